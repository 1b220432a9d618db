"""One typed, validated config for a run, loaded from TOML and overridable with ``--set``.

The tree is a set of frozen dataclasses. Every field carries its help text and its allowed
values in ``metadata``; :func:`from_dict` walks a TOML table against that tree and reports
the first unknown key, wrong type or out-of-range value with its dotted path and what is
allowed, as a :class:`~fl_privsim.core.errors.ConfigError`. :func:`to_toml` writes the fully
resolved config that every run folder keeps.

TOML has no null: "not set" is spelled ``""`` for paths and ``0`` for optional counts.
Relative paths (:data:`PATH_KEYS`) resolve as :mod:`fl_privsim.core.paths` says: against the
config file's folder when written in the file, against the current directory when given
with ``--set``; the returned config holds them absolute.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fl_privsim.core import paths, plugins
from fl_privsim.core.errors import ConfigError, did_you_mean
from fl_privsim.core.ray_address import check_ray_address

#: The path-valued keys of a run config (resolved by :func:`load`).
PATH_KEYS: tuple[str, ...] = ("data.root", "output.dir")


def _f(default: Any, help: str, **rules: Any) -> Any:
    """A dataclass field with help text and validation rules (min, max, choices).

    ``choices`` is a tuple, or a function returning the allowed values when asked (a plugin
    registry's names, :mod:`fl_privsim.core.plugins`: the one list of them); read it with
    :func:`choices_of`."""
    if isinstance(default, (list, dict)):
        return field(
            default_factory=lambda: type(default)(default), metadata={"help": help, **rules}
        )
    return field(default=default, metadata={"help": help, **rules})


#: The field helper under its public name, for the other commands' schemas (measure,
#: reproduction settings): ``config_field(default, help, min=..., max=..., choices=...)``.
config_field = _f


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: which dataset, where it lives and how it is split across clients."""

    name: str = _f("digits", "dataset", choices=plugins.DATASETS.names)
    root: str = _f("", 'folder holding the dataset files ("" = none; needed for all but digits)')
    download: bool = _f(
        False, "let torchvision download mnist/fashion_mnist/cifar10 (needs internet)"
    )
    image_size: int = _f(
        0, "resize images to this square size (0 = native; folder default 32)", min=0
    )
    test_fraction: float = _f(
        0.2, "held-out share when a dataset has no test split", min=0.05, max=0.9
    )
    max_examples: int = _f(0, "cap on training examples, deterministic subset (0 = all)", min=0)
    partition: str = _f("iid", "how examples are split over clients", choices=("iid", "dirichlet"))
    alpha: float = _f(0.5, "Dirichlet concentration for label skew (smaller = more skew)", min=1e-3)


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the architecture trained by the federation and seen by the attacks."""

    name: str = _f(
        "mlp",
        "architecture (resnet18_gn: resnet18 with GroupNorm, for dp_sgd; any + _vib: with a VIB "
        "head, for the vib defense)",
        choices=plugins.model_names,
    )
    init: str = _f(
        "default",
        "weight init: default (PyTorch), uniform (DLG's U(-0.5, 0.5)), normal, kaiming, xavier",
        choices=("default", "uniform", "normal", "kaiming", "xavier"),
    )


@dataclass(frozen=True)
class CentralDPConfig:
    """``[federation.central_dp]``: Flower's central DP wrappers (clipping + server noise)."""

    mode: str = _f(
        "off",
        "Flower central DP: off, server_fixed, client_fixed, server_adaptive, client_adaptive "
        "(client_*: clients clip with Flower's mods)",
        choices=("off", "server_fixed", "client_fixed", "server_adaptive", "client_adaptive"),
    )
    noise_multiplier: float = _f(
        1.0,
        "sigma: noise std on the mean update = sigma * C / num_sampled_clients "
        "(0 = clipping only, no DP guarantee)",
        min=0.0,
    )
    clipping_norm: float = _f(1.0, "C: L2 bound of each client's update (fixed modes)", min=0.0)
    initial_clipping_norm: float = _f(0.1, "first C of the adaptive modes (Andrew et al.)", min=0.0)
    target_clipped_quantile: float = _f(
        0.5, "share of updates the adaptive C aims to clip", min=0.0, max=1.0
    )
    clip_norm_lr: float = _f(0.2, "learning rate of the adaptive C (geometric update)", min=0.0)
    clipped_count_stddev: float = _f(
        0.0,
        "noise std of the clipped count (adaptive; 0 = Flower's default num_sampled_clients / 20)",
        min=0.0,
    )
    num_sampled_clients: int = _f(
        0, "clients the noise is calibrated for (0 = federation.clients_per_round)", min=0
    )
    delta: float = _f(1e-5, "delta of the reported (epsilon, delta)", min=0.0, max=1.0)
    amplification: bool = _f(
        True,
        "account privacy amplification by client sampling, "
        "q = clients_per_round / num_clients (false: every round a full Gaussian release)",
    )


@dataclass(frozen=True)
class SecureAggregationConfig:
    """``[federation.secure_aggregation]``: Flower's SecAgg+ (Bell et al., CCS 2020) on the
    workflow path (:mod:`strategies.secure_aggregation`); the server sees only the unmasked
    weighted mean of the surviving clients' models."""

    mode: str = _f(
        "off",
        "off: the server sees every update; secagg+: Flower's SecAgg+ masks them",
        choices=("off", "secagg+"),
    )
    num_shares: int = _f(
        0,
        "shares of each client's secrets (0 = every sampled client); > 2, odd or equal to "
        "federation.clients_per_round",
        min=0,
    )
    reconstruction_threshold: int = _f(
        0, "shares needed to unmask (0 = ceil(2/3 num_shares), at least 2, below num_shares)", min=0
    )
    clipping_range: float = _f(
        8.0, "C: each weighted model entry is clipped to [-C, C] before quantisation", min=1e-6
    )
    quantization_range: int = _f(2**22, "Q: quantisation levels over [-C, C] (step 2C/Q)", min=2)
    max_weight: float = _f(
        0.0,
        "W: the example count that gets full weight (0 = client.batch_size x "
        "client.local_steps, the most a client sends)",
        min=0.0,
    )
    timeout: float = _f(600.0, "seconds the server waits for each SecAgg+ stage's replies", min=1.0)
    save_aggregates: bool = _f(
        False,
        "debug: save each round's unmasked aggregate update (what the server saw) "
        "under secagg_aggregates/ in the run folder",
    )


@dataclass(frozen=True)
class FederationConfig:
    """``[federation]``: the simulated federation and its protocol."""

    num_clients: int = _f(
        10, "simulated clients (Flower SuperNodes), one data partition each", min=1, max=10000
    )
    clients_per_round: int = _f(
        10, "clients sampled each round (deterministic from the seed)", min=1
    )
    rounds: int = _f(5, "server rounds", min=1, max=100000)
    protocol: str = _f(
        "fedsgd",
        "fedsgd: one batch's gradient; fedavg: weight delta after local_steps",
        choices=("fedsgd", "fedavg"),
    )
    server_lr: float = _f(0.5, "server learning rate applied to the averaged update", min=0.0)
    num_cpus_per_client: float = _f(1.0, "Ray CPUs reserved per client actor", min=0.0)
    num_gpus_per_client: float = _f(
        0.0, "Ray GPUs per client actor (set > 0 to train clients on CUDA)", min=0.0, max=1.0
    )
    server_threads: int = _f(
        1,
        "torch CPU threads of the server (attacks, central evaluation); "
        "more threads than free cores slow small models down",
        min=1,
        max=256,
    )
    device: str = _f("auto", "where clients train and attacks run", choices=("auto", "cpu", "cuda"))
    ray_address: str = _f(
        "",
        'Ray cluster to join: "" = start a local one, "auto" (the one ray start recorded), '
        '"host:port" (its GCS) or "ray://host:port" (docs/scaling.md)',
    )
    fraction_evaluate: float = _f(
        1.0,
        "share of the clients that evaluation_clients names asked to evaluate each round (0 = off)",
        min=0.0,
        max=1.0,
    )
    evaluation_clients: str = _f(
        "sampled",
        "whom federated evaluation asks: sampled (the round's training sample, so evaluation "
        "costs what training does at any scale) or all (every client, Flower's meaning)",
        choices=("sampled", "all"),
    )
    failure_rate: float = _f(
        0.0,
        "injected client failures: each sampled client fails in a round with this probability, "
        "drawn from (seed, round, client); 0 = none, below 1 (docs/faults.md)",
        min=0.0,
        max=1.0,
    )
    failure_mode: str = _f(
        "crash",
        "how an injected failure shows: crash (the client raises), garbage (NaN or wrongly "
        "shaped arrays), hang (no reply before round_timeout), mixed (crash or garbage, drawn "
        "per client and round), or a plugin's failure (fl_privsim.failures)",
        choices=lambda: (*plugins.FAILURES.names(), "hang", "mixed"),
    )
    round_timeout: float = _f(
        3600.0,
        "seconds the server waits for a round's replies; a client that has not replied by then "
        "counts as failed (timed out) and the round goes on without it",
        min=1.0,
    )
    central_dp: CentralDPConfig = field(
        default_factory=CentralDPConfig, metadata={"help": "[federation.central_dp]"}
    )
    secure_aggregation: SecureAggregationConfig = field(
        default_factory=SecureAggregationConfig,
        metadata={"help": "[federation.secure_aggregation]"},
    )


@dataclass(frozen=True)
class ClientConfig:
    """``[client]``: local training of each client."""

    batch_size: int = _f(4, "examples per local batch", min=1)
    local_steps: int = _f(
        1, "local SGD steps (fedavg; fedsgd always sends one batch's gradient)", min=1
    )
    lr: float = _f(0.1, "client learning rate (fedavg local SGD)", min=0.0)
    loss: str = _f(
        "cross_entropy",
        "training loss: cross_entropy, or mse (squared error of the softmax against "
        "the one-hot label; Eloul et al.'s mixing loss choice, clients.defenses.losses)",
        choices=("cross_entropy", "mse"),
    )


@dataclass(frozen=True)
class TargetsConfig:
    """``[attacks.targets]``: which updates an attack is run on."""

    rounds: list[int] = _f([1], "rounds to attack", min=1)
    clients: list[int] = _f([0, 1], "client (partition) ids to attack", min=0)
    aggregate: bool = _f(False, "also attack the round's aggregate of all sampled clients")


@dataclass(frozen=True)
class AttackConfig:
    """``[[attacks]]``: one attack, its parameters and its targets."""

    name: str = _f("", "registered attack name (fl-privsim attacks lists them)")
    params: dict[str, Any] = _f({}, "keyword parameters of the attack")
    targets: TargetsConfig = field(default_factory=TargetsConfig, metadata={"help": "targets"})


@dataclass(frozen=True)
class DefenseConfig:
    """``[[defenses]]``: one client defense and its parameters (applied in list order)."""

    name: str = _f(
        "",
        "registered defense name (dp_sgd, dynamic_dp, pruning, signsgd, quantization, noise, "
        "identical_labels, or a plugin's)",
    )
    params: dict[str, Any] = _f({}, "keyword parameters of the defense")


@dataclass(frozen=True)
class AnalysisConfig:
    """``[[analyses]]``: one analyst-side measure run on attacked updates (fl_privsim.engine.analyses)."""

    name: str = _f(
        "", "analysis name (i2f: predicted reconstruction error of the client's defense noise)"
    )
    params: dict[str, Any] = _f(
        {},
        "keyword parameters (i2f: noise = auto|gaussian|laplace|none, scale, eps, "
        "mc_samples, exact, cg_max_iter)",
    )
    targets: TargetsConfig = field(
        default_factory=TargetsConfig, metadata={"help": "targets (clients only)"}
    )


@dataclass(frozen=True)
class ModificationTargetsConfig:
    """``[server.modifications.targets]``: when, and for whom, the server crafts the model."""

    rounds: list[int] = _f([1], "rounds in which the crafted model is sent", min=1)
    clients: list[int] = _f(
        [], "client ids that get the crafted model ([] = every sampled client)", min=0
    )


@dataclass(frozen=True)
class ModificationConfig:
    """``[[server.modifications]]``: one model modification of a malicious server."""

    name: str = _f("", "registered modification (imprint, trap_weights, fishing, or a plugin's)")
    params: dict[str, Any] = _f({}, "keyword parameters of the modification")
    targets: ModificationTargetsConfig = field(
        default_factory=ModificationTargetsConfig, metadata={"help": "targets"}
    )


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: the server's role (honest-but-curious observes; malicious also crafts
    the model it sends) and its modifications."""

    role: str = _f(
        "honest_but_curious",
        "honest_but_curious: trains as told and only looks at updates; "
        "malicious: may also change the model it sends ([[server.modifications]])",
        choices=("honest_but_curious", "malicious"),
    )
    modifications: list[ModificationConfig] = _f([], "[[server.modifications]], applied in order")
    public_examples: int = _f(
        1000,
        "records of the server's own data (a seeded subset of the test split, "
        "which no client trains on) that a modification may use to calibrate",
        min=1,
    )


def _default_attacks() -> list[AttackConfig]:
    return [AttackConfig(name=n) for n in ("analytic", "idlg", "inverting_gradients")]


@dataclass(frozen=True)
class ScoringConfig:
    """``[scoring]``: how the scorer judges reconstructions."""

    asr_mse_threshold: float = _f(
        0.01,
        "a sample counts as reconstructed (attack success rate, Wei & Liu) when the MSE of "
        "its matched reconstruction in [0, 1] pixels is at most this (0.01 = PSNR 20 dB)",
        min=0.0,
    )


@dataclass(frozen=True)
class OutputConfig:
    """``[output]``: where the run folder goes."""

    dir: str = _f("runs", "parent folder of run folders (runs/<UTC time>_<name>/)")
    save_images: bool = _f(True, "write attacks/round_XXX/client_YYY.png grids")


@dataclass(frozen=True)
class Config:
    """The whole run."""

    name: str = _f("default", "run name (used in the run folder name)")
    seed: int = _f(0, "root seed: same config and seed give the same metrics", min=0)
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "[data]"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "[model]"})
    federation: FederationConfig = field(
        default_factory=FederationConfig, metadata={"help": "[federation]"}
    )
    client: ClientConfig = field(default_factory=ClientConfig, metadata={"help": "[client]"})
    server: ServerConfig = field(default_factory=ServerConfig, metadata={"help": "[server]"})
    attacks: list[AttackConfig] = field(
        default_factory=_default_attacks, metadata={"help": "[[attacks]]"}
    )
    defenses: list[DefenseConfig] = field(default_factory=list, metadata={"help": "[[defenses]]"})
    analyses: list[AnalysisConfig] = field(default_factory=list, metadata={"help": "[[analyses]]"})
    scoring: ScoringConfig = field(default_factory=ScoringConfig, metadata={"help": "[scoring]"})
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "[output]"})


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, str(tp)
    )


def choices_of(meta: typing.Mapping[str, Any]) -> tuple[Any, ...] | None:
    """The allowed values of a field's metadata (``choices`` called when it is a function), or
    ``None`` when any value of its type is allowed."""
    choices = meta.get("choices")
    if choices is None:
        return None
    return tuple(choices() if callable(choices) else choices)


def _check_scalar(value: Any, tp: Any, path: str, meta: dict[str, Any]) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    ok = isinstance(value, tp) and not (tp in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    choices = choices_of(meta)
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{path}: {value!r} is not allowed{did_you_mean(value, choices)}; "
            f"allowed: {', '.join(map(str, choices))}"
        )
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{path}: {value!r} is below the minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{path}: {value!r} is above the maximum {meta['max']}")
    return value


def bind(cls: type, data: Any, path: str = "") -> Any:
    """Bind a TOML-shaped dict to the frozen dataclass schema ``cls``: every key known, every
    value of its field's type and within its rules (``choices``, ``min``, ``max``), nested
    tables and arrays of tables included. The one binder of the run, game and measure configs;
    a problem is one :class:`ConfigError` line naming the key (under ``path``, e.g.
    ``demixing.seed``) and what is allowed."""
    return _build(cls, data, path)


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"[{path}]" if path else "the top level"
        raise ConfigError(
            f"unknown key {unknown[0]!r} in {where}{did_you_mean(unknown[0], fields)}; "
            f"allowed: {', '.join(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = f"{path}.{name}" if path else name
        kwargs[name] = _convert(hints[name], value, sub, dict(fields[name].metadata))
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str, meta: dict[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(typing.cast(type, tp), value, path)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_meta = {} if dataclasses.is_dataclass(item_tp) else meta
        return [_convert(item_tp, v, f"{path}[{i}]", item_meta) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table, got {value!r}")
        return dict(value)
    return _check_scalar(value, tp, path, meta)


def _check_data_root(cfg: Config) -> None:
    """A dataset that needs files has ``data.root`` (a client checks it too)."""
    loader = plugins.DATASETS.get(cfg.data.name)  # what the dataset's loader declares
    if (
        getattr(loader, "needs_root", True)
        and not cfg.data.root
        and not (cfg.data.download and getattr(loader, "downloads", False))
    ):
        raise ConfigError(
            f"data.root: dataset {cfg.data.name!r} needs data.root (the folder holding its files)"
        )


def _check_tabular_model(cfg: Config) -> None:
    """Tabular data needs a dense model (a client checks it too)."""
    if cfg.data.name == "adult" and (
        cfg.model.name not in ("mlp", "linear") or cfg.data.image_size
    ):
        raise ConfigError(
            f"model.name: {cfg.model.name!r} cannot take tabular adult rows; allowed with "
            "data.name = 'adult': mlp, linear (and data.image_size = 0)"
        )


def _cross_check(cfg: Config) -> None:
    fed = cfg.federation
    if fed.clients_per_round > fed.num_clients:
        raise ConfigError(
            f"federation.clients_per_round: {fed.clients_per_round} exceeds federation.num_clients "
            f"({fed.num_clients})"
        )
    _check_data_root(cfg)
    for i, atk in enumerate(cfg.attacks):
        where = f"attacks[{i}]"
        if not atk.name:
            raise ConfigError(f"{where}.name: every [[attacks]] entry needs a name")
        _check_targets(where, atk.targets, fed)


def _check_targets(where: str, targets: Any, fed: FederationConfig) -> None:
    """The rounds and clients an attack or a modification targets exist in the federation."""
    for r in targets.rounds:
        if r > fed.rounds:
            raise ConfigError(
                f"{where}.targets.rounds: round {r} is after the last round ({fed.rounds})"
            )
    for c in targets.clients:
        if c >= fed.num_clients:
            raise ConfigError(
                f"{where}.targets.clients: client {c} does not exist "
                f"(clients are 0..{fed.num_clients - 1})"
            )


def _check_server(cfg: Config) -> None:
    """``[server]``: modifications only under the malicious role, known names and valid params,
    rounds and clients that exist."""
    srv, fed = cfg.server, cfg.federation
    if srv.modifications and srv.role != "malicious":
        raise ConfigError(
            f"server.modifications: {srv.modifications[0].name or 'a modification'!r} needs "
            f'server.role = "malicious" (an honest-but-curious server never changes the model)'
        )
    if not srv.modifications:
        return
    for i, mod in enumerate(srv.modifications):
        where = f"server.modifications[{i}]"
        if not mod.name:
            raise ConfigError(
                f"{where}.name: every [[server.modifications]] entry needs a name; known: "
                f"{', '.join(plugins.MODIFICATIONS.names())}"
            )
        try:
            plugins.MODIFICATIONS.create(mod.name, **mod.params)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if plugins.MODIFICATIONS.get(mod.name).needs_target_clients and not mod.targets.clients:
            raise ConfigError(
                f"{where}.targets.clients: {mod.name!r} needs the client(s) it singles out, "
                "e.g. targets = { clients = [3] }"
            )
        _check_targets(where, mod.targets, fed)


def _check_central_dp(cfg: Config) -> None:
    """Cross-field checks of ``[federation.central_dp]`` (one clear line per problem)."""
    dp, where = cfg.federation.central_dp, "federation.central_dp"
    if dp.mode == "off":
        return
    if not 0.0 < dp.delta < 1.0:
        raise ConfigError(f"{where}.delta: {dp.delta!r} must be strictly between 0 and 1")
    if dp.num_sampled_clients > cfg.federation.clients_per_round:
        raise ConfigError(
            f"{where}.num_sampled_clients: {dp.num_sampled_clients} exceeds federation.clients_per_round "
            f"({cfg.federation.clients_per_round}); the noise would be too small for the real sample"
        )
    if dp.mode.endswith("_fixed"):
        if dp.clipping_norm <= 0:
            raise ConfigError(f"{where}.clipping_norm: {dp.clipping_norm!r} must be positive")
        return
    if dp.initial_clipping_norm <= 0:
        raise ConfigError(
            f"{where}.initial_clipping_norm: {dp.initial_clipping_norm!r} must be positive"
        )
    if dp.clip_norm_lr <= 0:
        raise ConfigError(f"{where}.clip_norm_lr: {dp.clip_norm_lr!r} must be positive")
    m = dp.num_sampled_clients or cfg.federation.clients_per_round
    stddev = dp.clipped_count_stddev or m / 20
    if dp.noise_multiplier > 0 and dp.noise_multiplier >= 2 * stddev:
        raise ConfigError(
            f"{where}.noise_multiplier: {dp.noise_multiplier!r} must be below 2 * clipped_count_stddev "
            f"(= {2 * stddev:g}{'' if dp.clipped_count_stddev else f', default {m}/20'}) with adaptive "
            f"clipping; raise {where}.clipped_count_stddev"
        )


def _check_faults(cfg: Config) -> None:
    """``federation.failure_rate``: below 1, and only where failed replies are handled (the
    Message-API path with an honest server)."""
    rate = cfg.federation.failure_rate
    if rate >= 1.0:
        raise ConfigError(
            f"federation.failure_rate: {rate!r} must be below 1 (every client would fail)"
        )
    if rate == 0.0:
        return
    if cfg.federation.secure_aggregation.mode != "off":
        raise ConfigError(
            "federation.failure_rate: injected failures are not supported with "
            "federation.secure_aggregation (SecAgg+ handles dropouts in its own protocol); "
            'set failure_rate = 0 or secure_aggregation.mode = "off"'
        )
    if cfg.server.role == "malicious":
        raise ConfigError(
            "federation.failure_rate: injected failures are not supported with server.role = "
            '"malicious"; set failure_rate = 0 or role = "honest"'
        )


def _check_secure_aggregation(cfg: Config) -> None:
    """``[federation.secure_aggregation]`` against the rest (its check hook:
    :func:`fl_privsim.engine.secure_aggregation.check_config`)."""
    if cfg.federation.secure_aggregation.mode != "off":
        plugins.CONFIG_CHECKS.get("secure_aggregation")(cfg)


def _check_defenses(cfg: Config) -> None:
    """``[[defenses]]`` and ``client.loss`` (hook: :func:`clients.defenses.check_config`)."""
    plugins.CONFIG_CHECKS.get("defenses")(cfg)


def _check_analyses(cfg: Config) -> None:
    """``[[analyses]]`` (hook: :func:`fl_privsim.engine.analyses.check_config`)."""
    if cfg.analyses:
        plugins.CONFIG_CHECKS.get("analyses")(cfg)


def _check_inference_attacks(cfg: Config) -> None:
    """Tabular data needs a dense model; the inference attacks' params must fit the run's data
    and model (hook: :func:`adversaries.inference.federated.check_run_config`)."""
    _check_tabular_model(cfg)
    if any(
        a.name in ("attribute_inference", "property_inference", "membership_inference")
        for a in cfg.attacks
    ):
        plugins.CONFIG_CHECKS.get("inference_attacks")(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a TOML-shaped dict."""
    cfg: Config = _build(Config, data, "")
    _cross_check(cfg)
    _check_server(cfg)
    _check_central_dp(cfg)
    _check_faults(cfg)
    check_ray_address(cfg.federation.ray_address)
    _check_secure_aggregation(cfg)
    _check_defenses(cfg)
    _check_analyses(cfg)
    _check_inference_attacks(cfg)
    return cfg


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as a TOML value (``3``, ``0.1``, ``true``, ``[1, 2]``, ``"x"``);
    anything that is not valid TOML is taken as a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``KEY=VALUE`` (``federation.rounds=3``, ``attacks.0.params.iterations=50``)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. federation.rounds=3")
    key, raw = assignment.split("=", 1)
    if not [p for p in key.strip().split(".") if p]:
        raise ConfigError(f"--set {assignment!r}: empty key")
    set_value(data, key, parse_value(raw.strip()))


def add_set_option(
    parser: Any,
    help: str = "override one config key (repeatable)",
    metavar: str = "KEY=VALUE",
) -> None:
    """Add the ``--set KEY=VALUE`` option (repeatable; read by :func:`apply_override`) to an
    ``argparse`` parser: every command spells it the same way."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar=metavar, help=help
    )


def set_value(data: dict[str, Any], key: str, value: Any, *, label: str = "--set") -> None:
    """Set the dotted ``key`` (``client.batch_size``, ``attacks.0.params.iterations``) of a
    TOML-shaped dict to an already typed ``value``, creating missing tables; a list index out of
    range or a step through a scalar is one :class:`ConfigError` that starts with ``label``
    (the ``--set`` parser and a sweep's grid share this)."""
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"{label} {key!r}: empty key")
    key = ".".join(parts)
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"{label} {key}: {part!r} is not an index of a list of {len(node)}"
                )
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
        else:
            raise ConfigError(f"{label} {key}: {'.'.join(parts[:i])} is not a table")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{label} {key}: {last!r} is not an index of a list of {len(node)}")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{label} {key}: {'.'.join(parts[:-1])} is not a table")


def to_dict(cfg: Config) -> dict[str, Any]:
    """The fully resolved config as a plain dict."""
    return dataclasses.asdict(cfg)


def default_dict() -> dict[str, Any]:
    """The defaults as a dict (the base that a TOML file and ``--set`` modify)."""
    return to_dict(Config())


def read_toml_file(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The TOML document at ``path``; a missing, unreadable or invalid file is one
    :class:`ConfigError` naming ``what`` and the path (shared by every command's config)."""
    p = paths.absolute(path)
    if not p.is_file():
        raise ConfigError(
            paths.missing_path_message(
                what, p, original=path, problem="is not a file" if p.exists() else "does not exist"
            )
        )
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {str(p)!r} is not valid TOML: {exc}") from None


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (or the defaults), apply ``--set`` overrides, validate.

    A TOML file only needs the keys it changes; ``[[attacks]]`` in the file replaces the
    default list of attacks. Relative :data:`PATH_KEYS` in the file resolve against its
    folder, those of ``--set`` against the current directory (:mod:`fl_privsim.core.paths`).
    """
    data: dict[str, Any] = read_toml_file(path) if path else {}
    if "sweep" in data:
        raise ConfigError(
            f"config file {str(path)!r} has a [sweep] table: run it with `fl-privsim sweep "
            f"{path}` (fl-privsim run takes a config of one run)"
        )
    if path:
        paths.resolve_keys(data, PATH_KEYS, paths.absolute(path).parent)
    if (
        overrides
        and "attacks" not in data
        and any(o.strip().startswith("attacks") for o in overrides)
    ):
        data["attacks"] = default_dict()["attacks"]
    for assignment in overrides:
        apply_override(data, assignment)
        paths.resolve_keys(data, PATH_KEYS, under=override_key(assignment))
    return from_dict(data)


def override_key(assignment: str) -> str:
    """The dotted key of one ``--set KEY=VALUE`` (``attacks.0.name``)."""
    return ".".join(p for p in assignment.split("=", 1)[0].strip().split(".") if p)


def loads(text: str) -> Config:
    """Parse and validate a TOML string (as written by :func:`to_toml`)."""
    try:
        return from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config text is not valid TOML: {exc}") from None


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML text (what ``config.toml`` in a run folder holds)."""
    return tomli_w.dumps(to_dict(cfg))


def describe() -> str:
    """Every config key with its default, allowed values and help, for ``--help``."""
    lines: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(tp):
                walk(typing.cast(type, tp), f"{key}.")
                continue
            if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
                walk(typing.get_args(tp)[0], f"{key}[i].")
                continue
            meta = f.metadata
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]  # MISSING default: factory set
            allowed = ""
            choices = choices_of(meta)
            if choices is not None:
                allowed = " {" + "|".join(choices) + "}"
            elif "min" in meta or "max" in meta:
                allowed = f" [{meta.get('min', '')}..{meta.get('max', '')}]"
            lines.append(f"  {key:<34} {meta.get('help', '')}{allowed} (default {default!r})")

    walk(Config, "")
    return "\n".join(lines)

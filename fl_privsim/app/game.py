"""``fl-privsim game``: play one inference game offline and write a run folder.

Config (TOML; every key optional, ``--set`` overrides any)::

    seed = 0
    name = "game"
    [game]      kind, trials, shadow_trials, batch_size, shadow_batch_size, clients_per_aggregate,
                adversary (static|adaptive), attack_model (mlp|random_forest), features, ...
    [data]      name (adult|utkface|digits|cifar10_npz), root, sensitive (adult: sex|race; utkface:
                gender|race), property_class, image_size (utkface), ...
    [model]     name, width (mlp), init, pretrain_steps
    [[defenses]] name, params (as in ``fl-privsim run``)

The run folder holds ``config.toml`` (resolved), ``summary.json`` (``auc``, ``auc_ci``,
``accuracy``, ``advantage``, ``tpr_at_1pct_fpr`` and more, with bootstrap CIs), ``roc.png``
and ``scores.csv`` (trial, secret, score). Static adversary: shadow updates without the
defense; adaptive: with the same defense and parameters (Li et al., arXiv:2408.16913).

Adversary uncertainties beyond batch size and auxiliary shift: ``model_mismatch_steps`` = k
(the adversary computes its shadow updates, and its target gradients, at the global model k
SGD steps of the pretraining trajectory before the one the clients used: an attack trained at
an earlier round) and ``rounds`` = R (the same client batches are released at R successive
global models, ``round_steps`` SGD steps apart; the adversary holds one meta-classifier per
round and combines them with ``round_combine``: ``mean_logit``, as Li et al., or ``concat``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adversaries.inference import Game, LossBaseline, MetaClassifier, Pool, Release
from adversaries.inference.adversary import MultiRound
from adversaries.inference.audit import write_audit
from adversaries.inference.datasets import load_game_data
from adversaries.inference.metrics import game_metrics, save_roc_plot
from clients.defenses import batch_sampler, build_defenses
from clients.defenses.vib import VIBHead
from fl_privsim.core import paths, plugins
from fl_privsim.core.config import (
    DefenseConfig,
    _f,
    add_set_option,
    apply_override,
    bind,
    override_key,
    read_toml_file,
)
from fl_privsim.core.devices import resolve_device
from fl_privsim.core.errors import ConfigError, DataError
from fl_privsim.core.models import build_model, init_weights, mlp
from fl_privsim.core.progress import configure_logging
from fl_privsim.core.results import RunFolder, atomic_write_text, make_run_dir
from fl_privsim.core.seeding import numpy_rng, seed_int, torch_generator

logger = logging.getLogger(__name__)

__all__ = ["GameRunConfig", "add_parser", "cmd_game", "load_game_config", "run_game"]


@dataclass(frozen=True)
class GameSection:
    """``[game]``: which game, how many trials, the aggregation and the adversary."""

    kind: str = _f(
        "property",
        "game",
        choices=plugins.GAMES.names,
    )
    trials: int = _f(1000, "challenge trials (secrets drawn by the challenger)", min=20)
    shadow_trials: int = _f(
        1000, "shadow trials the adversary trains on (its auxiliary pool)", min=20
    )
    batch_size: int = _f(8, "records per client batch", min=1)
    shadow_batch_size: int = _f(0, "the adversary's batch size (0 = the same: no mismatch)", min=0)
    clients_per_aggregate: int = _f(1, "clients averaged into the released aggregate", min=1)
    adversary: str = _f(
        "adaptive",
        "adaptive: shadow updates with the same defense; static: without",
        choices=("static", "adaptive"),
    )
    attack_model: str = _f("mlp", "meta-classifier", choices=("mlp", "random_forest"))
    features: str = _f(
        "last",
        "update features: last layer, all layers, or only the alignment with the "
        "target's gradients (attribute, membership, user)",
        choices=("last", "all", "alignment"),
    )
    alignment: bool = _f(
        True, "add the update's alignment with the target's gradients (when known)"
    )
    protocol: str = _f("fedsgd", "client update", choices=("fedsgd", "fedavg"))
    lr: float = _f(0.1, "local learning rate (fedavg; loss baseline step)", min=0.0)
    local_steps: int = _f(1, "fedavg local steps on the client's batch", min=1)
    alpha0: float = _f(0.25, "distributional: share of P under s = 0", min=0.0, max=1.0)
    alpha1: float = _f(0.5, "distributional: share of P under s = 1", min=0.0, max=1.0)
    user_records: int = _f(8, "user: records of the target user", min=1)
    aux_attribute_rate: float = _f(
        0.0, "auxiliary shift: share of a = 1 in the aux pool (0 = natural)", min=0.0, max=0.99
    )
    exact: bool = _f(False, "force one local_update call per client and trial (no vectorised path)")
    device: str = _f(
        "auto",
        "where the clients' per-sample gradients are computed: auto (CUDA when a GPU is "
        "visible), cpu or cuda",
        choices=("auto", "cpu", "cuda"),
    )
    bootstrap: int = _f(1000, "bootstrap resamples of the CIs", min=10)
    rounds: int = _f(
        1,
        "observed rounds R: the same batches released at R successive global models",
        min=1,
        max=20,
    )
    round_steps: int = _f(20, "SGD steps of the global model between two observed rounds", min=1)
    round_combine: str = _f(
        "mean_logit",
        "multi-round: average the per-round classifiers' logits, or one "
        "classifier on the concatenated features",
        choices=("mean_logit", "concat"),
    )
    model_mismatch_steps: int = _f(
        0,
        "the adversary's model is this many SGD steps older than the clients' (0 = the same model)",
        min=0,
    )
    audit: bool = _f(
        False,
        "canary auditing of dp_sgd (attribute game, adult): empirical epsilon lower bound "
        "for natural records and a crafted canary beside the accountant's epsilon",
    )
    canary_steps: int = _f(100, "audit: gradient-ascent steps of the canary crafting", min=1)
    audit_alpha: float = _f(
        0.05, "audit: 1 - confidence of the Clopper-Pearson intervals", min=1e-6, max=0.5
    )


@dataclass(frozen=True)
class DataSection:
    """``[data]``: the dataset of the pools."""

    name: str = _f("digits", "dataset", choices=("adult", "utkface", "digits", "cifar10_npz"))
    root: str = _f(
        "",
        "folder of the files (adult: adult.data.gz/adult.test.gz; adult and utkface default to "
        "adult/ and utkface/ in the shared data folder: $FL_PRIVSIM_SHARED_DATA, else "
        "../shared/data beside the repository)",
    )
    sensitive: str = _f(
        "sex",
        "sensitive attribute (attribute = the secret, property P = a = 1): adult sex|race, "
        "utkface gender|race",
        choices=("sex", "race", "gender"),
    )
    image_size: int = _f(24, "utkface: side of the resized faces", min=8, max=200)
    property_class: int = _f(0, "digits/cifar10_npz: property P = label is this class", min=0)
    pool_size: int = _f(4000, "challenger pool size (at most half the training rows)", min=10)
    aux_size: int = _f(4000, "adversary's auxiliary pool size (disjoint)", min=10)


@dataclass(frozen=True)
class ModelSection:
    """``[model]``: the global model θ at which the game is played."""

    name: str = _f(
        "mlp",
        "architecture (mlp_vib: the mlp with a VIB head, for the vib defense)",
        choices=("mlp", "mlp_vib", "linear", "lenet", "convnet", "cnn6"),
    )
    width: int = _f(32, "mlp hidden width", min=1)
    init: str = _f(
        "default", "weight init", choices=("default", "uniform", "normal", "kaiming", "xavier")
    )
    pretrain_steps: int = _f(
        200, "SGD steps (batch 64, lr 0.1) on the held-out split before the game", min=0
    )


@dataclass(frozen=True)
class GameRunConfig:
    """The whole ``fl-privsim game`` config."""

    seed: int = _f(0, "root seed")
    name: str = _f("game", "run name (folder suffix)")
    output_dir: str = _f("runs", "parent of run folders")
    game: GameSection = field(default_factory=GameSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    defenses: list[DefenseConfig] = field(default_factory=list)


def load_game_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> GameRunConfig:
    """Load a game config file (or the defaults), apply ``--set`` overrides, validate.

    Relative ``data.root`` and ``output_dir`` resolve against the file's folder when written in
    the file, against the current directory when given with ``--set`` (:mod:`fl_privsim.core.paths`);
    an unset root of adult or utkface becomes its folder in the shared data folder when that
    exists (:func:`_default_root`)."""
    data: dict[str, Any] = read_toml_file(path) if path else {}
    if path:
        paths.resolve_keys(data, _PATH_KEYS, paths.absolute(path).parent)
    for assignment in overrides:
        apply_override(data, assignment)
        paths.resolve_keys(data, _PATH_KEYS, under=override_key(assignment))
    cfg: GameRunConfig = bind(GameRunConfig, data)
    default_root = "" if cfg.data.root else _default_root(cfg.data.name)
    if default_root:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=default_root))
    if cfg.game.kind == "attribute" and cfg.data.name not in ("adult", "utkface"):
        raise ConfigError(
            "game.kind = 'attribute' needs data.name = 'adult' or 'utkface' (a sensitive attribute); "
            "allowed with digits/cifar10_npz: property, distributional, user, membership"
        )
    allowed_sensitive = {"adult": ("sex", "race"), "utkface": ("gender", "race")}.get(cfg.data.name)
    if allowed_sensitive and cfg.data.sensitive not in allowed_sensitive:
        raise ConfigError(
            f"data.sensitive: {cfg.data.sensitive!r} is not allowed for {cfg.data.name}; allowed: "
            f"{', '.join(allowed_sensitive)}"
        )
    knows_target = cfg.game.kind in ("membership", "user") or (
        cfg.game.kind == "attribute" and cfg.data.name == "adult"
    )
    if cfg.game.features == "alignment" and not knows_target:
        raise ConfigError(
            "game.features = 'alignment' needs a target the adversary knows (attribute on adult, "
            "membership, user); use 'last' or 'all' here"
        )
    if cfg.game.model_mismatch_steps > cfg.model.pretrain_steps:
        raise ConfigError(
            f"game.model_mismatch_steps: {cfg.game.model_mismatch_steps} exceeds "
            f"model.pretrain_steps ({cfg.model.pretrain_steps}); the adversary's model cannot "
            "precede the initialisation"
        )
    if cfg.game.audit and (cfg.game.rounds > 1 or cfg.game.model_mismatch_steps > 0):
        raise ConfigError(
            "game.audit = true plays one round at the clients' model: set game.rounds = 1 and "
            "game.model_mismatch_steps = 0"
        )
    if cfg.game.audit and (
        cfg.game.kind != "attribute"
        or cfg.game.protocol != "fedsgd"
        or not any(dc.name == "dp_sgd" for dc in cfg.defenses)
    ):
        raise ConfigError(
            "game.audit = true needs game.kind = 'attribute', game.protocol = 'fedsgd' and a "
            'dp_sgd defense ([[defenses]] name = "dp_sgd")'
        )

    if batch_sampler(build_defenses(cfg.defenses)) is not None:
        raise ConfigError(
            "defenses: a game builds its own batches; sampler defenses (identical_labels, "
            "dp_sgd with poisson = true) are not supported in games"
        )
    return cfg


#: The files that make ``<shared data>/<name>`` the default ``data.root`` of a game.
_SHARED_FILES = {"adult": "adult.data.gz", "utkface": "utkface_subset_1500.zip"}
_PATH_KEYS = ("data.root", "output_dir")


def _default_root(name: str) -> str:
    """The one rule for an unset ``data.root`` of adult and utkface: ``<name>/`` in
    :func:`fl_privsim.core.paths.shared_data_dir` when it holds the dataset's files, else ``""``."""
    if name not in _SHARED_FILES:
        return ""
    cand = paths.shared_data_dir() / name
    return str(cand) if (cand / _SHARED_FILES[name]).is_file() else ""


def _adult_root(root: str) -> Path:
    if root:
        return Path(root).expanduser()
    default = _default_root("adult")
    if default:
        return Path(default)
    shared = paths.shared_data_dir() / "adult"
    raise DataError(
        "adult: data.root is not set and "
        + paths.missing_path_message(
            "",
            shared,
            contains=("adult.data.gz", "adult.test.gz"),
            problem="does not hold adult.data.gz" if shared.is_dir() else "does not exist",
            expect="set data.root to the folder holding adult.data.gz and adult.test.gz (UCI Adult), or "
            "FL_PRIVSIM_SHARED_DATA to the shared data folder holding adult/",
        ).lstrip()
    )


def _build_model(
    cfg: GameRunConfig, input_shape: tuple[int, int, int], num_classes: int
) -> nn.Module:

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_int(cfg.seed, "model_init"))
        if cfg.model.name in ("mlp", "mlp_vib"):
            model = init_weights(
                mlp(input_shape, num_classes, width=cfg.model.width),
                cfg.model.init,
                torch_generator(cfg.seed, "model_init"),
            )
            if cfg.model.name == "mlp_vib":  # last Linear (h -> logits) replaced by a VIB head
                model[-1] = VIBHead(model[-1].in_features, num_classes)
        else:
            model = build_model(
                cfg.model.name,
                input_shape,
                num_classes,
                init=cfg.model.init,
                generator=torch_generator(cfg.seed, "model_init"),
            )
    return model


def _trajectory(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, checkpoints: list[int], seed: int
) -> dict[int, nn.Module]:
    """The global models θ of the game: copies of ``model`` after each of ``checkpoints``
    steps of one seeded plain-SGD run (batch 64, lr 0.1) on the held-out split (gradients
    enabled on every copy)."""

    gen = torch_generator(seed, "batch", 999)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    out: dict[int, nn.Module] = {}
    for step in range(max(checkpoints) + 1):
        if step in checkpoints:
            out[step] = copy.deepcopy(model)
        if step == max(checkpoints):
            break
        idx = torch.randint(0, int(y.shape[0]), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    for m in out.values():
        for p in m.parameters():
            p.requires_grad_(True)
    return out


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run_game(cfg: GameRunConfig, *, out: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Play the configured game; returns the run folder and the summary written there."""
    import tomli_w

    t0 = time.perf_counter()
    g, d = cfg.game, cfg.data
    device = resolve_device(g.device, "game.device")
    root = _adult_root(d.root) if d.name == "adult" else (d.root or None)
    data = load_game_data(
        d.name,
        root=root,
        sensitive=d.sensitive,
        property_class=d.property_class,
        pool_size=d.pool_size,
        aux_size=d.aux_size,
        aux_attribute_rate=g.aux_attribute_rate,
        seed=cfg.seed,
        image_size=d.image_size,
    )
    # global model of each observed round (clients) and the adversary's (possibly older) model
    client_steps = [cfg.model.pretrain_steps + r * g.round_steps for r in range(g.rounds)]
    adv_steps = [st - g.model_mismatch_steps for st in client_steps]
    snaps = _trajectory(
        _build_model(cfg, data.input_shape, data.num_classes),
        data.x_pre,
        data.y_pre,
        sorted(set(client_steps + adv_steps)),
        cfg.seed,
    )
    model = snaps[client_steps[0]]
    acc = _accuracy(model, data.x_pre, data.y_pre)

    def releases(steps: list[int], adaptive: bool, seed: int) -> list[Release]:
        return [
            Release(
                snaps[st],
                protocol=g.protocol,
                lr=g.lr,
                local_steps=g.local_steps,
                defenses=build_defenses(cfg.defenses) if adaptive else [],
                seed=seed,
                force_exact=g.exact,
                device=device.type,
            )
            for st in steps
        ]

    client_releases = releases(client_steps, True, cfg.seed)
    shadow_releases = releases(adv_steps, g.adversary == "adaptive", cfg.seed + 1)
    release = client_releases[0]
    run_dir = make_run_dir(cfg.output_dir, cfg.name, out)
    atomic_write_text(run_dir / "config.toml", tomli_w.dumps(dataclasses.asdict(cfg)))
    t_setup = time.perf_counter()

    def game_for(batch: int) -> Game:
        return Game(
            g.kind,
            batch_size=batch,
            clients_per_aggregate=g.clients_per_aggregate,
            alpha0=g.alpha0,
            alpha1=g.alpha1,
            user_records=g.user_records,
            attr_column=data.attr_column,
        )

    aux = Pool(data.x_aux, data.y_aux, data.a_aux)
    pool = Pool(data.x_pool, data.y_pool, data.a_pool)
    if g.audit:
        return run_dir, write_audit(
            cfg, run_dir, model, release, pool, aux, data.attr_column, acc, t0
        )
    shadow_obs, shadow_secrets = game_for(g.shadow_batch_size or g.batch_size).play_rounds(
        aux, shadow_releases, g.shadow_trials, numpy_rng(cfg.seed, "attack", 1), stream=1
    )
    t_shadow = time.perf_counter()
    obs, secrets = game_for(g.batch_size).play_rounds(
        pool, client_releases, g.trials, numpy_rng(cfg.seed, "attack", 2), stream=0
    )
    t_challenge = time.perf_counter()
    per_round = [
        MetaClassifier(
            snaps[st],
            attack_model=g.attack_model,
            features=g.features,
            attr_column=data.attr_column if g.kind == "attribute" else None,
            alignment=g.alignment,
            seed=cfg.seed,
        )
        for st in adv_steps
    ]
    if g.rounds == 1:
        scores = per_round[0].fit(shadow_obs[0], shadow_secrets).score(obs[0])
    else:
        scores = (
            MultiRound(per_round, combine=g.round_combine)
            .fit(shadow_obs, shadow_secrets)
            .score(obs)
        )
    obs = obs[0]  # the first round's observations (membership loss baseline)
    t_attack = time.perf_counter()
    summary: dict[str, Any] = {
        "game": g.kind,
        "dataset": d.name,
        "attribute": data.attribute,
        "adversary": g.adversary,
        "attack_model": g.attack_model,
        "batch_size": g.batch_size,
        "clients_per_aggregate": g.clients_per_aggregate,
        "rounds": g.rounds,
        "model_mismatch_steps": g.model_mismatch_steps,
        "aggregation_size": g.batch_size * g.clients_per_aggregate,
        "defenses": [dc.name for dc in cfg.defenses],
        "release_path": "vectorised" if release.fast else "exact",
        "device": device.type if release.fast else "cpu",
        "model_accuracy": acc,
        "prior_positive_rate": float(data.a_pool.float().mean()),
        **game_metrics(secrets, scores, n_boot=g.bootstrap, seed=cfg.seed),
    }
    if g.kind == "membership":
        base = LossBaseline(model, lr=g.lr).score(obs)
        summary["loss_baseline"] = game_metrics(secrets, base, n_boot=g.bootstrap, seed=cfg.seed)
    summary["seconds"] = {
        "setup": t_setup - t0,
        "shadow_updates": t_shadow - t_setup,
        "challenge_updates": t_challenge - t_shadow,
        "attack": t_attack - t_challenge,
        "total": time.perf_counter() - t0,
    }
    save_roc_plot(
        run_dir / "roc.png",
        secrets,
        scores,
        title=f"{g.kind} inference ({d.name}, |B| = {g.batch_size}×{g.clients_per_aggregate})",
    )
    atomic_write_text(
        run_dir / "scores.csv",
        "trial,secret,score\n"
        + "".join(
            f"{i},{int(s)},{float(x):.6g}\n"
            for i, (s, x) in enumerate(zip(secrets, scores, strict=True))
        ),
    )

    RunFolder(run_dir).write_summary(summary)
    return run_dir, summary


def add_parser(sub: Any) -> None:
    """Register ``fl-privsim game`` on the CLI's subparsers."""
    p = sub.add_parser(
        "game",
        help="play one inference game (attribute, property, distributional, user, "
        "membership) offline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config", nargs="?", help="TOML config file (default: the property game on digits)"
    )
    add_set_option(p, "override one config key (repeatable), e.g. game.batch_size=64")
    p.add_argument("--out", help="run folder to create (default: <output_dir>/<UTC time>_<name>)")
    p.add_argument("--verbose", action="store_true", help="log progress")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the summary (summary.json plus run_dir) as JSON instead of the headline numbers",
    )


def cmd_game(args: argparse.Namespace) -> int:
    """The ``game`` subcommand: run it and print the headline numbers (``--json``: the summary)."""
    cfg = load_game_config(args.config, args.overrides)
    configure_logging(args.verbose)
    run_dir, s = run_game(cfg, out=args.out)
    if getattr(args, "json", False):
        import json

        saved = json.loads(
            (Path(run_dir) / "summary.json").read_text(encoding="utf-8")
        )  # as written
        print(json.dumps({**saved, "run_dir": str(run_dir)}, indent=2))
        return 0
    print(
        f"{s['game']} inference on {s['dataset']} ({s['attribute']}), |B| = {s['batch_size']} x "
        f"{s['clients_per_aggregate']}, {s['adversary']} {s['attack_model']} adversary:"
    )
    print(
        f"  AUC {s['auc']:.3f} [{s['auc_ci'][0]:.3f}, {s['auc_ci'][1]:.3f}]  accuracy {s['accuracy']:.3f}  "
        f"advantage {s['advantage']:.3f}  TPR@1%FPR {s['tpr_at_1pct_fpr']:.3f}"
    )
    if "loss_baseline" in s:
        print(f"  loss baseline AUC {s['loss_baseline']['auc']:.3f}")
    if "epsilon_lower_bound" in s:
        print(
            f"  audit: epsilon lower bound {s['epsilon_lower_bound']:.3f} (canary), "
            f"{s['natural']['epsilon_lower_bound']:.3f} (natural records); accountant epsilon {s['epsilon']:.3f}"
        )
    print(f"run folder: {run_dir}")
    return 0

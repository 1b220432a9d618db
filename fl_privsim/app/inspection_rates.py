"""Detection and false-alarm rates of the client-side model inspection (pure torch; no Flower, Ray).

:mod:`clients.defenses.model_inspection` refuses models whose weights carry the structure of a
malicious modification (imprint: Fowl et al., ICLR 2022; trap weights: Boenisch et al.,
EuroS&P 2023; fishing: Wen et al., ICML 2022), the detection arXiv 2503.11514 argues is easy.
A detector is only worth its false alarms, and honest models *drift* during training, so both
rates are measured here on models of real federated training:

- **False alarms**: honest models are trained for ``rounds`` rounds of FedAvg (or FedSGD) with
  :func:`clients.local_update.local_update` on real data (an iid partition among
  ``num_clients`` clients, ``clients_per_round`` sampled per round), and the global model a
  client would receive is inspected at every round, from the fresh initialisation (round 0)
  to the last. Rate = alarmed models / inspected models, with its one-sided 95 %
  Clopper-Pearson upper bound (0 alarms in N models is not a rate of 0).
- **Detection**: every registered modification (:data:`adversaries.malicious.MODIFICATIONS`)
  in each of its variants (:data:`VARIANTS`) is crafted on the honest models of ``stages``
  (rounds of the same trajectories) with a :class:`~adversaries.malicious.ServerView` whose
  public data is a seeded subset of the test split; rate = detected crafts / crafts, with its
  95 % lower bound. A modification whose ``check_model`` refuses an architecture is
  reported as not applicable there.

:func:`measure` does both in one pass over the trajectories; :func:`main` prints the result as
JSON (``python -m fl_privsim.app.inspection_rates --help``). The defaults (digits, five small
architectures, two seeds, 20 rounds, 13 modification variants crafted at rounds 0/10/20) take
about 45 s on one CPU thread (the CLI's ``--threads 1`` default; torch's intra-op threads only
slow these small models down, several-fold on a busy machine; :func:`measure` leaves the thread
setting alone). CIFAR-10 from ``cifar10_exact_subset.npz``: ``--dataset cifar10_npz --root
../shared/data/cifar10``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import beta
from torch import nn

from adversaries.malicious import MODIFICATIONS, ServerView
from clients.defenses.model_inspection import CHECKS, LayerStats, ModelInspector
from clients.local_update import local_update
from fl_privsim.core.data import ImageData, load_dataset
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.models import build_model
from fl_privsim.core.partition import partition, sample_batch
from fl_privsim.core.seeding import seed_int, torch_generator

log = logging.getLogger(__name__)

#: Architectures trained by default (every model of :mod:`fl_privsim.core.models` but the ResNets,
#: which are slow on a CPU; pass ``models=("resnet18", ...)`` to include them).
DEFAULT_MODELS: tuple[str, ...] = ("mlp", "linear", "lenet", "convnet", "cnn6")

#: Parameter sets crafted per modification; a registered modification not listed here is
#: crafted with its defaults only.
VARIANTS: dict[str, tuple[dict[str, Any], ...]] = {
    "imprint": (
        {"variant": "cumulative", "measurement": "brightness"},
        {"variant": "cumulative", "measurement": "random"},
        {"variant": "cumulative", "measurement": "dct"},
        {"variant": "sparse", "measurement": "brightness"},
        {"variant": "sparse", "measurement": "random"},
        {"variant": "one_shot", "measurement": "brightness"},
        {"variant": "one_shot", "measurement": "random"},
    ),
    "trap_weights": ({"calibrate": True}, {"calibrate": False}),
    "fishing": ({"mode": "class"}, {"mode": "feature"}),
}


@dataclass(frozen=True)
class Training:
    """The honest federated training whose models are inspected.

    Attributes
    ----------
    protocol:
        ``"fedavg"`` (``local_steps`` SGD steps per client, the global model moves by the mean
        delta) or ``"fedsgd"`` (one batch gradient per client, the global model takes one SGD
        step of ``lr`` on their mean).
    rounds:
        Rounds trained; the model is inspected at rounds 0..rounds.
    num_clients, clients_per_round:
        Size of the iid partition and clients sampled per round.
    local_steps, batch_size, lr:
        Local SGD steps (FedAvg), batch size and learning rate.
    """

    protocol: str = "fedavg"
    rounds: int = 20
    num_clients: int = 10
    clients_per_round: int = 2
    local_steps: int = 5
    batch_size: int = 32
    lr: float = 0.1

    def __post_init__(self) -> None:
        if self.protocol not in ("fedavg", "fedsgd"):
            raise ConfigError(f"protocol must be 'fedavg' or 'fedsgd', got {self.protocol!r}")
        for key in ("rounds", "num_clients", "clients_per_round", "local_steps", "batch_size"):
            value = getattr(self, key)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if key == "rounds" else 1)
            ):
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"clients_per_round ({self.clients_per_round}) exceeds num_clients "
                f"({self.num_clients})"
            )
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a number > 0, got {self.lr!r}")


def _honest_model(name: str, data: ImageData, seed: int) -> nn.Module:
    """Model ``name`` with PyTorch's default initialisation drawn from ``(seed, "model_init")``
    (the global RNG is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_int(seed, "model_init"))
        return build_model(name, data.input_shape, data.num_classes)


def honest_trajectory(
    name: str,
    data: ImageData,
    *,
    seed: int,
    training: Training = Training(),
) -> Iterator[tuple[int, nn.Module]]:
    """Yield ``(round, global model)`` for rounds 0..``training.rounds`` of honest federated
    training of model ``name`` on ``data`` (the yielded model is the live global model: copy
    it to keep it). All draws derive from ``seed`` (partition, client sampling, batches)."""
    t = training
    labels = data.train_y.numpy()
    parts = partition(labels, t.num_clients, seed=seed)
    x_all = data.normalize(data.images("train", slice(None)))
    y_all = data.labels("train", slice(None))
    model = _honest_model(name, data, seed)
    yield 0, model
    sampler = torch_generator(seed, "sampling")
    for rnd in range(1, t.rounds + 1):
        chosen = torch.randperm(t.num_clients, generator=sampler)[: t.clients_per_round].tolist()
        updates: list[dict[str, torch.Tensor]] = []
        weights: list[int] = []
        for cid in chosen:
            gen = torch_generator(seed, rnd, cid, "batch")
            steps = t.local_steps if t.protocol == "fedavg" else 1
            batches = []
            for _ in range(steps):
                idx = torch.as_tensor(
                    sample_batch(parts[cid], min(t.batch_size, len(parts[cid])), gen)
                )
                batches.append((x_all[idx], y_all[idx]))
            local = copy.deepcopy(model)
            result = local_update(local, batches, protocol=t.protocol, lr=t.lr)
            updates.append(result.update)
            weights.append(result.num_examples)
        total = float(sum(weights))
        with torch.no_grad():
            state = model.state_dict()
            params = dict(model.named_parameters())
            for key in updates[0]:
                mean = sum(u[key] * (w / total) for u, w in zip(updates, weights, strict=True))
                step = -t.lr * mean if (t.protocol == "fedsgd" and key in params) else mean
                state[key].add_(step.to(state[key].dtype))
        yield rnd, model


def _accuracy(model: nn.Module, data: ImageData, limit: int = 1000) -> float:
    n = min(limit, int(data.test_y.shape[0]))
    x = data.normalize(data.images("test", slice(0, n)))
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == data.labels("test", slice(0, n))).float().mean())
    model.train()
    return acc


def upper_bound(k: int, n: int, level: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of a rate observed as ``k`` of ``n``."""
    return 1.0 if n == 0 or k >= n else float(beta.ppf(level, k + 1, n - k))


def lower_bound(k: int, n: int, level: float = 0.95) -> float:
    """One-sided Clopper-Pearson lower bound of a rate observed as ``k`` of ``n``."""
    return 0.0 if n == 0 or k <= 0 else float(beta.ppf(1.0 - level, k, n - k + 1))


def variant_label(name: str, params: Mapping[str, Any]) -> str:
    """``name(key=value, ...)`` (``name`` alone for the defaults)."""
    inner = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{name}({inner})" if inner else name


def server_view(
    data: ImageData, *, stage: int, seed: int, training: Training, public: int = 256
) -> Any:
    """The :class:`~adversaries.malicious.ServerView` of a crafted round: public data is a
    seeded subset of the test split (normalised), two clients sampled, client 0 targeted."""

    n_test = int(data.test_y.shape[0])
    idx = torch.randperm(n_test, generator=torch_generator(seed, "public_data"))[
        : min(public, n_test)
    ]
    return ServerView(
        round=stage + 1,
        clients=(0, 1),
        targets=(0,),
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        data_mean=tuple(data.mean),
        data_std=tuple(data.std),
        protocol=training.protocol,
        batch_size=training.batch_size,
        local_steps=training.local_steps if training.protocol == "fedavg" else 1,
        lr=training.lr,
        public_inputs=data.normalize(data.images("test", idx)),
        public_labels=data.labels("test", idx),
        generator=torch_generator(seed, stage, "modification"),
    )


@dataclass
class _Tally:
    """Counts of inspected models and of those with findings; keeps up to 10 example lines of
    the alarmed models (``keep="alarmed"``: false alarms) or of the missed ones (detection)."""

    keep: str = "alarmed"
    n: int = 0
    hits: int = 0
    by_check: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, checks: set[str], example: str) -> None:
        self.n += 1
        self.hits += bool(checks)
        for c in checks:
            self.by_check[c] = self.by_check.get(c, 0) + 1
        if bool(checks) == (self.keep == "alarmed") and len(self.examples) < 10:
            self.examples.append(example)

    def false_alarms(self) -> dict[str, Any]:
        """``n``, ``alarms``, ``rate``, ``upper95``, ``by_check``, ``examples``."""
        return {
            "n": self.n,
            "alarms": self.hits,
            "rate": self.hits / self.n if self.n else math.nan,
            "upper95": upper_bound(self.hits, self.n),
            "by_check": dict(sorted(self.by_check.items())),
            "examples": self.examples,
        }

    def detection(self) -> dict[str, Any]:
        """``n``, ``detected``, ``rate``, ``lower95``, ``by_check``, ``missed``."""
        return {
            "n": self.n,
            "detected": self.hits,
            "rate": self.hits / self.n if self.n else math.nan,
            "lower95": lower_bound(self.hits, self.n),
            "by_check": dict(sorted(self.by_check.items())),
            "missed": self.examples,
        }


#: (margin key, LayerStats attribute, True when larger values are closer to an alarm)
_MARGINS = (
    ("max_abs_cos", "max_abs_cos", True),
    ("min_signs_pvalue", "signs_pvalue", False),
    ("max_zero_share", "zero_share", True),
    ("max_bias_ratio", "bias_ratio", True),
    ("min_distinct_share", "min_distinct_share", False),
)


def _margins(stats: Sequence[LayerStats], where: str, into: dict[str, dict[str, Any]]) -> None:
    """Fold the honest statistics of one model into ``into``: per margin key, the value closest
    to its threshold seen so far and ``where`` it was seen (model, seed, round, layer)."""
    for key, attr, larger in _MARGINS:
        for s in stats:
            value = getattr(s, attr)
            if math.isnan(value):
                continue
            best = into.get(key)
            if best is None or (value > best["value"] if larger else value < best["value"]):
                into[key] = {"value": value, "where": f"{where} {s.layer} ({s.rows}x{s.row_size})"}


def measure(
    *,
    dataset: str = "digits",
    root: str | None = None,
    models: Sequence[str] = DEFAULT_MODELS,
    seeds: Sequence[int] = (0, 1),
    training: Training = Training(),
    stages: Sequence[int] | None = None,
    modifications: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    inspector: ModelInspector | None = None,
    detect: bool = True,
) -> dict[str, Any]:
    """False-alarm rate on honest trajectories and detection rate per crafted modification.

    Parameters
    ----------
    dataset, root:
        Passed to :func:`fl_privsim.core.data.load_dataset` (split seed 0).
    models, seeds:
        Architectures and seeds; one trajectory per pair.
    training:
        The honest federated training (:class:`Training`).
    stages:
        Rounds whose models the modifications are crafted on; default: first, middle, last.
    modifications:
        ``{name: [params, ...]}`` to craft; default: every registered modification with its
        :data:`VARIANTS` (``detect=False`` skips the detection part and its imports).
    inspector:
        The inspection to measure; default :class:`ModelInspector` with its defaults.

    Returns
    -------
    dict
        ``false_alarms`` (``n`` inspected models, ``alarms``, ``rate``, ``upper95``,
        ``by_check``, ``by_model``, ``margins``: the honest statistics closest to each
        threshold, ``examples``), ``detection`` (per variant label: ``n``, ``detected``,
        ``rate``, ``lower95``, ``by_check``, ``not_applicable``), ``accuracy`` (final test
        accuracy per model and seed, to show the models did train), ``settings``, ``seconds``.
    """
    start = time.perf_counter()
    insp = inspector or ModelInspector()
    data = load_dataset(dataset, root=root, seed=0)
    stage_set = sorted(
        set(stages if stages is not None else (0, training.rounds // 2, training.rounds))
    )
    if any(s < 0 or s > training.rounds for s in stage_set):
        raise ConfigError(f"stages must lie in 0..{training.rounds}, got {list(stage_set)}")
    registry = None
    if detect:
        registry = MODIFICATIONS
        if modifications is None:
            modifications = {n: VARIANTS.get(n, ({},)) for n in MODIFICATIONS.names()}
    honest = _Tally()
    by_model: dict[str, _Tally] = {}
    margins: dict[str, dict[str, Any]] = {}
    detections: dict[str, _Tally] = {}
    not_applicable: dict[str, list[str]] = {}
    accuracy: dict[str, dict[int, float]] = {}
    for name in models:
        for seed in seeds:
            for rnd, model in honest_trajectory(name, data, seed=seed, training=training):
                findings, stats = insp.inspect(model)
                checks = {f.check for f in findings}
                example = (
                    f"{name} seed {seed} round {rnd}: {'; '.join(str(f) for f in findings[:3])}"
                )
                honest.add(checks, example)
                by_model.setdefault(name, _Tally()).add(checks, example)
                _margins(stats, f"{name} seed {seed} round {rnd}", margins)
                if registry is not None and modifications and rnd in stage_set:
                    _craft_all(
                        registry,
                        modifications,
                        model,
                        data,
                        name,
                        seed,
                        rnd,
                        training,
                        insp,
                        detections,
                        not_applicable,
                    )
                if rnd == training.rounds:
                    accuracy.setdefault(name, {})[seed] = _accuracy(model, data)
            log.info(
                "inspection rates: %s seed %d done (%.0f s)",
                name,
                seed,
                time.perf_counter() - start,
            )
    false_alarms = honest.false_alarms()
    false_alarms["by_model"] = {m: t.false_alarms() for m, t in by_model.items()}
    false_alarms["margins"] = margins
    detection: dict[str, Any] = {}
    for label in sorted(set(detections) | set(not_applicable)):
        detection[label] = detections.get(label, _Tally(keep="missed")).detection()
        detection[label]["not_applicable"] = sorted(set(not_applicable.get(label, [])))
    settings = {
        "dataset": dataset,
        "models": list(models),
        "seeds": list(seeds),
        "stages": stage_set,
        "training": training.__dict__,
        "checks": list(insp.checks),
        "thresholds": {
            "cos_threshold": insp.cos_threshold,
            "alpha": insp.alpha,
            "zero_tol": insp.zero_tol,
            "bias_ratio": insp.bias_ratio,
            "distinct_share": insp.distinct_share,
        },
    }
    return {
        "false_alarms": false_alarms,
        "detection": detection,
        "accuracy": accuracy,
        "settings": settings,
        "seconds": time.perf_counter() - start,
    }


def _craft_all(
    registry: Any,
    modifications: Mapping[str, Sequence[Mapping[str, Any]]],
    model: nn.Module,
    data: ImageData,
    name: str,
    seed: int,
    rnd: int,
    training: Training,
    insp: ModelInspector,
    detections: dict[str, _Tally],
    not_applicable: dict[str, list[str]],
) -> None:
    """Craft every variant on (a copy of) ``model`` and tally whether the inspection fires."""
    for mod_name, variants in modifications.items():
        for params in variants:
            label = variant_label(mod_name, params)
            mod = registry.create(mod_name, **dict(params))
            try:
                mod.check_model(model, data.input_shape, data.num_classes)
            except ConfigError:
                not_applicable.setdefault(label, []).append(name)
                continue
            view = server_view(data, stage=rnd, seed=seed, training=training)
            crafted = mod.craft(copy.deepcopy(model), view)
            for sent in (crafted.model, *crafted.per_client.values()):
                if sent_unchanged(sent, model):
                    continue  # isolation's target gets the honest model: nothing to detect, not a miss
                checks = {f.check for f in insp.findings(sent)}
                detections.setdefault(label, _Tally(keep="missed")).add(
                    checks, f"{name} seed {seed} round {rnd}"
                )


def sent_unchanged(sent: nn.Module, honest: nn.Module) -> bool:
    """Whether a crafted model is the honest one, weight for weight (nothing to detect)."""
    a, b = sent.state_dict(), honest.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _finite(value: Any) -> Any:
    """``value`` with every float NaN replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: measure and print the result as JSON on stdout."""
    p = argparse.ArgumentParser(
        prog="python -m fl_privsim.app.inspection_rates", description=__doc__.split("\n")[0]
    )
    p.add_argument("--dataset", default="digits")
    p.add_argument(
        "--root", default=None, help="data folder (e.g. ../shared/data/cifar10 for cifar10_npz)"
    )
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--protocol", default="fedavg", choices=("fedavg", "fedsgd"))
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--clients-per-round", type=int, default=2)
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument(
        "--stages", default=None, help="comma-separated rounds to craft on (default 0,R/2,R)"
    )
    p.add_argument("--no-detect", action="store_true", help="false alarms only")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1, fastest for these small models; 0: torch's)",
    )
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    training = Training(
        protocol=args.protocol,
        rounds=args.rounds,
        num_clients=args.num_clients,
        clients_per_round=args.clients_per_round,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        lr=args.lr,
    )
    result = measure(
        dataset=args.dataset,
        root=args.root,
        models=[m for m in args.models.split(",") if m],
        seeds=[int(s) for s in args.seeds.split(",") if s],
        training=training,
        stages=None if args.stages is None else [int(s) for s in args.stages.split(",") if s],
        detect=not args.no_detect,
    )
    sys.stdout.write(json.dumps(_finite(result), indent=1, default=_json_default) + "\n")
    return 0


__all__ = [
    "CHECKS",
    "DEFAULT_MODELS",
    "VARIANTS",
    "Training",
    "honest_trajectory",
    "lower_bound",
    "main",
    "measure",
    "sent_unchanged",
    "server_view",
    "upper_bound",
    "variant_label",
]

if __name__ == "__main__":
    raise SystemExit(main())

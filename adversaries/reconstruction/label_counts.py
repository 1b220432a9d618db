"""Batch label recovery from the last layer's gradient: label *counts*, not just presence.

Wainakh, Ventola, Müßig, Keim, Garcia Cordero, Zimmer, Grube, Kersting and Mühlhäuser,
"User-Level Label Leakage from Gradients in Federated Learning" (PoPETs 2022(2),
arXiv:2105.09369; reference code github.com/tklab-tud/LLG), and the bias-gradient identity
used by Eloul et al. (arXiv:2204.12495) for dense-layer de-mixing.

For a last layer ``z = W h + b`` trained with mean softmax cross-entropy over ``N`` samples,

    ∂L/∂b_k = p̄_k - c_k / N,        Σ_j ∂L/∂W_kj = (1/N) Σ_n (p_nk - y_nk) Σ_j h_nj,

with ``p̄`` the batch-mean softmax and ``c_k`` the number of samples of class ``k``. The
first gives ``c_k = N (p̄_k - ∂L/∂b_k)`` exactly (the *bias* estimator, up to the error of
the estimate of ``p̄``); the second is negative for every present class when ``h ≥ 0``
(ReLU/sigmoid features) and falls by about one *impact* per sample of the class (LLG).

The reusable pieces (:func:`largest_remainder`, :func:`bias_counts`, :func:`llg_labels`,
:func:`counts_to_labels`, :func:`dummy_mean_softmax`) are also used by the analytic attack.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import ClassVar

import torch
import torch.nn.functional as F

from adversaries.base import (
    ATTACKS,
    Attack,
    AttackResult,
    Observation,
    Setup,
    require_cross_entropy,
)
from adversaries.reconstruction._common import (
    last_linear,
    layer_grads,
    num_targets,
    target_gradient,
)
from adversaries.reconstruction.dlg import class_logits_layer
from fl_privsim.core.errors import ThreatModelError

log = logging.getLogger(__name__)

#: Label-count methods of :class:`LLGAttack`.
METHODS = ("auto", "llg", "llg+", "bias")
#: Dummy-input distributions for the estimate of the batch-mean softmax.
DUMMIES = ("normal", "uniform")


def largest_remainder(
    raw: torch.Tensor, total: int, minimum: torch.Tensor | None = None
) -> torch.Tensor:
    """Round non-negative real counts to integers summing to ``total`` (largest remainder).

    Each class first gets ``max(floor(raw_k), minimum_k)`` (``raw`` clipped at 0); the
    missing units then go one by one to the class with the largest remainder
    ``raw_k - count_k``, and any excess is taken one by one from the class with the
    smallest remainder among those above their minimum (Hamilton's method, extended to
    lower bounds).

    Parameters
    ----------
    raw:
        Real-valued count estimates, shape (K,).
    total:
        The integer sum the counts must have (the batch size).
    minimum:
        Optional per-class lower bounds (int64, shape (K,)), e.g. 1 for classes known to
        be present; their sum must not exceed ``total``.

    Returns
    -------
    torch.Tensor
        int64 counts of shape (K,) on CPU, summing to ``total``.
    """
    raw = raw.detach().double().cpu().clamp_min(0.0)
    low = torch.zeros_like(raw, dtype=torch.int64) if minimum is None else minimum.cpu().long()
    if int(low.sum()) > total:
        raise ValueError(f"minimum counts sum to {int(low.sum())} > total {total}")
    counts = torch.maximum(torch.floor(raw).long(), low)
    while int(counts.sum()) < total:
        counts[int(torch.argmax(raw - counts))] += 1
    while int(counts.sum()) > total:
        rem = (raw - counts).masked_fill(counts <= low, float("inf"))
        counts[int(torch.argmin(rem))] -= 1
    return counts


def counts_to_labels(counts: torch.Tensor) -> torch.Tensor:
    """The sorted label multiset (int64, CPU) with ``counts[k]`` copies of class ``k``."""
    counts = counts.detach().cpu().long()
    return torch.repeat_interleave(torch.arange(counts.numel()), counts)


def bias_counts(
    grad_bias: torch.Tensor, p_mean: torch.Tensor, n: int, *, force_present: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label counts from the last layer's bias gradient: ``c_k = N (p̄_k - ∂L/∂b_k)``.

    Exact when ``p_mean`` is the batch-mean softmax of the (equally weighted) ``n``
    samples. Rounded by :func:`largest_remainder` to sum to ``n``; with ``force_present``
    every class with ``∂L/∂b_k < 0`` (necessarily present, since ``p̄_k > 0``) keeps at
    least one sample (when there are at most ``n`` of them).

    Returns
    -------
    tuple of torch.Tensor
        int64 counts (K,) on CPU, and the real-valued estimates before rounding.
    """
    gb = grad_bias.detach().double().cpu().flatten()
    raw = n * (p_mean.detach().double().cpu().flatten() - gb)
    minimum = None
    if force_present:
        present = (gb < 0).long()
        if int(present.sum()) <= n:
            minimum = present
    return largest_remainder(raw, n, minimum), raw


def llg_labels(
    row_sums: torch.Tensor,
    n: int,
    *,
    impact: float | None = None,
    offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """LLG label assignment (Wainakh et al. 2022, Algorithm 1; reference ``Predictor.py``).

    ``row_sums[k] = Σ_j ∂L/∂W_kj`` of the last layer. Every class with a negative sum is
    taken once (with non-negative features, a negative sum proves the class is present);
    ``offset`` (LLG+; zero for LLG) is then subtracted from all sums and each taken class's
    sum is raised by ``|m|``; the remaining ``N - #negative`` labels go greedily to the
    currently smallest sum, each time subtracting the impact ``m`` from it. If more than
    ``N`` sums are negative, the ``N`` most negative classes are returned.

    Parameters
    ----------
    row_sums:
        Shape (K,).
    n:
        Number of labels to return.
    impact:
        Per-sample impact ``m`` (negative). ``None``: LLG's estimate from the gradient alone,
        ``m = (Σ_{k: g_k<0} g_k / N) · (1 + 1/K)``.
    offset:
        Per-class offset (LLG+), shape (K,); ``None``: zero.

    Returns
    -------
    tuple
        The sorted int64 labels (N,) on CPU and the impact ``m`` used.
    """
    g = row_sums.detach().double().cpu().flatten().clone()
    k = g.numel()
    negative = torch.nonzero(g < 0).flatten()
    if impact is None:
        impact = float(g[negative].sum()) / n * (1.0 + 1.0 / k)
    if negative.numel() > n:
        negative = negative[torch.argsort(g[negative])[:n]]
    if offset is not None:
        g = g - offset.detach().double().cpu().flatten()
    labels = [int(c) for c in negative]
    g[negative] -= impact
    while len(labels) < n:
        c = int(torch.argmin(g))
        labels.append(c)
        g[c] -= impact
    return torch.tensor(sorted(labels), dtype=torch.int64), float(impact)


def llg_plus_calibration(
    obs: Observation,
    n: int,
    *,
    rounds: int,
    kind: str,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[float, torch.Tensor]:
    """LLG+ impact and offset measured on attacker-made inputs (no client data).

    As in the reference code (``v2_prediction``/``v3_prediction``): for each of ``rounds``
    dummy batches of ``n`` inputs (:func:`dummy_inputs`) and each class ``i``, the batch is
    labelled all ``i`` and the last layer's row sums ``g`` are computed. The impact is
    ``mean_i g_i / n · (1 + 1/K)``, the offset of class ``j`` the mean of ``g_j`` over the
    batches labelled with another class. LLG+ in the paper uses auxiliary real data; the
    reference code's ``v3`` variant uses dummies, as here.
    """
    model = obs.fresh_model(device).train()
    _, layer = last_linear(model)
    k = obs.num_classes
    impact, offset = 0.0, torch.zeros(k, dtype=torch.float64)
    for _ in range(rounds):
        x = dummy_inputs(obs, n, kind=kind, generator=generator, device=device)
        for i in range(k):
            y = torch.full((n,), i, dtype=torch.int64, device=device)
            loss = F.cross_entropy(model(x), y)
            g = torch.autograd.grad(loss, layer.weight)[0].detach().double().sum(dim=1).cpu()
            impact += float(g[i]) / n
            others = torch.arange(k) != i
            offset[others] += g[others]
    impact = impact / (rounds * k) * (1.0 + 1.0 / k)
    return impact, offset / (rounds * (k - 1))


def dummy_inputs(
    obs: Observation, num: int, *, kind: str, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """``num`` attacker-made inputs in the observation's input box (no client data).

    ``normal``: N(0, 1) in the normalised space clipped to the box, i.e. pixels with the
    declared per-channel mean and std; ``uniform``: uniform in the box (uniform pixels).
    Drawn on CPU from ``generator``, then moved to ``device``.
    """
    return _box_inputs(
        obs.input_shape, obs.input_bounds("cpu"), num, kind=kind, generator=generator
    ).to(device)


def _box_inputs(
    input_shape: tuple[int, int, int],
    bounds: tuple[torch.Tensor, torch.Tensor],
    num: int,
    *,
    kind: str,
    generator: torch.Generator,
) -> torch.Tensor:
    """:func:`dummy_inputs` for an input shape and a (CPU) box ``(lower, upper)``."""
    shape = (num, *input_shape)
    lower, upper = bounds
    if kind == "normal":
        x = torch.randn(shape, generator=generator).clamp(lower.expand(shape), upper.expand(shape))
    elif kind == "uniform":
        x = lower + (upper - lower) * torch.rand(shape, generator=generator)
    else:
        raise ValueError(f"dummy must be one of {', '.join(DUMMIES)}, got {kind!r}")
    return x


@torch.no_grad()
def dummy_mean_softmax(
    obs: Observation, num: int, *, kind: str, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Mean softmax of the global model (train mode, on a private copy) over dummy inputs."""
    model = obs.fresh_model(device).train()
    x = dummy_inputs(obs, num, kind=kind, generator=generator, device=device)
    return F.softmax(model(x).double(), dim=1).mean(0)


@torch.no_grad()
def last_layer_input_min(setup: Setup, num: int = 8) -> float:
    """Smallest value that reaches the last ``nn.Linear`` on a few probe inputs.

    Probes are N(0, 1) in the normalised space clipped to the input box, then uniform in the
    box, from fixed seeds (no client data), through a private CPU copy of ``setup.model`` in
    train mode; they check empirically that the classifier sees non-negative features
    (ReLU/sigmoid) whatever the registration order of the modules.
    """
    model = copy.deepcopy(setup.model).to("cpu").train()
    _, layer = last_linear(model)
    seen: list[float] = []
    hook = layer.register_forward_pre_hook(lambda _m, args: seen.append(float(args[0].min())))
    bounds = setup.input_bounds()
    try:
        gen = torch.Generator().manual_seed(0)
        model(_box_inputs(setup.input_shape, bounds, num, kind="normal", generator=gen))
        gen = torch.Generator().manual_seed(1)
        model(_box_inputs(setup.input_shape, bounds, num, kind="uniform", generator=gen))
    finally:
        hook.remove()
    return min(seen)


@ATTACKS.register("llg")
class LLGAttack(Attack):
    """Recover the label multiset of a batch (labels only; ``inputs`` is ``None``).

    Threat model: honest-but-curious server that knows the architecture, the global
    parameters, the loss (mean softmax cross-entropy) and the number of samples
    ``N = num_targets(obs)`` (the batch size for one FedSGD client). The last ``nn.Linear``
    outputs the class logits. Aggregates are handled as one batch of all clients' samples,
    which is exact for FedSGD with equal client batch sizes (then the aggregate is the mean
    gradient of the ``N`` samples); FedAvg deltas are converted by
    :meth:`Observation.gradient` (exact for one local step).

    Methods (``method``):

    * ``"llg"`` -- LLG of Wainakh et al. (PoPETs 2022): classes whose last-layer
      weight-gradient row sums are negative are present; the per-sample impact ``m`` is
      estimated from the gradient alone; the remaining labels are assigned greedily by
      subtracting ``m`` (:func:`llg_labels`). Needs non-negative features into the last
      layer (checked on probe inputs). Exact for small batches; the gradient-only impact
      estimate degrades once many classes hold several samples (N >~ K).
    * ``"llg+"`` -- the same with impact and per-class offset measured on ``rounds``
      batches of attacker-made dummy inputs (:func:`llg_plus_calibration`; the paper's
      LLG+ uses auxiliary real data instead).
    * ``"bias"`` -- ``c_k = N (p̄_k - ∂L/∂b_k)`` with ``p̄`` the model's mean softmax on
      ``dummies`` dummy inputs (:func:`dummy_inputs`), rounded by largest remainder so
      the counts sum to ``N`` (:func:`bias_counts`). Needs a bias in the last layer; exact
      while ``N·|p̄_est - p̄_true| < 1/2`` per class (e.g. untrained models).
    * ``"auto"`` -- ``"bias"`` when the last layer has a trainable bias, else ``"llg+"``.

    Dummy inputs are drawn from ``generator`` only: ``"normal"`` is N(0, 1) in the
    normalised space clipped to the input box (pixels with the declared mean/std),
    ``"uniform"`` is uniform in the box.

    Parameters
    ----------
    method:
        ``"auto"`` (default), ``"llg"``, ``"llg+"`` or ``"bias"``.
    dummies:
        Number of dummy inputs for the ``bias`` estimate of ``p̄`` (>= 1).
    dummy:
        Their distribution: ``"normal"`` (default) or ``"uniform"``.
    rounds:
        Dummy batches (of ``N`` inputs each, one pass per class) for ``llg+`` (>= 1).
    """

    requires: ClassVar[tuple[str, ...]] = (
        "last nn.Linear outputs the class logits; loss is mean softmax cross-entropy",
        "number of samples N = num_targets(obs) known (aggregates: equal client batch sizes)",
        "method llg/llg+: non-negative features into the last nn.Linear (ReLU/sigmoid)",
        "method bias: the last nn.Linear has a trainable bias",
    )

    def __init__(
        self, *, method: str = "auto", dummies: int = 256, dummy: str = "normal", rounds: int = 4
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if isinstance(dummies, bool) or not isinstance(dummies, int) or dummies < 1:
            raise ValueError(f"dummies must be an integer >= 1, got {dummies!r}")
        if dummy not in DUMMIES:
            raise ValueError(f"dummy must be one of {', '.join(DUMMIES)}, got {dummy!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
        self.method = method
        self.dummies = dummies
        self.dummy = dummy
        self.rounds = rounds

    def _resolve(self, obs: Observation | Setup) -> str:
        if self.method != "auto":
            return self.method
        _, layer = last_linear(obs.model)
        return "bias" if layer.bias is not None and layer.bias.requires_grad else "llg+"

    def check_setup(self, setup: Setup) -> None:
        """Refuse without a class-logit last layer, with clients trained with another loss, or
        without the method's needs (a trainable bias; non-negative features on probes)."""
        name, layer = class_logits_layer(setup.model, setup.num_classes, "llg")
        require_cross_entropy(setup, "llg")
        method = self._resolve(setup)
        if method == "bias":
            if layer.bias is None or not layer.bias.requires_grad:
                raise ThreatModelError(
                    "llg: method 'bias' requires the last nn.Linear to have a trainable bias "
                    f"in the update, but {name!r} has none"
                )
            return
        low = last_layer_input_min(setup)
        if low < 0:
            raise ThreatModelError(
                f"llg: method {method!r} requires non-negative features into the last "
                f"nn.Linear (ReLU/sigmoid), but {name!r} receives negative values on probe "
                f"inputs (min {low:.3g}); use method 'bias' if it has a bias"
            )

    def check(self, obs: Observation) -> None:
        """:meth:`check_setup`, then refuse an update without the gradient the method reads."""
        self.check_setup(Setup.of(obs))
        name, _ = last_linear(obs.model)
        g = layer_grads(obs, obs.gradient(), name)
        need = "bias" if self._resolve(obs) == "bias" else "weight"
        if need not in g:
            raise ThreatModelError(
                f"llg: requires the {need} gradient of {name!r}, but the update lacks it"
            )

    def run(
        self, obs: Observation, *, device: torch.device, generator: torch.Generator
    ) -> AttackResult:
        """Return the ``N`` recovered labels (sorted), ``inputs=None``."""
        start = time.perf_counter()
        grads = target_gradient(obs, device)
        n = num_targets(obs)
        name, _ = last_linear(obs.model)
        g = layer_grads(obs, grads, name)
        method = self._resolve(obs)
        metrics: dict[str, float] = {"num_targets": float(n)}
        if method == "bias":
            p_mean = dummy_mean_softmax(
                obs, self.dummies, kind=self.dummy, generator=generator, device=device
            )
            counts, raw = bias_counts(g["bias"], p_mean, n)
            labels = counts_to_labels(counts)
            # Distance of the raw estimates to the nearest integer: small = confident.
            metrics["max_rounding"] = float((raw - raw.round()).abs().max())
        else:
            impact = offset = None
            if method == "llg+":
                impact, offset = llg_plus_calibration(
                    obs, n, rounds=self.rounds, kind=self.dummy, generator=generator, device=device
                )
            labels, impact = llg_labels(g["weight"].sum(dim=1), n, impact=impact, offset=offset)
            metrics["impact"] = impact
        metrics["classes"] = float(torch.unique(labels).numel())
        metrics["seconds"] = time.perf_counter() - start
        log.debug("llg (%s): %s", method, metrics)
        return AttackResult(inputs=None, labels=labels.to(device), metrics=metrics)


__all__ = [
    "DUMMIES",
    "METHODS",
    "LLGAttack",
    "bias_counts",
    "counts_to_labels",
    "dummy_inputs",
    "dummy_mean_softmax",
    "largest_remainder",
    "last_layer_input_min",
    "llg_labels",
    "llg_plus_calibration",
]

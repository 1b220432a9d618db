"""Client-side inspection of the model a server sent: refuse crafted models before training.

arXiv 2503.11514 argues that the analytic malicious-model attacks are easy to detect from the
weights a client receives. This defense looks, in every weight tensor of two or more dimensions
(dense layers ``(out, in)``, convolutions ``(out, in, k...)`` flattened to rows ``(out, -1)``),
for the structures those attacks need and that honest initialisation and training do not
produce, and raises :class:`~clients.defenses.base.ModelRefused` from :meth:`begin` when it
finds one (the client then sends no update). It reads tensors only: no module classes, no
names, no data.

Checks (``checks``; all by default). Each is a statement about the weights whose probability
under honest initialisation (independent draws from a continuous symmetric law: PyTorch's
Kaiming-uniform default and every scheme of :func:`fl_privsim.core.models.init_weights`) is
computed or bounded, and the thresholds are set at a tail probability (``alpha``) or at an
order of magnitude, never fitted to a measured false-alarm rate:

``parallel_rows`` (imprint; Fowl et al., "Robbing the Fed", ICLR 2022)
    Two rows of one layer whose directions agree, ``|cos| ≥ cos_threshold`` (0.999). An imprint
    block's encoder rows all carry the *same* measurement direction (brightness, random or DCT)
    and differ only in their biases (the bin boundaries), and its decoder columns are identical,
    so every decoder row is constant. For two independent isotropic rows of dimension ``d``,
    ``P(|cos| ≥ t) = I_{1-t²}((d-1)/2, 1/2)`` (regularised incomplete beta); a layer is tested
    only when the union bound over its row pairs is below ``alpha`` (otherwise near-parallel
    rows are plausible by chance, e.g. 2-dimensional rows, and the layer is skipped).
    Training moves rows along data directions but does not collapse distinct rows onto one
    direction (largest honest ``|cos|`` measured: 0.94; :mod:`fl_privsim.app.inspection_rates`).
``balanced_signs`` (trap weights; Boenisch et al., "When the Curious Abandon Honesty",
    EuroS&P 2023, arXiv:2112.02918)
    Trap rows have *exactly* half of their weights negative (the other half positive and scaled
    by ~0.95); the normalisation they are folded through scales weights by positive factors and
    keeps the signs. Under honest initialisation the negative count of a row of ``n`` non-zero
    weights is Binomial(n, 1/2), balanced (``|n₊ − n₋| ≤ 1``) with probability
    ``p_n ≈ sqrt(2 / (π n))`` (exact value used). The number of balanced rows of a layer is then
    Binomial(rows, p_n) (rows shorter than ``MIN_ROW`` are left out; rows with fewer non-zero
    weights use the largest ``p_n`` of the layer, a conservative p-value); the layer is flagged
    when its upper-tail p-value is below ``alpha``. The test looks at the *lower* tail of sign
    imbalance, and training drift usually spreads the sign counts (a row drifts towards one
    sign) rather than balancing them exactly; the smallest honest p-value measured over
    thousands of trained layers was 1e-4.
``zero_rows`` (fishing; Wen et al., "Fishing for User Data", ICML 2022; also model
    inconsistency, Pasquini et al., CCS 2022)
    Some, but not all, rows of a layer have (near-)zero weights: norm ≤ ``zero_tol`` (1e-6)
    × the largest row norm. Class fishing zeroes every non-target row of the classifier. No
    continuous initialisation draws such a row (for rows of ``d ≥ 2`` weights the chance is of
    order ``zero_tol^d`` per row; one-weight rows are not tested), and gradient steps do not
    shrink a row by six orders of magnitude. (An all-zero layer, e.g. a zero-initialised head,
    is not flagged.)
``dead_rows`` (model inconsistency: Pasquini et al., CCS 2022; LOKI's switched-off rows)
    Rows whose bias is below what their weights can lift for any input whose features lie
    within ``±bias_ratio``: ``b_i + ‖w_i‖₂ sqrt(d) · bias_ratio < 0`` (Cauchy–Schwarz), so
    the unit is never active after a ReLU. Client isolation's decoy zeroes a whole layer and
    gives it a negative bias, so nothing reaches the rest of the model and the client's update
    vanishes; honest initialisations put ``|b_i|`` below ``‖w_i‖₂`` and training does not
    push a bias ten standard deviations beyond its row's reach.
``saturated_bias`` (fishing)
    The bias gap of a layer is beyond what its weights can move:
    ``R = (max b − min b) / (2 · max_i ‖w_i‖₂ · sqrt(d)) > bias_ratio`` (10). Since
    ``|w_i·h − w_j·h| ≤ 2 max‖w‖₂ sqrt(d) ‖h‖_∞``, no input whose features all lie within
    ``±R`` can change the order of the highest- and lowest-bias outputs: with ``R > 10`` the
    layer's output ignores any input of up to ten standard deviations per feature. Fishing sets
    the non-target biases to 1000; honest layers stayed at ``R ≤ 0.15`` at initialisation and
    through training (measured). The bound is worst-case (``sqrt(d)``), so on wide classifiers
    (e.g. softmax regression on 3072 CIFAR features) a trained fishing layer can fall below it:
    ``zero_rows`` is the robust fishing check, this one a second opinion.
``few_values``
    A non-zero row of at least ``MIN_ROW`` (16) weights with fewer than ``distinct_share``
    (1/2) × its length distinct values. Continuous float32 draws almost never repeat (the
    expected number of ties in a row of ``d`` is about ``d² / 2²⁴``), and gradient steps keep
    them distinct; analytic constructions use constant or few-level rows (a brightness
    measurement: one value per channel; a DCT direction; constant decoder rows; a fished
    feature ``α · e_j``).
``nonfinite``
    A NaN or infinite weight or bias: nothing can be trained on it.

False alarms are *per layer and per check* bounded by ``alpha`` for the two statistical checks
and are essentially impossible under the null for the others; honest models *drift* away from
the null during training, which is why :mod:`fl_privsim.app.inspection_rates` measures the
false-alarm rate on the models of real FedAvg/FedSGD rounds. What it cannot see: a server that
randomises its construction (e.g. adds noise to imprint rows, draws trap signs by coin flips,
or uses a moderate fishing bias with small but non-zero rows) evades the corresponding check;
a model that differs between clients (model inconsistency) needs a second channel.

Stage: ``"update"`` with an identity :meth:`transform_update`; :meth:`begin` of every defense
runs before any training, so the inspection happens before the first local step wherever it is
declared; its role ``"inspect"`` exempts it from the stack's ordering rules, so it may be
declared anywhere in a stack (first is the natural place).

This module imports neither Flower, Ray, nor the attack code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from clients.defenses.base import Defense, ModelRefused, Tensors, TrainingInfo, register_defense

log = logging.getLogger(__name__)

#: The checks, in the order they are run and reported.
CHECKS: tuple[str, ...] = (
    "nonfinite",
    "parallel_rows",
    "balanced_signs",
    "zero_rows",
    "dead_rows",
    "saturated_bias",
    "few_values",
)
#: Rows shorter than this are not tested by ``few_values`` (too few entries to say anything)
#: nor by ``balanced_signs`` (a balanced row of fewer than 16 signs is common by chance).
MIN_ROW = 16
#: Rows compared at once by the parallel-rows search (bounds its memory to CHUNK × rows).
_CHUNK = 1024


@dataclass(frozen=True)
class Finding:
    """One structure found in one tensor.

    Attributes
    ----------
    check:
        The check that fired (one of :data:`CHECKS`).
    layer:
        The parameter name (``state_dict`` name of the weight tensor).
    detail:
        A short human-readable statement of what was found.
    statistic:
        The check's statistic (share of parallel rows, p-value, share of zero rows, R, ...).
    """

    check: str
    layer: str
    detail: str
    statistic: float

    def __str__(self) -> str:
        return f"{self.check} in {self.layer}: {self.detail}"


@dataclass
class LayerStats:
    """The statistics of one tensor, whether or not a check fired (for margins and rates).

    ``nan`` where a check did not apply (skipped, untestable or not requested).
    """

    layer: str
    rows: int
    row_size: int
    max_abs_cos: float = math.nan
    parallel_share: float = math.nan
    signs_pvalue: float = math.nan
    balanced_share: float = math.nan
    zero_share: float = math.nan
    bias_ratio: float = math.nan
    min_distinct_share: float = math.nan


def _number(
    name: str, value: object, lo: float, hi: float, *, lo_open: bool = True, hi_open: bool = True
) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be a number in {lb}{lo:g}, {hi:g}{rb}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def parallel_null_probability(row_size: int, cos_threshold: float) -> float:
    """``P(|cos| ≥ t)`` for two independent isotropic rows of dimension ``row_size``:
    ``I_{1-t²}((d-1)/2, 1/2)`` (1 for ``d = 1``)."""
    from scipy.special import betainc  # lazy: scipy costs every client process ~60 MB

    if row_size < 2:
        return 1.0
    return float(betainc((row_size - 1) / 2.0, 0.5, 1.0 - cos_threshold**2))


def balanced_null_probability(n: int) -> float:
    """``P(|n₊ − n₋| ≤ 1)`` for ``n`` fair independent signs (Binomial(n, 1/2))."""
    from scipy.stats import binom

    if n <= 0:
        return 1.0
    if n % 2 == 0:
        return float(binom.pmf(n // 2, n, 0.5))
    return float(2.0 * binom.pmf(n // 2, n, 0.5))


def max_abs_cos(rows: torch.Tensor) -> torch.Tensor:
    """For every row of ``rows`` (already unit-norm), the largest ``|cos|`` with another row."""
    m = rows.shape[0]
    out = torch.empty(m, dtype=rows.dtype)
    for start in range(0, m, _CHUNK):
        block = (rows[start : start + _CHUNK] @ rows.T).abs()
        idx = torch.arange(block.shape[0])
        block[idx, idx + start] = 0.0
        out[start : start + _CHUNK] = block.max(dim=1).values
    return out


def _weight_tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """``(name, weight, bias)`` of every parameter with two or more dimensions; the bias is the
    sibling ``<prefix>.bias`` parameter when it exists and has one entry per row."""
    params = dict(model.named_parameters())
    for name, w in params.items():
        if w.ndim < 2:
            continue
        bias = None
        if name.endswith("weight"):
            b = params.get(name[: -len("weight")] + "bias")
            if b is not None and b.ndim == 1 and b.shape[0] == w.shape[0]:
                bias = b
        yield name, w, bias


class ModelInspector:
    """The inspection itself (pure torch + scipy), usable outside a federation.

    Parameters
    ----------
    checks:
        Names of the checks to run (a subset of :data:`CHECKS`) or ``"all"`` (default).
    cos_threshold:
        ``|cos|`` at or above which two rows count as parallel (in (0.9, 1); 0.999).
    alpha:
        Per-layer false-alarm bound of the statistical checks under honest initialisation
        (``parallel_rows``: layers whose pair bound exceeds it are not tested;
        ``balanced_signs``: p-value threshold), in (0, 0.01]; default 1e-6.
    zero_tol:
        Relative row norm at or below which a row counts as zero (in (0, 1e-2]; 1e-6).
    bias_ratio:
        Threshold on ``R`` of ``saturated_bias`` (> 1; default 10).
    distinct_share:
        ``few_values`` flags rows with fewer than this share of distinct values
        (in (0, 1); default 0.5).
    """

    def __init__(
        self,
        *,
        checks: Sequence[str] | str = "all",
        cos_threshold: float = 0.999,
        alpha: float = 1e-6,
        zero_tol: float = 1e-6,
        bias_ratio: float = 10.0,
        distinct_share: float = 0.5,
    ) -> None:
        if isinstance(checks, str) and checks != "all":
            checks = [checks]
        if checks == "all":
            chosen: tuple[str, ...] = CHECKS
        else:
            if not isinstance(checks, (list, tuple)) or not checks:
                raise ValueError(
                    f"checks must be 'all' or a non-empty list of "
                    f"{', '.join(CHECKS)}; got {checks!r}"
                )
            bad = [c for c in checks if c not in CHECKS]
            if bad:
                raise ValueError(f"unknown check {bad[0]!r}; allowed: {', '.join(CHECKS)}")
            chosen = tuple(c for c in CHECKS if c in checks)
        self.checks = chosen
        self.cos_threshold = _number("cos_threshold", cos_threshold, 0.9, 1.0)
        self.alpha = _number("alpha", alpha, 0.0, 0.01, hi_open=False)
        self.zero_tol = _number("zero_tol", zero_tol, 0.0, 0.01, hi_open=False)
        self.bias_ratio = _number("bias_ratio", bias_ratio, 1.0, math.inf)
        self.distinct_share = _number("distinct_share", distinct_share, 0.0, 1.0)

    # ------------------------------------------------------------------ per tensor
    def inspect_tensor(
        self, name: str, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[list[Finding], LayerStats]:
        """Findings and statistics of one weight tensor (rows = first dimension)."""
        rows = weight.detach().to("cpu", torch.float32).reshape(weight.shape[0], -1)
        m, d = rows.shape
        stats = LayerStats(layer=name, rows=m, row_size=d)
        found: list[Finding] = []
        b = None if bias is None else bias.detach().to("cpu", torch.float64)
        bad = int((~torch.isfinite(rows)).sum())
        bad += 0 if b is None else int((~torch.isfinite(b)).sum())
        if bad:  # nothing else is meaningful on such a tensor
            if "nonfinite" in self.checks:
                found.append(
                    Finding("nonfinite", name, f"{bad} NaN or infinite weights/biases", float(bad))
                )
            return found, stats
        norms = rows.to(torch.float64).norm(dim=1)
        top = float(norms.max()) if m else 0.0
        nonzero = norms > self.zero_tol * top if top > 0 else torch.zeros(m, dtype=torch.bool)
        if "parallel_rows" in self.checks:
            found += self._parallel(name, rows, norms, nonzero, stats)
        if "balanced_signs" in self.checks:
            found += self._signs(name, rows, stats)
        if "zero_rows" in self.checks and top > 0 and d >= 2:
            zeros = int((~nonzero).sum())
            stats.zero_share = zeros / m
            if zeros:
                detail = (
                    f"{zeros}/{m} rows have (near-)zero weights "
                    f"(norm <= {self.zero_tol:g} x the largest)"
                )
                found.append(Finding("zero_rows", name, detail, zeros / m))
        if "dead_rows" in self.checks and b is not None and b.numel() == m:
            reach = norms * math.sqrt(d) * self.bias_ratio  # |w·h| <= ||w|| sqrt(d) ||h||_inf
            dead = int((b + reach < 0).sum())
            if dead:
                detail = (
                    f"{dead}/{m} rows stay negative for every input within +-{self.bias_ratio:g} per feature "
                    "(dead after a ReLU)"
                )
                found.append(Finding("dead_rows", name, detail, dead / m))
        if "saturated_bias" in self.checks and b is not None and m >= 2:
            gap = float(b.max() - b.min())
            scale = 2.0 * top * math.sqrt(d)
            r = gap / scale if scale > 0 else (math.inf if gap > 0 else 0.0)
            stats.bias_ratio = r
            if r > self.bias_ratio:
                detail = (
                    f"bias gap {gap:.3g} is {r:.3g} x what the weights can move "
                    f"(threshold {self.bias_ratio:g})"
                )
                found.append(Finding("saturated_bias", name, detail, r))
        if "few_values" in self.checks and d >= MIN_ROW:
            found += self._few_values(name, rows[nonzero], m, stats)
        return found, stats

    def _parallel(
        self,
        name: str,
        rows: torch.Tensor,
        norms: torch.Tensor,
        nonzero: torch.Tensor,
        stats: LayerStats,
    ) -> list[Finding]:
        live = int(nonzero.sum())
        d = rows.shape[1]
        if live < 2 or d < 2:
            return []
        bound = live * (live - 1) / 2 * parallel_null_probability(d, self.cos_threshold)
        if bound > self.alpha:  # near-parallel rows are plausible by chance here: not testable
            return []
        unit = (rows[nonzero].to(torch.float64) / norms[nonzero, None]).to(torch.float32)
        best = max_abs_cos(unit)
        stats.max_abs_cos = float(best.max())
        hits = int((best >= self.cos_threshold).sum())
        stats.parallel_share = hits / live
        if hits < 2:
            return []
        return [
            Finding(
                "parallel_rows",
                name,
                f"{hits}/{live} rows are parallel to another row (|cos| >= {self.cos_threshold:g})",
                hits / live,
            )
        ]

    def _signs(self, name: str, rows: torch.Tensor, stats: LayerStats) -> list[Finding]:
        pos = (rows > 0).sum(dim=1)
        neg = (rows < 0).sum(dim=1)
        n = pos + neg
        tested = n >= MIN_ROW
        k = int(tested.sum())
        if k == 0:
            return []
        balanced = int(((pos - neg).abs() <= 1)[tested].sum())
        # rows may differ in their count of non-zero weights: the largest p_n over the counts
        # present bounds every row's chance (a conservative p-value)
        p = max(balanced_null_probability(int(c)) for c in n[tested].unique().tolist())
        from scipy.stats import binom

        pvalue = float(binom.sf(balanced - 1, k, p)) if balanced else 1.0
        stats.signs_pvalue = pvalue
        stats.balanced_share = balanced / k
        if pvalue >= self.alpha:
            return []
        return [
            Finding(
                "balanced_signs",
                name,
                f"{balanced}/{k} rows have exactly balanced signs "
                f"(chance {p:.3g} each; p-value {pvalue:.2g})",
                pvalue,
            )
        ]

    def _few_values(
        self, name: str, rows: torch.Tensor, m: int, stats: LayerStats
    ) -> list[Finding]:
        if rows.shape[0] == 0:
            return []
        srt = rows.sort(dim=1).values
        distinct = 1 + (srt[:, 1:] != srt[:, :-1]).sum(dim=1)
        share = distinct.to(torch.float64) / rows.shape[1]
        stats.min_distinct_share = float(share.min())
        hits = int((share < self.distinct_share).sum())
        if not hits:
            return []
        return [
            Finding(
                "few_values",
                name,
                f"{hits}/{m} rows take fewer than "
                f"{self.distinct_share:g} x their length distinct values (fewest: "
                f"{int(distinct.min())} of {rows.shape[1]})",
                hits / m,
            )
        ]

    # ------------------------------------------------------------------ whole model
    def inspect(self, model: nn.Module) -> tuple[list[Finding], list[LayerStats]]:
        """Findings and per-tensor statistics of every weight tensor of ``model``."""
        findings: list[Finding] = []
        stats: list[LayerStats] = []
        with torch.no_grad():
            for name, w, b in _weight_tensors(model):
                f, s = self.inspect_tensor(name, w, b)
                findings += f
                stats.append(s)
        order = {c: i for i, c in enumerate(CHECKS)}
        findings.sort(key=lambda f: order[f.check])
        return findings, stats

    def findings(self, model: nn.Module) -> list[Finding]:
        """The findings of :meth:`inspect` only."""
        return self.inspect(model)[0]


def refusal_reason(findings: Sequence[Finding], *, limit: int = 4) -> str:
    """One line naming every check that fired and the first ``limit`` findings."""
    checks = sorted({f.check for f in findings}, key=CHECKS.index)
    shown = "; ".join(str(f) for f in findings[:limit])
    more = f"; and {len(findings) - limit} more" if len(findings) > limit else ""
    return f"model_inspection: crafted model ({', '.join(checks)}): {shown}{more}"


@register_defense("model_inspection")
class ModelInspection(Defense):
    """Refuse to train a model whose weights carry the structure of a malicious modification.

    The checks, their thresholds and why they are set where they are: see the module
    docstring (imprint: Fowl et al., ICLR 2022; trap weights: Boenisch et al., EuroS&P 2023;
    fishing: Wen et al., ICML 2022; detection argued by arXiv 2503.11514). :meth:`begin` runs
    :class:`ModelInspector` on the received model and raises
    :class:`~clients.defenses.base.ModelRefused` with a one-line reason naming each check and
    layer when anything is found; otherwise the update passes unchanged. Deterministic and
    state-free (no randomness, nothing kept across rounds).

    Parameters
    ----------
    checks, cos_threshold, alpha, zero_tol, bias_ratio, distinct_share:
        As :class:`ModelInspector`.

    Metrics (of an accepted model): ``layers`` (tensors inspected), ``max_abs_cos`` (largest
    ``|cos|`` between two rows of a tested layer), ``min_signs_pvalue``, ``max_bias_ratio``,
    ``min_distinct_share`` — the margins to the thresholds.
    """

    stage = "update"
    role: ClassVar[str] = "inspect"  # stack rule: may stand anywhere (clients.defenses.stack)

    def __init__(
        self,
        *,
        checks: Sequence[str] | str = "all",
        cos_threshold: float = 0.999,
        alpha: float = 1e-6,
        zero_tol: float = 1e-6,
        bias_ratio: float = 10.0,
        distinct_share: float = 0.5,
    ) -> None:
        self.inspector = ModelInspector(
            checks=checks,
            cos_threshold=cos_threshold,
            alpha=alpha,
            zero_tol=zero_tol,
            bias_ratio=bias_ratio,
            distinct_share=distinct_share,
        )

    def begin(self, model: nn.Module, info: TrainingInfo) -> None:
        super().begin(model, info)
        findings, stats = self.inspector.inspect(model)
        if findings:
            reason = refusal_reason(findings)
            log.info("%s (round %d)", reason, info.server_round)
            raise ModelRefused(reason)
        self.record("layers", len(stats))
        for key, values, pick in (
            ("max_abs_cos", [s.max_abs_cos for s in stats], max),
            ("min_signs_pvalue", [s.signs_pvalue for s in stats], min),
            ("max_bias_ratio", [s.bias_ratio for s in stats], max),
            ("min_distinct_share", [s.min_distinct_share for s in stats], min),
        ):
            finite = [v for v in values if not math.isnan(v)]
            if finite:
                self.record(key, pick(finite))

    def transform_update(self, update: Tensors, *, generator: torch.Generator) -> Tensors:
        """Identity: the inspection happens in :meth:`begin`."""
        return update

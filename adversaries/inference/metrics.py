"""Metrics of a binary inference game: ROC-AUC, accuracy, advantage, TPR at low FPR.

The game of Li et al. (arXiv:2408.16913, CCS 2024; in the style of Salem et al., "SoK: Let
the Privacy Games Begin", S&P 2023) draws a secret s ~ Bernoulli(1/2), releases an update
and asks the adversary for a score; the headline metric is the ROC-AUC of the scores, with
accuracy, advantage 2·Pr[ŝ = s] − 1 and the TPR at a low FPR (Carlini et al. 2022) beside it.

Every point estimate comes with a percentile bootstrap confidence interval over the trials
(seeded), and accuracies with an exact Clopper–Pearson interval.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

logger = logging.getLogger(__name__)

__all__ = [
    "auc_score",
    "bootstrap_ci",
    "clopper_pearson",
    "game_metrics",
    "roc_curve_points",
    "roc_figure",
    "save_roc_plot",
    "tpr_at_fpr",
]


def _check(secrets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(secrets).astype(np.int64).reshape(-1)
    x = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape != x.shape:
        raise ValueError(f"secrets and scores differ in length ({s.size} vs {x.size})")
    if not np.all((s == 0) | (s == 1)):
        raise ValueError("secrets must be 0 or 1")
    return s, x


def auc_score(secrets: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC as the Mann–Whitney statistic (ties count one half); NaN with one class only."""
    s, x = _check(secrets, scores)
    n1 = int(s.sum())
    n0 = s.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = stats.rankdata(x)
    return float((ranks[s == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def roc_curve_points(secrets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of every threshold, from (0, 0) to (1, 1), ties kept together."""
    s, x = _check(secrets, scores)
    order = np.argsort(-x, kind="mergesort")
    xs, ss = x[order], s[order]
    distinct = np.r_[np.nonzero(np.diff(xs))[0], xs.size - 1]
    tp = np.cumsum(ss)[distinct]
    fp = (distinct + 1) - tp
    n1, n0 = max(int(s.sum()), 1), max(int(s.size - s.sum()), 1)
    return np.r_[0.0, fp / n0], np.r_[0.0, tp / n1]


def tpr_at_fpr(secrets: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """The highest TPR over thresholds whose FPR is at most ``fpr`` (0 when none is)."""
    f, t = roc_curve_points(secrets, scores)
    ok = f <= fpr + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0


def _accuracy(s: np.ndarray, x: np.ndarray, threshold: float) -> float:
    return float(np.mean((x >= threshold).astype(np.int64) == s))


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided (1 − alpha) Clopper–Pearson interval of a binomial proportion k / n.

    Solved from the binomial tail probabilities by bisection (not from the beta quantiles,
    so the unit test that compares with ``scipy.stats.beta.ppf`` is a real check): the lower
    end is the p with Pr[X ≥ k | p] = alpha/2, the upper the p with Pr[X ≤ k | p] = alpha/2.
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")

    def solve(f: Any) -> float:  # f increasing in p, root in [0, 1]
        lo, hi = 0.0, 1.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if f(mid) < 0:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    lower = 0.0 if k == 0 else solve(lambda p: stats.binom.sf(k - 1, n, p) - alpha / 2)
    upper = 1.0 if k == n else solve(lambda p: alpha / 2 - stats.binom.cdf(k, n, p))
    return lower, upper


def bootstrap_ci(
    secrets: np.ndarray,
    scores: np.ndarray,
    statistic: Any,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap (1 − alpha) interval of ``statistic(secrets, scores)``, resampling
    trials with replacement with a seeded generator; resamples with one class only are skipped."""
    s, x = _check(secrets, scores)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, s.size, s.size)
        if s[idx].min() == s[idx].max():
            continue
        v = statistic(s[idx], x[idx])
        if math.isfinite(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def game_metrics(
    secrets: np.ndarray,
    scores: np.ndarray,
    *,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics of one game with bootstrap CIs: ``auc``, ``accuracy`` (ŝ = 1 when
    score ≥ ``threshold``), ``advantage`` = 2·accuracy − 1, ``tpr_at_1pct_fpr``,
    ``tpr_at_0.1pct_fpr``, each with ``<name>_ci`` = [low, high]; ``accuracy_cp`` is the
    Clopper–Pearson 95% interval of the accuracy."""
    s, x = _check(secrets, scores)
    stats_: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "auc": auc_score,
        "accuracy": lambda a, b: _accuracy(a, b, threshold),
        "advantage": lambda a, b: 2 * _accuracy(a, b, threshold) - 1,
        "tpr_at_1pct_fpr": lambda a, b: tpr_at_fpr(a, b, 0.01),
        "tpr_at_0.1pct_fpr": lambda a, b: tpr_at_fpr(a, b, 0.001),
    }
    out: dict[str, Any] = {"trials": int(s.size), "positives": int(s.sum())}
    for i, (name, fn) in enumerate(stats_.items()):
        out[name] = float(fn(s, x))
        out[f"{name}_ci"] = list(bootstrap_ci(s, x, fn, n_boot=n_boot, seed=seed + i))
    k = int(np.sum((x >= threshold).astype(np.int64) == s))
    out["accuracy_cp"] = list(clopper_pearson(k, s.size))
    return out


def save_roc_plot(
    path: str | Path, secrets: np.ndarray, scores: np.ndarray, *, title: str = ""
) -> Path:
    """Save the ROC curve (linear and log-log panels) as a PNG."""
    fig = roc_figure(secrets, scores, title=title)
    out = Path(path)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    return out


def roc_figure(secrets: np.ndarray, scores: np.ndarray, *, title: str = "") -> Any:
    """The figure :func:`save_roc_plot` saves (a matplotlib ``Figure`` on an Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fl_privsim.core.plots import legend_outside

    f, t = roc_curve_points(secrets, scores)
    auc = auc_score(secrets, scores)
    fig = Figure(figsize=(10.5, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, log in zip(axes, (False, True), strict=True):
        ax.plot(f, t, label=f"AUC = {auc:.3f}")
        ax.plot([1e-4, 1], [1e-4, 1], "k--", lw=0.8, label="chance")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(1e-3, 1)
            ax.set_ylim(1e-3, 1)
            ax.tick_params(axis="x", pad=7)  # the two 10^-3 labels would meet at the corner
    legend_outside(
        axes[1], fontsize=10
    )  # both panels draw the same two curves: one key, right of them
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig

"""Metrics of the inference games against independent references (scipy, scikit-learn)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from adversaries.inference.metrics import (
    auc_score,
    bootstrap_ci,
    clopper_pearson,
    game_metrics,
    roc_curve_points,
    save_roc_plot,
    tpr_at_fpr,
)


@pytest.mark.parametrize(
    "k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (37, 200), (999, 1000), (3, 5000)]
)
@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_clopper_pearson_matches_beta_quantiles(k: int, n: int, alpha: float) -> None:
    lo, hi = clopper_pearson(k, n, alpha)
    ref_lo = 0.0 if k == 0 else stats.beta.ppf(alpha / 2, k, n - k + 1)
    ref_hi = 1.0 if k == n else stats.beta.ppf(1 - alpha / 2, k + 1, n - k)
    assert lo == pytest.approx(ref_lo, abs=1e-9)
    assert hi == pytest.approx(ref_hi, abs=1e-9)


def test_clopper_pearson_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        clopper_pearson(11, 10)
    with pytest.raises(ValueError):
        clopper_pearson(1, 10, alpha=0.0)


def test_auc_and_roc_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 2, 500)
    x = np.round(s * 0.7 + rng.normal(size=500), 1)  # rounded: ties
    assert auc_score(s, x) == pytest.approx(roc_auc_score(s, x), abs=1e-12)
    f, t = roc_curve_points(s, x)
    rf, rt, _ = roc_curve(s, x, drop_intermediate=False)
    np.testing.assert_allclose(f, rf, atol=1e-12)
    np.testing.assert_allclose(t, rt, atol=1e-12)


def test_tpr_at_fpr_hand_example() -> None:
    s = np.array([1, 1, 0, 1, 0, 0, 0, 0, 0, 0])
    x = np.arange(10, 0, -1, dtype=float)  # ranks: two positives first, then a negative
    assert tpr_at_fpr(s, x, 0.0) == pytest.approx(2 / 3)
    assert tpr_at_fpr(s, x, 1 / 7) == pytest.approx(1.0)
    assert tpr_at_fpr(1 - s, x, 0.01) == 0.0


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(1)
    s = rng.integers(0, 2, 400)
    x = s + rng.normal(size=400)
    a = bootstrap_ci(s, x, auc_score, n_boot=300, seed=7)
    assert a == bootstrap_ci(s, x, auc_score, n_boot=300, seed=7)
    assert a[0] < auc_score(s, x) < a[1]
    m = game_metrics(s, 1 / (1 + np.exp(-x)), n_boot=200)
    for key in ("auc", "accuracy", "advantage", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"):
        lo, hi = m[f"{key}_ci"]
        assert lo <= m[key] <= hi, key
    assert m["advantage"] == pytest.approx(2 * m["accuracy"] - 1)
    k = round(m["accuracy"] * 400)
    assert m["accuracy_cp"] == list(clopper_pearson(k, 400))


def test_roc_plot_is_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    s = rng.integers(0, 2, 100)
    out = save_roc_plot(tmp_path / "roc.png", s, s + rng.normal(size=100), title="t")
    assert out.is_file() and out.read_bytes()[:4] == b"\x89PNG"

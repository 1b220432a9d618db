"""Gaussian-decoder V-information about a continuous target (Mo et al., arXiv:2105.13929;
Xu et al., ICLR 2020): known answers for jointly Gaussian features and targets.

For ``X ~ N(0, I_d)`` and ``G = X A + s·E`` (``E ~ N(0, I)``, ``A`` invertible) the linear
Gaussian decoder is the true conditional, so ``I_V = I(X; G) = ½ ln det(I + A Aᵀ/s²)``
(``d/2 · ln(1 + 1/s²)`` for ``A = I``). The held-out estimate has two errors: sampling noise
(its ``stderr``) and the held-out excess NLL of fitted parameters, about ``(p + 1)·D/(2 n)``
nats for ``p`` features and ``D`` target dimensions (each of the ``D`` regressions pays
``(p + 1)/(2n)``, AIC's penalty), which only lowers the estimate. The tolerances are
``4·stderr`` plus that excess (plus the null model's ``D/n``)."""

from __future__ import annotations

import math

import pytest
import torch

from adversaries.measures import gaussian_v_information, layer_gaussian_v_information
from adversaries.measures.vinfo_gaussian import gaussian_nll

torch.set_num_threads(1)


def _gaussian_pair(n: int, d: int, s: float, seed: int, a: torch.Tensor | None = None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    g = (x if a is None else x @ a) + s * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x, g, gen


def _excess(res) -> float:
    """Held-out excess NLL of the fitted decoder and null model (module docstring)."""
    return (res.n_features + 2) * res.target_dim / (2 * res.n_train)


def test_gaussian_nll_matches_torch_distribution():
    gen = torch.Generator().manual_seed(0)
    t, m = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    var = torch.tensor([0.5, 1.0, 2.0])
    ref = torch.distributions.Normal(m, var.sqrt()).log_prob(t).sum(1)
    assert torch.allclose(gaussian_nll(t, m, var), -ref, atol=1e-6)
    assert torch.allclose(
        gaussian_nll(t, m, torch.tensor(0.7)), gaussian_nll(t, m, torch.full((3,), 0.7))
    )


@pytest.mark.parametrize("variance", ["per_dim", "shared"])
def test_noisy_copy_of_gaussian_target_gives_analytic_mi(variance):
    d, s = 4, 0.5
    x, g, gen = _gaussian_pair(2000, d, s, seed=1)
    perm = torch.randperm(2000, generator=gen)
    res = gaussian_v_information(g, x, families=("linear",), variance=variance, permutation=perm)
    true = d / 2 * math.log(1 + 1 / s**2)  # 3.22 nats
    assert res.target_dim == d and res.explained_variance == 1.0 and res.best_family == "linear"
    assert res.n_test == 600 and res.n_train == 1400
    assert abs(res.v_information - true) <= 4 * res.stderr + _excess(res)
    assert res.v_information_per_dim == pytest.approx(res.v_information / d)
    # H_V(X|∅) is the held-out NLL of the Gaussian fitted (by maximum likelihood) to the train split
    te, tr = perm[:600], perm[600:]
    var = x[tr].var(0, correction=0)
    if variance == "shared":
        var = var.mean().expand(d)
    null = torch.distributions.Normal(x[tr].mean(0), var.sqrt())
    assert res.h_x == pytest.approx(float(-null.log_prob(x[te]).sum(1).mean()), rel=1e-9)


def test_invertible_linear_map_and_affine_target_change():
    """``G = X A + s·E`` with ``A = diag(c) Q`` (``Q`` orthogonal, so the posterior covariance
    ``(I + AAᵀ/s²)⁻¹`` is diagonal and inside the family): ``I_V = ½ Σ ln(1 + c_i²/s²)``; an
    affine change of the target's units (x ↦ 5x + 3) shifts both entropies by d·ln 5, not I_V."""
    d, s = 6, 0.2
    q, _ = torch.linalg.qr(
        torch.randn(d, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    )
    c = torch.linspace(0.3, 3.0, d, dtype=torch.float64)
    x, g, gen = _gaussian_pair(2000, d, s, seed=2, a=torch.diag(c) @ q)
    true = 0.5 * float(torch.log1p(c**2 / s**2).sum())
    perm = torch.randperm(2000, generator=gen)
    res = gaussian_v_information(g, 5 * x + 3, families=("linear",), permutation=perm)
    assert true > 10 and abs(res.v_information - true) <= 4 * res.stderr + _excess(res)
    ref = gaussian_v_information(g, x, families=("linear",), permutation=perm)
    assert res.v_information == pytest.approx(ref.v_information, rel=1e-9)
    assert res.h_x == pytest.approx(ref.h_x + d * math.log(5), rel=1e-9)


@pytest.mark.parametrize("families", [("linear",), ("linear", "mlp")])
def test_independent_noise_gives_zero(families):
    x, _, gen = _gaussian_pair(1000, 4, 1.0, seed=3)
    noise = torch.randn(1000, 5, generator=gen, dtype=torch.float64)
    res = gaussian_v_information(
        noise, x, families=families, mlp_epochs=50, hidden=16, generator=gen
    )
    # no information: the estimate is at most sampling noise above 0, and below 0 by at most
    # sampling noise plus the fitted decoder's excess held-out NLL
    assert -(4 * res.stderr + _excess(res)) <= res.v_information <= 4 * res.stderr


def test_mlp_decoder_recovers_most_of_the_information():
    d, s = 3, 0.5
    x, g, gen = _gaussian_pair(1200, d, s, seed=4)
    true = d / 2 * math.log(1 + 1 / s**2)
    res = gaussian_v_information(g, x, families=("mlp",), mlp_epochs=300, hidden=16, generator=gen)
    assert res.best_family == "mlp"
    # a family can't beat the true conditional (up to sampling noise), and this one gets close
    assert 0.8 * true <= res.v_information <= true + 4 * res.stderr


def test_as_many_features_as_samples_does_not_blow_up():
    """70 train samples, 70 (or 73) features: the linear decoder must not interpolate (its
    ridge penalty is chosen by GCV among those with tr H <= n/2), so pure noise gives ≈ 0 and
    a layer with 3 informative features among 70 noise ones gives a positive value that
    cannot exceed the truth."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(100, 3, generator=gen, dtype=torch.float64)
    noise = torch.randn(100, 70, generator=gen, dtype=torch.float64)
    res = gaussian_v_information(noise, x, families=("linear",), max_features=None, generator=gen)
    assert res.n_train == 70 and res.n_features == 70
    assert -(4 * res.stderr + 0.1) <= res.v_information <= 4 * res.stderr
    signal = torch.cat(
        [x + 0.3 * torch.randn(100, 3, generator=gen, dtype=torch.float64), noise], 1
    )
    res = gaussian_v_information(signal, x, families=("linear",), max_features=None, generator=gen)
    true = 3 / 2 * math.log(1 + 1 / 0.3**2)
    assert 4 * res.stderr < res.v_information <= true + 4 * res.stderr


def test_target_projection_and_layer_table():
    """A 20-pixel target that lives in 3 directions: 3 principal components hold all its
    variance; the layer that copies it beats the noise layer."""
    n, gen = 900, torch.Generator().manual_seed(5)
    z = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    mix = torch.randn(3, 20, generator=gen, dtype=torch.float64)
    x = z @ mix
    layers = {
        "copy": z + 0.3 * torch.randn(n, 3, generator=gen, dtype=torch.float64),
        "noise": torch.randn(n, 8, generator=gen, dtype=torch.float64),
    }
    table = layer_gaussian_v_information(
        layers, x.reshape(n, 4, 5), generator=gen, families=("linear",), target_components=3
    )
    assert [r["layer"] for r in table] == ["copy", "noise"]
    assert all(
        r["target_dim"] == 3 and r["explained_variance"] == pytest.approx(1.0) for r in table
    )
    assert table[0]["h_x"] == pytest.approx(table[1]["h_x"])  # shared split and projection
    true = 3 / 2 * math.log(1 + 1 / 0.3**2)  # information about z, hence about its projection
    assert abs(table[0]["v_information"] - true) <= 4 * table[0]["stderr"] + 0.1
    assert table[1]["v_information"] < 4 * table[1]["stderr"]


def test_bad_arguments():
    x, g, _ = _gaussian_pair(50, 2, 1.0, seed=6)
    with pytest.raises(ValueError, match="families"):
        gaussian_v_information(g, x, families=("svm",))
    with pytest.raises(ValueError, match="variance"):
        gaussian_v_information(g, x, variance="full")
    with pytest.raises(ValueError, match="rows"):
        gaussian_v_information(g, x[:10])
    with pytest.raises(ValueError, match="target_components"):
        gaussian_v_information(g, x, target_components=0)

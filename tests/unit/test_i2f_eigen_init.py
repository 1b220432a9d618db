"""The ``i2f_eigen_init`` reproduction: helpers on known inputs, and the quick run on real MNIST
(skipped cleanly where ../shared/data/mnist is absent)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adversaries.measures.i2f import InversionJacobian, dense_jacobian
from fl_privsim.app.reproduce.i2f_eigen_init import (
    dense_jacobian_rows,
    exact_i2f,
    log_slope,
    spectrum,
)

torch.set_num_threads(1)


def _tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)).double()
    return model, torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])


def test_dense_rows_match_autograd_jacobian():
    model, x, y = _tiny()
    op = InversionJacobian(model, x, y)
    assert torch.allclose(dense_jacobian_rows(op), dense_jacobian(model, x, y), atol=1e-10)


def test_exact_i2f_is_c_over_sqrt_mu_along_eigenvectors():
    model, x, y = _tiny()
    op = InversionJacobian(model, x, y)
    jac = dense_jacobian_rows(op)
    lam, u = spectrum(jac)
    assert torch.all(lam[:-1] >= lam[1:]) and lam.numel() <= 3
    _, _vals, vecs = torch.linalg.svd(
        jac, full_matrices=False
    )  # right singular vectors = eigvecs of JᵀJ
    for i in range(lam.numel()):
        delta = 5.0 * vecs[i]
        assert exact_i2f(lam, u, op.jvp(delta)) == pytest.approx(
            5.0 / math.sqrt(float(lam[i])), rel=1e-6
        )
    # the generic value equals the pseudo-inverse formula
    delta = torch.randn(op.d_theta, dtype=torch.float64)
    ref = torch.linalg.pinv(jac @ jac.T) @ (jac @ delta)
    assert exact_i2f(lam, u, op.jvp(delta)) == pytest.approx(float(ref.norm()), rel=1e-6)


def test_log_slope():
    mu = [1.0, 4.0, 16.0, 64.0]
    assert log_slope(mu, [m**-0.5 for m in mu]) == pytest.approx(-0.5)
    assert math.isnan(log_slope([1.0], [1.0])) and math.isnan(log_slope([1.0, 2.0], [0.0, 1.0]))


def test_quick_reproduction(shared_data, tmp_path):
    if not (shared_data / "mnist").is_dir():
        pytest.skip(f"{shared_data / 'mnist'} not present")
    from fl_privsim.app.reproduce import run_reproduction

    path, result = run_reproduction("i2f_eigen_init", quick=True, out=tmp_path / "run")
    s = result.summary
    assert s["samples"] == 1 and s["inits"] == ["uniform", "xavier"] and s["directions"] == [1, 6]
    assert s["eigsh_vs_svd_max_relerr"] < 1e-3
    assert 0.0 <= s["eigen_small_beats_large_fraction"] <= 1.0
    assert set(s["init_median_rmse"]) == {"uniform", "xavier"}
    assert sorted(s["init_order_by_rmse"]) == ["uniform", "xavier"]
    for name in ("summary.json", "table.md", "samples.json", "eigen_init.png", "settings.toml"):
        assert (path / name).is_file(), name
    assert "c/√μ" in result.table and "xavier" in result.table

"""Known-answer tests of the I²F measure (Zhang et al., NeurIPS 2023) on tiny float64 models.

Convention under test: J = ∇_x ∇_θ L ∈ R^{d_x × d_θ}; Jδ maps parameter space to input space.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adversaries.measures._common import trainable_named_params
from adversaries.measures.i2f import (
    InversionJacobian,
    dense_jacobian,
    i2f,
    i2f_expected,
    max_eigenvalue,
    parameter_eigenpairs,
    pruning_perturbation,
    sample_noise,
)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


def softmax_regression(d: int = 5, k: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, k)).double()


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def tiny_conv(seed: int = 0) -> nn.Module:
    """Fewer parameters (18) than inputs (64): λ_max is taken in parameter space."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, bias=False), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).double()


def closed_form_jacobian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """J of softmax regression with mean CE over a batch of B samples, derived by hand.

    Per sample n: r = p − e_y, S = diag(p) − ppᵀ, A = S W (∂r/∂x); with θ = (W row-major, b):
    J[k, (i, j)] = (A[i, k] x_j + r_i [j = k]) / B and J[k, b_i] = A[i, k] / B; the rows of
    sample n are its input entries.
    """
    lin = model[1]
    w, b = lin.weight.detach(), lin.bias.detach()
    kk, d = w.shape
    bsz = x.shape[0]
    blocks = []
    for n in range(bsz):
        xn = x[n].reshape(-1)
        p = torch.softmax(w @ xn + b, 0)
        r = p - torch.nn.functional.one_hot(y[n], kk).double()
        a = (torch.diag(p) - torch.outer(p, p)) @ w  # (K, d)
        jw = torch.einsum("ik,j->kij", a, xn) + torch.einsum(
            "i,jk->kij", r, torch.eye(d, dtype=torch.float64)
        )
        blocks.append(torch.cat([jw.reshape(d, kk * d), a.T], dim=1) / bsz)
    return torch.cat(blocks, dim=0)


@pytest.mark.parametrize("bsz", [1, 3])
def test_closed_form_jacobian_matches_products(bsz: int) -> None:
    model = softmax_regression()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(bsz, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1][:bsz])
    jac = closed_form_jacobian(model, x, y)
    assert torch.allclose(dense_jacobian(model, x, y), jac, atol=1e-12)
    op = InversionJacobian(model, x, y)
    assert (op.d_x, op.d_theta) == (5 * bsz, 18) == tuple(jac.shape)
    for _ in range(3):
        delta = torch.randn(18, generator=g, dtype=torch.float64)
        b = torch.randn(5 * bsz, generator=g, dtype=torch.float64)
        assert torch.allclose(op.jvp(delta), jac @ delta, atol=1e-12)
        assert torch.allclose(op.vjp(b), jac.T @ b, atol=1e-12)
        assert torch.allclose(op.gram_input(b), jac @ (jac.T @ b), atol=1e-12)


@pytest.mark.parametrize("make,shape", [(tiny_mlp, (2, 6)), (tiny_conv, (1, 1, 8, 8))])
def test_products_match_dense_jacobian_nonlinear(make, shape) -> None:
    model = make()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.arange(shape[0]) % 2
    jac = dense_jacobian(model, x, y)
    op = InversionJacobian(model, x, y)
    delta = torch.randn(op.d_theta, generator=g, dtype=torch.float64)
    b = torch.randn(op.d_x, generator=g, dtype=torch.float64)
    assert torch.allclose(op.jvp(delta), jac @ delta, atol=1e-12)
    assert torch.allclose(op.vjp(b), jac.T @ b, atol=1e-12)
    assert torch.allclose(op.gram_param(delta), jac.T @ (jac @ delta), atol=1e-12)


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize(
    "make,shape", [(tiny_mlp, (1, 6)), (tiny_conv, (1, 1, 8, 8)), (softmax_regression, (2, 5))]
)
def test_lambda_max_matches_eigvalsh(method: str, make, shape) -> None:
    model = make()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.zeros(shape[0], dtype=torch.long)
    jac = dense_jacobian(model, x, y)
    expected = float(torch.linalg.eigvalsh(jac @ jac.T)[-1])
    op = InversionJacobian(model, x, y)
    got = max_eigenvalue(
        op, method=method, tol=1e-12, max_iter=20000, generator=torch.Generator().manual_seed(0)
    )
    assert got == pytest.approx(expected, rel=1e-6 if method == "lanczos" else 1e-4)


def _tiny_setup(seed: int = 4):
    model = tiny_mlp(seed)
    x = torch.randn(1, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = torch.tensor([1])
    return model, x, y, dense_jacobian(model, x, y)


@pytest.mark.parametrize("eps", [0.0, 0.01, 1.0])
def test_exact_value_matches_direct_solve(eps: float) -> None:
    model, x, y, jac = _tiny_setup()
    delta = torch.randn(
        jac.shape[1], generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    (res,) = i2f(model, x, y, delta, eps=eps, cg_tol=1e-12, cg_max_iter=200)
    gram = jac @ jac.T + eps * torch.eye(jac.shape[0], dtype=torch.float64)
    expected = float(torch.linalg.solve(gram, jac @ delta).norm())
    assert res.cg_converged
    assert res.exact == pytest.approx(expected, rel=1e-7)
    assert res.jdelta_norm == pytest.approx(float((jac @ delta).norm()), rel=1e-12)
    assert res.lower_bound == pytest.approx(
        res.jdelta_norm / float(torch.linalg.eigvalsh(jac @ jac.T)[-1]), rel=1e-6
    )


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-4, 2),
    sparsity=st.floats(0.0, 0.95),
    eps=st.sampled_from([0.01, 0.1, 1.0, 10.0]),
)
def test_lower_bound_below_exact(seed: int, log_scale: float, sparsity: float, eps: float) -> None:
    model, x, y, jac = _tiny_setup(seed % 7)
    g = torch.Generator().manual_seed(seed)
    delta = 10**log_scale * torch.randn(jac.shape[1], generator=g, dtype=torch.float64)
    delta = delta * (torch.rand(jac.shape[1], generator=g, dtype=torch.float64) >= sparsity)
    (unreg,) = i2f(model, x, y, delta, eps=0.0, cg_tol=1e-12, cg_max_iter=200)
    (reg,) = i2f(model, x, y, delta, eps=eps, cg_tol=1e-12, cg_max_iter=200)
    assert unreg.cg_converged and reg.cg_converged
    # Eq. 5 (ε = 0): ‖Jδ‖/λ_max ≤ ‖(JJᵀ)⁻¹Jδ‖; with ε: ‖Jδ‖/(λ_max+ε) ≤ ‖(JJᵀ+εI)⁻¹Jδ‖ ≤ unregularised.
    assert unreg.lower_bound <= unreg.exact * (1 + 1e-9)
    assert reg.lower_bound_eps <= reg.exact * (1 + 1e-9)
    assert reg.exact <= unreg.exact * (1 + 1e-9)


def test_eigenvector_perturbation_gives_inverse_sqrt_eigenvalue() -> None:
    model, x, y, jac = _tiny_setup()
    op = InversionJacobian(model, x, y)
    vals, vecs = parameter_eigenpairs(op, 3, generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.eigvalsh(jac @ jac.T).flip(0)[:3]
    assert torch.allclose(vals, ref, rtol=1e-8)
    for i in range(3):
        (res,) = i2f(model, x, y, 5.0 * vecs[:, i], eps=0.0, cg_tol=1e-12)
        assert res.exact == pytest.approx(5.0 / math.sqrt(float(vals[i])), rel=1e-6)
    (top,) = i2f(model, x, y, vecs[:, 0], eps=0.0, cg_tol=1e-12)
    assert top.lower_bound == pytest.approx(
        top.exact, rel=1e-6
    )  # the bound is tight on the top direction


def test_per_sample_and_batch_forms() -> None:
    model = tiny_mlp()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    d_theta = sum(p.numel() for _, p in trainable_named_params(model))
    delta = torch.randn(d_theta, generator=g, dtype=torch.float64)
    per = i2f(model, x, y, delta, eps=0.1, cg_tol=1e-12)
    for i in range(3):
        (alone,) = i2f(
            model, x[i : i + 1], y[i : i + 1], delta, per_sample=False, eps=0.1, cg_tol=1e-12
        )
        assert per[i].exact == pytest.approx(alone.exact, rel=1e-8)
        assert per[i].lambda_max == pytest.approx(alone.lambda_max, rel=1e-8)
    rows = torch.stack([delta, 2 * delta, -delta])
    multi = i2f(model, x, y, rows, eps=0.1, cg_tol=1e-12)
    assert multi[1].exact == pytest.approx(2 * per[1].exact, rel=1e-7)
    assert multi[2].exact == pytest.approx(per[2].exact, rel=1e-7)
    (joint,) = i2f(model, x, y, delta, per_sample=False, eps=0.1, cg_tol=1e-12)
    assert joint.d_x == 18
    named = dict(trainable_named_params(model))
    as_dict = {
        n: piece
        for n, piece in zip(
            named, torch.split(delta, [p.numel() for p in named.values()]), strict=True
        )
    }
    as_dict = {n: v.view_as(named[n]) for n, v in as_dict.items()}
    (via_dict,) = i2f(model, x, y, as_dict, per_sample=False, eps=0.1, cg_tol=1e-12)
    assert via_dict.exact == pytest.approx(joint.exact, rel=1e-10)


@pytest.mark.parametrize("noise", ["gaussian", "laplace"])
def test_monte_carlo_expectation_within_error_bars(noise: str) -> None:
    model, x, y, jac = _tiny_setup()
    lam = float(torch.linalg.eigvalsh(jac @ jac.T)[-1])
    ref_draws = sample_noise(
        noise,
        0.3,
        jac.shape[1] * 40000,
        generator=torch.Generator().manual_seed(99),
        dtype=torch.float64,
    ).view(40000, -1)
    reference = (
        float((ref_draws @ jac.T).norm(dim=1).mean()) / lam
    )  # E‖Jδ‖/λ_max, SE ≈ 0.3% of the n=200 SE
    (res,) = i2f_expected(
        model,
        x,
        y,
        noise=noise,
        scale=0.3,
        n_draws=200,
        exact=False,
        generator=torch.Generator().manual_seed(7),
    )
    assert res.lambda_max == pytest.approx(lam, rel=1e-6)
    assert abs(res.lower_bound_mean - reference) <= 4 * res.lower_bound_stderr
    assert res.exact_mean is None


def test_expectation_scales_linearly_with_noise_scale() -> None:
    model, x, y, _ = _tiny_setup()
    kw = {"n_draws": 8, "eps": 0.0, "cg_tol": 1e-12}
    (one,) = i2f_expected(model, x, y, scale=1.0, generator=torch.Generator().manual_seed(3), **kw)
    (two,) = i2f_expected(model, x, y, scale=2.0, generator=torch.Generator().manual_seed(3), **kw)
    assert two.lower_bound_mean == pytest.approx(2 * one.lower_bound_mean, rel=1e-9)
    assert two.exact_mean == pytest.approx(2 * one.exact_mean, rel=1e-6)
    assert two.lower_bound_stderr == pytest.approx(2 * one.lower_bound_stderr, rel=1e-9)
    assert one.all_converged and one.lower_bound_mean <= one.exact_mean


def test_sample_noise_moments() -> None:
    n = 200_000
    lap = sample_noise(
        "laplace", 0.5, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    # Laplace(0, b): E|X| = b (sd b), Var X = 2b².
    assert abs(float(lap.abs().mean()) - 0.5) <= 4 * 0.5 / math.sqrt(n)
    assert float(lap.var()) == pytest.approx(2 * 0.25, rel=0.02)
    gau = sample_noise(
        "gaussian", 0.5, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert float(gau.std()) == pytest.approx(0.5, rel=0.01)
    with pytest.raises(ValueError):
        sample_noise("cauchy", 1.0, 3)


def test_pruning_perturbation() -> None:
    model, x, y, _ = _tiny_setup()
    op = InversionJacobian(model, x, y)
    g0 = op.clean_gradient()
    pruned = g0 + pruning_perturbation(op, 0.4)
    k = round(0.4 * g0.numel())
    assert int((pruned == 0).sum()) >= k
    assert torch.equal(g0 + pruning_perturbation(op, 1.0), torch.zeros_like(g0))
    kept = pruned != 0
    assert float(g0.abs()[kept].min()) >= float(g0.abs()[~kept].max())

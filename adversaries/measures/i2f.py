"""Inversion Influence Function (I²F): how far a gradient perturbation moves a reconstruction.

Zhang, Hong, Deng, Mahdavi, Zhou, "Understanding Deep Gradient Leakage via Inversion
Influence Functions", NeurIPS 2023 (arXiv:2309.13016); reference code
``illidanlab/inversion-influence-function`` (``utils.py``: ``jvp``, ``I2F_lb``,
``compute_exact_bound``, ``max_eigen_val``).

Threat model. The attacker is DGL (``G_r(g) = argmin_x ‖∇_θL(x, θ) − g‖²``) and *perfect*: it
recovers ``x₀`` from the clean gradient ``g₀ = ∇_θL(x₀, θ)``. A defense sends ``g₀ + δ``. I²F is an
analyst-side measure: it is given ``x₀``, the labels and ``δ`` (or the noise distribution).

Convention (shapes). With ``d_x`` input entries (all samples of the batch, flattened) and
``d_θ`` trainable parameters (``named_parameters()`` order, flattened)::

    J = ∇_x ∇_θ L(x₀, θ) ∈ R^{d_x × d_θ},   J_{ij} = ∂²L / ∂x_i ∂θ_j

so ``J`` maps a *parameter-space* perturbation δ to the *input space*:

- ``J δ  = ∇_x ⟨∇_θ L, δ⟩``  (d_θ → d_x; one double backward),
- ``Jᵀ b = ∇_θ ⟨∇_x L, b⟩``  (d_x → d_θ; one double backward),
- ``J Jᵀ`` is ``d_x × d_x`` and symmetric positive semi-definite.

The implicit function theorem on ``J(x)(∇_θL(x) − g) = 0`` gives ``∂G_r/∂g = (JJᵀ)⁻¹J``, so

- I²F:           ``‖G_r(g₀ + δ) − x₀‖ ≈ 𝓘(δ) = ‖(JJᵀ)⁻¹ J δ‖``,
- lower bound:   ``𝓘_lb = ‖Jδ‖ / λ_max(JJᵀ) ≤ 𝓘(δ)`` (Eq. 5),
- regularised:   ``𝓘_ε = ‖(JJᵀ + εI)⁻¹ J δ‖`` (the reference code's ``compute_exact_bound``).

Note that ``𝓘_ε ≥ ‖Jδ‖/(λ_max + ε)`` always, but ``𝓘_ε`` may fall *below* ``𝓘_lb`` (by at most
the factor ``λ_max/(λ_max + ε)``) when Jδ lies along the top eigenvector; the paper's
inequality is for ``ε = 0``. ``J`` is never materialised (only :func:`dense_jacobian`, for
tests on tiny models, does).

Solver. ``(JJᵀ + εI) b = Jδ`` is solved by conjugate gradient: for ``ε > 0`` the matrix is
symmetric positive definite, CG needs only the products ``v ↦ J(Jᵀv) + εv`` and converges in
``O(√κ)`` products (κ = (λ_max+ε)/(λ_min+ε)) against ``O(κ)`` for the gradient descent of the
reference code. For ``ε = 0`` CG started at 0 stays in range(JJᵀ) and returns the minimum-norm
solution ``(JJᵀ)⁺Jδ`` (Jδ always lies in that range). ``λ_max`` comes from Lanczos (scipy
``eigsh`` on a ``LinearOperator``) with power iteration as the fallback, on the smaller of
``JJᵀ`` (input space) and ``JᵀJ`` (parameter space), which share their non-zero spectrum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from adversaries.measures._common import (
    LossFn,
    as_param_vector,
    default_loss,
    flatten,
    trainable_named_params,
    unflatten,
)
from adversaries.measures._linalg import conjugate_gradient, power_iteration

log = logging.getLogger(__name__)

Perturbation = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]
NOISES = ("gaussian", "laplace")


class InversionJacobian:
    """``J = ∇_x ∇_θ L(x, θ)`` (``d_x × d_θ``) at one input batch, as matrix-vector products.

    The forward pass and the two first-order gradients (w.r.t. θ and x, with
    ``create_graph=True``) are built once; every product is then one backward pass through
    them. ``x`` is a batch ``(N, ...)``; ``L = loss_fn(model(x), y)`` (mean cross-entropy by
    default), so for ``N > 1`` ``J`` is the joint Jacobian of the batch-mean gradient. The
    model's mode (train/eval) is used as is.
    """

    def __init__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_fn: LossFn = default_loss
    ) -> None:
        self.params = [p for _, p in trainable_named_params(model)]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.x = x.detach().clone().requires_grad_(True)
        loss = loss_fn(model(self.x), y)
        self._g_theta = torch.autograd.grad(
            loss, self.params, create_graph=True, retain_graph=True, allow_unused=True
        )
        (self._g_x,) = torch.autograd.grad(loss, self.x, create_graph=True)
        self.d_x = self.x.numel()
        self.d_theta = sum(p.numel() for p in self.params)
        self.dtype = self.x.dtype

    def clean_gradient(self) -> torch.Tensor:
        """``g₀ = ∇_θ L(x₀, θ)`` as a flat, detached vector."""
        return flatten(self._g_theta, self.params).detach()

    def jvp(self, delta: torch.Tensor) -> torch.Tensor:
        """``J δ = ∇_x ⟨∇_θ L, δ⟩`` for a flat ``δ`` of ``d_θ`` entries; returns ``d_x`` entries."""
        pieces = unflatten(delta.detach().to(device=self.x.device, dtype=self.dtype), self.params)
        terms = [
            (g * d).sum()
            for g, d in zip(self._g_theta, pieces, strict=True)
            if g is not None and g.requires_grad
        ]
        if not terms:
            return self.x.new_zeros(self.d_x)
        (out,) = torch.autograd.grad(
            torch.stack(terms).sum(), self.x, retain_graph=True, allow_unused=True
        )
        return self.x.new_zeros(self.d_x) if out is None else out.reshape(-1).detach()

    def vjp(self, b: torch.Tensor) -> torch.Tensor:
        """``Jᵀ b = ∇_θ ⟨∇_x L, b⟩`` for a flat ``b`` of ``d_x`` entries; returns ``d_θ`` entries."""
        if not self._g_x.requires_grad:
            return self.x.new_zeros(self.d_theta)
        s = (
            self._g_x * b.detach().to(device=self.x.device, dtype=self.dtype).view_as(self._g_x)
        ).sum()
        grads = torch.autograd.grad(s, self.params, retain_graph=True, allow_unused=True)
        return flatten(grads, self.params).detach()

    def gram_input(self, v: torch.Tensor) -> torch.Tensor:
        """``J Jᵀ v`` (input space, ``d_x × d_x``)."""
        return self.jvp(self.vjp(v))

    def gram_param(self, u: torch.Tensor) -> torch.Tensor:
        """``Jᵀ J u`` (parameter space, ``d_θ × d_θ``)."""
        return self.vjp(self.jvp(u))


def dense_jacobian(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_fn: LossFn = default_loss
) -> torch.Tensor:
    """``J`` materialised (``d_x × d_θ``) by ``torch.autograd.functional.jacobian`` of
    ``x ↦ ∇_θ L(x)``: for tests and tiny models only (memory ``d_x·d_θ``)."""
    params = [p for _, p in trainable_named_params(model)]

    def grad_theta(inp: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(model(inp), y)
        return flatten(
            torch.autograd.grad(loss, params, create_graph=True, allow_unused=True), params
        )

    jac = torch.autograd.functional.jacobian(grad_theta, x.detach())  # (d_θ, *x.shape)
    flat: torch.Tensor = jac.reshape(jac.shape[0], -1).T.contiguous()
    return flat


def _gram_operator(
    op: InversionJacobian,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, str]:
    if op.d_x <= op.d_theta:
        return op.gram_input, op.d_x, "input"
    return op.gram_param, op.d_theta, "parameter"


def max_eigenvalue(
    op: InversionJacobian,
    *,
    method: str = "auto",
    tol: float = 1e-6,
    max_iter: int = 1000,
    generator: torch.Generator | None = None,
) -> float:
    """``λ_max(JJᵀ)`` (= ``λ_max(JᵀJ)``), on the smaller of the two spaces.

    ``method``: ``"lanczos"`` (scipy ``eigsh(k=1, which="LA")`` on a ``LinearOperator``),
    ``"power"``, or ``"auto"`` (Lanczos, power iteration if ARPACK fails). The start vector
    is drawn from ``generator`` so the result is reproducible.
    """
    if method not in ("auto", "lanczos", "power"):
        raise ValueError(f"method must be auto, lanczos or power, got {method!r}")
    mv, n, space = _gram_operator(op)
    v0 = torch.randn(n, generator=generator, dtype=torch.float64)

    def mv64(v: torch.Tensor) -> torch.Tensor:
        return mv(v.to(op.dtype)).double().cpu()

    if method == "power" or n < 3:
        return power_iteration(mv64, v0, tol=tol, max_iter=max_iter)
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

    lin = LinearOperator(
        (n, n),
        matvec=lambda v: mv64(torch.from_numpy(np.ascontiguousarray(v).reshape(-1))).numpy(),
        dtype=np.float64,
    )
    try:
        (lam,) = eigsh(
            lin,
            k=1,
            which="LA",
            v0=v0.numpy(),
            tol=tol,
            maxiter=max_iter,
            return_eigenvectors=False,
        )
        log.debug("lambda_max=%g by Lanczos in %s space (n=%d)", lam, space, n)
        return float(lam)
    except (ArpackNoConvergence, ArpackError) as err:
        if method == "lanczos":
            raise
        log.warning("Lanczos failed (%s); falling back to power iteration", err)
        return power_iteration(mv64, v0, tol=tol, max_iter=max_iter)


def parameter_eigenpairs(
    op: InversionJacobian, k: int, *, which: str = "LA", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` eigenpairs of ``JᵀJ`` in parameter space (values descending, vectors ``(d_θ, k)``).

    For the eigenvector experiment of Zhang et al.: with ``δ = c·v`` for a unit eigenvector
    ``v`` of eigenvalue ``μ > 0``, ``𝓘(δ) = c/√μ`` exactly.
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    n = op.d_theta
    lin = LinearOperator(
        (n, n),
        dtype=np.float64,
        matvec=lambda v: (
            op.gram_param(torch.from_numpy(np.ascontiguousarray(v).reshape(-1)).to(op.dtype))
            .double()
            .cpu()
            .numpy()
        ),
    )
    v0 = torch.randn(n, generator=generator, dtype=torch.float64).numpy()
    vals, vecs = eigsh(lin, k=k, which=which, v0=v0)
    order = np.argsort(vals)[::-1].copy()
    return torch.from_numpy(vals[order].copy()), torch.from_numpy(vecs[:, order].copy())


@dataclass(frozen=True)
class I2FResult:
    """I²F of one sample (or one batch): ``lower_bound = ‖Jδ‖/λ_max``; ``exact = ‖(JJᵀ+εI)⁻¹Jδ‖``
    (``None`` when not computed); ``lower_bound_eps = ‖Jδ‖/(λ_max+ε) ≤ exact``."""

    lower_bound: float
    exact: float | None
    jdelta_norm: float
    lambda_max: float
    eps: float
    cg_iterations: int | None
    cg_residual: float | None
    cg_converged: bool | None
    d_x: int
    d_theta: int

    @property
    def lower_bound_eps(self) -> float:
        return (
            self.jdelta_norm / (self.lambda_max + self.eps)
            if self.lambda_max + self.eps > 0
            else math.inf
        )

    def to_dict(self) -> dict[str, float | int | bool | None]:
        return asdict(self) | {"lower_bound_eps": self.lower_bound_eps}


def i2f_for_operator(
    op: InversionJacobian,
    delta: torch.Tensor,
    *,
    lambda_max: float | None = None,
    eps: float = 1.0,
    exact: bool = True,
    cg_tol: float = 1e-6,
    cg_max_iter: int = 500,
    generator: torch.Generator | None = None,
) -> I2FResult:
    """I²F of a flat parameter-space ``delta`` at ``op`` (λ_max computed unless given)."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    lam = max_eigenvalue(op, generator=generator) if lambda_max is None else float(lambda_max)
    jd = op.jvp(delta)
    jd_norm = float(jd.double().norm())
    lb = jd_norm / lam if lam > 0 else math.inf
    if not exact:
        return I2FResult(lb, None, jd_norm, lam, eps, None, None, None, op.d_x, op.d_theta)
    cg = conjugate_gradient(
        lambda v: op.gram_input(v.to(op.dtype)).double() + eps * v,
        jd,
        tol=cg_tol,
        max_iter=cg_max_iter,
    )
    return I2FResult(
        lb,
        float(cg.solution.norm()),
        jd_norm,
        lam,
        eps,
        cg.iterations,
        cg.rel_residual,
        cg.converged,
        op.d_x,
        op.d_theta,
    )


def _units(
    x: torch.Tensor, y: torch.Tensor, per_sample: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples, y {y.shape[0]} labels")
    return [(x[i : i + 1], y[i : i + 1]) for i in range(x.shape[0])] if per_sample else [(x, y)]


def i2f(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    delta: Perturbation,
    *,
    per_sample: bool = True,
    eps: float = 1.0,
    exact: bool = True,
    loss_fn: LossFn = default_loss,
    cg_tol: float = 1e-6,
    cg_max_iter: int = 500,
    generator: torch.Generator | None = None,
) -> list[I2FResult]:
    """I²F of a given gradient perturbation ``delta`` (for example the defense's actual noise).

    ``x`` is a batch ``(N, ...)`` with labels ``y`` ``(N,)``. ``per_sample=True``: one result per
    sample, each as if the sample were sent alone (batch size 1); ``delta`` is one
    perturbation (flat ``(d_θ,)``, a list of parameter-shaped tensors or a dict by name)
    applied to every sample, or a ``(N, d_θ)`` tensor of one perturbation per sample.
    ``per_sample=False``: one result for the batch-mean gradient, ``J`` over all ``N`` inputs.
    """
    units = _units(x, y, per_sample)
    if isinstance(delta, torch.Tensor) and delta.dim() == 2:
        if not per_sample or delta.shape[0] != len(units):
            raise ValueError("a (N, d_θ) delta needs per_sample=True and one row per sample")
        deltas = [as_param_vector(row, model) for row in delta]
    else:
        deltas = [as_param_vector(delta, model)] * len(units)
    out = []
    for (xi, yi), di in zip(units, deltas, strict=True):
        op = InversionJacobian(model, xi, yi, loss_fn=loss_fn)
        out.append(
            i2f_for_operator(
                op,
                di,
                eps=eps,
                exact=exact,
                cg_tol=cg_tol,
                cg_max_iter=cg_max_iter,
                generator=generator,
            )
        )
    return out


def sample_noise(
    kind: str,
    scale: float,
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``n`` i.i.d. draws: ``"gaussian"`` N(0, scale²) (``scale`` = σ, so the paper's variance
    1e-3 is σ = √1e-3) or ``"laplace"`` Laplace(0, b = scale) = b·(E₁ − E₂), E ~ Exp(1)
    (the convention of ``clients/defenses/transforms.py``)."""
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    if kind == "gaussian":
        return scale * torch.randn(n, generator=generator, dtype=dtype)
    if kind == "laplace":
        e1 = -torch.log1p(-torch.rand(n, generator=generator, dtype=torch.float64))
        e2 = -torch.log1p(-torch.rand(n, generator=generator, dtype=torch.float64))
        return (scale * (e1 - e2)).to(dtype)
    raise ValueError(f"noise must be one of {', '.join(NOISES)}, got {kind!r}")


@dataclass(frozen=True)
class I2FExpectation:
    """Monte Carlo mean ± standard error (std/√n_draws) of I²F over ``n_draws`` noise draws."""

    lower_bound_mean: float
    lower_bound_stderr: float
    exact_mean: float | None
    exact_stderr: float | None
    jdelta_norm_mean: float
    lambda_max: float
    eps: float
    noise: str
    scale: float
    n_draws: int
    all_converged: bool | None

    def to_dict(self) -> dict[str, float | int | str | bool | None]:
        return asdict(self)


def _mean_se(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else math.nan
    return float(arr.mean()), se


def i2f_expected(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    noise: str = "gaussian",
    scale: float,
    n_draws: int = 32,
    per_sample: bool = True,
    eps: float = 1.0,
    exact: bool = True,
    loss_fn: LossFn = default_loss,
    cg_tol: float = 1e-6,
    cg_max_iter: int = 500,
    generator: torch.Generator | None = None,
) -> list[I2FExpectation]:
    """``E_δ[𝓘(δ)]`` for i.i.d. noise ``δ`` (see :func:`sample_noise`), by Monte Carlo.

    ``λ_max`` is computed once per sample (it does not depend on δ); each draw costs one
    ``Jδ`` (and one CG solve when ``exact``). Draws come from ``generator`` in order.
    """
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    out = []
    for xi, yi in _units(x, y, per_sample):
        op = InversionJacobian(model, xi, yi, loss_fn=loss_fn)
        lam = max_eigenvalue(op, generator=generator)
        runs = [
            i2f_for_operator(
                op,
                sample_noise(noise, scale, op.d_theta, generator=generator, dtype=op.dtype),
                lambda_max=lam,
                eps=eps,
                exact=exact,
                cg_tol=cg_tol,
                cg_max_iter=cg_max_iter,
            )
            for _ in range(n_draws)
        ]
        lb_mean, lb_se = _mean_se([r.lower_bound for r in runs])
        ex_mean, ex_se = _mean_se([r.exact for r in runs]) if exact else (None, None)  # type: ignore[misc]
        out.append(
            I2FExpectation(
                lb_mean,
                lb_se,
                ex_mean,
                ex_se,
                _mean_se([r.jdelta_norm for r in runs])[0],
                lam,
                eps,
                noise,
                float(scale),
                n_draws,
                all(bool(r.cg_converged) for r in runs) if exact else None,
            )
        )
    return out


def pruning_perturbation(op: InversionJacobian, ratio: float) -> torch.Tensor:
    """δ of global magnitude pruning: zeroing the ``ratio`` fraction of smallest-|g₀| entries
    of the clean gradient is ``g₀ + δ`` with ``δ = −g₀`` on those entries, 0 elsewhere."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    g0 = op.clean_gradient()
    k = round(ratio * g0.numel())
    delta = torch.zeros_like(g0)
    if k > 0:
        idx = torch.argsort(g0.abs())[:k]
        delta[idx] = -g0[idx]
    return delta

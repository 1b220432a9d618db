"""Matrix-free linear algebra for the measures: power iteration and conjugate gradient.

Both only need ``v ↦ A v`` for a symmetric positive (semi-)definite ``A`` (``JJᵀ + εI`` in
I²F, Zhang et al., NeurIPS 2023); the state is kept in float64 whatever the model's dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


def power_iteration(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    v0: torch.Tensor,
    *,
    tol: float = 1e-6,
    max_iter: int = 1000,
) -> float:
    """Largest eigenvalue of a PSD operator by power iteration (Rayleigh quotient, stops when
    it changes by less than ``tol`` relatively)."""
    v = v0 / v0.norm()
    lam = 0.0
    for _ in range(max_iter):
        w = matvec(v).double()
        new = float(v @ w)
        norm = float(w.norm())
        if norm == 0.0:
            return 0.0
        v = w / norm
        if abs(new - lam) <= tol * abs(new):
            return new
        lam = new
    log.warning("power iteration did not reach tol %g in %d steps", tol, max_iter)
    return lam


@dataclass(frozen=True)
class CGResult:
    """Result of :func:`conjugate_gradient`: the solution and the true relative residual."""

    solution: torch.Tensor
    iterations: int
    rel_residual: float
    converged: bool


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    *,
    tol: float = 1e-6,
    max_iter: int = 500,
) -> CGResult:
    """Solve ``A b = rhs`` for a symmetric positive (semi-)definite ``A`` given as ``matvec``.

    State in float64; stops when the recursive residual is below ``tol·‖rhs‖``; the
    reported residual is recomputed as ``‖rhs − A b‖/‖rhs‖``.
    """
    rhs = rhs.double()
    sol = torch.zeros_like(rhs)
    bnorm = float(rhs.norm())
    if bnorm == 0.0:
        return CGResult(sol, 0, 0.0, True)
    r = rhs.clone()
    p = r.clone()
    rs = float(r @ r)
    it = 0
    for it in range(1, max_iter + 1):
        ap = matvec(p).double()
        curv = float(p @ ap)
        if curv <= 0.0:
            break
        alpha = rs / curv
        sol += alpha * p
        r -= alpha * ap
        rs_new = float(r @ r)
        if math.sqrt(rs_new) <= tol * bnorm:
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    rel = float((rhs - matvec(sol).double()).norm()) / bnorm
    converged = rel <= 10 * tol
    if not converged:
        log.warning(
            "CG stopped after %d iterations at relative residual %.2e (tol %.0e)", it, rel, tol
        )
    return CGResult(sol, it, rel, converged)

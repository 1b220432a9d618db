"""Adversarial perturbation of the released gradient (Li et al., arXiv:2408.16913, CCS 2024;
methods.md section 1: "add δ with ‖δ‖ ≤ ε, chosen by PGD to lower a surrogate attacker's
confidence").

The paper's code is not public, so the surrogate attacker is a [derived] choice, documented
here and in the README. The client knows its own batch, so it can play the attacker it fears
most: a **gradient-alignment attacker** that scores each record z_i of the batch by how well
its per-sample gradient g_i lines up with the release, ``conf_i = cos(g̃, g_i)`` (the signal
attribute, property and membership inference read from an aggregate: a record whose gradient
direction is in the release). With ḡ = mean_i g_i (the undefended batch gradient) the defense
releases g̃ = ḡ + δ with

    δ* = argmin_δ  agg_i cos(ḡ + δ, g_i)       (agg = mean or max over the batch)
         s.t.  ‖δ‖ ≤ budget · ‖ḡ‖                      (relative L2 budget: bounded utility loss)
               ⟨ḡ + δ, ḡ⟩ ≥ min_inner · ‖ḡ‖²          (still a descent direction for the batch)

found by L2 PGD: a random start in the feasible set drawn from the defense generator, then
``steps`` normalised-gradient steps of size ``2.5 · radius / steps`` (Madry et al. 2018), each
followed by the exact Euclidean projection onto the intersection of the ball and the
half-space (:func:`project_ball_halfspace`); the iterate with the lowest objective is kept
(the zero perturbation is a candidate too, so the defense never raises the surrogate's
confidence). With budget < 1 − min_inner the half-space constraint is never active.

It needs the batch's per-sample gradients, so it is a ``per_sample`` defense (like DP-SGD,
and therefore not stackable with ``dp_sgd``/``dynamic_dp``; stack it with update transforms
freely). FedSGD: the release is exactly g̃. FedAvg: every local step's gradient is perturbed
(each within the budget of that step's gradient).
"""

from __future__ import annotations

import math

import torch

from clients.defenses.base import PerSampleDefense, Tensors, register_defense

OBJECTIVES = ("mean", "max")


def project_ball_halfspace(
    d: torch.Tensor, u: torch.Tensor, radius: float, offset: float
) -> torch.Tensor:
    """Euclidean projection of ``d`` onto {δ : ‖δ‖ ≤ radius, ⟨δ, u⟩ ≥ −offset} (``u`` a unit
    vector, ``offset`` ≥ 0, so the origin is feasible).

    If the ball projection satisfies the half-space it is the answer (the half-space contains
    the origin, so scaling towards it cannot leave it when ``d`` was inside); otherwise the
    answer lies on the hyperplane ⟨δ, u⟩ = −offset, inside the disc of radius
    √(radius² − offset²) centred at −offset·u.
    """
    n = d.norm()
    ball = d * (radius / n) if n > radius else d
    if float(ball @ u) >= -offset:
        return ball
    center = -offset * u
    w = d - (d @ u) * u  # component in the hyperplane's directions
    rho = math.sqrt(max(radius * radius - offset * offset, 0.0))
    wn = w.norm()
    if wn > rho:
        w = w * (rho / wn)
    return center + w


@register_defense("adversarial_perturbation")
class AdversarialPerturbation(PerSampleDefense):
    """PGD perturbation of the batch gradient against a gradient-alignment surrogate attacker
    (see the module docstring for the exact problem).

    Parameters
    ----------
    budget:
        Relative L2 budget, > 0: ‖δ‖ ≤ budget · ‖ḡ‖.
    steps:
        PGD steps, an integer ≥ 1 (default 20).
    objective:
        ``"mean"`` (default: the mean alignment over the batch's records) or ``"max"`` (the
        most exposed record).
    min_inner:
        In (0, 1]: the release keeps ⟨g̃, ḡ⟩ ≥ min_inner · ‖ḡ‖² (default 0.1), a positive
        inner product with the true gradient.

    Metrics: ``relative_perturbation`` = ‖δ‖/‖ḡ‖, ``cosine_to_original`` = cos(g̃, ḡ),
    ``surrogate_confidence_before`` / ``_after`` (the objective at ḡ and at g̃).
    """

    def __init__(
        self, *, budget: float, steps: int = 20, objective: str = "mean", min_inner: float = 0.1
    ) -> None:
        if (
            isinstance(budget, bool)
            or not isinstance(budget, (int, float))
            or not 0 < budget < math.inf
        ):
            raise ValueError(
                f"budget (relative L2 norm of the perturbation) must be a finite number > 0, got {budget!r}"
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if objective not in OBJECTIVES:
            raise ValueError(
                f"objective must be one of {', '.join(map(repr, OBJECTIVES))}; got {objective!r}"
            )
        if (
            isinstance(min_inner, bool)
            or not isinstance(min_inner, (int, float))
            or not 0 < min_inner <= 1
        ):
            raise ValueError(f"min_inner must be a number in (0, 1], got {min_inner!r}")
        self.budget = float(budget)
        self.steps = steps
        self.objective = objective
        self.min_inner = float(min_inner)

    def _confidence(self, release: torch.Tensor, unit_rows: torch.Tensor) -> torch.Tensor:
        cos = unit_rows @ release / release.norm().clamp_min(1e-30)
        return cos.mean() if self.objective == "mean" else cos.max()

    def perturb(self, per_sample: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """The release g̃ (flat) from flat per-sample gradients ``[B, P]``."""
        g = per_sample.mean(dim=0)
        gnorm = float(g.norm())
        if gnorm == 0.0 or not math.isfinite(gnorm):
            self.record("relative_perturbation", 0.0)
            self.record("cosine_to_original", 1.0 if gnorm == 0.0 else float("nan"))
            return g
        work = torch.float64 if g.dtype == torch.float64 else torch.float32
        gw = g.detach().to(work)
        rows = per_sample.detach().to(work)
        unit_rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
        u = gw / gnorm
        radius = self.budget * gnorm
        offset = (1.0 - self.min_inner) * gnorm  # ⟨ḡ+δ, ḡ⟩ ≥ m‖ḡ‖² ⟺ ⟨δ, u⟩ ≥ −(1 − m)‖ḡ‖
        start = torch.randn(gw.shape, generator=generator, dtype=work).to(gw.device)
        start = start * (
            radius
            * float(torch.rand((), generator=generator))
            / float(start.norm().clamp_min(1e-30))
        )
        delta = project_ball_halfspace(start, u, radius, offset)
        step = 2.5 * radius / self.steps
        best_delta = torch.zeros_like(gw)
        with torch.no_grad():
            before = float(self._confidence(gw, unit_rows))
        best = before
        for _ in range(self.steps):
            delta = delta.detach().requires_grad_(True)
            conf = self._confidence(gw + delta, unit_rows)
            if float(conf) < best:
                best, best_delta = float(conf), delta.detach().clone()
            (grad,) = torch.autograd.grad(conf, delta)
            gn = grad.norm()
            if not gn > 0:
                break
            with torch.no_grad():
                delta = project_ball_halfspace(delta - step * grad / gn, u, radius, offset)
        with torch.no_grad():
            conf = float(self._confidence(gw + delta, unit_rows))
            if conf < best:
                best, best_delta = conf, delta.detach().clone()
            release = gw + best_delta
        self.record("relative_perturbation", float(best_delta.norm()) / gnorm)
        self.record("cosine_to_original", float(release @ gw) / (float(release.norm()) * gnorm))
        self.record("surrogate_confidence_before", before)
        self.record("surrogate_confidence_after", best)
        return release.to(g.dtype)

    def reduce_per_sample(self, grads: Tensors, *, generator: torch.Generator) -> Tensors:
        names = list(grads)
        if not names:
            return {}
        b = next(iter(grads.values())).shape[0]
        if b == 0:
            return {n: g.sum(dim=0) for n, g in grads.items()}
        flat = torch.cat([grads[n].reshape(b, -1) for n in names], dim=1)
        release = self.perturb(flat, generator=generator)
        out, start = {}, 0
        for n in names:
            shape = grads[n].shape[1:]
            size = math.prod(shape)
            out[n] = release[start : start + size].reshape(shape)
            start += size
        return out

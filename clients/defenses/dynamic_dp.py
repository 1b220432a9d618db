"""Dynamic-noise per-example DP (Wei & Liu, "Gradient Leakage Attack Resilient Deep Learning",
IEEE TIFS 17, 2022; methods.md section 3), on top of DP-SGD (Abadi et al., CCS 2016).

Every local step replaces the batch gradient by

    ĝ = (1/B) Σ_i g_i / max(1, ‖g_i‖/C_t) + (1/B)·N(0, σ_t² C_t² I)

with σ_t from a schedule (:mod:`clients.defenses.schedules`) and C_t from a clipping rule:
``fixed`` (C), ``l2max`` (max_i ‖g_i‖) or ``mean`` (mean_i ‖g_i‖), the last two clamped to
[``clip_min``, ``clip_max``]. Privacy is accounted by RDP composition of the σ_t sequence
(Mironov 2017) with Opacus' functions (:mod:`clients.defenses.accounting`).

Threat model: the server sees only ĝ (FedSGD) or the delta after the noisy local steps
(FedAvg), the round and the protocol's metadata; it may run any reconstruction attack.

Caveat: with ``l2max`` or ``mean`` clipping, C_t is a function of the batch's gradients, so
the sensitivity is data-dependent and the reported ε is *not* a formal guarantee (the metric
``epsilon_formal`` is 0); it is the ε the mechanism would have if C_t were fixed in advance,
as in the paper's reporting. Fixed-size batches (the default) are not Poisson samples either
(see :mod:`clients.defenses.accounting`); ``epsilon_formal`` is 1 only with ``poisson = true``
and ``fixed`` clipping.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clients.defenses.accounting import AccountedDefense
from clients.defenses.base import Tensors, TrainingInfo, register_defense
from clients.defenses.schedules import SCHEDULE_NAMES, resolve_schedule, sigma_at

CLIPPINGS = ("fixed", "l2max", "mean")
CLIP_SCOPES = ("flat", "layer")
STEP_UNITS = ("round", "iteration")


def _pos(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return str(value)


@register_defense("dynamic_dp")
class DynamicDP(AccountedDefense):
    """Per-example clipping and Gaussian noise with a σ_t schedule and a C_t rule.

    Parameters
    ----------
    schedule:
        ``constant`` (needs ``sigma``), ``linear``, ``staircase``, ``exponential``, ``cyclic``
        or ``"pkg.module:function"`` (a function ``(t, T) -> σ``).
    sigma:
        σ of the ``constant`` schedule (ignored by the others).
    horizon:
        T of the schedule (rounds or iterations, see ``step_unit``); default 100 (the paper's).
    step_unit:
        ``round``: t = server round − 1 (σ fixed within a round); ``iteration``:
        t = (round − 1)·local_steps + local step (the paper's per-iteration version).
    clipping:
        ``fixed`` (C_t = ``clip_norm``), ``l2max`` or ``mean`` of the per-sample norms,
        clamped to [``clip_min``, ``clip_max``] (data-dependent: ε not formal).
    clip_norm, clip_min, clip_max:
        4.0, 0.1, 8.0 (the paper's defaults).
    clip_scope:
        ``flat`` (one norm over all parameters, as Opacus) or ``layer`` (each parameter tensor
        clipped to its own C_t and noised with σ_t·C_t; over L tensors the sensitivity is
        √L·C, so the accountant charges the effective multiplier σ_t/√L).
    delta:
        δ of the reported ε(δ) (1e-5).
    sample_rate:
        q of the accountant; 0 (default) = batch size / client dataset size.
    poisson:
        false (default): the simulator's fixed-size batches, B = the drawn size; true: Poisson
        batches (each example with probability q), B = the expected size ``batch_size``.

    Metrics: ``sigma`` and ``clip`` (means over the update's steps), ``epsilon``, ``steps``,
    ``sample_rate``, ``epsilon_formal`` (1 only with ``poisson`` and ``fixed`` clipping).
    """

    def __init__(
        self,
        *,
        schedule: str = "constant",
        sigma: float | None = None,
        horizon: int = 100,
        step_unit: str = "round",
        clipping: str = "fixed",
        clip_norm: float = 4.0,
        clip_min: float = 0.1,
        clip_max: float = 8.0,
        clip_scope: str = "flat",
        delta: float = 1e-5,
        sample_rate: float = 0.0,
        poisson: bool = False,
    ) -> None:
        super().__init__(delta=delta, sample_rate=sample_rate, poisson=poisson)
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(
                f"horizon must be an integer >= 1 (rounds or iterations), got {horizon!r}"
            )
        if not isinstance(schedule, str):
            raise ValueError(
                f"schedule must be one of {', '.join(map(repr, SCHEDULE_NAMES))} or a "
                f"'pkg.module:function' path; got {schedule!r}"
            )
        self.schedule_name = schedule
        self.schedule = resolve_schedule(schedule, sigma=sigma)
        self.horizon = horizon
        sigma_at(self.schedule, 0, horizon)  # a user schedule fails here, at config load
        self.step_unit = _choice("step_unit", step_unit, STEP_UNITS)
        self.clipping = _choice("clipping", clipping, CLIPPINGS)
        self.clip_scope = _choice("clip_scope", clip_scope, CLIP_SCOPES)
        self.clip_norm = _pos("clip_norm", clip_norm)
        self.clip_min, self.clip_max = _pos("clip_min", clip_min), _pos("clip_max", clip_max)
        if self.clip_min > self.clip_max:
            raise ValueError(f"clip_min ({clip_min}) must be <= clip_max ({clip_max})")
        self.fixed_clipping = self.clipping == "fixed"
        self._step = 0

    def begin(self, model: nn.Module, info: TrainingInfo) -> None:
        super().begin(model, info)
        self._step = 0

    def current_t(self) -> int:
        """t of the schedule for the next step."""
        r = max(0, self.info.server_round - 1)
        return r if self.step_unit == "round" else r * self.info.num_steps + self._step

    def clip_bound(self, norms: torch.Tensor) -> float:
        """C_t for per-sample norms ``norms`` ([B]) under the clipping rule."""
        if self.clipping == "fixed":
            return self.clip_norm
        if norms.numel() == 0:  # an empty Poisson batch: the largest allowed bound
            return self.clip_max
        value = float(norms.max() if self.clipping == "l2max" else norms.mean())
        return min(max(value, self.clip_min), self.clip_max)

    def clip(self, grads: Tensors) -> tuple[Tensors, list[float]]:
        """Per-sample gradients clipped by the rule (per ``clip_scope`` group) and the C_t of
        each group: ``g_i / max(1, ‖g_i‖/C_t)``."""
        groups = [list(grads)] if self.clip_scope == "flat" else [[n] for n in grads]
        clipped: Tensors = {}
        bounds: list[float] = []
        for names in groups:
            norms = torch.cat([grads[n].flatten(1) for n in names], dim=1).norm(dim=1)
            c = self.clip_bound(norms)
            bounds.append(c)
            factor = (c / (norms + 1e-12)).clamp(max=1.0)
            for n in names:
                clipped[n] = grads[n] * factor.to(grads[n].dtype).reshape(
                    -1, *([1] * (grads[n].dim() - 1))
                )
        return clipped, bounds

    def reduce_per_sample(self, grads: Tensors, *, generator: torch.Generator) -> Tensors:
        sigma = sigma_at(self.schedule, self.current_t(), self.horizon)
        self._step += 1
        batch = self.divisor(next(iter(grads.values())).shape[0])
        clipped, bounds = self.clip(grads)
        bound_of = dict(
            zip(grads, bounds * len(grads) if len(bounds) == 1 else bounds, strict=True)
        )
        out: Tensors = {}
        for n, g in clipped.items():
            noise = torch.normal(
                0.0, sigma * bound_of[n], g.shape[1:], generator=generator, dtype=g.dtype
            )
            out[n] = (g.sum(dim=0) + noise.to(g.device)) / batch
        self.account(sigma if len(bounds) == 1 else sigma / math.sqrt(len(bounds)))
        self.record("sigma", sigma)
        self.record("clip", sum(bounds) / len(bounds))
        return out

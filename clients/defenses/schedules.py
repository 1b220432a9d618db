"""Noise-multiplier schedules σ_t of dynamic-noise DP (Wei & Liu, IEEE TIFS 2022; methods.md §3).

Each schedule maps a step ``t`` (a round or a local iteration, 0-based) and the horizon ``T``
to the noise multiplier σ_t. The four dynamic schedules are the formulas of the authors'
code (git-disl/Fed-alphaCDP): every one goes from ≈15 at t = 0 to ≈4.85 at t = T.

==============  =====================================
schedule        σ_t
==============  =====================================
constant        ``sigma``
linear          15 − 10.15·t/T
staircase       15 − 1.015·⌊10·t/T⌋  (= ⌊t/10⌋ at T = 100, the paper's setting)
exponential     exp(1.58 + 1.13·(T − t)/T)
cyclic          15·cos(1.24·t/T)
==============  =====================================

``t`` is clamped to [0, T]: past the horizon the schedule stays at σ_T (the formulas would
otherwise go negative). A user-defined schedule is a dotted path ``"pkg.module:function"``
to a function ``(t, T) -> σ``; its values must be finite and > 0.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

Schedule = Callable[[int, int], float]


def _clamp(t: int, horizon: int) -> float:
    return float(min(max(t, 0), horizon))


def linear(t: int, horizon: int) -> float:
    """σ_t = 15 − 10.15·t/T."""
    return 15.0 - 10.15 * _clamp(t, horizon) / horizon


def staircase(t: int, horizon: int) -> float:
    """σ_t = 15 − 1.015·⌊10·t/T⌋: ten stairs over the horizon (the paper's ⌊t/10⌋ at T = 100)."""
    return 15.0 - 1.015 * math.floor(10.0 * _clamp(t, horizon) / horizon + 1e-9)


def exponential(t: int, horizon: int) -> float:
    """σ_t = exp(1.58 + 1.13·(T − t)/T)."""
    return math.exp(1.58 + 1.13 * (horizon - _clamp(t, horizon)) / horizon)


def cyclic(t: int, horizon: int) -> float:
    """σ_t = 15·cos(1.24·t/T) (the paper's name; over [0, T] it is a quarter-wave decay)."""
    return 15.0 * math.cos(1.24 * _clamp(t, horizon) / horizon)


SCHEDULES: dict[str, Schedule] = {
    "linear": linear,
    "staircase": staircase,
    "exponential": exponential,
    "cyclic": cyclic,
}
#: Names accepted by :func:`resolve_schedule` (besides a ``"pkg.module:function"`` path).
SCHEDULE_NAMES: tuple[str, ...] = ("constant", *SCHEDULES)


def _load_dotted(path: str) -> Schedule:
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"schedule {path!r}: cannot import it ({exc})") from None
    if not callable(fn):
        raise ValueError(f"schedule {path!r} is not callable")
    return fn


def resolve_schedule(schedule: str, *, sigma: float | None = None) -> Schedule:
    """The function ``(t, T) -> σ_t`` for ``schedule``.

    ``schedule`` is one of :data:`SCHEDULE_NAMES` or ``"pkg.module:function"``; ``constant``
    needs ``sigma`` (> 0). Raises ``ValueError`` naming the allowed values.
    """
    if schedule == "constant":
        if (
            sigma is None
            or not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool))
            or not 0 < sigma < math.inf
        ):
            raise ValueError(f"schedule 'constant' needs sigma, a finite number > 0; got {sigma!r}")
        value = float(sigma)
        return lambda t, horizon: value
    if schedule in SCHEDULES:
        return SCHEDULES[schedule]
    if isinstance(schedule, str) and ":" in schedule:
        return _load_dotted(schedule)
    raise ValueError(
        f"schedule must be one of {', '.join(map(repr, SCHEDULE_NAMES))} or a "
        f"'pkg.module:function' path; got {schedule!r}"
    )


def sigma_at(fn: Schedule, t: int, horizon: int) -> float:
    """``fn(t, horizon)`` checked to be a finite number > 0."""
    value = fn(int(t), int(horizon))
    if not isinstance(value, (int, float)) or not 0 < float(value) < math.inf:
        raise ValueError(
            f"noise schedule gave σ = {value!r} at t = {t} (T = {horizon}); σ must be finite and > 0"
        )
    return float(value)

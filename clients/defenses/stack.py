"""Building a client's stack of defenses from config, and the rules a stack must follow.

Stacking rules (each violation is one :class:`~fl_privsim.core.errors.ConfigError` naming the two
entries and the rule):

1. Declared order = execution order: ``sampler`` → ``per_sample`` → ``step`` → ``update``
   (e.g. ``identical_labels`` first; a DP defense before a transform of the update).
2. At most one sampler and one per-sample defense (each replaces the default draw or the
   default batch gradient; two cannot both do it). ``dp_sgd`` with ``poisson = true`` draws
   its own (Poisson) batches, so it counts as the sampler too.
3. Within one stage (``step`` or ``update``):

   - at most one ``signsgd`` and one ``quantization``;
   - after ``signsgd`` only ``quantization`` may follow: the sign already discards the
     magnitudes, so pruning or noise after it is meaningless (prune or add noise first);
   - ``quantization`` comes last: it models the wire format, so anything after it (e.g.
     pruning or noise) undoes it.
4. A defense with role ``"inspect"`` (``model_inspection``) may stand anywhere: it looks at the
   received model in ``begin()``, before any training, and changes nothing.
5. ``soteria`` is a ``step`` defense (it needs each local batch): at most one per stack; it
   runs after any sampler or per-sample defense (e.g. DP-SGD's noisy gradient, whose columns
   it zeroes as post-processing) and before every update transform; within the step stage
   rule 3 puts it before ``signsgd`` and ``quantization``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from clients.defenses.base import DEFENSES, STAGES, BatchSamplerDefense, Defense
from fl_privsim.core.errors import ConfigError, UserError


def _label(i: int, d: Defense) -> str:
    return f"defenses[{i}] ({d.name or type(d).__name__})"


def validate_stack(defenses: Sequence[Defense]) -> None:
    """Raise :class:`ConfigError` when ``defenses`` (in declared order) break a stacking rule."""
    for i, d in enumerate(defenses):
        if d.stage not in STAGES:
            raise ConfigError(
                f"{_label(i, d)}: stage {d.stage!r} is not one of {', '.join(STAGES)}"
            )
    for j, d in enumerate(defenses):
        for i in range(j):
            e = defenses[i]
            if "inspect" in (
                d.role,
                e.role,
            ):  # inspection runs in begin(), before any training: anywhere
                continue
            where = f"{_label(j, d)} after {_label(i, e)}"
            if STAGES.index(d.stage) < STAGES.index(e.stage):
                raise ConfigError(
                    f"{where}: a {d.stage!r} defense runs before a {e.stage!r} one; declare defenses "
                    f"in execution order ({' → '.join(STAGES)})"
                )
            if e.stage == "sampler" and _provided_sampler(d) is not None:
                raise ConfigError(
                    f"{where}: {d.name} samples its own batches (poisson = true); it cannot "
                    f"be combined with the sampler {e.name or type(e).__name__}"
                )
            if d.stage != e.stage:
                continue
            if d.exclusive and type(d) is type(e):
                raise ConfigError(
                    f"{where}: at most one {d.name or type(d).__name__} per {d.stage!r} stage"
                )
            if e.stage in ("sampler", "per_sample"):
                raise ConfigError(
                    f"{where}: at most one {e.stage!r} defense (both would replace the same step)"
                )
            if e.role == "sign" and d.role != "quantize":
                raise ConfigError(
                    f"{where}: after signsgd only quantization may follow (the sign already discards "
                    f"the magnitudes; put {d.name or type(d).__name__} before signsgd)"
                )
            if e.role == "quantize":
                raise ConfigError(
                    f"{where}: quantization must be the last defense of its stage (it is the wire "
                    f"format; put {d.name or type(d).__name__} before it)"
                )


def _fields(spec: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, dict):
        return str(spec.get("name", "")), dict(spec.get("params", {}))
    return str(spec.name), dict(spec.params)


def build_defenses(specs: Iterable[Any]) -> list[Defense]:
    """Create the defenses of ``specs`` (``DefenseConfig`` or ``{"name", "params"}``) in
    order and check the stack; any bad name, parameter or order is one :class:`ConfigError`
    prefixed with ``defenses[i]``."""
    out: list[Defense] = []
    for i, spec in enumerate(specs):
        name, params = _fields(spec)
        if not name:
            raise ConfigError(
                f"defenses[{i}].name: every [[defenses]] entry needs a name; known: "
                f"{', '.join(DEFENSES.names())}"
            )
        try:
            defense = DEFENSES.create(name, **params)
        except UserError as exc:
            raise ConfigError(f"defenses[{i}]: {exc}") from None
        if not isinstance(defense, Defense):
            raise ConfigError(f"defenses[{i}]: {name!r} is not a clients.defenses.Defense")
        if not defense.name:
            defense.name = name  # type: ignore[misc]  # an entry-point class without one
        out.append(defense)
    validate_stack(out)
    return out


def _provided_sampler(d: Defense) -> BatchSamplerDefense | None:
    """The sampler a non-sampler defense asks for (``dp_sgd(poisson = true)``), or ``None``."""
    provide = getattr(d, "batch_sampler", None)
    return provide() if callable(provide) and not isinstance(d, BatchSamplerDefense) else None


def batch_sampler(defenses: Sequence[Defense]) -> BatchSamplerDefense | None:
    """The stack's sampler defense, or the sampler another defense provides (Poisson sampling
    of ``dp_sgd``), or ``None`` (draw batches the default way)."""
    for d in defenses:
        if isinstance(d, BatchSamplerDefense):
            return d
    for d in defenses:
        if (sampler := _provided_sampler(d)) is not None:
            return sampler
    return None


def draw_batches(
    sampler: BatchSamplerDefense,
    partition: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    num_batches: int,
    generator: torch.Generator,
) -> list[np.ndarray]:
    """Call ``sampler`` and check what it returns (sizes, membership in the partition)."""
    batches = sampler.sample_batches(
        partition, labels, batch_size=batch_size, num_batches=num_batches, generator=generator
    )
    allowed = set(np.asarray(partition).tolist())
    allows_empty = bool(getattr(sampler, "allows_empty", False))  # Poisson batches may be empty
    if len(batches) != num_batches:
        raise ValueError(f"{sampler.name}: returned {len(batches)} batches, expected {num_batches}")
    for b in batches:
        if (len(b) == 0 and not allows_empty) or not set(np.asarray(b).tolist()) <= allowed:
            raise ValueError(
                f"{sampler.name}: a batch is empty or has indices outside the partition"
            )
    return [np.asarray(b, dtype=np.int64) for b in batches]

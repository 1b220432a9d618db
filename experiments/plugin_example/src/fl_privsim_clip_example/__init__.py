"""An example fl-privsim defense living in its own package (registered by entry point).

``clip_update`` scales the whole update down to L2 norm at most ``max_norm`` (the clipping
half of DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"; without noise it bounds the sensitivity but gives no privacy by itself).
"""

from __future__ import annotations

import math

import torch

from clients.defenses import TensorTransform

__all__ = ["ClipUpdate"]


class ClipUpdate(TensorTransform):
    """Scale the update (all tensors together) to L2 norm ``<= max_norm``.

    Parameters
    ----------
    max_norm:
        The bound C > 0.
    apply_to:
        ``"update"`` (default) or ``"step"``.
    """

    def __init__(self, *, max_norm: float, apply_to: str = "update") -> None:
        super().__init__(apply_to=apply_to)
        if (
            isinstance(max_norm, bool)
            or not isinstance(max_norm, (int, float))
            or not 0 < max_norm < math.inf
        ):
            raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
        self.max_norm = float(max_norm)

    def transform(
        self, tensors: dict[str, torch.Tensor], *, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        norm = math.sqrt(sum(float(t.detach().pow(2).sum()) for t in tensors.values()))
        factor = min(1.0, self.max_norm / norm) if norm > 0 else 1.0
        self.record("clip_factor", factor)
        return {n: t * factor for n, t in tensors.items()}

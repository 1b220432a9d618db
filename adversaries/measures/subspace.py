"""Per-layer subspace distance between the gradients of two groups (latent-information leakage).

Mo, Borovykh, Malekzadeh, Haddadi, Demetriou, "Quantifying and Localizing Usable Information
Leakage from Neural Network Gradients" (arXiv:2105.13929): stack the per-sample gradients of
layer ``l`` for the samples with attribute value ``a`` and for those with value ``b``; take
the top-``k`` right singular vectors ``V_a``, ``V_b`` (``d_l × k``); the principal angles
``θ_1 ≤ … ≤ θ_k`` between their spans give the distance
``d = ‖V_aV_aᵀ − V_bV_bᵀ‖_F / √2 = √(Σ sin²θ_i)`` (0 for the same subspace, √k for
orthogonal ones). A layer whose gradient subspaces differ by attribute leaks the attribute.

Threat model: analyst-side, given the samples, labels and attribute values. Principal angles
are computed by ``scipy.linalg.subspace_angles`` (Knyazev & Argentati's sine/cosine
combination, accurate for small angles too).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from adversaries.measures._common import LossFn, default_loss, per_sample_layer_gradients

log = logging.getLogger(__name__)


def top_right_singular_vectors(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Orthonormal basis ``(d, k')`` of the top-``k`` right singular vectors of ``rows`` (n × d),
    ``k' = min(k, rank)``: directions with a zero singular value are dropped."""
    _, s, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    tol = s.max() * max(rows.shape) * torch.finfo(torch.float64).eps if s.numel() else 0.0
    keep = min(k, int((s > tol).sum()))
    basis: torch.Tensor = vh[:keep].T
    return basis


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spans of ``a`` and ``b``."""
    from scipy.linalg import subspace_angles

    angles = subspace_angles(a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy())
    return torch.from_numpy(np.sort(angles))


def subspace_distance(angles: torch.Tensor) -> float:
    """``√(Σ sin²θ_i)`` = ``‖P_a − P_b‖_F/√2`` for equal-dimensional subspaces."""
    return float(torch.sin(angles.double()).pow(2).sum().sqrt())


@dataclass(frozen=True)
class SubspaceResult:
    """Principal angles and distance between two groups' gradient subspaces for one layer."""

    layer: str
    k: int
    angles: tuple[float, ...]
    distance: float
    normalized_distance: float
    n_a: int
    n_b: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def layer_subspace_distance(
    grads_a: Mapping[str, torch.Tensor], grads_b: Mapping[str, torch.Tensor], *, k: int = 5
) -> list[SubspaceResult]:
    """Per layer, principal angles between the top-``k`` right singular subspaces of two
    stacks of per-sample gradients (``{layer: (n, d_l)}``, same layers in both).
    ``normalized_distance = distance/√k`` lies in [0, 1]."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if set(grads_a) != set(grads_b):
        raise ValueError("both groups need the same layers")
    out = []
    for layer, ga in grads_a.items():
        gb = grads_b[layer]
        va, vb = top_right_singular_vectors(ga, k), top_right_singular_vectors(gb, k)
        kk = min(va.shape[1], vb.shape[1])
        if kk == 0:
            log.warning("layer %s: a group's gradients are all zero; no subspace", layer)
            out.append(SubspaceResult(layer, 0, (), math.nan, math.nan, ga.shape[0], gb.shape[0]))
            continue
        angles = principal_angles(va[:, :kk], vb[:, :kk])
        dist = subspace_distance(angles)
        out.append(
            SubspaceResult(
                layer,
                kk,
                tuple(float(t) for t in angles),
                dist,
                dist / math.sqrt(kk),
                ga.shape[0],
                gb.shape[0],
            )
        )
    return out


def group_subspace_distance(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    group: torch.Tensor,
    *,
    k: int = 5,
    values: tuple[int, int] | None = None,
    layers: Sequence[str] | None = None,
    loss_fn: LossFn = default_loss,
) -> list[SubspaceResult]:
    """Subspace distance per layer between samples with ``group == values[0]`` and
    ``group == values[1]`` (default: the two distinct values of ``group``, sorted)."""
    uniq = sorted(int(v) for v in torch.unique(group))
    if values is None:
        if len(uniq) != 2:
            raise ValueError(f"group has values {uniq}; pass values=(a, b)")
        values = (uniq[0], uniq[1])
    mask_a, mask_b = group == values[0], group == values[1]
    ga = per_sample_layer_gradients(model, x[mask_a], y[mask_a], loss_fn=loss_fn, layers=layers)
    gb = per_sample_layer_gradients(model, x[mask_b], y[mask_b], loss_fn=loss_fn, layers=layers)
    return layer_subspace_distance(ga, gb, k=k)

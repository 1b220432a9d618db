"""Per-sample gradients and per-sample clipping, the building blocks of DP-SGD.

DP-SGD (Abadi et al. 2016; methods.md sections 1 and 3) clips each example's gradient to
norm C before averaging: ĝ = (1/B) Σ_i g_i / max(1, ‖g_i‖/C) (+ noise). The norm is taken
over all parameters together (flat clipping), as Opacus does by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

Tensors = dict[str, torch.Tensor]


def per_sample_gradients(
    model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, Tensors]:
    """Per-example cross-entropy gradients of the parameters ``names`` with ``torch.func``.

    Returns the mean loss of the batch and, by name, tensors of shape ``[B, *param.shape]``.
    Models with BatchNorm in training mode have no per-sample gradient (the batch statistics
    couple the examples); they are refused with a ``ValueError``.
    """
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
        raise ValueError("per-sample gradients need a model without BatchNorm (use GroupNorm)")
    named = dict(model.named_parameters())
    params = {n: named[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in named.items() if n not in params}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss_one(p: Tensors, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**p, **frozen, **buffers}, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    grads, losses = vmap(grad_and_value(loss_one), in_dims=(None, 0, 0), randomness="different")(
        params, x, y
    )
    return losses.mean(), grads


def per_sample_norms(grads: Tensors) -> torch.Tensor:
    """L2 norm of each example's gradient over all parameters together, shape ``[B]``."""
    flat = [g.reshape(g.shape[0], -1) for g in grads.values()]
    return torch.cat(flat, dim=1).norm(dim=1)


def clip_per_sample(grads: Tensors, max_norm: float) -> Tensors:
    """Scale each example's gradient by ``min(1, max_norm / ‖g_i‖)`` (flat clipping)."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    factor = (max_norm / (per_sample_norms(grads) + 1e-12)).clamp(max=1.0)
    return {n: g * factor.reshape(-1, *([1] * (g.dim() - 1))) for n, g in grads.items()}

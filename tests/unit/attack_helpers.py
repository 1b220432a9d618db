"""Ground-truth side of the attack tests: digits data and observations built from it.

The attacks only ever receive the :class:`Observation`; the samples stay here for scoring.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adversaries.base import Observation
from fl_privsim.core.metrics import match_reconstructions, psnr
from fl_privsim.core.models import build_model

SHAPE = (1, 8, 8)
CLASSES = 10


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """scikit-learn digits as (N, 1, 8, 8) floats in [0, 1], labels, and mean/std."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(d.target, dtype=torch.int64), float(x.mean()), float(x.std())


def sample(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw images in [0, 1], their normalised version and labels."""
    x, y, mean, std = digits()
    raw = x[indices]
    return raw, (raw - mean) / std, y[indices]


def make_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, SHAPE, CLASSES).train()


def observe(
    model: nn.Module,
    x_norm: torch.Tensor,
    y: torch.Tensor,
    *,
    protocol: str = "fedsgd",
    lr: float = 0.1,
) -> Observation:
    """What the server sees after one client step on ``(x_norm, y)`` (mean CE loss)."""
    _, _, mean, std = digits()
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x_norm), y)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    if protocol == "fedsgd":
        update = {n: g.detach().clone() for n, g in zip(names, grads)}
    else:  # one local SGD step, reported as new - old
        named = dict(model.named_parameters())
        update = {n: (named[n].detach() - lr * g) - named[n].detach() for n, g in zip(names, grads)}
    b = x_norm.shape[0]
    return Observation(
        round=1,
        client_id=0,
        protocol=protocol,
        model=model,
        global_params=params,
        update=update,
        batch_size=b,
        local_steps=1,
        lr=lr,
        num_examples=b,
        input_shape=SHAPE,
        num_classes=CLASSES,
        data_mean=(mean,),
        data_std=(std,),
    )


def to_pixels(x_norm: torch.Tensor) -> torch.Tensor:
    _, _, mean, std = digits()
    return (x_norm.detach().cpu().double() * std + mean).clamp(0, 1)


def matched_psnr(raw: torch.Tensor, recon_norm: torch.Tensor) -> np.ndarray:
    """Per-original PSNR after optimal matching of the reconstructions."""
    rec = to_pixels(recon_norm)
    perm = match_reconstructions(raw.double(), rec)
    return psnr(raw.double(), rec[torch.as_tensor(perm)]).numpy()

"""Reconstruction and label metrics, used by the scorer (never by an attack).

All image metrics take images in [0, 1] of shape (N, C, H, W) and return one value per
image. PSNR is ``10 log10(1 / MSE)`` (data range 1), with MSE floored at 1e-10 so an exact
recovery reports 100 dB rather than infinity. SSIM follows Wang et al. (2004) with a
Gaussian window (σ = 1.5, size 11, shrunk to the largest odd size that fits a small image),
K1 = 0.01, K2 = 0.03, averaged over channels and valid positions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

MSE_FLOOR = 1e-10


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"expected two (N, C, H, W) tensors of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error."""
    _check_pair(a, b)
    return ((a.double() - b.double()) ** 2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for data range 1 (capped at 100 dB by the MSE floor)."""
    return 10.0 * torch.log10(1.0 / mse(a, b).clamp_min(MSE_FLOOR))


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    w = torch.outer(g, g)
    return w.expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image structural similarity (Wang et al. 2004), data range 1."""
    _check_pair(a, b)
    a, b = a.double(), b.double()
    c = a.shape[1]
    size = min(window, a.shape[2], a.shape[3])
    if size % 2 == 0:
        size -= 1
    w = _gaussian_window(size, sigma, c).to(a.device)
    c1, c2 = 0.01**2, 0.03**2
    mu_a = F.conv2d(a, w, groups=c)
    mu_b = F.conv2d(b, w, groups=c)
    var_a = F.conv2d(a * a, w, groups=c) - mu_a**2
    var_b = F.conv2d(b * b, w, groups=c) - mu_b**2
    cov = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def match_reconstructions(originals: torch.Tensor, recons: torch.Tensor) -> np.ndarray:
    """Optimal assignment of reconstructions to originals by MSE (Hungarian algorithm).

    Returns ``perm`` such that ``recons[perm[i]]`` is matched with ``originals[i]`` for the
    first ``min(N, M)`` originals; with fewer reconstructions than originals the unmatched
    originals get ``-1``.
    """
    n = originals.shape[0]
    cost = ((originals.double().flatten(1)[:, None, :] - recons.double().flatten(1)[None, :, :]) ** 2).mean(-1)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    perm = np.full(n, -1, dtype=np.int64)
    perm[rows] = cols
    return perm


def label_accuracy(true: torch.Tensor, predicted: torch.Tensor) -> float:
    """Fraction of labels recovered, as a multiset (order-free): |true ∩ predicted| / |true|.

    For one sample this is plain accuracy; for a batch it counts how many of the true labels
    are matched by a recovered label, each recovered label used once.
    """
    true_counts = np.bincount(true.cpu().numpy().astype(np.int64))
    pred = predicted.cpu().numpy().astype(np.int64)
    pred_counts = np.bincount(pred, minlength=true_counts.size)[: true_counts.size]
    return float(np.minimum(true_counts, pred_counts).sum() / max(len(true), 1))

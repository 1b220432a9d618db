"""Reconstruction and label metrics, used by the scorer (never by an attack).

All image metrics take images in [0, 1] of shape (N, C, H, W) and return one value per
image. PSNR is ``10 log10(1 / MSE)`` (data range 1), with MSE floored at 1e-10 so an exact
recovery reports 100 dB rather than infinity. SSIM follows Wang et al. (2004) with a
Gaussian window (σ = 1.5, size 11, shrunk to the largest odd size that fits a small image),
K1 = 0.01, K2 = 0.03, averaged over channels and valid positions.

AVD (Eloul et al., arXiv:2204.12495; code of Papadopoulos et al., ECIR 2024) compares the
first- and second-order finite differences of an original and a reconstruction; it stays
informative for noisy reconstructions where MSE and SSIM saturate. The attack success rate
(Wei & Liu, IEEE TIFS 2022; Wei et al., ESORICS 2020) is the fraction of originals whose
matched reconstruction has an MSE at or below a threshold.
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


def _quantise_8bit(v: torch.Tensor) -> torch.Tensor:
    """``ToTensor(ToPILImage(v))`` for v in [0, 1]: ``floor(255 v) / 255`` (PIL truncates)."""
    return torch.floor(v.clamp(0.0, 1.0) * 255.0) / 255.0


def _avd_terms(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First- and second-order difference maps d1, d2 of a (N, C, H, W) batch."""
    dx = v[..., :, :-1] - v[..., :, 1:]
    dy = v[..., :-1, :] - v[..., 1:, :]
    d1 = (dx[..., 1:, :] + dy[..., :, 1:]).abs()
    d2x = dx[..., :, :-1] - dx[..., :, 1:]
    d2y = dy[..., :-1, :] - dy[..., 1:, :]
    d2 = (d2x[..., 2:, :] + d2y[..., :, 2:]).abs()
    return d1, d2


def avd(
    originals: torch.Tensor, recons: torch.Tensor, *, c1: float = 1.0, c2: float = 0.5,
    first_order_only: bool = False,
) -> torch.Tensor:
    """Per-image AVD of ``recons`` against ``originals`` (both (N, C, H, W), in [0, 1]).

    As in the reference code: the reconstruction is replaced by ``|v1|`` and quantised to
    8 bits (ToPILImage → ToTensor); with ``Dx v = v[:, :, :-1] - v[:, :, 1:]``,
    ``Dy v = v[:, :-1, :] - v[:, 1:, :]``, ``d1 = |Dx v[:, 1:, :] + Dy v[:, :, 1:]|`` and
    ``d2 = |Dx² v[:, 2:, :] + Dy² v[:, :, 2:]|``,
    ``AVD = sqrt(c1 mean[(d1(v1) - d1(v0))²] + c2 mean[(d2(v1) - d2(v0))²])`` with
    c1 = 1, c2 = 0.5. ``first_order_only`` gives the code's variant
    ``sqrt(mean[(d1(v1)/2 - d1(v0)/2)²] / 0.1)``. Images need H, W >= 3.
    """
    _check_pair(originals, recons)
    if min(originals.shape[2:]) < 3:
        raise ValueError(f"AVD needs images of at least 3x3 pixels, got {tuple(originals.shape[2:])}")
    v0 = originals.double()
    v1 = _quantise_8bit(recons.double().abs())
    a1, a2 = _avd_terms(v0)
    b1, b2 = _avd_terms(v1)
    if first_order_only:
        return torch.sqrt(((b1 / 2 - a1 / 2) ** 2).flatten(1).mean(1) / 0.1)
    first = ((b1 - a1) ** 2).flatten(1).mean(1)
    second = ((b2 - a2) ** 2).flatten(1).mean(1)
    return torch.sqrt(c1 * first + c2 * second)


def avd_matched(originals: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """AVD for a batch: each reconstruction against the original that minimises it.

    Returns one value per reconstruction (Eloul et al.: "match each reconstruction to the
    original that minimizes AVD"). Several reconstructions may pick the same original.
    """
    if originals.dim() != 4 or recons.dim() != 4 or originals.shape[1:] != recons.shape[1:]:
        raise ValueError(
            f"expected (N, C, H, W) and (M, C, H, W) tensors, got {tuple(originals.shape)} and {tuple(recons.shape)}"
        )
    n, m = originals.shape[0], recons.shape[0]
    o = originals.repeat_interleave(m, dim=0)
    r = recons.repeat(n, 1, 1, 1)
    cost = avd(o, r).view(n, m)
    return cost.min(dim=0).values


def attack_success_rate(per_original_mse: torch.Tensor, threshold: float, num_originals: int) -> float:
    """Fraction of ``num_originals`` whose matched reconstruction has MSE <= ``threshold``.

    ``per_original_mse`` holds the MSE of each matched original; originals left without a
    reconstruction count as failures.
    """
    if num_originals <= 0:
        return 0.0
    return float((per_original_mse <= threshold).sum()) / float(num_originals)

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
matched reconstruction has an MSE at or below a threshold; the leakage rate is the share of
the clients behind an update with at least one such record.

Matching scales to about a thousand originals against a thousand reconstructions: the MSE
cost matrix and the all-pairs AVD are computed from Gram matrices (``|a|² + |b|² - 2 a·b`` in
float64, in row chunks) instead of materialising every (original, reconstruction) pair.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

MSE_FLOOR = 1e-10


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(
            f"expected two (N, C, H, W) tensors of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error."""
    _check_pair(a, b)
    return ((a.double() - b.double()) ** 2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for data range 1 (capped at 100 dB by the MSE floor)."""
    return 10.0 * torch.log10(1.0 / mse(a, b).clamp_min(MSE_FLOOR))


def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _valid_filter_matrix(n: int, g: torch.Tensor) -> torch.Tensor:
    """(n - k + 1, n) matrix ``F`` with ``(F @ v)[i] = sum_j g[j] v[i + j]`` (a valid
    cross-correlation with the length-k filter ``g``, as ``conv1d`` computes it)."""
    k = g.numel()
    out = torch.zeros(n - k + 1, n, dtype=g.dtype, device=g.device)
    rows = torch.arange(n - k + 1, device=g.device)
    for j in range(k):
        out[rows, rows + j] = g[j]
    return out


def ssim(a: torch.Tensor, b: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image structural similarity (Wang et al. 2004), data range 1.

    The Gaussian window is separable, so each local mean is ``Fv @ x @ Fh.T`` with banded
    filter matrices: equal to a grouped ``conv2d`` with the 2-D window up to float64 rounding,
    and much faster for a large batch.
    """
    _check_pair(a, b)
    a, b = a.double(), b.double()
    size = min(window, a.shape[2], a.shape[3])
    if size % 2 == 0:
        size -= 1
    g = _gaussian_1d(size, sigma).to(a.device)
    fv = _valid_filter_matrix(a.shape[2], g)
    fh_t = _valid_filter_matrix(a.shape[3], g).T

    def blur(v: torch.Tensor) -> torch.Tensor:
        return fv @ v @ fh_t

    c1, c2 = 0.01**2, 0.03**2
    mu_a = blur(a)
    mu_b = blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return s.flatten(1).mean(1)


#: Rows of the left operand per chunk of a pairwise-distance computation; bounds the
#: temporaries to ``PAIRWISE_CHUNK`` x M float64 values beyond the inputs themselves.
PAIRWISE_CHUNK = 1024


def pairwise_sq_distances(
    a: torch.Tensor, b: torch.Tensor, *, chunk: int = PAIRWISE_CHUNK
) -> torch.Tensor:
    """All squared Euclidean distances between the rows of ``a`` (N, D) and ``b`` (M, D).

    Computed as ``|a_i|² + |b_j|² - 2 a_i·b_j`` in float64, ``chunk`` rows of ``a`` at a time,
    and clamped at 0 (the expansion can round an exact zero to a tiny negative number).

    Parameters
    ----------
    a, b:
        Two 2-D tensors with the same number of columns, on the same device.
    chunk:
        Rows of ``a`` per matrix product.

    Returns
    -------
    torch.Tensor
        (N, M) float64 tensor on the inputs' device.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"expected (N, D) and (M, D) tensors, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    a, b = a.double(), b.double()
    b_sq = (b * b).sum(1)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[0], max(1, chunk)):
        block = a[start : start + chunk]
        d = (block * block).sum(1)[:, None] + b_sq[None, :] - 2.0 * (block @ b.T)
        out[start : start + chunk] = d.clamp_min_(0.0)
    return out


def mse_cost_matrix(originals: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """(N, M) float64 matrix of the MSE between every original and every reconstruction.

    Equal (up to float64 rounding) to ``((o[:, None] - r[None]) ** 2).mean(-1)`` on the
    flattened images, without the (N, M, D) intermediate.
    """
    o = originals.flatten(1)
    r = recons.flatten(1).to(o.device)
    return pairwise_sq_distances(o, r) / max(o.shape[1], 1)


def match_reconstructions(originals: torch.Tensor, recons: torch.Tensor) -> np.ndarray:
    """Optimal assignment of reconstructions to originals by MSE (Hungarian algorithm).

    Returns ``perm`` such that ``recons[perm[i]]`` is matched with ``originals[i]`` for the
    first ``min(N, M)`` originals; with fewer reconstructions than originals the unmatched
    originals get ``-1``.
    """
    n = originals.shape[0]
    perm = np.full(n, -1, dtype=np.int64)
    if n == 0 or recons.shape[0] == 0:
        return perm
    cost = mse_cost_matrix(originals, recons)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    perm[rows] = cols
    return perm


def coverage(perm: np.ndarray) -> float:
    """Share of originals that got a matched reconstruction (``perm >= 0``).

    Not a success measure: a reconstruction of noise still covers its original. See
    :func:`attack_success_rate` and :func:`leakage_rate`.
    """
    perm = np.asarray(perm)
    return float((perm >= 0).mean()) if perm.size else 0.0


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
    originals: torch.Tensor,
    recons: torch.Tensor,
    *,
    c1: float = 1.0,
    c2: float = 0.5,
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
        raise ValueError(
            f"AVD needs images of at least 3x3 pixels, got {tuple(originals.shape[2:])}"
        )
    v0 = originals.double()
    v1 = _quantise_8bit(recons.double().abs())
    a1, a2 = _avd_terms(v0)
    b1, b2 = _avd_terms(v1)
    if first_order_only:
        return torch.sqrt(((b1 / 2 - a1 / 2) ** 2).flatten(1).mean(1) / 0.1)
    first = ((b1 - a1) ** 2).flatten(1).mean(1)
    second = ((b2 - a2) ** 2).flatten(1).mean(1)
    return torch.sqrt(c1 * first + c2 * second)


def avd_features(
    v: torch.Tensor, *, reconstruction: bool, c1: float = 1.0, c2: float = 0.5
) -> torch.Tensor:
    """Per-image feature vectors whose Euclidean distances are the AVD of :func:`avd`.

    ``AVD(o, r)² = c1 mean[(d1(r) - d1(o))²] + c2 mean[(d2(r) - d2(o))²] = |f(r) - f(o)|²``
    with ``f = [sqrt(c1 / n1) d1, sqrt(c2 / n2) d2]`` (n1, n2 the sizes of the maps). A
    reconstruction (``reconstruction=True``) is first replaced by ``|v|`` quantised to 8 bits,
    as in :func:`avd`; an original is used as is.

    Returns
    -------
    torch.Tensor
        (N, n1 + n2) float64.
    """
    v = v.double()
    if reconstruction:
        v = _quantise_8bit(v.abs())
    d1, d2 = _avd_terms(v)
    d1, d2 = d1.flatten(1), d2.flatten(1)
    return torch.cat([d1 * (c1 / d1.shape[1]) ** 0.5, d2 * (c2 / d2.shape[1]) ** 0.5], dim=1)


def avd_matched(originals: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """AVD for a batch: each reconstruction against the original that minimises it.

    Returns one value per reconstruction (Eloul et al.: "match each reconstruction to the
    original that minimizes AVD"). Several reconstructions may pick the same original.

    All N x M AVDs come from one distance matrix between :func:`avd_features` (Gram form,
    float64); the minimum of each reconstruction is then recomputed directly from the two
    feature vectors, so an exact copy scores 0 rather than a rounding residue.
    """
    if originals.dim() != 4 or recons.dim() != 4 or originals.shape[1:] != recons.shape[1:]:
        raise ValueError(
            f"expected (N, C, H, W) and (M, C, H, W) tensors, got {tuple(originals.shape)} and {tuple(recons.shape)}"
        )
    if min(originals.shape[2:]) < 3:
        raise ValueError(
            f"AVD needs images of at least 3x3 pixels, got {tuple(originals.shape[2:])}"
        )
    if originals.shape[0] == 0:
        raise ValueError("avd_matched needs at least one original")
    fo = avd_features(originals, reconstruction=False)
    fr = avd_features(recons.to(originals.device), reconstruction=True)
    best = pairwise_sq_distances(fr, fo).argmin(dim=1)
    return torch.sqrt(((fr - fo[best]) ** 2).sum(1))


def attack_success_rate(
    per_original_mse: torch.Tensor, threshold: float, num_originals: int
) -> float:
    """Fraction of ``num_originals`` whose matched reconstruction has MSE <= ``threshold``.

    ``per_original_mse`` holds the MSE of each matched original; originals left without a
    reconstruction count as failures.
    """
    if num_originals <= 0:
        return 0.0
    return float((per_original_mse <= threshold).sum()) / float(num_originals)


def leakage_rate(success: np.ndarray, owners: np.ndarray, num_clients: int) -> float:
    """Share of ``num_clients`` clients with at least one successfully reconstructed record.

    Parameters
    ----------
    success:
        (N,) booleans, one per original: its matched reconstruction reached the ASR threshold
        (unmatched originals are ``False``).
    owners:
        (N,) client positions in ``range(num_clients)``: which client each original belongs to.
    num_clients:
        Clients behind the observed update (a client without records counts, and cannot leak).

    Returns
    -------
    float
        ``|{owners[i] : success[i]}| / num_clients``; 0 or 1 for a single client.
    """
    success, owners = np.asarray(success, dtype=bool), np.asarray(owners)
    if success.shape != owners.shape:
        raise ValueError(f"success and owners differ in shape: {success.shape} vs {owners.shape}")
    if num_clients <= 0:
        return 0.0
    return float(np.unique(owners[success]).size) / float(num_clients)

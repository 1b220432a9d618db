"""Metrics: known answers for MSE/PSNR/SSIM, optimal matching, order-free label accuracy,
coverage and leakage rate; the Gram-form matching and AVD equal the pairwise formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_privsim.core import metrics


def test_psnr_known_values():
    a = torch.zeros(2, 1, 8, 8)
    b = a.clone()
    b[0] += 0.1  # MSE 0.01 -> 20 dB
    p = metrics.psnr(a, b)
    assert math.isclose(float(p[0]), 20.0, abs_tol=1e-6)
    assert float(p[1]) == 100.0  # exact recovery hits the MSE floor


def test_ssim_identity_and_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g)
    assert torch.allclose(metrics.ssim(x, x), torch.ones(3, dtype=torch.float64))
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    s = metrics.ssim(x, noisy)
    assert (s < 0.9).all() and (s > -1).all()
    small = torch.rand(2, 1, 8, 8, generator=g)  # window shrinks to fit 8x8
    assert torch.allclose(metrics.ssim(small, small), torch.ones(2, dtype=torch.float64))


def _conv2d_ssim(
    a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """The former SSIM: a grouped conv2d with the 2-D Gaussian window."""
    import torch.nn.functional as F

    a, b = a.double(), b.double()
    c = a.shape[1]
    size = min(window, a.shape[2], a.shape[3])
    size -= 1 - size % 2
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    w = torch.outer(g, g).expand(c, 1, size, size).contiguous()
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    var_a = F.conv2d(a * a, w, groups=c) - mu_a**2
    var_b = F.conv2d(b * b, w, groups=c) - mu_b**2
    cov = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    return (num / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))).flatten(1).mean(1)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8), (2, 12, 9), (1, 28, 28)])
def test_separable_ssim_equals_the_conv2d_formula(shape):
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.rand(4, *shape, generator=g)
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert torch.allclose(metrics.ssim(a, b), _conv2d_ssim(a, b), rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.permutations(list(range(5))))
def test_matching_recovers_a_permutation(perm):
    g = torch.Generator().manual_seed(1)
    orig = torch.rand(5, 1, 6, 6, generator=g)
    recon = orig[list(perm)] + 0.01 * torch.randn(5, 1, 6, 6, generator=g)
    match = metrics.match_reconstructions(orig, recon)
    assert (recon[match] - orig).abs().max() < 0.1


def test_matching_with_fewer_reconstructions():
    orig = torch.stack([torch.full((1, 4, 4), v) for v in (0.0, 0.5, 1.0)])
    match = metrics.match_reconstructions(orig, orig[[2]])
    assert list(match) == [-1, -1, 0]


def _old_match(orig: torch.Tensor, recon: torch.Tensor) -> np.ndarray:
    """The former matching: an (N, M, D) difference tensor, then the Hungarian algorithm."""
    from scipy.optimize import linear_sum_assignment

    diff = orig.double().flatten(1)[:, None, :] - recon.double().flatten(1)[None, :, :]
    cost = (diff**2).mean(-1)
    rows, cols = linear_sum_assignment(cost.numpy())
    perm = np.full(orig.shape[0], -1, dtype=np.int64)
    perm[rows] = cols
    return perm


@pytest.mark.parametrize("n, m", [(7, 7), (9, 5), (5, 9), (1, 4), (30, 30)])
def test_gram_matching_equals_the_pairwise_formula(n, m):
    g = torch.Generator().manual_seed(n * 100 + m)
    orig = torch.rand(n, 3, 5, 4, generator=g)
    recon = torch.rand(m, 3, 5, 4, generator=g)
    diff = orig.double().flatten(1)[:, None, :] - recon.double().flatten(1)[None, :, :]
    want = (diff**2).mean(-1)
    assert torch.allclose(metrics.mse_cost_matrix(orig, recon), want, rtol=0, atol=1e-14)
    assert np.array_equal(metrics.match_reconstructions(orig, recon), _old_match(orig, recon))


def test_pairwise_sq_distances_chunks_and_clamps():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(11, 6, generator=g, dtype=torch.float64)
    b = torch.cat([a[:2], torch.rand(4, 6, generator=g, dtype=torch.float64)])
    got = metrics.pairwise_sq_distances(a, b, chunk=3)
    assert torch.allclose(got, torch.cdist(a, b) ** 2, atol=1e-13)
    assert (got >= 0).all() and got[0, 0] < 1e-14 and got[1, 1] < 1e-14
    with pytest.raises(ValueError):
        metrics.pairwise_sq_distances(a, b[:, :5])


def test_matching_with_no_reconstructions():
    match = metrics.match_reconstructions(torch.rand(3, 1, 4, 4), torch.rand(0, 1, 4, 4))
    assert list(match) == [-1, -1, -1]


def test_coverage_counts_matched_originals_only():
    assert metrics.coverage(np.array([2, -1, 0, -1])) == 0.5
    assert metrics.coverage(np.array([1, 0])) == 1.0
    assert metrics.coverage(np.array([], dtype=np.int64)) == 0.0


def test_leakage_rate_counts_clients_with_one_success():
    owners = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    success = np.array([False, True, False, False, False, True, True, False])
    assert metrics.leakage_rate(success, owners, 3) == pytest.approx(2 / 3)
    assert metrics.leakage_rate(success, owners, 4) == 0.5  # a fourth client without records
    assert metrics.leakage_rate(np.zeros(8, dtype=bool), owners, 3) == 0.0
    assert metrics.leakage_rate(np.array([True]), np.array([0]), 1) == 1.0
    assert metrics.leakage_rate(np.array([False]), np.array([0]), 1) == 0.0
    with pytest.raises(ValueError, match="shape"):
        metrics.leakage_rate(success[:3], owners, 3)


def test_label_accuracy_is_order_free_multiset():
    t = torch.tensor([3, 3, 1, 0])
    assert metrics.label_accuracy(t, torch.tensor([0, 1, 3, 3])) == 1.0
    assert metrics.label_accuracy(t, torch.tensor([3, 1, 1, 1])) == 0.5
    assert metrics.label_accuracy(torch.tensor([7]), torch.tensor([2])) == 0.0


# ----------------------------------------------------------------------------- AVD, ASR


def _avd_loops(v0: np.ndarray, v1: np.ndarray, c1: float = 1.0, c2: float = 0.5) -> float:
    """AVD of one (C, H, W) pair written out pixel by pixel from the definition."""
    v1 = np.floor(np.clip(np.abs(v1), 0, 1) * 255) / 255
    c, h, w = v0.shape

    def maps(v):
        dx = lambda ch, r, q: v[ch, r, q] - v[ch, r, q + 1]
        dy = lambda ch, r, q: v[ch, r, q] - v[ch, r + 1, q]
        d1 = [
            [[abs(dx(ch, i + 1, j) + dy(ch, i, j + 1)) for j in range(w - 1)] for i in range(h - 1)]
            for ch in range(c)
        ]
        d2x = lambda ch, r, q: dx(ch, r, q) - dx(ch, r, q + 1)
        d2y = lambda ch, r, q: dy(ch, r, q) - dy(ch, r + 1, q)
        d2 = [
            [
                [abs(d2x(ch, i + 2, j) + d2y(ch, i, j + 2)) for j in range(w - 2)]
                for i in range(h - 2)
            ]
            for ch in range(c)
        ]
        return np.array(d1), np.array(d2)

    a1, a2 = maps(v0)
    b1, b2 = maps(v1)
    return float(np.sqrt(c1 * np.mean((b1 - a1) ** 2) + c2 * np.mean((b2 - a2) ** 2)))


def test_avd_matches_the_definition_pixel_by_pixel():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 2, 6, 5, generator=g, dtype=torch.float64)
    b = torch.rand(3, 2, 6, 5, generator=g, dtype=torch.float64) * 1.4 - 0.2  # some out of [0, 1]
    got = metrics.avd(a, b)
    want = [_avd_loops(a[i].numpy(), b[i].numpy()) for i in range(3)]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12)


def test_avd_is_zero_for_a_shifted_copy_while_mse_is_not():
    g = torch.Generator().manual_seed(1)
    base = (
        torch.randint(0, 200, (2, 1, 8, 8), generator=g).double() + 0.5
    ) / 255  # mid-bin: exact 8-bit
    shifted = base + 40 / 255  # same differences, different intensities
    assert torch.allclose(
        metrics.avd(base, shifted), torch.zeros(2, dtype=torch.float64), atol=1e-12
    )
    assert float(metrics.mse(base, shifted).min()) > 0.02
    noisy = (base + 0.1 * torch.randn(base.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert float(metrics.avd(base, noisy).min()) > 0.05


def test_avd_first_order_variant_and_bad_input():
    a = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    b = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    b[0, 0, 1, 1] = 1.0
    # |Dx[i+1, j] + Dy[i, j+1]|: (0,0): -1 + -1; (0,1): 1 + 0; (1,0): 0 + 1
    d1_b = np.array([[2, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=float)
    want = np.sqrt(np.mean((d1_b / 2) ** 2) / 0.1)
    assert float(metrics.avd(a, b, first_order_only=True)) == pytest.approx(want)
    with pytest.raises(ValueError, match="at least 3x3"):
        metrics.avd(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


def test_avd_matched_picks_the_closest_original_per_reconstruction():
    g = torch.Generator().manual_seed(2)
    originals = (torch.randint(0, 255, (3, 1, 6, 6), generator=g).double() + 0.5) / 255
    recons = originals[[2, 0]].clone()
    got = metrics.avd_matched(originals, recons)
    assert got.shape == (2,)
    assert torch.allclose(got, torch.zeros(2, dtype=torch.float64), atol=1e-12)


def _old_avd_matched(originals: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """The former avd_matched: every (original, reconstruction) pair through :func:`avd`."""
    n, m = originals.shape[0], recons.shape[0]
    o = originals.repeat_interleave(m, dim=0)
    r = recons.repeat(n, 1, 1, 1)
    return metrics.avd(o, r).view(n, m).min(dim=0).values


@pytest.mark.parametrize(
    "n, m, shape", [(5, 5, (3, 8, 8)), (4, 9, (1, 6, 7)), (9, 3, (3, 5, 5)), (1, 1, (2, 3, 3))]
)
def test_avd_matched_equals_the_pairwise_formula(n, m, shape):
    g = torch.Generator().manual_seed(n * 10 + m)
    originals = torch.rand(n, *shape, generator=g)
    recons = torch.rand(m, *shape, generator=g) * 1.4 - 0.2  # some out of [0, 1]
    recons[0] = originals[-1]  # one near-exact copy (8-bit quantisation only)
    got = metrics.avd_matched(originals, recons)
    want = _old_avd_matched(originals, recons)
    assert got.shape == (m,)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_avd_features_distance_is_avd():
    g = torch.Generator().manual_seed(4)
    a = torch.rand(4, 2, 7, 6, generator=g, dtype=torch.float64)
    b = torch.rand(4, 2, 7, 6, generator=g, dtype=torch.float64) * 1.2 - 0.1
    fa = metrics.avd_features(a, reconstruction=False)
    fb = metrics.avd_features(b, reconstruction=True)
    assert torch.allclose((fb - fa).norm(dim=1), metrics.avd(a, b), atol=1e-13)


def test_avd_matched_rejects_small_or_mismatched_images():
    with pytest.raises(ValueError, match="at least 3x3"):
        metrics.avd_matched(torch.zeros(2, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="expected"):
        metrics.avd_matched(torch.zeros(2, 1, 4, 4), torch.zeros(1, 3, 4, 4))


def test_attack_success_rate_counts_unmatched_originals_as_failures():
    per = torch.tensor([0.001, 0.02, 0.005])
    assert metrics.attack_success_rate(per, 0.01, 3) == pytest.approx(2 / 3)
    assert metrics.attack_success_rate(per, 0.01, 4) == pytest.approx(2 / 4)
    assert metrics.attack_success_rate(per, 0.0, 3) == 0.0

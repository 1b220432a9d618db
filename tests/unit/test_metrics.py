"""Metrics: known answers for MSE/PSNR/SSIM, optimal matching, order-free label accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_privsim import metrics


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
        dx = lambda ch, r, q: v[ch, r, q] - v[ch, r, q + 1]  # noqa: E731
        dy = lambda ch, r, q: v[ch, r, q] - v[ch, r + 1, q]  # noqa: E731
        d1 = [[[abs(dx(ch, i + 1, j) + dy(ch, i, j + 1)) for j in range(w - 1)] for i in range(h - 1)] for ch in range(c)]
        d2x = lambda ch, r, q: dx(ch, r, q) - dx(ch, r, q + 1)  # noqa: E731
        d2y = lambda ch, r, q: dy(ch, r, q) - dy(ch, r + 1, q)  # noqa: E731
        d2 = [[[abs(d2x(ch, i + 2, j) + d2y(ch, i, j + 2)) for j in range(w - 2)] for i in range(h - 2)] for ch in range(c)]
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
    base = (torch.randint(0, 200, (2, 1, 8, 8), generator=g).double() + 0.5) / 255  # mid-bin: exact 8-bit
    shifted = base + 40 / 255  # same differences, different intensities
    assert torch.allclose(metrics.avd(base, shifted), torch.zeros(2, dtype=torch.float64), atol=1e-12)
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


def test_attack_success_rate_counts_unmatched_originals_as_failures():
    per = torch.tensor([0.001, 0.02, 0.005])
    assert metrics.attack_success_rate(per, 0.01, 3) == pytest.approx(2 / 3)
    assert metrics.attack_success_rate(per, 0.01, 4) == pytest.approx(2 / 4)
    assert metrics.attack_success_rate(per, 0.0, 3) == 0.0

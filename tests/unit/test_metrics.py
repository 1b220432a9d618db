"""Metrics: known answers for MSE/PSNR/SSIM, optimal matching, order-free label accuracy."""

from __future__ import annotations

import math

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

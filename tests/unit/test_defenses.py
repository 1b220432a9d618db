"""The update transforms (pruning, signSGD, quantisation, noise) and per-sample clipping."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.defenses import DEFENSES, TrainingInfo
from clients.defenses.per_sample import clip_per_sample, per_sample_norms
from clients.defenses.transforms import AdditiveNoise, Pruning, Quantization, SignSGD, num_zeroed

torch.set_num_threads(1)
GEN = torch.Generator().manual_seed(0)

distinct = st.lists(
    st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False),
    min_size=1,
    max_size=60,
    unique=True,
)
ratios = st.floats(0.0, 1.0)


def _tensors(values: list[float], split: int) -> dict[str, torch.Tensor]:
    t = torch.tensor(values, dtype=torch.float64)
    cut = min(split, len(values) - 1) if len(values) > 1 else 1
    parts = {"a": t[:cut].reshape(-1, 1), "b": t[cut:]}
    return {k: v for k, v in parts.items() if v.numel()}


@settings(max_examples=60, deadline=None)
@given(values=distinct, ratio=ratios, split=st.integers(1, 30))
def test_pruning_per_layer_keeps_the_count_and_the_largest(values, ratio, split) -> None:
    tensors = _tensors(values, split)
    pruner = Pruning(ratio=ratio)
    masks = pruner.masks(tensors)
    out = pruner.transform(tensors, generator=GEN)
    for n, t in tensors.items():
        m = masks[n]
        assert int(m.sum()) == t.numel() - num_zeroed(ratio, t.numel())
        assert torch.equal(out[n], t * m)
        if m.any() and (~m).any():
            assert t[m].abs().min() >= t[~m].abs().max()


@settings(max_examples=60, deadline=None)
@given(values=distinct, ratio=ratios, split=st.integers(1, 30))
def test_pruning_global_keeps_the_count_and_the_largest(values, ratio, split) -> None:
    tensors = _tensors(values, split)
    masks = Pruning(ratio=ratio, scope="global").masks(tensors)
    flat_t = torch.cat([t.reshape(-1) for t in tensors.values()])
    flat_m = torch.cat([masks[n].reshape(-1) for n in tensors])
    assert int(flat_m.sum()) == len(values) - num_zeroed(ratio, len(values))
    if flat_m.any() and (~flat_m).any():
        assert flat_t[flat_m].abs().min() >= flat_t[~flat_m].abs().max()


def test_pruning_count_rule_and_metric() -> None:
    assert [num_zeroed(r, 100) for r in (0.0, 0.29, 0.9, 1.0)] == [
        0,
        29,
        90,
        100,
    ]  # 0.29*100 < 29 in floats
    pruner = Pruning(ratio=0.9)
    pruner.begin(torch.nn.Linear(1, 1), TrainingInfo("fedsgd", 0.1, 1, 4))
    pruner.transform({"w": torch.randn(10, 10, generator=GEN)}, generator=GEN)
    assert pruner.metrics() == {"kept_fraction": pytest.approx(0.1)}


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=40),
    scale=st.floats(1e-3, 10.0),
)
def test_signsgd_outputs_minus_s_zero_or_s(values, scale) -> None:
    t = torch.tensor(values, dtype=torch.float64)
    out = SignSGD(scale=scale).transform({"g": t}, generator=GEN)["g"]
    assert all(v in (-scale, 0.0, scale) for v in out.tolist())
    assert torch.equal(torch.sign(out), torch.sign(t))


def test_signsgd_l1_scale_is_the_mean_magnitude() -> None:
    t = torch.tensor([3.0, -1.0, 0.0, 4.0])
    out = SignSGD(scale="l1").transform({"g": t}, generator=GEN)["g"]
    assert torch.equal(out, torch.tensor([2.0, -2.0, 0.0, 2.0]))


def test_int_round_trip_keeps_values_whose_step_underflows() -> None:
    """Found by hypothesis: max |t| = 5e-324 makes the step underflow to 0 (was: all zeros)."""
    t = torch.tensor([5e-324, 0.0], dtype=torch.float64)
    assert torch.equal(Quantization(bits=8).quantize(t), t)
    assert torch.equal(Quantization(bits=8).quantize(torch.zeros(3)), torch.zeros(3))


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=60),
    bits=st.integers(2, 16),
)
def test_int_round_trip_error_is_at_most_half_a_step(values, bits) -> None:
    t = torch.tensor(values, dtype=torch.float64)
    out = Quantization(bits=bits).quantize(t)
    step = float(t.abs().max()) / (2 ** (bits - 1) - 1)
    # s/2 exactly, plus float64 rounding of q*s (a few ulps of the largest value)
    assert float((out - t).abs().max()) <= step / 2 + 1e-12 * float(t.abs().max())
    levels = torch.round(out / step) if step > 0 else out
    assert float(levels.abs().max()) <= 2 ** (bits - 1) - 1


def test_int8_has_at_most_255_levels_and_fp16_round_trips() -> None:
    t = torch.randn(1000, generator=GEN)
    out = Quantization(bits=8).quantize(t)
    assert len(torch.unique(out)) <= 255
    half = Quantization(dtype="fp16").quantize(t)
    assert half.dtype == t.dtype
    assert torch.allclose(half, t, rtol=2**-11, atol=0)  # fp16 has an 11-bit significand


def _std_error_tolerance(n: int) -> float:
    return 5 / math.sqrt(n)  # 5 standard errors: a seeded draw, so this is fixed, not flaky


def test_gaussian_noise_has_std_scale() -> None:
    n, scale = 200_000, 0.3
    noise = AdditiveNoise(scale=scale).sample(
        torch.Size([n]), torch.float64, torch.Generator().manual_seed(1)
    )
    # SE of the sample std of a Gaussian is σ/√(2n); of its mean σ/√n.
    assert abs(float(noise.std()) / scale - 1) <= _std_error_tolerance(2 * n)
    assert abs(float(noise.mean())) <= scale * _std_error_tolerance(n)


def test_laplace_noise_has_mean_abs_b_and_std_sqrt2_b() -> None:
    n, b = 200_000, 0.3
    noise = AdditiveNoise(scale=b, distribution="laplace").sample(
        torch.Size([n]), torch.float64, torch.Generator().manual_seed(2)
    )
    # |X| ~ Exp(mean b, std b): SE of mean|X| is b/√n. Laplace kurtosis 6: SE(s) ≈ σ·√(5/n)/2.
    assert abs(float(noise.abs().mean()) / b - 1) <= _std_error_tolerance(n)
    assert abs(float(noise.std()) / (math.sqrt(2) * b) - 1) <= 5 * math.sqrt(5 / n) / 2
    assert torch.isfinite(noise).all()


@pytest.mark.parametrize("distribution", ["gaussian", "laplace"])
def test_noise_is_reproducible_from_the_generator(distribution) -> None:
    update = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
    noise = AdditiveNoise(scale=1.0, distribution=distribution)
    a = noise.transform(update, generator=torch.Generator().manual_seed(7))
    b = noise.transform(update, generator=torch.Generator().manual_seed(7))
    c = noise.transform(update, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a[k], b[k]) for k in update)
    assert not torch.equal(a["w"], c["w"])


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("pruning", {"ratio": 1.5}, "ratio (fraction zeroed) must be a number in [0, 1]"),
        ("pruning", {"ratio": 0.5, "scope": "net"}, "scope must be one of 'layer', 'global'"),
        ("pruning", {"ratio": 0.5, "apply_to": "send"}, "apply_to must be 'update' or 'step'"),
        ("signsgd", {"scale": 0}, "scale must be a number > 0 or 'l1'"),
        ("quantization", {"bits": 1}, "bits must be an integer in 2..16"),
        ("quantization", {"dtype": "int4"}, "dtype must be one of 'int', 'fp16', 'bf16'"),
        ("quantization", {"dtype": "fp16", "bits": 4}, "bits applies to dtype 'int' only"),
        ("noise", {"scale": -1}, "scale must be a finite number > 0"),
        (
            "noise",
            {"scale": 1, "distribution": "cauchy"},
            "distribution must be one of 'gaussian', 'laplace'",
        ),
        ("noise", {}, "missing parameter(s) scale"),
        ("signsgd", {"ratio": 0.1}, "unknown parameter(s) ratio; allowed: apply_to, scale"),
    ],
)
def test_bad_params_give_one_clear_error(name, params, message) -> None:
    from fl_privsim.core.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        DEFENSES.create(name, **params)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@settings(max_examples=40, deadline=None)
@given(norms=st.lists(st.floats(0.0, 1e3), min_size=1, max_size=16), max_norm=st.floats(1e-2, 1e2))
def test_clipped_per_sample_norms_are_at_most_c(norms, max_norm) -> None:
    gen = torch.Generator().manual_seed(len(norms))
    direction = {
        "w": torch.randn(len(norms), 3, 2, generator=gen, dtype=torch.float64),
        "b": torch.randn(len(norms), 2, generator=gen, dtype=torch.float64),
    }
    unit = per_sample_norms(direction)
    grads = {
        k: v * (torch.tensor(norms, dtype=torch.float64) / unit).reshape(-1, *([1] * (v.dim() - 1)))
        for k, v in direction.items()
    }
    clipped = per_sample_norms(clip_per_sample(grads, max_norm))
    assert (clipped <= max_norm * (1 + 1e-9)).all()
    small = torch.tensor(norms, dtype=torch.float64) <= max_norm
    assert torch.allclose(clipped[small], torch.tensor(norms, dtype=torch.float64)[small])

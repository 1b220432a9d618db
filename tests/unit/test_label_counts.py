"""Batch label counts: LLG (Wainakh et al., PoPETs 2022) and the bias-gradient estimator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attack_helpers import CLASSES, make_model, observe, sample
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adversaries import ATTACKS
from adversaries.reconstruction._common import last_linear, layer_grads
from adversaries.reconstruction.label_counts import (
    bias_counts,
    counts_to_labels,
    largest_remainder,
    llg_labels,
)
from fl_privsim.core.errors import ConfigError, ThreatModelError
from fl_privsim.core.metrics import label_accuracy
from fl_privsim.engine.offline import aggregate_observation

torch.set_num_threads(1)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def batches(n: int, count: int, seed: int) -> list[list[int]]:
    """``count`` random digits batches of ``n`` (labels i.i.d., so duplicates occur)."""
    rng = np.random.default_rng(seed)
    return [[int(i) for i in rng.choice(1797, n, replace=False)] for _ in range(count)]


@settings(max_examples=200, deadline=None)
@given(
    raw=st.lists(st.floats(-2.0, 20.0, allow_nan=False), min_size=1, max_size=12),
    extra=st.integers(0, 10),
)
def test_largest_remainder_properties(raw: list[float], extra: int) -> None:
    values = torch.tensor(raw, dtype=torch.float64)
    total = round(float(values.clamp_min(0).sum())) + extra
    counts = largest_remainder(values, total)
    assert counts.dtype == torch.int64 and int(counts.sum()) == total and (counts >= 0).all()
    if extra == 0 and abs(float(values.clamp_min(0).sum()) - total) < 1e-9:
        # A consistent estimate: every count is its value rounded down or up.
        clipped = values.clamp_min(0)
        assert ((counts >= torch.floor(clipped)) & (counts <= torch.ceil(clipped))).all()


def test_largest_remainder_minimum_and_exact() -> None:
    assert largest_remainder(torch.tensor([2.0, 0.0, 1.0]), 3).tolist() == [2, 0, 1]
    # Rounding alone would give [0, 0, 3]; the minimum keeps the present class.
    got = largest_remainder(torch.tensor([0.2, 0.1, 2.7]), 3, torch.tensor([1, 0, 0]))
    assert got.tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="minimum"):
        largest_remainder(torch.tensor([1.0, 1.0]), 1, torch.tensor([1, 1]))


def test_bias_counts_exact_with_true_mean_softmax() -> None:
    gen = torch.Generator().manual_seed(0)
    k, n = 6, 11
    p = torch.softmax(torch.randn(n, k, generator=gen, dtype=torch.float64), dim=1)
    y = torch.randint(k, (n,), generator=gen)
    grad_b = (p - torch.nn.functional.one_hot(y, k).double()).mean(0)
    counts, raw = bias_counts(grad_b, p.mean(0), n)
    assert counts.tolist() == torch.bincount(y, minlength=k).tolist()
    torch.testing.assert_close(raw, torch.bincount(y, minlength=k).double())
    assert counts_to_labels(counts).tolist() == sorted(y.tolist())


@pytest.mark.parametrize("model_name", ["mlp", "lenet", "convnet"])
@pytest.mark.parametrize("n", [4, 8, 16])
def test_bias_counts_exact_untrained(model_name: str, n: int) -> None:
    attack = ATTACKS.create("llg", method="bias", dummies=64)
    for seed, idx in enumerate(batches(n, 4, seed=n)):
        _, x, y = sample(idx)
        res = attack(
            observe(make_model(model_name, seed), x, y),
            generator=torch.Generator().manual_seed(seed),
        )
        assert res.inputs is None and res.labels.shape == (n,) and res.labels.dtype == torch.int64
        assert label_accuracy(y, res.labels) == 1.0, (y.tolist(), res.labels.tolist())


@pytest.mark.parametrize(("method", "n"), [("llg", 4), ("llg+", 4), ("llg+", 8)])
def test_llg_exact_small_batches(method: str, n: int) -> None:
    """Few repeated classes: one impact per sample separates the counts (ReLU mlp)."""
    attack = ATTACKS.create("llg", method=method)
    for seed, idx in enumerate(batches(n, 5, seed=10 + n)):
        _, x, y = sample(idx)
        res = attack(observe(make_model("mlp", seed), x, y))
        assert label_accuracy(y, res.labels) == 1.0, (y.tolist(), res.labels.tolist())


def test_llg_presence_is_sound() -> None:
    """With ReLU features a negative weight-gradient row sum proves the class is present."""
    for seed, idx in enumerate(batches(16, 6, seed=3)):
        _, x, y = sample(idx)
        obs = observe(make_model("mlp", seed), x, y)
        name, _ = last_linear(obs.model)
        g = layer_grads(obs, obs.gradient(), name)["weight"].sum(dim=1)
        negative = set(torch.nonzero(g < 0).flatten().tolist())
        assert negative and negative <= set(y.tolist())
        labels, impact = llg_labels(g, 16)
        assert impact < 0 and negative <= set(labels.tolist()) and labels.numel() == 16


@pytest.mark.parametrize("method", ["bias", "llg+"])
def test_llg_plus_beats_llg_at_16(method: str) -> None:
    """LLG's gradient-only impact underestimates m once classes repeat; calibration fixes it."""
    plain, better = [], []
    for seed, idx in enumerate(batches(16, 5, seed=4)):
        _, x, y = sample(idx)
        obs = observe(make_model("mlp", seed), x, y)
        plain.append(label_accuracy(y, ATTACKS.create("llg", method="llg")(obs).labels))
        better.append(label_accuracy(y, ATTACKS.create("llg", method=method)(obs).labels))
    assert np.mean(better) > np.mean(plain)
    if method == "bias":
        assert min(better) == 1.0


@pytest.mark.parametrize("method", ["auto", "llg+"])
def test_aggregate_of_two_clients(method: str) -> None:
    """Equal batch sizes: the aggregate is one batch of 2 x 6 samples."""
    for seed, idx in enumerate(batches(12, 3, seed=5)):
        _, x, y = sample(idx)
        model = make_model("mlp", seed)
        obs = aggregate_observation([observe(model, x[:6], y[:6]), observe(model, x[6:], y[6:])])
        res = ATTACKS.create("llg", method=method)(obs)
        assert res.labels.shape == (12,)
        assert label_accuracy(y, res.labels) == 1.0


def test_fedavg_one_step() -> None:
    _, x, y = sample(batches(8, 1, seed=6)[0])
    res = ATTACKS.create("llg")(observe(make_model("mlp", 1), x, y, protocol="fedavg"))
    assert label_accuracy(y, res.labels) == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_device_and_determinism(device: str) -> None:
    _, x, y = sample(batches(8, 1, seed=7)[0])
    obs = observe(make_model("lenet", 2), x, y)
    a = ATTACKS.create("llg")(obs, device=device, generator=torch.Generator().manual_seed(1))
    b = ATTACKS.create("llg")(obs, device=device, generator=torch.Generator().manual_seed(1))
    assert a.labels.device.type == device and torch.equal(a.labels, b.labels)


def test_auto_without_bias_uses_llg_plus() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, CLASSES, bias=False)
    )
    _, x, y = sample(batches(8, 1, seed=8)[0])
    obs = observe(model, x, y)
    auto = ATTACKS.create("llg")(obs, generator=torch.Generator().manual_seed(3))
    plus = ATTACKS.create("llg", method="llg+")(obs, generator=torch.Generator().manual_seed(3))
    assert "impact" in auto.metrics and torch.equal(auto.labels, plus.labels)
    with pytest.raises(
        ThreatModelError,
        match="llg: method 'bias' requires the last nn.Linear to have a trainable bias",
    ):
        ATTACKS.create("llg", method="bias")(obs)


def test_refuses_without_class_logit_layer() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))
    _, x, y = sample([1, 2])
    obs = observe(model, x, y % 5)
    with pytest.raises(
        ThreatModelError, match="llg: requires the last nn.Linear layer to output the class logits"
    ):
        ATTACKS.create("llg")(obs)


def test_refuses_negative_features_for_llg() -> None:
    """The `linear` model feeds the normalised image (negative background) to the classifier."""
    _, x, y = sample([1, 2, 3])
    with pytest.raises(ThreatModelError, match="non-negative features"):
        ATTACKS.create("llg", method="llg")(observe(make_model("linear"), x, y))
    torch.manual_seed(0)
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, CLASSES))
    with pytest.raises(ThreatModelError, match="non-negative features"):
        ATTACKS.create("llg", method="llg+")(observe(tanh, x, y))


@pytest.mark.parametrize(
    "params",
    [{"method": "lbfgs"}, {"dummies": 0}, {"dummy": "gaussian"}, {"rounds": 0}, {"rounds": True}],
)
def test_bad_params(params: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(params))):
        ATTACKS.create("llg", **params)

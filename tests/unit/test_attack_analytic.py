"""The analytic first-layer attack: exact recovery, batches, and its threat model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from attack_helpers import make_model, matched_psnr, observe, sample
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adversaries import ATTACKS, Observation
from adversaries.reconstruction._common import num_targets
from fl_privsim.core.errors import ConfigError, ThreatModelError
from fl_privsim.core.metrics import label_accuracy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
@pytest.mark.parametrize("index", [0, 17, 1234])
def test_single_sample_is_exact(protocol: str, index: int, device: str) -> None:
    raw, x, y = sample([index])
    obs = observe(make_model("mlp", seed=index), x, y, protocol=protocol)
    res = ATTACKS.create("analytic")(obs, device=device)
    assert res.inputs.shape == (1, 1, 8, 8) and res.inputs.device.type == device
    assert matched_psnr(raw, res.inputs)[0] >= 60.0
    assert res.labels.dtype == torch.int64 and res.labels.tolist() == y.tolist()
    assert res.metrics["out_of_bounds"] == 0.0


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    c=st.integers(1, 3),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    classes=st.integers(2, 12),
    w_scale=st.floats(0.01, 2.0),
    x_scale=st.floats(0.01, 3.0),
)
def test_linear_layer_property(
    seed: int, c: int, h: int, w: int, classes: int, w_scale: float, x_scale: float
) -> None:
    """Random x, random W and b of a lone linear layer: the ratio gives x back exactly."""
    gen = torch.Generator().manual_seed(seed)
    d = c * h * w
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, classes))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(classes, d, generator=gen) * w_scale)
        model[1].bias.copy_(torch.randn(classes, generator=gen) * w_scale)
    x = torch.randn(1, c, h, w, generator=gen) * x_scale
    y = torch.randint(classes, (1,), generator=gen)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    obs = Observation(
        round=1,
        client_id=0,
        protocol="fedsgd",
        model=model,
        global_params={k: v.clone() for k, v in model.state_dict().items()},
        update={"1.weight": grads[0], "1.bias": grads[1]},
        batch_size=1,
        local_steps=1,
        lr=0.1,
        num_examples=1,
        input_shape=(c, h, w),
        num_classes=classes,
        data_mean=(0.0,) * c,
        data_std=(1.0,) * c,
    )
    res = ATTACKS.create("analytic")(obs)
    torch.testing.assert_close(res.inputs, x, rtol=1e-5, atol=1e-6 * float(x.abs().max()))
    assert int(res.labels[0]) == int(y[0])


def test_batch_of_four_mostly_exact() -> None:
    """Rows activated by one sample only give that sample exactly (measured: 79/80)."""
    rng = np.random.default_rng(0)
    exact, labels = [], []
    for seed in range(5):
        idx = [int(i) for i in rng.choice(1797, 4, replace=False)]
        raw, x, y = sample(idx)
        res = ATTACKS.create("analytic")(observe(make_model("mlp", seed=seed), x, y))
        assert res.inputs.shape == (4, 1, 8, 8) and res.labels.shape == (4,)
        exact.append(int((matched_psnr(raw, res.inputs) >= 60.0).sum()))
        labels.append(label_accuracy(y, res.labels))
    assert min(exact) >= 3, exact
    assert sum(exact) >= 19, exact
    assert np.mean(labels) >= 0.9, labels


def test_refuses_conv_first_layer() -> None:
    _, x, y = sample([3])
    with pytest.raises(ThreatModelError, match="Linear with bias"):
        ATTACKS.create("analytic")(observe(make_model("lenet"), x, y))


def test_refuses_linear_without_bias() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 10))
    _, x, y = sample([3])
    with pytest.raises(ThreatModelError, match="Linear with bias"):
        ATTACKS.create("analytic")(observe(model, x, y))


def test_refuses_nonlinearity_before_first_linear() -> None:
    model = nn.Sequential(
        nn.Flatten(), nn.Sigmoid(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    _, x, y = sample([3])
    with pytest.raises(ThreatModelError, match="Sigmoid"):
        ATTACKS.create("analytic")(observe(model, x, y))


def test_does_not_touch_the_observation() -> None:
    _, x, y = sample([5, 6])
    obs = observe(make_model("mlp"), x, y)
    before = {k: v.clone() for k, v in obs.model.state_dict().items()}
    ATTACKS.create("analytic")(obs)
    for k, v in obs.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_num_targets() -> None:
    _, x, y = sample([1, 2, 3])
    obs = observe(make_model("mlp"), x, y)
    assert num_targets(obs) == 3


@pytest.mark.parametrize("params", [{"tol": -1.0}, {"tol": 1.0}, {"group_tol": 0.0}])
def test_bad_params(params: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match=next(iter(params))):
        ATTACKS.create("analytic", **params)

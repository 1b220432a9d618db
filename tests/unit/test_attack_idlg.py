"""iDLG: analytic labels, and gradient matching with the label fixed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attack_helpers import make_model, observe, sample

from adversaries import ATTACKS
from fl_privsim.core.errors import ConfigError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("model_name", ["lenet", "mlp"])
def test_label_accuracy_is_perfect_for_one_sample(model_name: str) -> None:
    rng = np.random.default_rng(1)
    model = make_model(model_name, seed=1)
    attack = ATTACKS.create("idlg", iterations=0)
    hits = 0
    for index in rng.choice(1797, 50, replace=False):
        _, x, y = sample([int(index)])
        res = attack(observe(model, x, y))
        assert res.inputs is None and res.labels.dtype == torch.int64 and res.labels.shape == (1,)
        hits += int(res.labels[0] == y[0])
    assert hits == 50


def test_label_rule_without_last_bias() -> None:
    """Without a bias the rule falls back to the weight-gradient row sums (iDLG)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, 32),
        torch.nn.Sigmoid(),
        torch.nn.Linear(32, 10, bias=False),
    )
    for index in range(20):
        _, x, y = sample([index])
        assert (
            ATTACKS.create("idlg", iterations=0)(observe(model, x, y)).labels.tolist() == y.tolist()
        )


@pytest.mark.parametrize("device", DEVICES)
def test_reconstruction_is_finite(device: str) -> None:
    _, x, y = sample([7, 8])
    res = ATTACKS.create("idlg", iterations=3)(
        observe(make_model("lenet"), x, y),
        device=device,
        generator=torch.Generator().manual_seed(0),
    )
    assert res.inputs.shape == (2, 1, 8, 8) and res.inputs.device.type == device
    assert torch.isfinite(res.inputs).all()
    assert sorted(res.labels.tolist()) == sorted(y.tolist())
    assert np.isfinite(res.metrics["final_loss"]) and res.metrics["iterations"] >= 1


def test_fedavg_observation() -> None:
    _, x, y = sample([9])
    res = ATTACKS.create("idlg", iterations=2)(
        observe(make_model("lenet"), x, y, protocol="fedavg")
    )
    assert res.labels.tolist() == y.tolist() and torch.isfinite(res.inputs).all()


def test_deterministic() -> None:
    _, x, y = sample([11])
    obs = observe(make_model("lenet"), x, y)
    runs = [
        ATTACKS.create("idlg", iterations=2)(obs, generator=torch.Generator().manual_seed(4))
        for _ in range(2)
    ]
    assert torch.equal(runs[0].inputs, runs[1].inputs)


@pytest.mark.parametrize(
    "params", [{"iterations": -1}, {"iterations": 1.5}, {"lr": 0.0}, {"lr": float("nan")}]
)
def test_bad_params(params: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match=next(iter(params))):
        ATTACKS.create("idlg", **params)

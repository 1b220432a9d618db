"""DLG (Zhu et al. 2019) and iDLG (Zhao et al. 2020) on the sigmoid LeNet with DLG's init.

The model is the paper's setting: sigmoid ``lenet`` with weights U(-0.5, 0.5)
(``init="uniform"``), on scikit-learn's 8x8 digits; a quick run of the ``idlg_labels``
reproduction on MNIST checks the end-to-end path when ../shared/data is present.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from attack_helpers import CLASSES, SHAPE, matched_psnr, observe, sample

from adversaries import ATTACKS
from adversaries.reconstruction._common import target_gradient
from adversaries.reconstruction.dlg import lbfgs_gradient_matching
from fl_privsim.core.errors import ConfigError, ThreatModelError
from fl_privsim.core.models import build_model
from fl_privsim.engine.offline import aggregate_observation

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dlg_lenet(seed: int) -> torch.nn.Module:
    """The sigmoid LeNet with DLG's U(-0.5, 0.5) weights, seeded."""
    gen = torch.Generator().manual_seed(seed)
    return build_model("lenet", SHAPE, CLASSES, init="uniform", generator=gen).train()


def test_idlg_label_rule_is_exact_for_one_sample() -> None:
    """Known answer: one sample, sigmoid activations into the last layer -> exact label."""
    rng = np.random.default_rng(3)
    attack = ATTACKS.create("idlg", iterations=0, init="uniform")
    for trial, index in enumerate(rng.choice(1797, 20, replace=False)):
        _, x, y = sample([int(index)])
        res = attack(observe(dlg_lenet(trial), x, y))
        assert res.inputs is None and res.labels.tolist() == y.tolist()


def test_matching_objective_is_zero_at_the_truth() -> None:
    """At the true batch the objective is 0: soft-label CE with one-hot targets is the
    client's batch-mean CE (a sum over the batch would be off by a factor of 3)."""
    _, x, y = sample([3, 40, 77])
    obs = observe(dlg_lenet(0), x, y)
    model, target = obs.fresh_model().train(), target_gradient(obs, torch.device("cpu"))
    scale = float(sum((t**2).sum() for t in target))
    hard = lbfgs_gradient_matching(model, target, x, labels=y, iterations=1, lr=1.0)
    assert hard.loss == 0.0 and hard.evaluations == 1 and torch.equal(hard.inputs, x)
    one_hot_logits = 1e4 * torch.nn.functional.one_hot(y, CLASSES).float()
    soft = lbfgs_gradient_matching(
        model, target, x, label_logits0=one_hot_logits, iterations=1, lr=1.0
    )
    assert soft.loss < 1e-10 * scale
    assert soft.label_logits.argmax(1).tolist() == y.tolist()


@pytest.mark.parametrize("name", ["dlg", "idlg"])
def test_reconstructs_single_digits(name: str) -> None:
    """DLG and iDLG recover single 8x8 digits and labels within 20 L-BFGS steps.

    L-BFGS can stall for some starts (the dummy input saturates the sigmoids and the
    gradient vanishes, a known failure of both), so a majority of 5 digits is required.
    """
    hits = 0
    for trial, index in enumerate([1234, 56, 789, 1500, 321]):
        raw, x, y = sample([index])
        res = ATTACKS.create(name, iterations=20)(
            observe(dlg_lenet(trial), x, y), generator=torch.Generator().manual_seed(trial)
        )
        assert res.labels.dtype == torch.int64 and res.metrics["iterations"] <= 20
        assert set(res.metrics) == {"final_loss", "iterations", "evaluations", "seconds"}
        hits += int(matched_psnr(raw, res.inputs)[0] > 40.0 and res.labels.tolist() == y.tolist())
    assert hits >= 3


@pytest.mark.parametrize("name", ["dlg", "idlg"])
def test_deterministic_under_a_seed(name: str) -> None:
    _, x, y = sample([11])
    obs = observe(dlg_lenet(1), x, y)
    attack = ATTACKS.create(name, iterations=2)
    a, b, c = (attack(obs, generator=torch.Generator().manual_seed(s)) for s in (4, 4, 5))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)


def test_refuses_without_class_logits() -> None:
    """A last linear layer with the wrong width is refused by both, naming the assumption."""
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Sigmoid(), torch.nn.Linear(16, 5)
    )
    _, x, _ = sample([0])
    obs = observe(model, x, torch.tensor([3]))
    with pytest.raises(ThreatModelError, match=r"^dlg: requires .*one logit per class"):
        ATTACKS.create("dlg", iterations=1)(obs)
    with pytest.raises(ThreatModelError, match=r"^idlg: requires .*class logits"):
        ATTACKS.create("idlg", iterations=1)(obs)


def test_no_linear_layer() -> None:
    """iDLG's rule needs a linear classifier; DLG only needs one output per class."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, CLASSES, 8), torch.nn.Flatten())
    _, x, y = sample([0])
    obs = observe(model, x, y)
    with pytest.raises(ThreatModelError, match=r"^idlg: requires .*nn.Linear"):
        ATTACKS.create("idlg", iterations=1)(obs)
    res = ATTACKS.create("dlg", iterations=1)(obs)
    assert res.inputs.shape == (1, *SHAPE) and res.labels.shape == (1,)


@pytest.mark.parametrize("name", ["dlg", "idlg"])
def test_accepts_aggregates(name: str) -> None:
    """Two clients of 2 samples each: the aggregate is attacked with 4 dummies."""
    model = dlg_lenet(0)
    obs = [
        replace(observe(model, sample(idx)[1], sample(idx)[2]), client_id=k)
        for k, idx in enumerate(([1, 2], [3, 4]))
    ]
    agg = aggregate_observation(obs)
    assert agg.is_aggregate and agg.num_examples == 4
    res = ATTACKS.create(name, iterations=1)(agg, generator=torch.Generator().manual_seed(0))
    assert res.inputs.shape == (4, *SHAPE) and res.labels.shape == (4,)
    assert res.labels.dtype == torch.int64 and torch.isfinite(res.inputs).all()


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_device(device: str) -> None:
    _, x, y = sample([7, 8])
    res = ATTACKS.create("dlg", iterations=2)(
        observe(dlg_lenet(0), x, y), device=device, generator=torch.Generator().manual_seed(0)
    )
    assert res.inputs.device.type == device and res.labels.device.type == device
    assert res.inputs.shape == (2, *SHAPE) and torch.isfinite(res.inputs).all()


@pytest.mark.parametrize(
    "name,params",
    [
        ("dlg", {"iterations": 0}),
        ("dlg", {"iterations": 2.5}),
        ("dlg", {"lr": -1.0}),
        ("dlg", {"init": "zeros"}),
        ("idlg", {"init": "zeros"}),
        ("idlg", {"lr": float("inf")}),
    ],
)
def test_bad_params(name: str, params: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(params))):
        ATTACKS.create(name, **params)


def test_quick_reproduction(shared_data, tmp_path) -> None:
    from fl_privsim.app.reproduce import run_reproduction

    path, result = run_reproduction("idlg_labels", quick=True, out=tmp_path / "run")
    s = result.summary
    assert s["trials"] == 3
    for key in ("label_accuracy_dlg", "label_accuracy_idlg"):
        assert 0.0 <= s[key] <= 1.0
    assert s["label_accuracy_idlg"] == 1.0  # the sign rule is exact for one sample
    assert np.isfinite(s["psnr_dlg"]) and np.isfinite(s["psnr_idlg"])
    assert "89.9" in result.table and (path / "table.md").is_file()

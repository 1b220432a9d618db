"""One table of cases that every registered attack must pass.

For each attack: output shapes and dtypes, determinism under a fixed generator seed, a
bounded run time (a hang guard, not a speed test), refusal with a ThreatModelError naming
the attack when its threat model is not met, and acceptance of an aggregate of two clients
(or a clear refusal where the method needs a single sample). Observations are built with
the clients' own update code (:mod:`fl_privsim.engine.offline`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import adversaries  # noqa: F401  (registers the attacks)
from adversaries.base import ATTACKS, Observation
from fl_privsim.core.errors import ThreatModelError
from fl_privsim.core.models import build_model
from fl_privsim.engine.offline import aggregate_observation, client_observation

MEAN, STD, CLASSES = 0.5, 0.25, 10
HANG_GUARD_S = 60.0


def _other_classes(obs: Observation) -> Observation:
    """The server believes in a different number of classes than the classifier outputs."""
    return dataclasses.replace(obs, num_classes=obs.num_classes + 3)


def _with_model(name: str) -> Callable[[Observation], Observation]:
    def swap(obs: Observation) -> Observation:
        model = build_model(name, obs.input_shape, obs.num_classes)
        return client_observation(
            model,
            _batches(obs.input_shape, obs.batch_size, 1, seed=7),
            protocol="fedsgd",
            lr=0.1,
            mean=(MEAN,) * obs.input_shape[0],
            std=(STD,) * obs.input_shape[0],
            num_classes=obs.num_classes,
        )

    return swap


def _batch_of(n: int) -> Callable[[Observation], Observation]:
    def swap(obs: Observation) -> Observation:
        model = obs.fresh_model()
        return client_observation(
            model,
            _batches(obs.input_shape, n, 1, seed=8),
            protocol="fedsgd",
            lr=0.1,
            mean=obs.data_mean,
            std=obs.data_std,
            num_classes=obs.num_classes,
        )

    return swap


@dataclass(frozen=True)
class Case:
    model: str
    shape: tuple[int, int, int]
    batch: int
    params: dict[str, Any]
    refuse: Callable[[Observation], Observation]
    refuse_match: str
    protocol: str = "fedsgd"
    steps: int = 1
    aggregate_ok: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "analytic": Case("linear", (1, 8, 8), 3, {}, _with_model("lenet"), "analytic: requires"),
    "idlg": Case("lenet", (1, 8, 8), 1, {"iterations": 2}, _other_classes, "idlg: requires"),
    "dlg": Case("lenet", (1, 8, 8), 1, {"iterations": 2}, _other_classes, "dlg: requires"),
    "inverting_gradients": Case(
        "convnet",
        (1, 8, 8),
        2,
        {"iterations": 3},
        _other_classes,
        "inverting_gradients: requires",
        protocol="fedavg",
        steps=2,
    ),
    "llg": Case("mlp", (1, 8, 8), 4, {}, _other_classes, "llg: requires"),
    "rgap": Case("cnn6", (3, 16, 16), 1, {}, _batch_of(2), "rgap: requires", aggregate_ok=False),
}


def _batches(shape, batch, steps, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = (torch.rand(batch, *shape, generator=g) - MEAN) / STD
        y = (
            torch.randperm(CLASSES, generator=g)[:batch]
            if batch <= CLASSES
            else torch.randint(0, CLASSES, (batch,), generator=g)
        )
        out.append((x, y))
    return out


def _observe(case: Case, seed: int = 0, client_id: int = 0) -> Observation:
    torch.manual_seed(seed)
    model = build_model(case.model, case.shape, CLASSES)
    return client_observation(
        model,
        _batches(case.shape, case.batch, case.steps, seed=100 + client_id),
        protocol=case.protocol,
        lr=0.1,
        mean=(MEAN,) * case.shape[0],
        std=(STD,) * case.shape[0],
        num_classes=CLASSES,
        client_id=client_id,
    )


def _check_result(result, obs: Observation, n: int) -> None:
    if result.inputs is not None:
        assert result.inputs.shape == (n, *obs.input_shape)
        assert result.inputs.dtype == torch.float32
        assert bool(torch.isfinite(result.inputs).all())
    if result.labels is not None:
        assert result.labels.shape == (n,) and result.labels.dtype == torch.int64
        assert int(result.labels.min()) >= 0 and int(result.labels.max()) < obs.num_classes
    assert result.inputs is not None or result.labels is not None
    assert all(isinstance(v, float) for v in result.metrics.values())


# The federated inference attacks return a score, not a reconstruction, and need the server
# knowledge the attack runner attaches: their contract (determinism, refusal by name, aggregates,
# hang guard) is tests/unit/test_inference_federated.py.
INFERENCE = {"attribute_inference", "property_inference", "membership_inference"}


# Attacks that read a malicious server's secrets: their table is tests/unit/test_malicious_contract.py.
MALICIOUS = {name for name in ATTACKS.names() if getattr(ATTACKS.get(name), "modification", None)}


def test_every_registered_attack_has_a_case():
    assert set(ATTACKS.names()) - INFERENCE - MALICIOUS <= set(CASES), (
        "add a row to CASES for every attack"
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_shapes_determinism_and_time(name):
    case = CASES[name]
    attack = ATTACKS.create(name, **case.params)
    obs = _observe(case)
    t0 = time.perf_counter()
    first = attack(obs, generator=torch.Generator().manual_seed(5))
    assert time.perf_counter() - t0 < HANG_GUARD_S
    _check_result(first, obs, case.batch * case.steps)
    again = attack(obs, generator=torch.Generator().manual_seed(5))
    for a, b in ((first.inputs, again.inputs), (first.labels, again.labels)):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(CASES))
def test_refuses_an_unmet_threat_model_by_name(name):
    case = CASES[name]
    attack = ATTACKS.create(name, **case.params)
    with pytest.raises(ThreatModelError, match=case.refuse_match):
        attack(case.refuse(_observe(case)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_accepts_an_aggregate_of_two_clients(name):
    case = CASES[name]
    attack = ATTACKS.create(name, **case.params)
    agg = aggregate_observation([_observe(case, client_id=0), _observe(case, client_id=1)])
    assert agg.is_aggregate and agg.num_clients == 2
    if not case.aggregate_ok:
        with pytest.raises(ThreatModelError, match=f"{name}: requires"):
            attack(agg)
        return
    result = attack(agg, generator=torch.Generator().manual_seed(1))
    _check_result(result, agg, 2 * case.batch * case.steps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(CASES))
def test_runs_on_cuda(name):
    case = CASES[name]
    result = ATTACKS.create(name, **case.params)(_observe(case), device="cuda")
    for t in (result.inputs, result.labels):
        assert t is None or t.device.type == "cuda"

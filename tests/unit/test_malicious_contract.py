"""One table of cases that every registered modification, and every attack that reads one's
secrets, must pass (the malicious counterpart of test_attack_contract.py).

Modifications: they leave the honest model untouched, are deterministic given the generator,
send a model whose architecture a client rebuilds from the spec alone (and whose weights load
into it), and refuse a model they cannot be placed in with a ConfigError. Attacks: finite
outputs of the input's shape, determinism, a hang guard, refusal by name without the secrets,
and acceptance of an aggregate of two clients.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import adversaries  # noqa: F401  (registers attacks and modifications)
from adversaries.base import ATTACKS, Observation
from adversaries.malicious import MODIFICATIONS, ServerView
from fl_privsim.core.architecture import build_architecture
from fl_privsim.core.errors import ConfigError, ThreatModelError
from fl_privsim.core.models import build_model
from fl_privsim.engine.offline import aggregate_observation, client_observation

MEAN, STD, CLASSES = 0.5, 0.25, 10
HANG_GUARD_S = 60.0


@dataclass(frozen=True)
class Case:
    model: str
    shape: tuple[int, int, int]
    batch: int
    params: dict[str, Any]
    cannot_hold: str | None  # a model the modification cannot be placed in
    attack_params: dict[str, Any] = field(default_factory=dict)
    has_attack: bool = True  # an attack of the same name reads its secrets


CASES: dict[str, Case] = {
    "imprint": Case("convnet", (1, 8, 8), 4, {"bins": 32}, None),
    "trap_weights": Case("mlp", (1, 8, 8), 4, {}, "lenet"),
    "fishing": Case("lenet", (1, 8, 8), 2, {"target_class": 3}, "cnn6", {"iterations": 3}),
    "loki": Case("convnet", (1, 8, 8), 4, {"bins_per_client": 8}, None),
    # isolation sends decoys; the honest-but-curious attacks read the aggregate it leaves
    "isolation": Case("mlp", (1, 8, 8), 1, {}, "lenet", has_attack=False),
}
ATTACKED = sorted(n for n in CASES if CASES[n].has_attack)


def _view(case: Case, clients: int = 1) -> ServerView:
    g = torch.Generator().manual_seed(11)
    public = (torch.rand(64, *case.shape, generator=g) - MEAN) / STD
    return ServerView(
        round=1,
        clients=tuple(range(clients)),
        targets=tuple(range(clients)),
        input_shape=case.shape,
        num_classes=CLASSES,
        data_mean=(MEAN,) * case.shape[0],
        data_std=(STD,) * case.shape[0],
        protocol="fedsgd",
        batch_size=case.batch,
        local_steps=1,
        lr=0.1,
        public_inputs=public,
        public_labels=torch.arange(64) % CLASSES,
        generator=torch.Generator().manual_seed(3),
    )


def _honest(case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(case.model, case.shape, CLASSES)


def _observe(name: str, case: Case, client_id: int = 0, clients: int = 1) -> Observation:
    crafted = MODIFICATIONS.create(name, **case.params).craft(_honest(case), _view(case, clients))
    g = torch.Generator().manual_seed(100 + client_id)
    x = (torch.rand(case.batch, *case.shape, generator=g) - MEAN) / STD
    y = torch.randperm(CLASSES, generator=g)[: case.batch]
    obs = client_observation(
        crafted.model,
        [(x, y)],
        protocol="fedsgd",
        lr=0.1,
        mean=(MEAN,) * case.shape[0],
        std=(STD,) * case.shape[0],
        num_classes=CLASSES,
        client_id=client_id,
    )
    return dataclasses.replace(obs, server_secrets={name: crafted.secrets})


def test_every_modification_and_its_attack_has_a_case():
    assert set(MODIFICATIONS.names()) <= set(CASES), "add a row to CASES for every modification"
    needing = {getattr(ATTACKS.get(a), "modification", None) for a in ATTACKS.names()} - {None}
    assert needing <= set(ATTACKED)


@pytest.mark.parametrize("name", sorted(CASES))
def test_craft_is_deterministic_leaves_the_honest_model_and_rebuilds_on_the_client(name):
    case = CASES[name]
    honest = _honest(case)
    before = copy.deepcopy(honest.state_dict())
    first = MODIFICATIONS.create(name, **case.params).craft(honest, _view(case))
    assert all(torch.equal(before[k], v) for k, v in honest.state_dict().items())
    again = MODIFICATIONS.create(name, **case.params).craft(honest, _view(case))
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    client_model = build_architecture(
        build_model(case.model, case.shape, CLASSES), first.arch, case.shape
    )
    client_model.load_state_dict(a)  # what a client builds from the spec takes the sent weights
    x = (torch.rand(3, *case.shape) - MEAN) / STD
    assert torch.allclose(client_model.eval()(x), first.model.eval()(x))


@pytest.mark.parametrize("name", sorted(n for n in CASES if CASES[n].cannot_hold))
def test_refuses_a_model_it_cannot_be_placed_in(name):
    case = CASES[name]
    other = build_model(case.cannot_hold, case.shape, CLASSES)
    with pytest.raises(ConfigError, match=name):
        MODIFICATIONS.create(name, **case.params).check_model(other, case.shape, CLASSES)


@pytest.mark.parametrize("name", ATTACKED)
def test_attack_shapes_determinism_and_time(name):
    case = CASES[name]
    attack = ATTACKS.create(name, **case.attack_params)
    obs = _observe(name, case)
    t0 = time.perf_counter()
    first = attack(obs, generator=torch.Generator().manual_seed(5))
    assert time.perf_counter() - t0 < HANG_GUARD_S
    assert (
        first.inputs is not None
        and first.inputs.shape[1:] == case.shape
        and first.inputs.shape[0] >= 1
    )
    assert first.inputs.dtype == torch.float32 and bool(torch.isfinite(first.inputs).all())
    assert all(isinstance(v, float) for v in first.metrics.values())
    again = attack(obs, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.inputs, again.inputs)


@pytest.mark.parametrize("name", ATTACKED)
def test_attack_refuses_without_the_secrets_by_name(name):
    case = CASES[name]
    obs = dataclasses.replace(_observe(name, case), server_secrets={})
    with pytest.raises(ThreatModelError, match=f"requires the server modification '{name}'"):
        ATTACKS.create(name, **case.attack_params)(obs)


@pytest.mark.parametrize("name", ATTACKED)
def test_attack_accepts_an_aggregate_of_two_clients(name):
    case = CASES[name]
    obs = [_observe(name, case, client_id=c, clients=2) for c in (0, 1)]
    agg = dataclasses.replace(aggregate_observation(obs), server_secrets=obs[0].server_secrets)
    result = ATTACKS.create(name, **case.attack_params)(
        agg, generator=torch.Generator().manual_seed(1)
    )
    assert result.inputs is not None and result.inputs.shape[1:] == case.shape
    assert bool(torch.isfinite(result.inputs).all())

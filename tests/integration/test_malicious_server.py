"""The malicious-server seam on hand-built Messages and the real client handlers (no Ray).

A test-only modification puts a front block in front of the model for some clients and keeps a
secret; the tests check what each client was sent and built, what the observations carry, that
training stays on the agreed model, that the honest path is unchanged, and that a client's
refusal is counted.
"""

from __future__ import annotations

import copy

import pytest
import torch

from adversaries.malicious import MODIFICATIONS, Crafted, Modification, ServerView
from clients.defenses.base import DEFENSES, Defense, ModelRefused
from fl_privsim.core import config as config_mod
from fl_privsim.core.architecture import ARCH_KEY, FrontBlock, FrontBlockModel
from fl_privsim.core.models import build_model
from strategies.honest_but_curious import HonestButCurious
from strategies.malicious import MaliciousServer, ModificationPlan
from strategies.server_app import public_data
from tests.integration.test_strategies import SMALL, RecordingObserver, _round, _setup


class FrontBlockForTest(Modification):
    """Adds a small front block (rows 3) and keeps the round and targets as its secret."""

    def __init__(self, *, rows: int = 3) -> None:
        self.rows = rows
        self.observed: list = []

    def craft(self, model: torch.nn.Module, view: ServerView) -> Crafted:
        block = FrontBlock(view.input_shape, self.rows)
        with torch.no_grad():
            block.decoder.weight.mul_(1e-3)
        return Crafted(
            model=FrontBlockModel(block, copy.deepcopy(model)),
            arch={"front_block": {"rows": self.rows, "activation": "relu"}},
            secrets={"round": view.round, "targets": view.targets},
        )

    def observe(self, obs) -> None:
        self.observed.append(obs)


class RefuseFrontBlocks(Defense):
    """Refuses any model whose state has more entries than the agreed mlp's (test only)."""

    stage = "update"

    def begin(self, model, info) -> None:
        super().begin(model, info)
        if any(name.startswith("block.") for name, _ in model.named_parameters()):
            raise ModelRefused("test_refuse: the model has a front block")

    def transform_update(self, update, *, generator):
        return update


@pytest.fixture(autouse=True)
def _test_plugins():
    """Register the test-only plugins for this module's tests, and remove them afterwards so
    that no other test sees them in the registries."""
    MODIFICATIONS.register("test_front_block")(FrontBlockForTest)
    RefuseFrontBlocks.name = "test_refuse"
    DEFENSES.register("test_refuse")(RefuseFrontBlocks)
    yield
    MODIFICATIONS._items.pop("test_front_block", None)
    DEFENSES._items.pop("test_refuse", None)


def _malicious(cfg, plans, observer):
    model, grid, inner, info = _setup(cfg)
    x, y = public_data(cfg)
    strategy = MaliciousServer(
        inner,
        info=info,
        observer=observer,
        plans=plans,
        node_to_client=inner.node_to_client,
        public_inputs=x,
        public_labels=y,
        seed=cfg.seed,
    )
    return model, grid, inner, strategy


def _cfg(*extra):
    return config_mod.load(None, [*SMALL, 'server.role="malicious"', *extra])


def test_crafted_model_reaches_only_its_targets_and_training_stays_honest():
    cfg = _cfg("federation.clients_per_round=4")
    mod = FrontBlockForTest()
    plan = ModificationPlan(name="test_front_block", modification=mod, rounds={1}, clients={1})
    observer = RecordingObserver(clients=[0, 1, 2, 3], aggregate=True)
    model, grid, inner, strategy = _malicious(cfg, [plan], observer)
    _, (arrays, _) = _round(strategy, grid, model)
    sent = {
        inner.node_to_client[m.metadata.dst_node_id]: m
        for m in grid.sent
        if m.metadata.message_type == "train"
    }
    assert ARCH_KEY in sent[1].content["config"] and ARCH_KEY not in sent[0].content["config"]
    assert any(k.startswith("block.") for k in sent[1].content["arrays"])
    by_client = {o.client_id: o for o in observer.seen if not o.is_aggregate}
    assert by_client[1].server_secrets["test_front_block"]["targets"] == (1,)
    assert (
        isinstance(by_client[1].model, FrontBlockModel)
        and "block.encoder.weight" in by_client[1].update
    )
    assert not by_client[0].server_secrets and "block.encoder.weight" not in by_client[0].update
    agg = next(
        o for o in observer.seen if o.is_aggregate
    )  # mixed models: agreed entries, no secrets
    assert not agg.server_secrets and not any(
        k.startswith(("block.", "model.")) for k in agg.update
    )
    honest = build_model(cfg.model.name, (1, 8, 8), 10)
    honest.load_state_dict(
        arrays.to_torch_state_dict()
    )  # the global model keeps the agreed architecture
    assert len(mod.observed) == 1 and mod.observed[0].members == (1,)
    assert mod.observed[0].server_secrets["test_front_block"]["round"] == 1


def test_aggregate_of_identically_crafted_clients_keeps_model_and_secrets():
    cfg = _cfg()
    plan = ModificationPlan(name="test_front_block", modification=FrontBlockForTest(), rounds={1})
    observer = RecordingObserver(clients=[], aggregate=True)
    model, grid, _, strategy = _malicious(cfg, [plan], observer)
    _round(strategy, grid, model)
    (agg,) = observer.seen
    assert agg.num_clients == 3 and agg.server_secrets["test_front_block"]["targets"] == agg.members
    assert "block.encoder.weight" in agg.update and isinstance(agg.model, FrontBlockModel)
    # round 2 is not targeted: honest model, no secrets
    observer.seen.clear()
    _round(strategy, grid, model, server_round=2)
    assert observer.seen and not observer.seen[0].server_secrets


def test_no_modification_gives_the_honest_servers_numbers():
    cfg = _cfg()
    results = []
    for kind in ("honest", "malicious"):
        observer = RecordingObserver(clients=[0, 1], aggregate=True)
        if kind == "honest":
            model, grid, inner, info = _setup(cfg)
            strategy = HonestButCurious(inner, info=info, observer=observer)
        else:
            model, grid, inner, strategy = _malicious(cfg, [], observer)
        _, (arrays, _) = _round(strategy, grid, model)
        results.append((arrays.to_torch_state_dict(), [o.update for o in observer.seen]))
    (a, obs_a), (b, obs_b) = results
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(obs_a, obs_b, strict=True) for k in x)


def test_a_refusing_client_is_counted_and_left_out_of_the_aggregate():
    cfg = _cfg('defenses=[{name="test_refuse"}]')
    plan = ModificationPlan(
        name="test_front_block", modification=FrontBlockForTest(), rounds={1}, clients={2}
    )
    observer = RecordingObserver(clients=[0, 1, 2], aggregate=False)
    model, grid, inner, strategy = _malicious(cfg, [plan], observer)
    assert 2 in inner.sample_clients(1, 3)
    replies, (arrays, _) = _round(strategy, grid, model)
    errors = [r for r in replies if r.has_error()]
    assert len(errors) == 1 and errors[0].error.reason.startswith("refused: test_refuse")
    report = inner.client_error_report()
    assert report["refused"]["total"] == 1 and report["refused"]["by_round"] == {"1": 1}
    sampled = set(inner.sample_clients(1, 3))
    assert {o.client_id for o in observer.seen} == (sampled & {0, 1, 2}) - {
        2
    }  # the refusal sent nothing
    assert arrays is not None


def test_config_rejects_modifications_without_the_malicious_role():
    with pytest.raises(config_mod.ConfigError, match="needs server.role"):
        config_mod.load(None, ['server.modifications=[{name="test_front_block"}]'])
    with pytest.raises(config_mod.ConfigError, match="unknown modification"):
        config_mod.load(None, ['server.role="malicious"', 'server.modifications=[{name="nope"}]'])
    with pytest.raises(config_mod.ConfigError, match="after the last round"):
        config_mod.load(
            None,
            [
                'server.role="malicious"',
                "federation.rounds=2",
                'server.modifications=[{name="test_front_block", targets={rounds=[3]}}]',
            ],
        )
    cfg = config_mod.load(
        None, ['server.role="malicious"', 'server.modifications=[{name="test_front_block"}]']
    )
    assert cfg.server.modifications[0].targets.rounds == [1]

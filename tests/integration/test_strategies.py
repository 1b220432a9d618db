"""FedUpdates and the honest-but-curious wrapper on hand-built Messages (no Ray), and the
whole server side run in-process against the real client handlers."""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord

from adversaries.base import Observation
from clients.client_app import CONFIG_KEY
from fl_privsim.core import config as config_mod
from fl_privsim.core.client_config import client_config_text
from fl_privsim.core.models import build_model
from fl_privsim.core.results import RunFolder
from fl_privsim.engine.federated_data import federated_data
from strategies.fedupdates import FedUpdates, discover_clients
from strategies.honest_but_curious import HonestButCurious, ModelInfo
from strategies.server_app import initial_model, run_server
from tests.integration.inprocess import InProcessGrid

SMALL = [
    "federation.num_clients=4",
    "federation.clients_per_round=3",
    "federation.rounds=2",
    'federation.device="cpu"',
    "federation.fraction_evaluate=0.5",
]


class RecordingObserver:
    def __init__(self, clients, aggregate=False, fail=False):
        self.clients, self.aggregate, self.fail = set(clients), aggregate, fail
        self.seen: list[Observation] = []

    def targets(self, server_round):
        return self.clients, self.aggregate

    def observe(self, server_round, observations):
        if self.fail:
            raise RuntimeError("attack exploded")
        self.seen.extend(observations)


def _setup(cfg):
    model = initial_model(cfg)
    grid = InProcessGrid(cfg.federation.num_clients)
    mapping = discover_clients(grid, expected=cfg.federation.num_clients)
    inner = FedUpdates(
        protocol=cfg.federation.protocol,
        server_lr=cfg.federation.server_lr,
        param_names=[n for n, _ in model.named_parameters()],
        clients_per_round=cfg.federation.clients_per_round,
        seed=cfg.seed,
        node_to_client=mapping,
        extra_config={CONFIG_KEY: client_config_text(cfg)},
    )
    fed = federated_data(cfg)
    info = ModelInfo(
        model=build_model(cfg.model.name, fed.data.input_shape, fed.data.num_classes),
        input_shape=fed.data.input_shape,
        num_classes=fed.data.num_classes,
        data_mean=fed.data.mean,
        data_std=fed.data.std,
        protocol=cfg.federation.protocol,
        batch_size=cfg.client.batch_size,
        local_steps=1,
        lr=cfg.client.lr,
    )
    return model, grid, inner, info


def _round(strategy, grid, model, server_round=1):
    arrays = ArrayRecord(model.state_dict())
    replies = grid.send_and_receive(
        strategy.configure_train(server_round, arrays, ConfigRecord({}), grid)
    )
    return replies, strategy.aggregate_train(server_round, replies)


def test_discovery_and_deterministic_sampling():
    cfg = config_mod.load(None, SMALL)
    _, _grid, inner, _ = _setup(cfg)
    assert sorted(inner.node_to_client.values()) == [0, 1, 2, 3]
    first = [inner.sample_clients(r, 3) for r in range(1, 6)]
    assert first == [inner.sample_clients(r, 3) for r in range(1, 6)]
    assert all(len(s) == 3 and len(set(s)) == 3 for s in first)
    assert len({tuple(s) for s in first}) > 1  # varies across rounds


def test_fedsgd_applies_mean_gradient():
    cfg = config_mod.load(None, SMALL)
    model, grid, inner, _ = _setup(cfg)
    replies, (new_arrays, metrics) = _round(inner, grid, model)
    grads = [r.content["arrays"].to_torch_state_dict() for r in replies]
    weights = torch.tensor([float(r.content["metrics"]["num-examples"]) for r in replies])
    new = new_arrays.to_torch_state_dict()
    for name, p in model.state_dict().items():
        mean = sum(w * g[name] for w, g in zip(weights / weights.sum(), grads))
        torch.testing.assert_close(new[name], p - cfg.federation.server_lr * mean)
    assert "loss" in metrics


def test_wrapper_observes_targets_without_changing_training():
    cfg = config_mod.load(None, SMALL)
    model, grid, inner, info = _setup(cfg)
    sampled = inner.sample_clients(1, 3)
    observer = RecordingObserver(clients=[sampled[0], 99], aggregate=True)
    wrapped = HonestButCurious(inner, info=info, observer=observer)
    replies, (arrays_w, _) = _round(wrapped, grid, model)
    arrays_i, _ = inner.aggregate_train(1, replies)
    for k, v in arrays_i.to_torch_state_dict().items():
        torch.testing.assert_close(arrays_w.to_torch_state_dict()[k], v)

    single = [o for o in observer.seen if not o.is_aggregate]
    agg = [o for o in observer.seen if o.is_aggregate]
    assert [o.client_id for o in single] == [sampled[0]]
    assert len(agg) == 1 and agg[0].members == tuple(sampled) and agg[0].num_clients == 3
    obs = single[0]
    assert obs.batch_size == cfg.client.batch_size and obs.protocol == "fedsgd"
    assert obs.num_examples == cfg.client.batch_size
    for k, v in model.state_dict().items():
        torch.testing.assert_close(obs.global_params[k], v)
    # the Observation has no ground-truth field
    assert not {"x", "y", "inputs", "labels", "batch", "indices"} & set(
        Observation.__dataclass_fields__
    )


def test_wrapper_survives_a_failing_attack():
    cfg = config_mod.load(None, SMALL)
    model, grid, inner, info = _setup(cfg)
    wrapped = HonestButCurious(
        inner, info=info, observer=RecordingObserver([0, 1, 2, 3], fail=True)
    )
    _, (arrays, _) = _round(wrapped, grid, model)
    assert arrays is not None and wrapped.failures == 1


def _run(tmp_path, name, overrides):
    cfg = config_mod.load(None, SMALL + overrides)
    folder = RunFolder(tmp_path / name)
    summary = run_server(InProcessGrid(cfg.federation.num_clients), cfg, folder)
    return folder, summary


def test_run_server_in_process_records_everything_and_is_reproducible(tmp_path):
    overrides = [
        "attacks.0.targets.clients=[0, 1, 2, 3]",
        "attacks.1.params.iterations=20",
        "attacks.2.params.iterations=30",
        "attacks.2.targets.aggregate=true",
    ]
    folder, summary = _run(tmp_path, "a", overrides)
    attacks = summary["attacks"]
    assert set(attacks) >= {
        "analytic",
        "idlg",
        "inverting_gradients",
        "inverting_gradients@aggregate",
    }
    assert attacks["analytic"]["psnr"] >= 60 and attacks["analytic"]["attacked"] >= 1
    assert attacks["idlg"]["label_accuracy"] > 0
    assert 0 <= summary["final_accuracy"] <= 1
    rounds = summary["round_seconds_by_round"]
    assert sorted(rounds) == ["1", "2"] and all(t > 0 for t in rounds.values())
    lines = folder.read_metrics()
    assert {"round", "client", "source", "key", "value"} <= set(lines[0])
    assert any(r["source"] == "server_eval" for r in lines)
    assert any(r["source"] == "federated_eval" for r in lines)
    assert list((folder.path / "attacks" / "round_001").glob("client_*.png"))
    assert json.loads((folder.path / "summary.json").read_text())["attacks"] == json.loads(
        json.dumps(attacks)
    )

    folder_b, summary_b = _run(tmp_path, "b", overrides)

    def strip(rows):
        return [r for r in rows if "seconds" not in r["key"]]

    assert strip(folder.read_metrics()) == strip(folder_b.read_metrics())
    assert summary["final_accuracy"] == summary_b["final_accuracy"]

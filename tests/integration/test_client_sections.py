"""What travels to a client and what a client round does with it: only the client sections of
the config (fl_privsim.core.client_config), validated alone; one defense stack per round; one
batch-size clamp shared by the client and the scorer (hand-built Messages, no Ray)."""

from __future__ import annotations

import tomllib

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import clients.defenses as defenses_pkg
import fl_privsim.engine.federated_data as federated_data_mod
from clients import client_app
from clients.client_app import CONFIG_KEY, client_config, handle_train, train_client
from fl_privsim.core import config as config_mod
from fl_privsim.core.client_config import (
    CLIENT_SECTIONS,
    client_config_from_dict,
    client_config_text,
    client_sections,
    load_client_config,
)
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.partition import effective_batch_size
from fl_privsim.core.results import RunFolder
from fl_privsim.engine.federated_data import federated_data
from fl_privsim.engine.scoring import Scorer
from strategies.server_app import initial_model, run_server
from tests.integration.inprocess import InProcessGrid

#: A run whose server-only sections are all set away from their defaults.
FULL = {
    "name": "sections",
    "seed": 3,
    "federation": {
        "num_clients": 4,
        "clients_per_round": 3,
        "rounds": 1,
        "protocol": "fedavg",
        "server_lr": 0.7,
        "device": "cpu",
        "fraction_evaluate": 0.5,
        "central_dp": {"mode": "client_fixed", "clipping_norm": 5.0, "noise_multiplier": 0.0},
    },
    "client": {"batch_size": 3, "local_steps": 2, "lr": 0.05},
    "defenses": [
        {"name": "identical_labels", "params": {}},
        {"name": "noise", "params": {"scale": 0.01}},
    ],
    "attacks": [{"name": "analytic", "targets": {"rounds": [1], "clients": [0]}}],
    "scoring": {"asr_mse_threshold": 0.02},
    "output": {"save_images": False},
}
SERVER_ONLY = ("name", "attacks", "server", "analyses", "scoring", "output")


def _context(pid: int) -> Context:
    return Context(
        run_id=1,
        node_id=77,
        node_config={"partition-id": pid, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )


def _train_message(text: str, model: torch.nn.Module, server_round: int) -> Message:
    config = ConfigRecord({CONFIG_KEY: text, "server-round": server_round})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
    return Message(content=content, dst_node_id=77, message_type=MessageType.TRAIN)


def test_server_sends_only_the_client_sections(tmp_path):
    cfg = config_mod.from_dict(FULL)
    grid = InProcessGrid(cfg.federation.num_clients, use_client_app=True)
    run_server(grid, cfg, RunFolder(tmp_path / "run"))
    sent = [
        m for m in grid.sent if m.metadata.message_type in (MessageType.TRAIN, MessageType.EVALUATE)
    ]
    assert any(m.metadata.message_type == MessageType.TRAIN for m in sent)
    for msg in sent:
        data = tomllib.loads(msg.content["config"][CONFIG_KEY])
        assert data == client_sections(cfg)
        assert set(data) == {"seed", "data", "model", "client", "defenses", "federation"}
        assert not set(data) & set(SERVER_ONLY)
        assert set(data["federation"]) == set(CLIENT_SECTIONS["federation"])
        assert data["federation"]["central_dp"] == {"mode": "client_fixed"}  # not the noise
        assert "secure_aggregation" not in data["federation"]


def test_client_given_only_its_sections_trains_identically():
    full = config_mod.from_dict(FULL)
    mine = load_client_config(client_config_text(full))
    assert mine.attacks == [] and mine.server == config_mod.ServerConfig()
    for section in ("seed", "data", "model", "client", "defenses"):
        assert getattr(mine, section) == getattr(full, section)
    model = initial_model(full)
    replies = [
        train_client(cfg, 2, model_copy, 1, RecordDict(), torch.device("cpu"))
        for cfg, model_copy in ((full, initial_model(full)), (mine, initial_model(full)))
    ]
    a, b = replies
    assert a.meta == b.meta and a.metrics == b.metrics and a.num_examples == b.num_examples
    for name, value in a.update.items():
        assert torch.equal(value, b.update[name])
    # and through the handler: the whole TOML (a foreign server) or only the sections agree
    ra = handle_train(_train_message(config_mod.to_toml(full), model, 1), _context(2))
    rb = handle_train(_train_message(client_config_text(full), model, 1), _context(2))
    ua, ub = ra.content["arrays"].to_torch_state_dict(), rb.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(ua[k], ub[k]) for k in ua)


def test_client_validates_only_its_sections():
    # server-only mistakes: the whole config refuses them, the client never looks at them
    bad_server = {
        **FULL,
        "federation": {**FULL["federation"], "clients_per_round": 9},
        "server": {"modifications": [{"name": "imprint"}]},
    }
    with pytest.raises(ConfigError):
        config_mod.from_dict(bad_server)
    assert client_config_from_dict(bad_server).federation.num_clients == 4
    # a client section's mistakes are the client's
    with pytest.raises(ConfigError, match="client.batch_size"):
        client_config_from_dict({**FULL, "client": {"batch_size": 0}})
    with pytest.raises(ConfigError, match=r"defenses\[0\]"):
        client_config_from_dict({**FULL, "defenses": [{"name": "no_such_defense"}]})
    with pytest.raises(ConfigError, match="data.root"):
        client_config_from_dict({**FULL, "data": {"name": "mnist"}})


def test_one_client_round_builds_the_defense_stack_once(monkeypatch):
    cfg = config_mod.from_dict(FULL)
    text = client_config_text(cfg)
    client_config(text)  # the client validates a text once per process (cached), not per round
    calls = []
    real = defenses_pkg.build_defenses

    def counting(specs):
        calls.append(1)
        return real(specs)

    for module in (client_app, federated_data_mod, defenses_pkg):
        monkeypatch.setattr(module, "build_defenses", counting)
    context = _context(1)
    for server_round in (1, 2):
        calls.clear()
        reply = handle_train(_train_message(text, initial_model(cfg), server_round), context)
        assert not reply.has_error()
        assert len(calls) == 1


def test_batch_size_is_clamped_once_for_client_defenses_and_scorer(monkeypatch):
    cfg = config_mod.from_dict(
        {
            "data": {"max_examples": 40},
            "federation": {"num_clients": 4, "clients_per_round": 4, "device": "cpu"},
            "client": {"batch_size": 32},
            "attacks": [],
        }
    )
    fed = federated_data(cfg)
    pid = 2
    size = len(fed.train_parts[pid])
    assert size < cfg.client.batch_size
    assert effective_batch_size(cfg.client.batch_size, size) == size
    seen = {}
    real = client_app.local_update

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(client_app, "local_update", spy)
    reply = train_client(cfg, pid, initial_model(cfg), 1, RecordDict(), torch.device("cpu"))
    assert reply.meta["batch-size"] == size == seen["expected_batch_size"]
    assert len(Scorer(cfg, fed).ground_truth_indices(1, [pid])) == size

"""The DP accountant's state lives in the node's Context.state between train messages, so ε
accumulates over a client's rounds (hand-built Messages, no Ray)."""

from __future__ import annotations

import json

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from opacus.accountants import RDPAccountant

from clients.client_app import CONFIG_KEY, handle_train
from clients.defenses.accounting import ALPHAS
from fl_privsim.core import config as config_mod
from fl_privsim.core.client_config import client_config_text
from fl_privsim.engine.federated_data import federated_data
from strategies.server_app import initial_model

KEY = "defense0.dp_sgd.epsilon"


def _cfg():
    return config_mod.from_dict(
        {
            "federation": {
                "num_clients": 4,
                "clients_per_round": 4,
                "protocol": "fedavg",
                "device": "cpu",
            },
            "client": {"batch_size": 5, "local_steps": 2},
            "defenses": [
                {"name": "dp_sgd", "params": {"noise_multiplier": 0.9, "max_grad_norm": 1.0}}
            ],
        }
    )


def _context() -> Context:
    return Context(
        run_id=1,
        node_id=77,
        node_config={"partition-id": 1, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )


def _train(cfg, context: Context, server_round: int) -> Message:
    config = ConfigRecord({CONFIG_KEY: client_config_text(cfg), "server-round": server_round})
    msg = Message(
        content=RecordDict(
            {"arrays": ArrayRecord(initial_model(cfg).state_dict()), "config": config}
        ),
        dst_node_id=77,
        message_type=MessageType.TRAIN,
    )
    return handle_train(msg, context)


def _opacus_epsilon(steps: int, q: float) -> float:
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=0.9, sample_rate=q)
    return acc.get_epsilon(1e-5, alphas=list(ALPHAS))


def test_epsilon_accumulates_through_context_state() -> None:
    cfg = _cfg()
    q = 5 / len(federated_data(cfg).train_parts[1])
    context = _context()
    eps = [_train(cfg, context, r).content["metrics"][KEY] for r in (1, 2, 3)]
    for rnd, e in enumerate(eps, start=1):
        assert e == pytest.approx(_opacus_epsilon(2 * rnd, q), rel=1e-12)
    state = json.loads(context.state.config_records["defense0.dp_sgd"]["state"])
    assert state == {"history": [[0.9, q, 6]]}

    # a fresh Context (what a client without persistence would have) starts from zero again
    assert _train(cfg, _context(), 3).content["metrics"][KEY] == pytest.approx(eps[0], rel=1e-12)

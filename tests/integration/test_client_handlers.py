"""ClientApp handlers fed hand-built Messages: the update a Flower client sends is the
pure-torch local update on the seeded batch."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from clients.client_app import CONFIG_KEY, handle_evaluate, handle_query, handle_train
from clients.local_update import local_update
from fl_privsim.core import config as config_mod
from fl_privsim.core.client_config import client_config_text
from fl_privsim.engine.federated_data import client_batch_indices, federated_data
from strategies.server_app import initial_model


def _context(pid: int) -> Context:
    return Context(
        run_id=1,
        node_id=77,
        node_config={"partition-id": pid, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )


def _train_message(cfg, model, server_round: int) -> Message:
    config = ConfigRecord({CONFIG_KEY: client_config_text(cfg), "server-round": server_round})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
    return Message(content=content, dst_node_id=77, message_type=MessageType.TRAIN)


@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
def test_train_reply_is_the_local_update(protocol):
    cfg = config_mod.load(
        None,
        [
            "federation.num_clients=4",
            "federation.clients_per_round=4",
            f"federation.protocol={protocol!r}".replace("'", '"'),
            "client.local_steps=3",
            "client.batch_size=5",
            'federation.device="cpu"',
        ],
    )
    model = initial_model(cfg)
    reply = handle_train(_train_message(cfg, model, 2), _context(pid=3))

    update = reply.content["arrays"].to_torch_state_dict()
    meta = reply.content["meta"]
    metrics = reply.content["metrics"]
    steps = 1 if protocol == "fedsgd" else 3
    assert meta["client-id"] == 3 and meta["protocol"] == protocol
    assert meta["batch-size"] == 5 and meta["local-steps"] == steps
    assert metrics["num-examples"] == 5 * steps

    # the same update, computed outside Flower on the batches the scorer reproduces
    fed = federated_data(cfg)
    batches = [fed.tensors("train", idx) for idx in client_batch_indices(cfg, fed, 2, 3)]
    expected = local_update(initial_model(cfg), batches, protocol=protocol, lr=cfg.client.lr)
    assert set(update) == set(expected.update)
    for name, value in expected.update.items():
        torch.testing.assert_close(update[name], value)


def test_batches_depend_on_round_and_client():
    cfg = config_mod.load(None, ["federation.num_clients=4", "federation.clients_per_round=4"])
    fed = federated_data(cfg)
    a = client_batch_indices(cfg, fed, 1, 0)[0]
    assert (a == client_batch_indices(cfg, fed, 1, 0)[0]).all()
    assert set(a) <= set(fed.train_parts[0])
    assert (
        not (a == client_batch_indices(cfg, fed, 2, 0)[0]).all()
        or not (a == client_batch_indices(cfg, fed, 3, 0)[0]).all()
    )


def test_evaluate_and_query_handlers():
    cfg = config_mod.load(None, ["federation.num_clients=4", "federation.clients_per_round=4"])
    model = initial_model(cfg)
    config = ConfigRecord({CONFIG_KEY: client_config_text(cfg), "server-round": 1})
    msg = Message(
        content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config}),
        dst_node_id=77,
        message_type=MessageType.EVALUATE,
    )
    reply = handle_evaluate(msg, _context(pid=1))
    m = reply.content["metrics"]
    fed = federated_data(cfg)
    assert m["num-examples"] == len(fed.test_parts[1])
    assert 0.0 <= m["accuracy"] <= 1.0

    q = Message(content=RecordDict(), dst_node_id=77, message_type=MessageType.QUERY)
    assert handle_query(q, _context(pid=2)).content["meta"]["client-id"] == 2

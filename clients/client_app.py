"""The Flower ClientApp (Message API): train, evaluate and query handlers.

Each handler rebuilds the model from the ArrayRecord it receives, finds its data
partition from ``context.node_config["partition-id"]``, and calls the pure-torch
:func:`clients.local_update.local_update`. The client sections of the run's resolved config
(:mod:`fl_privsim.core.client_config`: seed, data, model, client, defenses and the federation
keys a client reads) travel as TOML text in the message's ConfigRecord (key
``fl-privsim-config``) and the client validates only those; when the text is absent (a foreign
strategy sent the message) the handler falls back to ``run_config["config-path"]``.

The configured ``[[defenses]]`` are built once per train message (the batch draw and the
update share the stack) and applied inside
``local_update`` with a generator seeded from (run seed, round, partition id, "defense").
A defense's state across rounds (the DP defenses' accountant history, so ε accumulates) lives
in the node's ``context.state``: one ConfigRecord ``defense<i>.<name>`` per stateful defense,
holding its ``state_dict()`` as JSON under ``state``; it is restored before the update and
saved after it. Flower's simulation engine keeps each node's Context between its messages
(``flwr.server.superlink.fleet.vce.vce_api.worker`` stores the Context the Ray actor returns).

Reply of a train message: ``arrays`` (the update), ``metrics`` (``num-examples``, ``loss``,
and each defense's metrics, e.g. ``defense0.pruning.kept_fraction``)
and ``meta`` (``client-id``, ``protocol``, ``batch-size``, ``local-steps``, ``lr``): the
metadata a real client declares to its server.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.central_dp_mod import make_central_dp_mod
from clients.defenses import Defense, build_defenses
from clients.defenses.base import ModelRefused
from clients.local_update import local_update
from fl_privsim.core import config as config_mod
from fl_privsim.core import plugins
from fl_privsim.core.architecture import ARCH_KEY, build_architecture
from fl_privsim.core.client_config import load_client_config
from fl_privsim.core.config import Config
from fl_privsim.core.devices import resolve_device
from fl_privsim.core.faults import HANG, failure_kind, hang
from fl_privsim.core.models import build_model
from fl_privsim.core.partition import effective_batch_size
from fl_privsim.core.seeding import torch_generator
from fl_privsim.engine.federated_data import client_batch_indices, federated_data

log = logging.getLogger(__name__)

CONFIG_KEY = "fl-privsim-config"
CONFIG_RECORD = "config"
#: Error reply of a client that refuses to train: code, and the reason's prefix (the server
#: counts these as refusals, strategies.fedupdates).
REFUSED_CODE = 4001
REFUSED = "refused:"


@functools.lru_cache(maxsize=8)
def client_config(text: str) -> Config:
    """The client's config from the text a server sent (:func:`~fl_privsim.core.client_config.
    load_client_config`: only the client sections, validated once per text and process)."""
    return load_client_config(text)


def config_from_message(msg: Message, context: Context) -> Config:
    """The client sections of the run config carried by ``msg`` (or the config named by the run
    config of ``context``)."""
    record = msg.content.config_records.get(CONFIG_RECORD)
    text = record.get(CONFIG_KEY) if record is not None else None
    if isinstance(text, str) and text:
        return client_config(text)
    path = str(context.run_config.get("config-path", ""))
    return config_mod.load(path or None)


def partition_id(context: Context) -> int:
    """This node's data partition (the client id the server knows it by)."""
    return int(context.node_config.get("partition-id", 0))


def build_client_model(
    cfg: Config, state: dict[str, torch.Tensor], device: torch.device, arch_spec: str | None = None
) -> torch.nn.Module:
    """The model the server sent: the agreed architecture, or the one ``arch_spec`` describes
    (``fl-privsim-arch``, e.g. a malicious server's imprint block), loaded with ``state``."""
    # One torch thread per CPU Ray reserved for this client: more oversubscribes the cores.
    torch.set_num_threads(max(1, int(cfg.federation.num_cpus_per_client)))
    fed = federated_data(cfg)
    model = build_model(cfg.model.name, fed.data.input_shape, fed.data.num_classes)
    if arch_spec:
        model = build_architecture(model, arch_spec, fed.data.input_shape)
    model.load_state_dict(state)
    return model.to(device)


def _global_model(msg: Message, cfg: Config, device: torch.device) -> torch.nn.Module:
    """The model in ``msg`` (:func:`build_client_model`); a client trusts it."""
    record = msg.content.config_records.get(CONFIG_RECORD)
    spec = record.get(ARCH_KEY) if record is not None else None
    arrays = next(iter(msg.content.array_records.values()))
    return build_client_model(
        cfg, arrays.to_torch_state_dict(), device, spec if isinstance(spec, str) else None
    )


def _state_key(i: int, d: Defense) -> str:
    return f"defense{i}.{d.name or type(d).__name__}"


def restore_defense_state(defenses: Sequence[Defense], state: RecordDict) -> None:
    """Load each defense's state saved in ``state`` by an earlier round (if any)."""
    for i, d in enumerate(defenses):
        record = state.config_records.get(_state_key(i, d))
        if record is not None and isinstance(record.get("state"), str):
            d.load_state_dict(json.loads(record["state"]))


def save_defense_state(defenses: Sequence[Defense], state: RecordDict) -> None:
    """Store each stateful defense's ``state_dict()`` in ``state`` (the node's Context.state)."""
    for i, d in enumerate(defenses):
        sd = d.state_dict()
        if sd:
            state[_state_key(i, d)] = ConfigRecord({"state": json.dumps(sd)})


@dataclass
class TrainReply:
    """One client's answer to a train instruction, whatever the transport.

    ``update`` (gradient or delta by ``state_dict`` name, :func:`clients.local_update.local_update`),
    ``metrics`` (``num-examples``, ``loss`` and the defenses' metrics) and ``meta`` (``client-id``,
    ``protocol``, ``batch-size``, ``local-steps``, ``lr``: what a real client declares)."""

    update: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]
    meta: dict[str, int | float | str]


def train_client(
    cfg: Config,
    pid: int,
    model: torch.nn.Module,
    server_round: int,
    state: RecordDict,
    device: torch.device,
) -> TrainReply:
    """Client ``pid``'s local update of ``model`` in ``server_round``: its seeded batches, the
    configured defenses with their state restored from and saved to ``state`` (the node's
    ``Context.state``). Raises :class:`~clients.defenses.base.ModelRefused` when a defense refuses
    the model. Both the Message-API handler and the SecAgg+ client (:mod:`clients.secagg_client`)
    call this, so the two paths differ only in transport."""
    fed = federated_data(cfg)
    defenses = build_defenses(cfg.defenses)  # once per round: sampling and training share it
    batches = [
        fed.tensors("train", idx, device)
        for idx in client_batch_indices(cfg, fed, server_round, pid, defenses)
    ]
    restore_defense_state(defenses, state)
    generator = torch_generator(cfg.seed, server_round, pid, "defense")
    part_size = len(fed.train_parts[pid])
    result = local_update(
        model,
        batches,
        protocol=cfg.federation.protocol,
        lr=cfg.client.lr,
        defenses=defenses,
        generator=generator,
        server_round=server_round,
        dataset_size=part_size,
        expected_batch_size=effective_batch_size(cfg.client.batch_size, part_size),
        loss=cfg.client.loss,
    )
    save_defense_state(defenses, state)
    meta: dict[str, int | float | str] = {
        "client-id": pid,
        "protocol": cfg.federation.protocol,
        "batch-size": int(batches[0][1].shape[0]),
        "local-steps": len(batches),
        "lr": float(cfg.client.lr),
        "device": device.type,
    }
    metrics = {"num-examples": result.num_examples, "loss": result.loss, **result.metrics}
    update = {k: v.detach().cpu() for k, v in result.update.items()}
    return TrainReply(update=update, num_examples=result.num_examples, metrics=metrics, meta=meta)


def handle_train(msg: Message, context: Context) -> Message:
    """Compute this client's update for the round in ``msg`` and reply with it; or, when
    ``federation.failure_rate`` chose this client in this round
    (:func:`fl_privsim.core.faults.failure_kind`), crash, hang or reply garbage instead."""
    cfg = config_from_message(msg, context)
    pid = partition_id(context)
    device = resolve_device(cfg.federation.device)
    model = _global_model(msg, cfg, device)
    server_round = int(msg.content[CONFIG_RECORD].get("server-round", 0))
    fed = cfg.federation
    failure = failure_kind(cfg.seed, server_round, pid, fed.failure_rate, fed.failure_mode)
    if failure == HANG:  # injected: no reply before the server's timeout
        hang(fed.round_timeout, server_round, pid)
    if failure is not None:  # injected: crash raises (Flower replies with an error), others
        # reply with the arrays the failure returns (garbage: NaN or wrongly shaped)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        arrays = plugins.FAILURES.get(failure)(state, cfg.seed, server_round, pid)
        content = RecordDict(
            {
                "arrays": ArrayRecord(arrays),
                "metrics": MetricRecord({"num-examples": cfg.client.batch_size, "loss": 0.0}),
                "meta": ConfigRecord({"client-id": pid, "protocol": fed.protocol}),
            }
        )
        return Message(content=content, reply_to=msg)
    try:
        reply = train_client(cfg, pid, model, server_round, context.state, device)
    except ModelRefused as exc:  # a defense (model_inspection) refused the model it was sent
        log.info("client %d refused the model of round %d: %s", pid, server_round, exc)
        return Message(error=Error(code=REFUSED_CODE, reason=f"{REFUSED} {exc}"), reply_to=msg)
    content = RecordDict(
        {
            "arrays": ArrayRecord(reply.update),
            "metrics": MetricRecord(reply.metrics),
            "meta": ConfigRecord(reply.meta),
        }
    )
    return Message(content=content, reply_to=msg)


@torch.no_grad()
def evaluate_client(
    cfg: Config, pid: int, model: torch.nn.Module, device: torch.device
) -> dict[str, float]:
    """``num-examples``, ``accuracy`` and ``loss`` of ``model`` on client ``pid``'s local test shard."""
    fed = federated_data(cfg)
    model.eval()
    x, y = fed.tensors("test", fed.test_parts[pid], device)
    logits = model(x)
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    acc = float((logits.argmax(1) == y).float().mean())
    return {"num-examples": int(y.shape[0]), "accuracy": acc, "loss": loss}


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this client's local test shard."""
    cfg = config_from_message(msg, context)
    pid = partition_id(context)
    device = resolve_device(cfg.federation.device)
    metrics = MetricRecord(evaluate_client(cfg, pid, _global_model(msg, cfg, device), device))
    meta = ConfigRecord({"client-id": pid})
    return Message(content=RecordDict({"metrics": metrics, "meta": meta}), reply_to=msg)


def handle_query(msg: Message, context: Context) -> Message:
    """Tell the server which client (partition) this node is."""
    return Message(
        content=RecordDict({"meta": ConfigRecord({"client-id": partition_id(context)})}),
        reply_to=msg,
    )


# Flower's client-side clipping mods, active only in client_* central DP runs.
app = ClientApp(mods=[make_central_dp_mod(config_from_message)])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower train entry point."""
    return handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Flower evaluate entry point."""
    return handle_evaluate(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Flower query entry point."""
    return handle_query(msg, context)

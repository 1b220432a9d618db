"""FedSGD and FedAvg over *updates* (gradients or weight deltas), on Flower's Message API.

:class:`FedUpdates` extends Flower's ``FedAvg`` (``flwr.serverapp.strategy``): clients
reply with an update, the strategy averages the updates weighted by ``num-examples`` and
applies the average to the global model it sent:

- FedSGD: ``θ ← θ − η_s · mean(g)`` (McMahan et al. 2017, "FedSGD");
- FedAvg: ``θ ← θ + η_s · mean(Δ)`` (η_s = 1 is plain FedAvg);
- floating-point buffers (BatchNorm statistics): ``b ← b + mean(Δb)``.

Clients are sampled deterministically from the run seed and the round (not Flower's
global ``random``), and replies are aggregated in client order, so the same seed gives
the same model. Node ids are mapped to client (partition) ids once, by a query round
(:func:`discover_clients`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from clients.client_app import REFUSED
from fl_privsim.core.seeding import numpy_rng

log = logging.getLogger(__name__)

MetricSink = Callable[[int, int | None, str, dict[str, float]], None]


def reply_client_id(msg: Message) -> int | None:
    """The client id a reply declares in its ``meta`` ConfigRecord (None if absent)."""
    meta = msg.content.config_records.get("meta") if not msg.has_error() else None
    if meta is None or "client-id" not in meta:
        return None
    return int(meta["client-id"])


def discover_clients(
    grid: Grid,
    *,
    expected: int,
    timeout: float = 600.0,
    known: Callable[[], dict[int, int]] | None = None,
) -> dict[int, int]:
    """``{node_id: client_id}`` of the ``expected`` nodes, once they are connected.

    ``known`` (the launcher's :func:`strategies.flower_dispatch.registered_nodes`: the map
    Flower's simulation made when it registered the nodes) answers without any message when it
    covers exactly the connected nodes (waiting up to 5 s for it); otherwise every node is asked
    for its client id by a query message (one message per node: at 10 000 nodes, the costliest
    exchange of a run).
    """
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(node_ids)} of {expected} client nodes connected within {timeout:.0f}s"
            )
        time.sleep(0.2)
    if known is not None:
        settle = time.monotonic() + 5.0
        while True:
            mapping = known()
            if mapping and set(mapping) == set(node_ids):
                return mapping
            if time.monotonic() > settle:
                log.info("the launcher's node map does not cover the nodes; querying them")
                break
            time.sleep(0.05)
    messages = [
        Message(content=RecordDict(), dst_node_id=nid, message_type=MessageType.QUERY)
        for nid in node_ids
    ]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        cid = reply_client_id(reply)
        if cid is None:
            raise RuntimeError(f"node {reply.metadata.src_node_id} did not report its client id")
        mapping[reply.metadata.src_node_id] = cid
    return mapping


class FedUpdates(FedAvg):
    """Average client updates and apply them to the global model.

    Parameters
    ----------
    protocol:
        ``"fedsgd"`` or ``"fedavg"``.
    server_lr:
        Server learning rate η_s.
    param_names:
        ``state_dict`` names of trainable parameters; every other float entry is a buffer.
    clients_per_round:
        How many clients are sampled each round.
    seed:
        Run seed for the deterministic sampling.
    node_to_client:
        ``{node_id: client_id}`` from :func:`discover_clients`.
    extra_config:
        Entries added to every train/evaluate ConfigRecord (e.g. the resolved config text).
    metric_sink:
        Optional ``(round, client, source, metrics)`` callback for per-client metrics.
    fraction_evaluate:
        Share of the evaluation pool asked to evaluate each round (0 turns it off).
    evaluation_clients:
        The evaluation pool: ``"sampled"`` (the round's training sample; the default, so
        evaluation at scale costs what the sampled clients cost) or ``"all"`` (every client,
        the meaning of Flower's ``fraction_evaluate``).
    """

    def __init__(
        self,
        *,
        protocol: str,
        server_lr: float,
        param_names: Iterable[str],
        clients_per_round: int,
        seed: int,
        node_to_client: dict[int, int],
        extra_config: dict[str, str | int | float] | None = None,
        metric_sink: MetricSink | None = None,
        fraction_evaluate: float = 1.0,
        evaluation_clients: str = "sampled",
    ) -> None:
        n = len(node_to_client)
        if evaluation_clients not in ("sampled", "all"):
            raise ValueError(
                f"evaluation_clients must be sampled or all, got {evaluation_clients!r}"
            )
        pool = min(clients_per_round, n) if evaluation_clients == "sampled" else n
        super().__init__(
            fraction_train=clients_per_round / max(n, 1),
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=clients_per_round,
            min_evaluate_nodes=max(1, round(fraction_evaluate * pool))
            if fraction_evaluate > 0
            else 0,
            min_available_nodes=n,
        )
        self.evaluation_clients = evaluation_clients
        if protocol not in ("fedsgd", "fedavg"):
            raise ValueError(f"protocol must be fedsgd or fedavg, got {protocol!r}")
        self.protocol = protocol
        self.server_lr = float(server_lr)
        self.param_names = set(param_names)
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.node_to_client = dict(node_to_client)
        self.client_to_node = {c: nid for nid, c in node_to_client.items()}
        self.extra_config = dict(extra_config or {})
        self.metric_sink = metric_sink
        self._current: dict[int, ArrayRecord] = {}
        self.client_errors: list[dict[str, object]] = []
        #: Devices the clients reported training on (``meta["device"]``: "cpu", "cuda").
        self.client_devices: set[str] = set()
        #: Seconds from sending a round's train messages to having its replies (the fit stage).
        self.fit_seconds: dict[int, float] = {}
        self._fit_started: dict[int, float] = {}

    # ------------------------------------------------------------------ sampling
    def sample_clients(self, server_round: int, k: int) -> list[int]:
        """The ``k`` client ids of ``server_round``, drawn from ``(seed, round)``."""
        clients = sorted(self.client_to_node)
        if k >= len(clients):
            return clients
        rng = numpy_rng(self.seed, server_round, "sampling")
        return sorted(int(c) for c in rng.choice(clients, size=k, replace=False))

    def _messages(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        clients: list[int],
        kind: str,
    ) -> list[Message]:
        config = ConfigRecord({**dict(config), **self.extra_config, "server-round": server_round})
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [
            Message(content=record, dst_node_id=self.client_to_node[c], message_type=kind)
            for c in clients
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model to this round's deterministic sample of clients."""
        self._current = {server_round: arrays}
        self._fit_started[server_round] = time.perf_counter()
        clients = self.sample_clients(server_round, self.clients_per_round)
        log.info("round %d: training clients %s", server_round, clients)
        return self._messages(server_round, arrays, config, clients, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation on :meth:`evaluate_sample` (none when it is empty)."""
        clients = self.evaluate_sample(server_round)
        if not clients:
            return []
        return self._messages(server_round, arrays, config, clients, MessageType.EVALUATE)

    def evaluate_sample(self, server_round: int) -> list[int]:
        """The clients asked to evaluate ``server_round``'s global model: a deterministic
        ``fraction_evaluate`` share of the pool (``evaluation_clients``: the round's training
        sample, or every client); empty when ``fraction_evaluate`` is 0."""
        if self.fraction_evaluate == 0.0:
            return []
        if self.evaluation_clients == "all":
            k = max(1, round(self.fraction_evaluate * len(self.client_to_node)))
            return self.sample_clients(-server_round, k)
        trained = self.sample_clients(server_round, self.clients_per_round)
        k = max(1, round(self.fraction_evaluate * len(trained)))
        if k >= len(trained):
            return trained
        rng = numpy_rng(self.seed, -server_round, "sampling")
        return sorted(int(c) for c in rng.choice(trained, size=k, replace=False))

    # ------------------------------------------------------------------ aggregation
    @staticmethod
    def order_replies(replies: Iterable[Message]) -> list[Message]:
        """``replies`` in client-id order (deterministic aggregation)."""
        replies = list(replies)
        return sorted(replies, key=lambda m: (reply_client_id(m) is None, reply_client_id(m) or 0))

    _order = order_replies

    def record_client_metrics(self, server_round: int, replies: Iterable[Message]) -> None:
        """Hand each successful reply's train metrics to the metric sink; count the clients
        that refused to train (an error reply whose reason starts with ``refused:``, e.g. the
        ``model_inspection`` defense) and the other failed replies, with their reasons."""
        for msg in replies:
            if msg.has_error():
                cid = self.node_to_client.get(msg.metadata.src_node_id)
                reason = str(msg.error.reason or f"error code {msg.error.code}")
                kind = "refused" if reason.startswith(REFUSED) else "failed"
                self.client_errors.append(
                    {"round": server_round, "client": cid, "kind": kind, "reason": reason}
                )
                if self.metric_sink is not None:
                    self.metric_sink(server_round, cid, "client_train", {kind: reason})
                continue
            meta = msg.content.config_records.get("meta")
            if meta is not None and "device" in meta:
                self.client_devices.add(str(meta["device"]))
            if self.metric_sink is not None:
                m = next(iter(msg.content.metric_records.values()))
                self.metric_sink(server_round, reply_client_id(msg), "client_train", dict(m))

    def client_error_report(self) -> dict[str, object]:
        """Refusals and failures of train replies: totals, per round, and the distinct reasons."""
        out: dict[str, object] = {}
        for kind in ("refused", "failed"):
            rows = [e for e in self.client_errors if e["kind"] == kind]
            by_round: dict[str, int] = {}
            for e in rows:
                by_round[str(e["round"])] = by_round.get(str(e["round"]), 0) + 1
            out[kind] = {
                "total": len(rows),
                "by_round": by_round,
                "reasons": sorted({str(e["reason"]) for e in rows})[:10],
            }
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the updates (in client order) and apply them to the global model."""
        if server_round in self._fit_started:
            self.fit_seconds[server_round] = time.perf_counter() - self._fit_started.pop(
                server_round
            )
        replies = self._order(replies)
        self.record_client_metrics(server_round, replies)
        avg, metrics = super().aggregate_train(server_round, replies)
        current = self._current.get(server_round)
        if avg is None or current is None:
            return None, metrics
        return self.apply_update(current, avg), metrics

    def apply_update(self, current: ArrayRecord, avg_update: ArrayRecord) -> ArrayRecord:
        """The new global ArrayRecord: ``current`` moved by the averaged update."""
        state = current.to_torch_state_dict()
        upd = avg_update.to_torch_state_dict()
        new: dict[str, torch.Tensor] = {}
        for name, value in state.items():
            if name not in upd or not value.is_floating_point():
                new[name] = value
            elif name in self.param_names:
                step = upd[name].to(value.dtype)
                new[name] = (
                    value - self.server_lr * step
                    if self.protocol == "fedsgd"
                    else value + self.server_lr * step
                )
            else:
                new[name] = value + upd[name].to(value.dtype)
        return ArrayRecord(new)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted mean of the clients' evaluation metrics."""
        return super().aggregate_evaluate(server_round, self._order(replies))


def weighted_mean_update(
    updates: list[dict[str, torch.Tensor]], weights: list[float]
) -> dict[str, torch.Tensor]:
    """Weighted mean of several updates (what a secure aggregator would reveal)."""
    total = float(sum(weights))
    w = np.asarray(weights, dtype=np.float64) / total
    return {k: sum(float(wi) * u[k] for wi, u in zip(w, updates, strict=True)) for k in updates[0]}

"""The honest-but-curious server: it trains as told and looks at what it receives.

:class:`HonestButCurious` wraps any Message-API strategy (as Flower's DP wrappers wrap
theirs). It does not change training: messages out and the aggregation are the inner
strategy's. What it adds is a look at each reply: the global parameters it sent, the
update it got back and the metadata the client declared become framework-free
:class:`adversaries.Observation` objects, handed to an :class:`Observer` (the attack
runner). With ``aggregate`` targets it also builds the weighted mean of the round's
updates, all that a server behind secure aggregation would see.

Failures of the observer are logged and never stop training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from adversaries.base import Observation
from strategies.fedupdates import reply_client_id, weighted_mean_update
from strategies.model_info import ModelInfo
from strategies.wrapping import DelegatesEvaluation

log = logging.getLogger(__name__)


class Observer(Protocol):
    """Receives the observations of a round (the attack runner implements this)."""

    def targets(self, server_round: int) -> tuple[set[int], bool]:
        """Client ids to observe in ``server_round``, and whether to observe the aggregate."""

    def observe(self, server_round: int, observations: list[Observation]) -> None:
        """Handle the observations (run attacks, score, record)."""


class HonestButCurious(DelegatesEvaluation, Strategy):
    """Wrap ``inner`` so that ``observer`` sees every targeted update as an Observation."""

    def __init__(self, inner: Strategy, *, info: ModelInfo, observer: Observer) -> None:
        self.inner = inner
        self.info = info
        self.observer = observer
        self._sent: dict[int, dict[str, torch.Tensor]] = {}
        self.failures = 0

    def summary(self) -> None:
        """Log the inner strategy's summary."""
        log.info("HonestButCurious wrapper around %s", type(self.inner).__name__)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate; remember the global parameters sent in this round."""
        self._sent = {server_round: arrays.to_torch_state_dict()}
        self.info.model.load_state_dict(self._sent[server_round])  # once per round
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Observe the targeted replies, then let the inner strategy aggregate them all."""
        replies = list(replies)
        try:
            observations = self.observations(server_round, replies)
            if observations:
                self.observer.observe(server_round, observations)
        except Exception:  # an attack must never stop training
            self.failures += 1
            log.exception("observation of round %d failed; training continues", server_round)
        return self.inner.aggregate_train(server_round, replies)

    # ------------------------------------------------------------------ observations
    def _observation(
        self,
        server_round: int,
        client: int | None,
        update: dict[str, torch.Tensor],
        meta: dict,
        n_examples: int,
        num_clients: int,
        members: tuple[int, ...] = (),
    ) -> Observation:
        return build_observation(
            self.info,
            server_round,
            self._sent[server_round],
            client,
            update,
            meta,
            n_examples,
            num_clients,
            members,
        )

    def observations(self, server_round: int, replies: list[Message]) -> list[Observation]:
        """Observations of the targeted clients (and the aggregate) among ``replies``."""
        if server_round not in self._sent:
            return []
        clients, want_aggregate = self.observer.targets(server_round)
        if not clients and not want_aggregate:
            return []
        out: list[Observation] = []
        entries: list[tuple[int | None, dict[str, torch.Tensor], int, dict]] = []
        for msg in sorted(replies, key=lambda m: reply_client_id(m) or 0):
            if msg.has_error():
                continue
            cid = reply_client_id(msg)
            arrays = next(iter(msg.content.array_records.values()))
            metrics = next(iter(msg.content.metric_records.values()))
            meta_rec = msg.content.config_records.get("meta")
            meta = dict(meta_rec) if meta_rec is not None else {}
            n = int(metrics.get("num-examples", 0))
            update = arrays.to_torch_state_dict()
            if want_aggregate:
                entries.append((cid, update, n, meta))
            if cid is not None and cid in clients:
                out.append(self._observation(server_round, cid, update, meta, n, 1))
        if want_aggregate and entries:
            out.append(self.aggregate_observation(server_round, entries))
        return out

    def aggregate_observation(
        self,
        server_round: int,
        entries: list[tuple[int | None, dict[str, torch.Tensor], int, dict]],
    ) -> Observation:
        """The weighted mean of ``entries`` (client id, update, examples, metadata) as one
        observation: all that a server behind secure aggregation would see."""
        agg = weighted_mean_update([e[1] for e in entries], [float(e[2]) for e in entries])
        members = tuple(e[0] for e in entries if e[0] is not None)
        return self._observation(
            server_round,
            None,
            agg,
            entries[0][3],
            sum(e[2] for e in entries),
            len(entries),
            members,
        )


def build_observation(
    info: ModelInfo,
    server_round: int,
    global_params: dict[str, torch.Tensor],
    client: int | None,
    update: dict[str, torch.Tensor],
    meta: dict,
    n_examples: int,
    num_clients: int,
    members: tuple[int, ...] = (),
) -> Observation:
    """One :class:`Observation`: the global parameters sent, the update (of ``client``, or an
    aggregate when ``client`` is None) and the metadata the client(s) declared in ``meta``
    (``protocol``, ``batch-size``, ``local-steps``, ``lr``; ``info``'s values where absent)."""
    return Observation(
        round=server_round,
        client_id=client,
        protocol=str(meta.get("protocol", info.protocol)),  # type: ignore[arg-type]
        model=info.model,
        global_params=global_params,
        update=update,
        batch_size=int(meta.get("batch-size", info.batch_size)),
        local_steps=int(meta.get("local-steps", info.local_steps)),
        lr=float(meta.get("lr", info.lr)),
        num_examples=int(n_examples),
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        data_mean=info.data_mean,
        data_std=info.data_std,
        num_clients=num_clients,
        members=members if members else ((client,) if client is not None else ()),
    )

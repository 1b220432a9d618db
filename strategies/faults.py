"""Failed client replies, server side: counted, kept out of the aggregate, told to the attacks.

:class:`FaultFilter` is the outermost strategy of a Message-API run. For each round's train
replies it sorts out the ones that cannot be aggregated, before any other strategy sees them:

- a client asked to train that sent no reply before the round's timeout (a hang) is counted
  as a failure;
- an error reply (a client that raised: a crash, injected or real) is counted as a failure
  and handed on (:class:`strategies.fedupdates.FedUpdates` records its reason in
  ``client_errors``); a refusal (``refused:``, e.g. ``model_inspection``) is not a failure;
- a *garbage* reply (no arrays, an array the model lacks, a wrong shape, a non-finite value,
  a non-positive ``num-examples``: :func:`fl_privsim.core.faults.update_problem`) is counted
  and dropped, so the weighted mean is over the real replies only (weights renormalised by
  Flower's ``FedAvg`` over what it receives).

Every failed reply of a targeted client is reported to the observer (the attack runner's
:meth:`~strategies.attack_runner.AttackRunner.missing`), which records the skipped attack
with its reason. The summary's ``failures`` is :meth:`FaultFilter.report`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from clients.client_app import REFUSED
from fl_privsim.core.faults import update_problem
from strategies.fedupdates import reply_client_id
from strategies.wrapping import DelegatesEvaluation

log = logging.getLogger(__name__)


class MissingObserver(Protocol):
    """Told about each targeted update that did not come back (the attack runner)."""

    def missing(self, server_round: int, client: int | None, reason: str) -> None:
        """Record that ``client``'s update of ``server_round`` is missing, and why."""


class FaultFilter(DelegatesEvaluation, Strategy):
    """Wrap ``inner``: drop garbage train replies, count every failed reply per round.

    ``expected`` is the agreed model's ``state_dict`` (names and shapes of a valid update;
    ``None``: names and shapes are not checked, as under a malicious server whose crafted
    models have other arrays);
    ``node_to_client`` names the client of an error reply (which carries no content);
    ``injected`` (optional) gives, per round, the injected failures ``{client: kind}`` for the
    report; ``timeout`` (optional) is the round timeout, named in the reason of a client that
    never replied (counted as a failure too)."""

    def __init__(
        self,
        inner: Strategy,
        *,
        expected: dict[str, torch.Tensor] | None,
        node_to_client: dict[int, int],
        observer: MissingObserver | None = None,
        injected: Callable[[int], dict[int, str]] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.inner = inner
        self.expected = (
            {k: torch.empty(v.shape, device="meta") for k, v in expected.items()}
            if expected is not None
            else None
        )
        self.node_to_client = dict(node_to_client)
        self.observer = observer
        self.injected = injected
        #: ``(round, client, reason)`` of every failed train reply.
        self.failed: list[tuple[int, int | None, str]] = []
        #: Train replies handed on to be aggregated, per round.
        self.aggregated: dict[int, int] = {}
        self.rounds_seen: list[int] = []
        #: Node ids each round's train messages went to.
        self.asked: dict[int, list[int]] = {}
        #: Seconds the server waits for a round's replies (only named in the reason).
        self.timeout = timeout

    def summary(self) -> None:
        """Log the inner strategy's summary."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, noting which nodes were asked (to find the ones that never reply)."""
        self.rounds_seen.append(server_round)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.asked[server_round] = [m.metadata.dst_node_id for m in messages]
        return messages

    def problem(self, msg: Message) -> str | None:
        """Why ``msg`` (a successful reply) cannot be aggregated; ``None`` when it can."""
        arrays = list(msg.content.array_records.values())
        metrics = list(msg.content.metric_records.values())
        if not arrays or not metrics:
            return "garbage reply: no arrays or no metrics"
        n = metrics[0].get("num-examples")
        try:
            update = arrays[0].to_torch_state_dict()
        except Exception as exc:  # noqa: BLE001 - whatever the client sent
            return f"garbage reply: unreadable arrays ({type(exc).__name__})"
        expected = self.expected if self.expected is not None else update
        return update_problem(update, expected, float(n) if n is not None else None)  # type: ignore[arg-type]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Count the failed replies, drop the garbage ones, let ``inner`` aggregate the rest."""
        kept: list[Message] = []
        replies = list(replies)
        answered = {m.metadata.src_node_id for m in replies}
        for node in self.asked.get(server_round, []):
            if node not in answered:  # no reply before the timeout: a hang or a lost client
                waited = f" within {self.timeout:g} s" if self.timeout is not None else ""
                self._fail(server_round, self.node_to_client.get(node), f"no reply{waited}")
        for msg in replies:
            if msg.has_error():
                reason = str(msg.error.reason or f"error code {msg.error.code}")
                if not reason.startswith(REFUSED):
                    cid = self.node_to_client.get(msg.metadata.src_node_id)
                    self._fail(server_round, cid, reason)
                kept.append(msg)  # FedUpdates records it in client_errors
                continue
            problem = self.problem(msg)
            if problem is None:
                kept.append(msg)
                continue
            cid = reply_client_id(msg)
            if cid is None:
                cid = self.node_to_client.get(msg.metadata.src_node_id)
            log.warning("round %d: client %s sent a %s; dropped", server_round, cid, problem)
            self._fail(server_round, cid, problem)
        self.aggregated[server_round] = sum(1 for m in kept if not m.has_error())
        return self.inner.aggregate_train(server_round, kept)

    def _fail(self, server_round: int, client: int | None, reason: str) -> None:
        reason = " ".join(reason.split())
        self.failed.append((server_round, client, reason))
        if self.observer is not None:
            try:
                self.observer.missing(server_round, client, reason)
            except Exception:  # bookkeeping must never stop training
                log.exception("could not record the missing update of client %s", client)

    def report(self) -> dict[str, Any]:
        """The summary's ``failures``: ``total``, ``by_round`` (every round trained, 0 where
        none failed), ``aggregated_by_round`` (replies aggregated), the distinct ``reasons``
        (at most 10) and, when failures are injected, ``injected`` (``total``, ``by_round``,
        ``by_kind`` and ``clients``: round -> the failed client ids)."""
        by_round = {str(r): 0 for r in self.rounds_seen}
        for r, _, _ in self.failed:
            by_round[str(r)] = by_round.get(str(r), 0) + 1
        out: dict[str, Any] = {
            "total": len(self.failed),
            "by_round": by_round,
            "aggregated_by_round": {str(r): n for r, n in sorted(self.aggregated.items())},
            "reasons": sorted({reason for _, _, reason in self.failed})[:10],
        }
        if self.injected is not None:
            per_round = {r: self.injected(r) for r in self.rounds_seen}
            kinds: dict[str, int] = {}
            for chosen in per_round.values():
                for kind in chosen.values():
                    kinds[kind] = kinds.get(kind, 0) + 1
            out["injected"] = {
                "total": sum(len(c) for c in per_round.values()),
                "by_round": {str(r): len(c) for r, c in per_round.items()},
                "by_kind": dict(sorted(kinds.items())),
                "clients": {str(r): sorted(c) for r, c in per_round.items()},
            }
        return out

"""The malicious server: it crafts the model it sends, then attacks what comes back.

:class:`MaliciousServer` extends the honest-but-curious wrapper
(:class:`strategies.honest_but_curious.HonestButCurious`). Before each train message leaves,
every configured modification (:mod:`adversaries.malicious`, pure torch) whose rounds include
this one crafts the model for its target clients: it may change weights and the architecture
(an imprint block in front of the model, :mod:`fl_privsim.core.architecture`). A targeted client's
message then carries the crafted weights and the architecture spec (config key
``fl-privsim-arch``); the client builds that architecture and trains on it, as a real client
that trusts its server would. The secrets each modification keeps travel to the attacks inside
the :class:`~adversaries.base.Observation` (``server_secrets``), never through globals.

Training stays the honest model's: a reply computed on a crafted model is mapped back to the
agreed model's parameter names (front-block entries dropped) before the inner strategy
aggregates it, so the global model keeps its architecture. Each modification's
:meth:`~adversaries.malicious.Modification.observe` hook sees the round's aggregate of the
targeted clients' updates (e.g. for fishing's search across rounds).

Crafting itself (:class:`strategies.crafting.Crafter`) is shared with the SecAgg+ server.
Aggregate observations are read against the model their members were sent
(:func:`strategies.crafting.observed_model`): one crafted model (or its per-client variants)
carries that model and its secrets; unrelated models give the agreed model's entries only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from adversaries.base import Observation
from fl_privsim.core.architecture import ARCH_KEY, honest_update, spec_to_text
from strategies.crafting import (
    MIXED,
    Crafter,
    ModificationPlan,
    SentModel,
    observed_model,
    undecoyed,
)
from strategies.fedupdates import reply_client_id, weighted_mean_update
from strategies.honest_but_curious import HonestButCurious, ModelInfo, Observer

log = logging.getLogger(__name__)


class MaliciousServer(HonestButCurious):
    """Craft the model per the modification plans, observe and attack the replies.

    Parameters
    ----------
    inner:
        The training strategy (FedUpdates, optionally inside central DP).
    info:
        The agreed model and the protocol metadata.
    observer:
        The attack runner.
    plans:
        The modifications, in the order they are applied.
    node_to_client:
        ``{node_id: client_id}`` of the federation.
    public_inputs, public_labels:
        The server's own data (normalised), given to the modifications.
    seed:
        Run seed: each modification's generator is drawn from (seed, round, its index).
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        info: ModelInfo,
        observer: Observer,
        plans: Sequence[ModificationPlan],
        node_to_client: dict[int, int],
        public_inputs: torch.Tensor,
        public_labels: torch.Tensor,
        seed: int,
    ) -> None:
        super().__init__(inner, info=info, observer=observer)
        self.crafter = Crafter(
            plans, info=info, public_inputs=public_inputs, public_labels=public_labels, seed=seed
        )
        self.plans = self.crafter.plans
        self.node_to_client = dict(node_to_client)
        self._sent_models: dict[int, SentModel] = {}

    def craft(self, server_round: int, sampled: Sequence[int]) -> dict[int, SentModel]:
        """The crafted model of every sampled client that gets one in ``server_round``."""
        return self.crafter.craft(server_round, sampled)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's messages, with the crafted model for each targeted client."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        sampled = sorted(self.node_to_client[m.metadata.dst_node_id] for m in messages)
        self._sent_models = self.craft(server_round, sampled)
        if not self._sent_models:
            return messages
        out = []
        for msg in messages:
            sent = self._sent_models.get(self.node_to_client[msg.metadata.dst_node_id])
            if sent is None:
                out.append(msg)
                continue
            content = RecordDict()
            for key, rec in msg.content.items():
                if isinstance(rec, ArrayRecord):
                    content[key] = ArrayRecord(sent.state)
                elif isinstance(rec, ConfigRecord):
                    content[key] = ConfigRecord({**dict(rec), ARCH_KEY: spec_to_text(sent.arch)})
                else:
                    content[key] = rec
            out.append(
                Message(
                    content=content,
                    dst_node_id=msg.metadata.dst_node_id,
                    message_type=msg.metadata.message_type,
                )
            )
        log.info(
            "round %d: crafted models sent to clients %s", server_round, sorted(self._sent_models)
        )
        return out

    # ------------------------------------------------------------------ replies
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Observe (with the crafted models), let the modifications see their aggregate, then
        hand the replies, mapped to the agreed model's names, to the inner strategy."""
        replies = list(replies)
        try:
            self._feed_modifications(server_round, replies)
        except Exception:  # a modification's bookkeeping must never stop training
            self.failures += 1
            log.exception(
                "modification feedback of round %d failed; training continues", server_round
            )
        try:
            observations = self.observations(server_round, replies)
            if observations:
                self.observer.observe(server_round, observations)
        except Exception:
            self.failures += 1
            log.exception("observation of round %d failed; training continues", server_round)
        for msg in replies:
            cid = reply_client_id(msg)
            sent = self._sent_models.get(cid) if cid is not None else None
            if sent is None or not sent.arch:
                continue
            for key, rec in list(msg.content.items()):
                if isinstance(rec, ArrayRecord):
                    msg.content[key] = ArrayRecord(
                        honest_update(rec.to_torch_state_dict(), sent.arch)
                    )
        return self.inner.aggregate_train(server_round, replies)

    def _feed_modifications(self, server_round: int, replies: list[Message]) -> None:
        entries = []
        for msg in sorted(replies, key=lambda m: reply_client_id(m) or 0):
            cid = reply_client_id(msg)
            if msg.has_error() or cid is None or cid not in self._sent_models:
                continue
            metrics = next(iter(msg.content.metric_records.values()))
            meta_rec = msg.content.config_records.get("meta")
            update = next(iter(msg.content.array_records.values())).to_torch_state_dict()
            entries.append(
                (
                    cid,
                    update,
                    int(metrics.get("num-examples", 0)),
                    dict(meta_rec) if meta_rec is not None else {},
                )
            )
        for i, plan in enumerate(self.plans):
            mine = [e for e in entries if i in self._sent_models[e[0]].plans]
            if mine:
                plan.modification.observe(self.aggregate_observation(server_round, mine))

    def aggregate_observation(
        self,
        server_round: int,
        entries: list[tuple[int | None, dict[str, torch.Tensor], int, dict]],
    ) -> Observation:
        """The weighted mean of ``entries``, read against the model its members were sent
        (:func:`strategies.crafting.observed_model`): the honest one, one crafted model with its
        secrets, or, when members got unrelated models, the agreed model's entries only."""
        sent = [self._sent_models.get(c) if c is not None else None for c, *_ in entries]
        chosen = observed_model(sent)
        if chosen is None:
            return super().aggregate_observation(server_round, entries)
        members = tuple(e[0] for e in entries if e[0] is not None)
        total = sum(e[2] for e in entries)
        if chosen == MIXED:
            mapped = [
                (c, honest_update(u, s.arch) if s is not None else u, n, meta)
                for (c, u, n, meta), s in zip(entries, sent, strict=True)
            ]
            obs = super().aggregate_observation(server_round, mapped)
            return dataclasses.replace(
                obs,
                model=self.info.model,
                global_params=self._sent[server_round],
                server_secrets={},
            )
        assert isinstance(chosen, SentModel)
        agg = weighted_mean_update([e[1] for e in entries], [float(e[2]) for e in entries])
        kept, total, scale = undecoyed(
            members, [e[2] for e in entries if e[0] is not None], self._sent_models
        )
        if scale != 1.0:  # decoys' updates vanish: read the aggregate as the other members' update
            agg = {k: v * scale for k, v in agg.items()}
        obs = super()._observation(server_round, None, agg, entries[0][3], total, len(kept), kept)
        return dataclasses.replace(
            obs, model=chosen.model, global_params=chosen.state, server_secrets=chosen.secrets
        )

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
        """As the honest server's, with the model, weights and secrets the client was sent."""
        obs = super()._observation(
            server_round, client, update, meta, n_examples, num_clients, members
        )
        sent = self._sent_models.get(client) if client is not None else None
        if sent is None:
            return obs
        return dataclasses.replace(
            obs, model=sent.model, global_params=sent.state, server_secrets=sent.secrets
        )

    def report(self) -> dict[str, Any]:
        """What the server crafted, for the run summary."""
        return self.crafter.report()

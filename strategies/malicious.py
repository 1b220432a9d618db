"""The malicious server: it crafts the model it sends, then attacks what comes back.

:class:`MaliciousServer` extends the honest-but-curious wrapper
(:class:`strategies.honest_but_curious.HonestButCurious`). Before each train message leaves,
every configured modification (:mod:`adversaries.malicious`, pure torch) whose rounds include
this one crafts the model for its target clients: it may change weights and the architecture
(an imprint block in front of the model, :mod:`fl_privsim.architecture`). A targeted client's
message then carries the crafted weights and the architecture spec (config key
``fl-privsim-arch``); the client builds that architecture and trains on it, as a real client
that trusts its server would. The secrets each modification keeps travel to the attacks inside
the :class:`~adversaries.base.Observation` (``server_secrets``), never through globals.

Training stays the honest model's: a reply computed on a crafted model is mapped back to the
agreed model's parameter names (front-block entries dropped) before the inner strategy
aggregates it, so the global model keeps its architecture. Each modification's
:meth:`~adversaries.malicious.Modification.observe` hook sees the round's aggregate of the
targeted clients' updates (e.g. for fishing's search across rounds).

Aggregate observations: when every member of the aggregate got the same crafted model, the
aggregate carries that model and its secrets; when members got different models, the
aggregate is taken over the agreed model's entries and carries no secrets.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from adversaries.base import Observation
from adversaries.malicious import Modification, ServerView
from fl_privsim.architecture import ARCH_KEY, honest_update, spec_to_text
from fl_privsim.seeding import torch_generator
from strategies.fedupdates import reply_client_id
from strategies.honest_but_curious import HonestButCurious, ModelInfo, Observer

log = logging.getLogger(__name__)


@dataclass
class ModificationPlan:
    """One configured modification and when and for whom it crafts."""

    name: str
    modification: Modification
    rounds: set[int]
    clients: set[int] = field(default_factory=set)  # empty: every sampled client

    def targets(self, server_round: int, sampled: Sequence[int]) -> tuple[int, ...]:
        """The sampled clients this plan crafts for in ``server_round``."""
        if server_round not in self.rounds:
            return ()
        return tuple(c for c in sampled if not self.clients or c in self.clients)


@dataclass
class SentModel:
    """What one client was sent in a round: the crafted model, its weights, spec, secrets."""

    model: torch.nn.Module
    state: dict[str, torch.Tensor]
    arch: dict[str, Any]
    secrets: dict[str, Any]
    plans: tuple[int, ...]


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
        self, inner: Strategy, *, info: ModelInfo, observer: Observer, plans: Sequence[ModificationPlan],
        node_to_client: dict[int, int], public_inputs: torch.Tensor, public_labels: torch.Tensor, seed: int,
    ) -> None:
        super().__init__(inner, info=info, observer=observer)
        self.plans = list(plans)
        self.node_to_client = dict(node_to_client)
        self.public_inputs = public_inputs
        self.public_labels = public_labels
        self.seed = seed
        self._sent_models: dict[int, SentModel] = {}
        self.crafted_rounds: dict[int, dict[str, list[int]]] = {}

    # ------------------------------------------------------------------ crafting
    def _view(self, server_round: int, sampled: Sequence[int], targets: Sequence[int], index: int) -> ServerView:
        info = self.info
        return ServerView(
            round=server_round, clients=tuple(sampled), targets=tuple(targets), input_shape=info.input_shape,
            num_classes=info.num_classes, data_mean=info.data_mean, data_std=info.data_std,
            protocol=info.protocol, batch_size=info.batch_size, local_steps=info.local_steps, lr=info.lr,
            public_inputs=self.public_inputs, public_labels=self.public_labels,
            generator=torch_generator(self.seed, server_round, index, "modification"),
        )

    def craft(self, server_round: int, sampled: Sequence[int]) -> dict[int, SentModel]:
        """The crafted model of every targeted client of ``server_round`` (others: absent)."""
        by_client: dict[int, tuple[int, ...]] = {}
        targets = {i: p.targets(server_round, sampled) for i, p in enumerate(self.plans)}
        for c in sampled:
            chain = tuple(i for i in range(len(self.plans)) if c in targets[i])
            if chain:
                by_client[c] = chain
        out: dict[int, SentModel] = {}
        for chain in sorted(set(by_client.values())):
            clients = [c for c, ch in by_client.items() if ch == chain]
            model: torch.nn.Module = copy.deepcopy(self.info.model)
            arch: dict[str, Any] = {}
            secrets: dict[str, Any] = {}
            overrides: dict[int, torch.nn.Module] = {}
            for i in chain:
                plan = self.plans[i]
                crafted = plan.modification.craft(model, self._view(server_round, sampled, targets[i], i))
                model, secrets[plan.name] = crafted.model, crafted.secrets
                arch.update(crafted.arch)
                overrides.update(crafted.per_client)
            shared = _sent(model, arch, secrets, chain)
            for c in clients:
                out[c] = _sent(overrides[c], arch, secrets, chain) if c in overrides else shared
        self.crafted_rounds[server_round] = {
            self.plans[i].name: sorted(targets[i]) for i in range(len(self.plans)) if targets[i]
        }
        return out

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
            out.append(Message(content=content, dst_node_id=msg.metadata.dst_node_id,
                               message_type=msg.metadata.message_type))
        log.info("round %d: crafted models sent to clients %s", server_round, sorted(self._sent_models))
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
            log.exception("modification feedback of round %d failed; training continues", server_round)
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
                    msg.content[key] = ArrayRecord(honest_update(rec.to_torch_state_dict(), sent.arch))
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
            entries.append((cid, update, int(metrics.get("num-examples", 0)),
                            dict(meta_rec) if meta_rec is not None else {}))
        for i, plan in enumerate(self.plans):
            mine = [e for e in entries if i in self._sent_models[e[0]].plans]
            if mine:
                plan.modification.observe(self.aggregate_observation(server_round, mine))

    def aggregate_observation(
        self, server_round: int, entries: list[tuple[int | None, dict[str, torch.Tensor], int, dict]]
    ) -> Observation:
        """The weighted mean of ``entries``; when their clients were sent different models,
        each update is first mapped to the agreed model's entries (no secrets then)."""
        sent = [self._sent_models.get(c) if c is not None else None for c, *_ in entries]
        if all(s is sent[0] for s in sent):  # one model for all (crafted or agreed)
            return super().aggregate_observation(server_round, entries)
        mapped = [(c, honest_update(u, s.arch) if s is not None else u, n, meta)
                  for (c, u, n, meta), s in zip(entries, sent, strict=True)]
        obs = super().aggregate_observation(server_round, mapped)
        return dataclasses.replace(obs, model=self.info.model, global_params=self._sent[server_round],
                                   server_secrets={})

    def _observation(
        self, server_round: int, client: int | None, update: dict[str, torch.Tensor], meta: dict, n_examples: int,
        num_clients: int, members: tuple[int, ...] = (),
    ) -> Observation:
        """As the honest server's, with the crafted model, weights and secrets when every client
        behind the update was sent the same crafted model."""
        obs = super()._observation(server_round, client, update, meta, n_examples, num_clients, members)
        who = members if client is None else (client,)
        sent = [self._sent_models.get(c) for c in who]
        first = sent[0] if sent else None
        if first is None or any(s is not first for s in sent):
            return obs
        return dataclasses.replace(obs, model=first.model, global_params=first.state,
                                   server_secrets=first.secrets)

    def report(self) -> dict[str, Any]:
        """What the server crafted, for the run summary."""
        return {
            "role": "malicious",
            "modifications": [p.name for p in self.plans],
            "crafted": {str(r): v for r, v in sorted(self.crafted_rounds.items()) if v},
        }


def _sent(model: torch.nn.Module, arch: dict[str, Any], secrets: dict[str, Any], chain: tuple[int, ...]) -> SentModel:
    model = model.eval()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return SentModel(model=model, state=state, arch=arch, secrets=secrets, plans=chain)

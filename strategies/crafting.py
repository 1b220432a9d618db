"""What a malicious server sends each client, shared by both server paths.

:class:`Crafter` applies the configured modifications (:mod:`adversaries.malicious`, pure
torch) to the honest global model of a round and returns, per sampled client, the
:class:`SentModel` it gets: crafted weights, the architecture spec a client builds, and the
secrets the server keeps. The Message-API server (:class:`strategies.malicious.MaliciousServer`)
and the SecAgg+ server (:class:`strategies.secure_aggregation.SecAggStrategy`) both use it, so
a modification behaves the same with and without secure aggregation.

A modification may also send models to sampled clients it does not target
(:attr:`adversaries.malicious.Crafted.per_client` naming a non-target): those are *decoys*,
e.g. the zero-update models of client isolation (Pasquini et al., CCS 2022). An aggregate is
read against the model of its non-decoy members when they all share one crafted model (or one
per-client family of it, as LOKI's customised models): :func:`observed_model`.

No Flower import here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adversaries.malicious import Modification, ServerView
from fl_privsim.core.seeding import torch_generator
from strategies.model_info import ModelInfo


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


@dataclass(eq=False)
class SentModel:
    """What one client was sent in a round.

    Attributes
    ----------
    model, state, arch, secrets:
        The crafted model, its weights, its architecture spec and the server's secrets.
    plans:
        Indices of the plans that crafted it.
    family:
        The chain's shared model when this one is a per-client variant of it (else ``None``).
    decoy:
        Sent to a client no plan targets (its update is meant to vanish from the aggregate).
    """

    model: torch.nn.Module
    state: dict[str, torch.Tensor]
    arch: dict[str, Any]
    secrets: dict[str, Any]
    plans: tuple[int, ...]
    family: SentModel | None = None
    decoy: bool = False

    @property
    def root(self) -> SentModel:
        """The chain's shared model (itself when it is not a per-client variant)."""
        return self.family if self.family is not None else self


#: :func:`observed_model`'s answer when the members of an aggregate got unrelated models.
MIXED = "mixed"


def observed_model(sent: Sequence[SentModel | None]) -> SentModel | str | None:
    """The model an aggregate over members who were sent ``sent`` is read against.

    ``None``: every member got the honest model. A :class:`SentModel`: the non-decoy members
    all got one crafted model (or per-client variants of one, with the same architecture as
    every decoy); its root is returned. :data:`MIXED` otherwise (the aggregate is then read on
    the agreed model's entries, without secrets)."""
    real = [s for s in sent if s is None or not s.decoy]
    if not real:
        return MIXED
    if all(s is None for s in sent):
        return None
    roots = {id(s.root) if s is not None else None for s in real}
    if len(roots) != 1 or real[0] is None:
        return MIXED
    root = real[0].root
    if any(s is not None and s.arch != root.arch for s in sent):
        return MIXED
    return root


def undecoyed(
    members: Sequence[int], counts: Sequence[int], sent: dict[int, SentModel]
) -> tuple[tuple[int, ...], int, float]:
    """The members of an aggregate whose update counts, their examples, and the factor that
    turns the aggregate into their own weighted mean.

    Decoys' updates vanish by design (isolation), so the server reads the aggregate as the
    update of the non-decoy members: ``(members, Σ n, Σ n_all / Σ n)``. Without decoys (or with
    decoys only) the members, their total and 1."""
    keep = [
        (c, n) for c, n in zip(members, counts, strict=True) if not (c in sent and sent[c].decoy)
    ]
    total = sum(counts)
    if not keep or len(keep) == len(members):
        return tuple(members), total, 1.0
    mine = sum(n for _, n in keep)
    return tuple(c for c, _ in keep), mine, total / max(mine, 1)


class Crafter:
    """Applies the modification plans to the honest model, round by round.

    Parameters
    ----------
    plans:
        The modifications, in the order they are applied.
    info:
        The agreed model and the declared protocol.
    public_inputs, public_labels:
        The server's own data (normalised), given to the modifications.
    seed:
        Run seed: each modification's generator is drawn from (seed, round, its index).
    update_resolution, weight_bound:
        The revealed mean's rounding per entry and the clipping of the weights clients send
        (SecAgg+), told to the modifications (:class:`adversaries.malicious.ServerView`).
    """

    def __init__(
        self,
        plans: Sequence[ModificationPlan],
        *,
        info: ModelInfo,
        public_inputs: torch.Tensor,
        public_labels: torch.Tensor,
        seed: int,
        update_resolution: float = 0.0,
        weight_bound: float = math.inf,
    ) -> None:
        self.plans = list(plans)
        self.info = info
        self.public_inputs = public_inputs
        self.public_labels = public_labels
        self.seed = seed
        self.update_resolution = float(update_resolution)
        self.weight_bound = float(weight_bound)
        self.crafted_rounds: dict[int, dict[str, list[int]]] = {}

    def _view(
        self, server_round: int, sampled: Sequence[int], targets: Sequence[int], index: int
    ) -> ServerView:
        info = self.info
        return ServerView(
            round=server_round,
            clients=tuple(sampled),
            targets=tuple(targets),
            input_shape=info.input_shape,
            num_classes=info.num_classes,
            data_mean=info.data_mean,
            data_std=info.data_std,
            protocol=info.protocol,
            batch_size=info.batch_size,
            local_steps=info.local_steps,
            lr=info.lr,
            public_inputs=self.public_inputs,
            public_labels=self.public_labels,
            generator=torch_generator(self.seed, server_round, index, "modification"),
            update_resolution=self.update_resolution,
            weight_bound=self.weight_bound,
        )

    def craft(self, server_round: int, sampled: Sequence[int]) -> dict[int, SentModel]:
        """The model of every sampled client that gets a crafted one in ``server_round``
        (clients absent from the result get the honest model)."""
        targets = {i: p.targets(server_round, sampled) for i, p in enumerate(self.plans)}
        by_client: dict[int, tuple[int, ...]] = {}
        for c in sampled:
            chain = tuple(i for i in range(len(self.plans)) if c in targets[i])
            if chain:
                by_client[c] = chain
        out: dict[int, SentModel] = {}
        decoys: dict[int, SentModel] = {}
        for chain in sorted(set(by_client.values())):
            model: torch.nn.Module = copy.deepcopy(self.info.model)
            arch: dict[str, Any] = {}
            secrets: dict[str, Any] = {}
            overrides: dict[int, torch.nn.Module] = {}
            for i in chain:
                plan = self.plans[i]
                crafted = plan.modification.craft(
                    model, self._view(server_round, sampled, targets[i], i)
                )
                model, secrets[plan.name] = crafted.model, crafted.secrets
                arch.update(crafted.arch)
                overrides.update(crafted.per_client)
            shared = _sent(model, arch, secrets, chain)
            for c, ch in by_client.items():
                if ch == chain:
                    out[c] = (
                        _sent(overrides[c], arch, secrets, chain, family=shared)
                        if c in overrides
                        else shared
                    )
            for c, m in overrides.items():
                if c in sampled and c not in by_client:
                    decoys[c] = _sent(m, arch, secrets, chain, family=shared, decoy=True)
        out.update({c: s for c, s in decoys.items() if c not in out})
        self.crafted_rounds[server_round] = {
            self.plans[i].name: sorted(targets[i]) for i in range(len(self.plans)) if targets[i]
        }
        decoyed = sorted(decoys)
        if decoyed:
            self.crafted_rounds[server_round]["decoys"] = decoyed
        return out

    def report(self) -> dict[str, Any]:
        """What the server crafted, for the run summary."""
        return {
            "role": "malicious",
            "modifications": [p.name for p in self.plans],
            "crafted": {str(r): v for r, v in sorted(self.crafted_rounds.items()) if v},
        }


def _sent(
    model: torch.nn.Module,
    arch: dict[str, Any],
    secrets: dict[str, Any],
    chain: tuple[int, ...],
    family: SentModel | None = None,
    decoy: bool = False,
) -> SentModel:
    model = model.eval()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return SentModel(
        model=model,
        state=state,
        arch=arch,
        secrets=secrets,
        plans=chain,
        family=family,
        decoy=decoy,
    )

"""The malicious server's model modifications: the interface and the registry (pure torch).

A *modification* is what a malicious server does to the model before it sends it (design
notes, "Server roles"). It receives the honest global model and a :class:`ServerView` (what the
server knows when it crafts: the round, the sampled clients, the declared protocol, its own
public data), and returns a :class:`Crafted`: the model to send (possibly with a different
architecture, described by a spec of :mod:`fl_privsim.core.architecture`), optionally other models
for some clients, and the *secrets* the server keeps (bin boundaries, planted rows, the target
class). The secrets reach the attacks inside :attr:`adversaries.base.Observation.server_secrets`
under the modification's name; an attack that needs them declares it in
:attr:`adversaries.base.Attack.modification`.

Threat model: the server may send any weights and any architecture the client will build (a
client trusts the server's model); it never sees the clients' data, only what they send back.
An honest-but-curious server never modifies the model.

This module imports neither Flower nor Ray.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from adversaries.base import Observation
from fl_privsim.core import plugins
from fl_privsim.core.registry import Registry


@dataclass(frozen=True)
class ServerView:
    """What the server knows when it crafts the model of one round.

    Attributes
    ----------
    round:
        The server round (1-based).
    clients:
        Client ids sampled in this round.
    targets:
        The clients this modification is applied to (a subset of ``clients``).
    input_shape, num_classes:
        Shape (C, H, W) of one input and number of classes.
    data_mean, data_std:
        Per-channel normalisation the clients apply (inputs are ``(pixel - mean) / std``).
    protocol, batch_size, local_steps, lr:
        What the protocol declares: ``"fedsgd"``/``"fedavg"``, the clients' batch size, local
        steps (1 for FedSGD) and local learning rate.
    public_inputs, public_labels:
        The server's own data of the same domain (normalised inputs, labels), never a
        client's: a seeded subset of the test split.
    generator:
        CPU generator for every random draw (seeded from run seed, round, purpose).
    update_resolution:
        The smallest change of one entry of the revealed mean update that survives the
        aggregation (secure aggregation's rounding, e.g. SecAgg+'s quantisation step); 0 when
        the server sees exact floats. A modification may size its signal above it.
    weight_bound:
        The largest weight magnitude the aggregation carries unclipped (SecAgg+'s
        ``clipping_range``: clients send full models); ``inf`` when nothing clips.
    """

    round: int
    clients: tuple[int, ...]
    targets: tuple[int, ...]
    input_shape: tuple[int, int, int]
    num_classes: int
    data_mean: tuple[float, ...]
    data_std: tuple[float, ...]
    protocol: str
    batch_size: int
    local_steps: int
    lr: float
    public_inputs: torch.Tensor
    public_labels: torch.Tensor
    generator: torch.Generator
    update_resolution: float = 0.0
    weight_bound: float = math.inf

    @property
    def records_per_update(self) -> int:
        """Records one targeted client touches in a round (batch × local steps)."""
        return self.batch_size * max(1, self.local_steps if self.protocol == "fedavg" else 1)


@dataclass
class Crafted:
    """What a modification returns.

    Attributes
    ----------
    model:
        The model sent to every targeted client (its architecture matches ``arch``).
    arch:
        Architecture spec of :mod:`fl_privsim.core.architecture` (``{}``: the agreed one).
    secrets:
        What the server keeps for its attack (tensors, numbers, strings).
    per_client:
        Optional models for single clients (same ``arch``), overriding ``model`` for them.
    """

    model: nn.Module
    arch: dict[str, Any] = field(default_factory=dict)
    secrets: dict[str, Any] = field(default_factory=dict)
    per_client: dict[int, nn.Module] = field(default_factory=dict)


class Modification(ABC):
    """Base class of every model modification.

    Subclasses take their parameters as keyword-only constructor arguments (validated there;
    ``ValueError`` with one line naming what is allowed), may refuse a model they cannot be
    placed in (:meth:`check_model`), and implement :meth:`craft`. They must not change the
    honest model they are given (work on a copy).
    """

    name: ClassVar[str] = ""
    #: The modification sends an architecture other than the agreed one (a front block). Under
    #: secure aggregation every client of a round must then get it (equal shapes are summed).
    changes_architecture: ClassVar[bool] = False
    #: ``targets.clients`` must name the clients it singles out (e.g. isolation's targets).
    needs_target_clients: ClassVar[bool] = False

    def check_model(
        self, model: nn.Module, input_shape: tuple[int, int, int], num_classes: int
    ) -> None:
        """Raise :class:`~fl_privsim.core.errors.ConfigError` when the modification cannot be
        placed in ``model`` (called before the federation starts). Nothing by default."""

    @abstractmethod
    def craft(self, model: nn.Module, view: ServerView) -> Crafted:
        """The model(s) to send in ``view.round`` and the secrets to keep."""

    def observe(self, obs: Observation) -> None:
        """Called by the server with the round's aggregate update (an
        :class:`~adversaries.base.Observation` carrying this round's secrets) after every round
        in which this modification was applied; a modification that adapts across rounds
        (e.g. fishing's binary search on a feature) updates its state here. Nothing by default."""


_M = TypeVar("_M", bound=Modification)

#: The modification registry (in the foundation, :mod:`fl_privsim.core.plugins`).
MODIFICATIONS: Registry[Modification] = plugins.MODIFICATIONS


def register_modification(name: str) -> Callable[[type[_M]], type[_M]]:
    """Register a :class:`Modification` subclass under ``name`` (and set its :attr:`name`)."""

    def deco(cls: type[_M]) -> type[_M]:
        cls.name = name
        MODIFICATIONS.register(name)(cls)  # returns cls
        return cls

    return deco

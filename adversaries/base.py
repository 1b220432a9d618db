"""The attack interface: what the server observes, what an attack returns.

An :class:`Observation` holds only what an honest-but-curious (or malicious) server
legitimately sees: the global model it sent, the update it received, and the metadata
the protocol declares. It has no field for ground truth; the scorer, outside the
attacks, looks that up on its own. This module imports neither Flower nor Ray.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from fl_privsim.core import plugins
from fl_privsim.core.errors import ThreatModelError
from fl_privsim.core.registry import Registry

Protocol = Literal["fedsgd", "fedavg"]


@dataclass(frozen=True)
class Observation:
    """One update as the server sees it (a single client's, or a round's aggregate).

    Attributes
    ----------
    round:
        Server round (1-based) in which the update was sent.
    client_id:
        The client's declared id (its partition id); ``None`` for an aggregate.
    protocol:
        ``"fedsgd"`` (update = one batch's mean gradient) or ``"fedavg"``
        (update = weights after ``local_steps`` SGD steps minus weights before).
    model:
        The architecture with the global parameters of this round loaded. Attacks must
        not modify it; use :meth:`fresh_model`.
    global_params:
        Parameters and buffers the server sent, by ``state_dict`` name.
    update:
        What came back, by name: gradient (FedSGD) or delta (FedAvg) for every trainable
        parameter, and the change of every floating-point buffer.
    batch_size, local_steps, lr, num_examples:
        Declared by the protocol (for an aggregate: per-client batch size and steps, and
        the total number of examples).
    input_shape, num_classes:
        Shape (C, H, W) of one model input, and the number of classes.
    data_mean, data_std:
        Per-channel normalisation the clients apply: inputs live in
        ``[(0 - mean) / std, (1 - mean) / std]``.
    num_clients:
        How many client updates were averaged into this one (1 for a single client).
    members:
        Ids of the clients whose updates were averaged (for an aggregate); the server
        knows who took part, not what they trained on.
    server_secrets:
        What a malicious server kept when it crafted the model of this round, by modification
        name (:mod:`adversaries.malicious`); empty for an honest-but-curious server. ``model``
        and ``global_params`` are then the crafted model that was sent.
    """

    round: int
    client_id: int | None
    protocol: Protocol
    model: nn.Module
    global_params: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]
    batch_size: int
    local_steps: int
    lr: float
    num_examples: int
    input_shape: tuple[int, int, int]
    num_classes: int
    data_mean: tuple[float, ...]
    data_std: tuple[float, ...]
    num_clients: int = 1
    members: tuple[int, ...] = ()
    server_secrets: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_aggregate(self) -> bool:
        """True when the update averages several clients."""
        return self.client_id is None

    def param_names(self) -> list[str]:
        """Names of the trainable parameters, in ``model.named_parameters()`` order."""
        return [name for name, p in self.model.named_parameters() if p.requires_grad]

    def gradient(self) -> list[torch.Tensor]:
        """The update as gradient-like tensors, one per trainable parameter.

        FedSGD: the update itself. FedAvg: ``-delta / (lr * local_steps)``, the average
        gradient along the local trajectory (exact for one local step).
        """
        names = self.param_names()
        missing = [n for n in names if n not in self.update]
        if missing:
            raise ThreatModelError(f"update lacks parameter(s) {missing[:3]}")
        if self.protocol == "fedsgd":
            return [self.update[n] for n in names]
        scale = -1.0 / (self.lr * max(self.local_steps, 1))
        return [self.update[n] * scale for n in names]

    def fresh_model(self, device: torch.device | str = "cpu") -> nn.Module:
        """A private copy of the model with the global parameters, on ``device``."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.global_params, strict=False)
        return model.to(device)

    def input_bounds(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel box ``[(0 - mean)/std, (1 - mean)/std]`` shaped (1, C, 1, 1)."""
        mean = torch.tensor(self.data_mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.data_std, device=device).view(1, -1, 1, 1)
        return (0 - mean) / std, (1 - mean) / std


@dataclass(frozen=True)
class Setup:
    """What the configuration fixes about the updates an attack will see, before any round runs.

    :meth:`Attack.check_setup` reads it to refuse, before launch, a threat model the run cannot
    meet. :meth:`of` derives the same facts from an :class:`Observation`, so an attack's runtime
    :meth:`Attack.check` can run the very same structural check (the two cannot disagree).

    Attributes
    ----------
    model:
        The architecture the clients train (for a malicious server: the honest one; a
        modification's fit is checked separately). Checks must not modify it.
    input_shape, num_classes:
        Shape (C, H, W) of one model input, and the number of classes.
    protocol:
        ``"fedsgd"`` or ``"fedavg"``.
    batch_size, local_steps, lr:
        Per client, as the client really trains: the batch size after clamping to its
        partition, the local steps (1 for FedSGD) and the local learning rate.
    loss:
        The clients' training loss (``client.loss``: ``"cross_entropy"`` or ``"mse"``);
        ``None`` when unknown (an observation does not declare it).
    data_name, model_name:
        ``data.name`` and ``model.name``; ``""`` when unknown.
    aggregate:
        Whether this check is for the round's aggregate (``targets.aggregate``) rather than
        one client's update.
    clients_per_round:
        Clients averaged into an aggregate (``federation.clients_per_round``).
    data_mean, data_std:
        Per-channel normalisation of the inputs (as in :class:`Observation`); ``()`` when
        unknown.
    num_examples:
        Examples behind the update when known (an observation); 0 = bounded by
        ``batch_size * local_steps`` per client.
    """

    model: nn.Module
    input_shape: tuple[int, int, int]
    num_classes: int
    protocol: Protocol
    batch_size: int
    local_steps: int
    lr: float
    loss: str | None = "cross_entropy"
    data_name: str = ""
    model_name: str = ""
    aggregate: bool = False
    clients_per_round: int = 1
    data_mean: tuple[float, ...] = ()
    data_std: tuple[float, ...] = ()
    num_examples: int = 0

    @property
    def num_clients(self) -> int:
        """Clients behind the checked update: ``clients_per_round`` for an aggregate, else 1."""
        return max(self.clients_per_round, 1) if self.aggregate else 1

    @property
    def num_targets(self) -> int:
        """Samples that can have shaped the update, as
        :func:`adversaries.reconstruction._common.num_targets` counts them for an observation:
        ``batch_size * local_steps * num_clients``, capped by ``num_examples`` when known."""
        touched = self.batch_size * max(self.local_steps, 1) * self.num_clients
        return max(1, min(self.num_examples, touched) if self.num_examples > 0 else touched)

    def input_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The input box as :meth:`Observation.input_bounds` (on CPU); with an unknown
        normalisation, the pixel box [0, 1]."""
        mean = torch.tensor(self.data_mean or (0.0,)).view(1, -1, 1, 1)
        std = torch.tensor(self.data_std or (1.0,)).view(1, -1, 1, 1)
        return (0 - mean) / std, (1 - mean) / std

    @classmethod
    def of(cls, obs: Observation) -> Setup:
        """The facts ``obs`` declares (its loss, data and model names are unknown)."""
        return cls(
            model=obs.model,
            input_shape=tuple(int(v) for v in obs.input_shape),  # type: ignore[arg-type]
            num_classes=int(obs.num_classes),
            protocol=obs.protocol,
            batch_size=int(obs.batch_size),
            local_steps=int(obs.local_steps),
            lr=obs.lr,
            loss=None,
            aggregate=obs.is_aggregate,
            clients_per_round=max(int(obs.num_clients), 1),
            data_mean=tuple(obs.data_mean),
            data_std=tuple(obs.data_std),
            num_examples=int(obs.num_examples),
        )


def require_cross_entropy(setup: Setup, attack: str) -> None:
    """Refuse a setup whose clients train with another loss than softmax cross-entropy (for
    attacks whose gradient model is that loss); an unknown loss passes."""
    if setup.loss is not None and setup.loss != "cross_entropy":
        raise ThreatModelError(
            f"{attack}: requires clients trained with mean softmax cross-entropy, "
            f"but client.loss = {setup.loss!r}"
        )


@dataclass
class AttackResult:
    """What an attack returns.

    Attributes
    ----------
    inputs:
        Reconstructed inputs, shape (N, C, H, W), in the model's normalised input space;
        ``None`` for an attack that recovers labels only.
    labels:
        Recovered labels, shape (N,), int64; ``None`` when the attack does not infer them.
    metrics:
        The attack's own diagnostics (final loss, iterations, seconds); never scores.
    labels_per_input:
        True when ``labels[i]`` is the label the attack assigned to ``inputs[i]`` (a dummy
        optimised with its label, a de-mixed row with its own label); False when the labels are
        a multiset recovered apart from the inputs (e.g. from the last layer's bias).
    """

    inputs: torch.Tensor | None
    labels: torch.Tensor | None
    metrics: dict[str, float] = field(default_factory=dict)
    labels_per_input: bool = False


class Attack(ABC):
    """Base class of every attack.

    Subclasses take their parameters as keyword-only constructor arguments (validated
    there), declare their threat model in :attr:`requires`, refuse an observation that
    does not meet it in :meth:`check` with a :class:`ThreatModelError` that names the
    failed assumption, and implement :meth:`run`.

    What the configuration already fixes (architecture, protocol, batch size, loss) is
    checked in :meth:`check_setup`, before the federation starts; :meth:`check` runs the same
    check on :meth:`Setup.of` the observation, and adds what only the observation reveals
    (missing update keys, update values, the server's secrets).
    """

    #: Human-readable assumptions of the threat model, e.g. "first layer is Linear with bias".
    requires: ClassVar[tuple[str, ...]] = ()
    #: The server modification whose secrets the attack reads (``None``: a passive attack).
    modification: ClassVar[str | None] = None
    #: What the attack outputs, which decides how the server's attack runner feeds and scores
    #: it: ``"reconstruction"`` (inputs and labels, scored against the originals and drawn in
    #: the image grids) or ``"inference"`` (a score for a secret: the runner attaches the
    #: server's knowledge to the observation, :mod:`fl_privsim.engine.inference_scoring`
    #: scores it).
    produces: ClassVar[str] = "reconstruction"

    def check_setup(self, setup: Setup) -> None:
        """Raise :class:`ThreatModelError`, naming the failed assumption, if no update of a run
        with ``setup`` can meet the threat model (called before launch, and by :meth:`check`).
        Nothing by default."""

    def check(self, obs: Observation) -> None:
        """Raise :class:`ThreatModelError` if ``obs`` does not meet the threat model
        (by default: :meth:`check_setup` on :meth:`Setup.of` ``obs``)."""
        self.check_setup(Setup.of(obs))

    @abstractmethod
    def run(
        self, obs: Observation, *, device: torch.device, generator: torch.Generator
    ) -> AttackResult:
        """Attack ``obs`` on ``device``; all randomness comes from ``generator`` (CPU)."""

    def secrets(self, obs: Observation) -> Any:
        """The secrets of :attr:`modification` in ``obs``; :class:`ThreatModelError` when the
        server did not apply it to this update."""
        name = self.modification
        if name is None or name not in obs.server_secrets:
            raise ThreatModelError(
                f"requires the server modification {name!r} in this round "
                f'([server] role = "malicious", [[server.modifications]] name = {name!r})'
            )
        return obs.server_secrets[name]

    def __call__(
        self,
        obs: Observation,
        *,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> AttackResult:
        """Check the threat model (and the modification's presence), then run."""
        if self.modification is not None:
            self.secrets(obs)
        self.check(obs)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        return self.run(obs, device=torch.device(device), generator=generator)


#: The attack registry (it lives in the foundation, :mod:`fl_privsim.core.plugins`).
ATTACKS: Registry[Attack] = plugins.ATTACKS

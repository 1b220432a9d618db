"""The client-defense interface: four hook points, one registry (pure torch; no Flower, no Ray).

A defense is the release mechanism T of Li et al. (arXiv:2408.16913, CCS 2024): the client
sends T(g) instead of its gradient or delta g. Threat model: the server (honest-but-curious or
malicious) sees only what leaves the client, i.e. the output of the last hook below; a defense
never sees ground truth it would not have anyway, and all its randomness comes from the
``generator`` the caller passes (seeded from run seed, round, client and purpose).

Hook points, in execution order (a defense implements exactly one; its :attr:`Defense.stage`
says which):

``"sampler"``
    :meth:`BatchSamplerDefense.sample_batches` chooses the indices of the client's batches
    (e.g. the identical-label mixing sampler of Eloul et al.).
``"per_sample"``
    :meth:`PerSampleDefense.reduce_per_sample` turns the per-sample gradients of one batch
    into the batch gradient (clip, add noise: DP-SGD, dynamic DP).
``"step"``
    :meth:`Defense.transform_step` transforms the gradient of every local step before the
    SGD step is taken (FedAvg), or the one gradient that is the update (FedSGD).
``"update"``
    :meth:`Defense.transform_update` transforms the final update (gradient or delta of the
    trainable parameters) just before it is sent.

Floating-point buffer changes (BatchNorm running statistics) are sent as they are; no hook
sees them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from clients.defenses.per_sample import per_sample_gradients
from fl_privsim.core import plugins
from fl_privsim.core.registry import Registry

Stage = Literal["sampler", "per_sample", "step", "update"]
#: Execution order of the stages; a stack must be declared in this order.
STAGES: tuple[Stage, ...] = ("sampler", "per_sample", "step", "update")
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainingInfo:
    """What a defense may know about the local update it is about to defend.

    Attributes
    ----------
    protocol:
        ``"fedsgd"`` or ``"fedavg"``.
    lr:
        Local learning rate.
    num_steps:
        Local steps (batches) in this update (1 for FedSGD).
    batch_size:
        Examples in the first batch.
    server_round:
        The server round (1-based; 0 when unknown, e.g. outside a federation).
    dataset_size:
        Examples in the client's training partition (0 when unknown); with the batch size it
        gives the sampling rate q = B / n of DP accounting.
    expected_batch_size:
        The configured batch size (0 = ``batch_size``); differs from the drawn batch size
        under Poisson sampling, where batches vary in size.
    """

    protocol: str
    lr: float
    num_steps: int
    batch_size: int
    server_round: int = 0
    dataset_size: int = 0
    expected_batch_size: int = 0


class ModelRefused(Exception):
    """Raised by a defense (in :meth:`Defense.begin`) that refuses to train the model it was
    sent, e.g. :mod:`clients.defenses.model_inspection` on a crafted model. The client then
    sends no update; its reply says why (``str(exc)``) and the server records a refusal."""


class Defense:
    """Base class of every client defense.

    Subclasses set :attr:`stage` (class attribute or property), implement the hook of that
    stage, validate their keyword-only constructor arguments (raise ``ValueError`` with one
    line naming the allowed values) and record per-update metrics with :meth:`record`.

    Class attributes used by the stack rules (:func:`clients.defenses.stack.validate_stack`):

    role:
        ``"transform"`` (default), ``"sign"`` (only quantisation may follow it in the same
        stage) or ``"quantize"`` (must be the last of its stage).
    exclusive:
        At most one defense of this class per stage.
    accounted:
        It keeps a privacy accountant whose ε(δ) the server reports (``delta``,
        ``not_formal_because``: :class:`clients.defenses.accounting.AccountedDefense`).
    """

    name: ClassVar[str] = ""
    stage: Stage = "update"
    role: ClassVar[str] = "transform"
    exclusive: ClassVar[bool] = False
    accounted: ClassVar[bool] = False

    # ------------------------------------------------------------------ lifecycle
    def begin(self, model: nn.Module, info: TrainingInfo) -> None:
        """Called once before each local update (reset per-update state here). The base
        implementation clears the recorded metrics; overrides must call it."""
        self._recorded: dict[str, list[float]] = {}

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`~fl_privsim.core.errors.ConfigError` if this defense cannot run on
        ``model`` (called once before a federation launches, so the error is not raised
        inside a Ray worker). Nothing to check by default."""

    def record(self, key: str, value: float) -> None:
        """Record a metric value; :meth:`metrics` reports the mean over the update's calls."""
        self.__dict__.setdefault("_recorded", {}).setdefault(key, []).append(float(value))

    def metrics(self) -> dict[str, float]:
        """Per-update metrics (means of the recorded values), sent with the reply."""
        recorded: dict[str, list[float]] = self.__dict__.get("_recorded", {})
        return {k: sum(v) / len(v) for k, v in sorted(recorded.items())}

    def state_dict(self) -> dict[str, Any]:
        """State to keep across rounds (e.g. a privacy accountant's history); empty by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned in an earlier round."""

    #: Stage ``"step"`` defenses that set this get :meth:`observe_batch` before each
    #: :meth:`transform_step` (e.g. Soteria, which differentiates the representation in x).
    needs_batch: ClassVar[bool] = False

    def observe_batch(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator
    ) -> None:
        """Stage ``"step"`` with :attr:`needs_batch`: see the local batch ``(x, y)`` whose
        gradient the next :meth:`transform_step` call receives (the model holds the weights
        that gradient was computed at). Must leave the model's parameters and buffers as it
        found them. Called for no other defense."""

    # ------------------------------------------------------------------ tensor hooks
    def transform_step(self, grads: Tensors, *, generator: torch.Generator) -> Tensors:
        """Stage ``"step"``: transform one local step's gradient (by parameter name)."""
        raise NotImplementedError(f"{type(self).__name__} has no step hook")

    def transform_update(self, update: Tensors, *, generator: torch.Generator) -> Tensors:
        """Stage ``"update"``: transform the final update (by parameter name)."""
        raise NotImplementedError(f"{type(self).__name__} has no update hook")


class TensorTransform(Defense):
    """A defense that maps a dict of tensors to a dict of tensors of the same shapes, usable
    either on every local step's gradient or on the final update.

    Parameters
    ----------
    apply_to:
        ``"update"`` (default: the final update before it is sent) or ``"step"`` (every
        local gradient before the SGD step; for FedSGD the two are the same).
    """

    def __init__(self, *, apply_to: str = "update") -> None:
        if apply_to not in ("update", "step"):
            raise ValueError(f"apply_to must be 'update' or 'step', got {apply_to!r}")
        self.stage = apply_to  # type: ignore[assignment]

    def transform(self, tensors: Tensors, *, generator: torch.Generator) -> Tensors:
        """The mapping itself (subclasses implement it)."""
        raise NotImplementedError

    def transform_step(self, grads: Tensors, *, generator: torch.Generator) -> Tensors:
        return self.transform(grads, generator=generator)

    def transform_update(self, update: Tensors, *, generator: torch.Generator) -> Tensors:
        return self.transform(update, generator=generator)


class PerSampleDefense(Defense):
    """Stage ``"per_sample"``: the hook DP-SGD and dynamic DP implement.

    :func:`clients.local_update.local_update` computes the per-sample gradients of each
    batch (with ``torch.func``; override :meth:`per_sample_gradients` to compute them another
    way, e.g. with Opacus' ``GradSampleModule``) and asks :meth:`reduce_per_sample` for the
    batch gradient that the SGD step (FedAvg) or the update (FedSGD) uses.
    """

    stage: Stage = "per_sample"
    exclusive: ClassVar[bool] = True

    def per_sample_gradients(
        self, model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, Tensors]:
        """Mean loss of the batch and per-sample gradients (leading dim = batch) by name."""

        return per_sample_gradients(model, names, x, y)

    def reduce_per_sample(self, grads: Tensors, *, generator: torch.Generator) -> Tensors:
        """Batch gradient (shapes of the parameters) from per-sample gradients ``[B, ...]``."""
        raise NotImplementedError


class BatchSamplerDefense(Defense):
    """Stage ``"sampler"``: chooses which examples form the client's batches.

    The ClientApp and the scorer draw batches through the same function
    (:func:`fl_privsim.engine.federated_data.client_batch_indices`), with the same seeded generator,
    so the scorer still knows the ground truth of a defended batch.
    """

    stage: Stage = "sampler"
    exclusive: ClassVar[bool] = True

    def sample_batches(
        self,
        partition: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        num_batches: int,
        generator: torch.Generator,
    ) -> list[np.ndarray]:
        """Indices (drawn from ``partition``; ``labels`` aligned with it) of each batch."""
        raise NotImplementedError


#: The defense registry (in the foundation, :mod:`fl_privsim.core.plugins`).
DEFENSES: Registry[Defense] = plugins.DEFENSES


def register_defense(name: str):
    """Register a :class:`Defense` subclass under ``name`` (and set its :attr:`name`)."""

    def deco(cls: type[Defense]) -> type[Defense]:
        cls.name = name
        return DEFENSES.register(name)(cls)

    return deco

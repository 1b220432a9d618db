"""Observations outside a federation: what a server would see, built with the client's own code.

Reproductions, benchmarks and tests attack updates computed by
:func:`clients.local_update.local_update`, the function the Flower ClientApp calls, so an
offline observation is exactly what a curious server receives in a real run. The inputs
that produced it stay with the caller (for scoring); the :class:`Observation` has none.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from adversaries.base import Observation
from clients.local_update import local_update


def client_observation(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    protocol: str,
    lr: float,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    round: int = 1,
    client_id: int = 0,
) -> Observation:
    """The observation of one client that trains ``model`` on ``batches``.

    ``batches`` are ``(normalised inputs, labels)`` pairs: one for FedSGD, ``local_steps``
    for FedAvg. ``model`` is left untouched (the client trains a copy).
    """
    global_params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    client_model = copy.deepcopy(model)
    result = local_update(client_model, batches, protocol=protocol, lr=lr)
    x0 = batches[0][0]
    return Observation(
        round=round,
        client_id=client_id,
        protocol=protocol,  # type: ignore[arg-type]
        model=copy.deepcopy(model),
        global_params=global_params,
        update=result.update,
        batch_size=int(x0.shape[0]),
        local_steps=len(batches),
        lr=float(lr),
        num_examples=result.num_examples,
        input_shape=tuple(int(v) for v in x0.shape[1:]),  # type: ignore[arg-type]
        num_classes=int(num_classes),
        data_mean=tuple(float(m) for m in mean),
        data_std=tuple(float(s) for s in std),
    )


def aggregate_observation(observations: Sequence[Observation]) -> Observation:
    """The example-weighted mean of several clients' observations of the same round.

    This is what a secure aggregator reveals: the server knows who took part and the total
    number of examples, not which client sent what.
    """
    if not observations:
        raise ValueError("aggregate_observation needs at least one observation")
    first = observations[0]
    total = sum(o.num_examples for o in observations)
    update = {
        k: sum(o.update[k] * (o.num_examples / total) for o in observations) for k in first.update
    }
    members = tuple(int(o.client_id) for o in observations if o.client_id is not None)
    return Observation(
        round=first.round,
        client_id=None,
        protocol=first.protocol,
        model=first.model,
        global_params=first.global_params,
        update=update,  # type: ignore[arg-type]
        batch_size=first.batch_size,
        local_steps=first.local_steps,
        lr=first.lr,
        num_examples=total,
        input_shape=first.input_shape,
        num_classes=first.num_classes,
        data_mean=first.data_mean,
        data_std=first.data_std,
        num_clients=len(observations),
        members=members,
    )

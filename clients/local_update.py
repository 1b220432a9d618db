"""The local update of one client, in pure torch (no Flower, no Ray).

Both the Flower ClientApp and code outside a federation (tests, inference games) call
:func:`local_update`, so an update produced anywhere is exactly what a Flower client
would send.

Protocols (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
from Decentralized Data"):

- **FedSGD**: the mean cross-entropy gradient of one batch, one tensor per trainable
  parameter.
- **FedAvg**: ``local_steps`` plain SGD steps (learning rate ``lr``), one batch each;
  the update is weights after minus weights before.

In both, floating-point buffers (BatchNorm running statistics) are sent as their change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LocalUpdate:
    """What one client sends back.

    Attributes
    ----------
    update:
        By ``state_dict`` name: gradient (FedSGD) or delta (FedAvg) of every trainable
        parameter, and the change of every floating-point buffer.
    num_examples:
        Examples the update was computed on (FedAvg: summed over local steps).
    loss:
        Mean training loss over the local batches, before each step.
    """

    update: dict[str, torch.Tensor]
    num_examples: int
    loss: float


def _float_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}


def local_update(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    protocol: str,
    lr: float,
) -> LocalUpdate:
    """Compute one client's update on ``model`` (modified in place for FedAvg).

    Parameters
    ----------
    model:
        The global model, already on the right device and loaded with the global weights.
    batches:
        ``(inputs, labels)`` pairs on the model's device; FedSGD uses exactly one, FedAvg
        takes one SGD step per batch.
    protocol:
        ``"fedsgd"`` or ``"fedavg"``.
    lr:
        Local SGD learning rate (FedAvg).
    """
    if protocol not in ("fedsgd", "fedavg"):
        raise ValueError(f"protocol must be 'fedsgd' or 'fedavg', got {protocol!r}")
    if not batches:
        raise ValueError("local_update needs at least one batch")
    if protocol == "fedsgd" and len(batches) != 1:
        raise ValueError(f"fedsgd sends one batch's gradient, got {len(batches)} batches")
    model.train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    buffers_before = _float_buffers(model)
    losses: list[float] = []

    if protocol == "fedsgd":
        x, y = batches[0]
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, [p for _, p in params])
        update = {n: g.detach().clone() for (n, _), g in zip(params, grads, strict=True)}
        losses.append(float(loss.detach()))
    else:
        before = {n: p.detach().clone() for n, p in params}
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, [p for _, p in params])
            with torch.no_grad():
                for (_, p), g in zip(params, grads, strict=True):
                    p.sub_(lr * g)
            losses.append(float(loss.detach()))
        update = {n: (p.detach() - before[n]).clone() for n, p in params}

    for n, b in model.named_buffers():
        if n in buffers_before:
            update[n] = (b.detach() - buffers_before[n]).clone()
    num_examples = int(sum(int(y.shape[0]) for _, y in batches))
    return LocalUpdate(update=update, num_examples=num_examples, loss=sum(losses) / len(losses))

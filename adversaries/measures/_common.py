"""Helpers shared by the leakage measures (pure torch; no Flower or Ray).

The measures are *analyst-side* tools: unlike the attacks they are handed the private
inputs and labels (and, for I2F, the defense's noise) because they quantify how much an
update *could* leak, not what a server can do with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: A loss ``loss_fn(logits, labels) -> scalar``; the default is the mean softmax cross-entropy
#: a client minimises.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy over the batch (the client's training loss)."""
    return F.cross_entropy(logits, labels)


def trainable_named_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every trainable parameter, in ``named_parameters()`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def layer_groups(model: nn.Module) -> dict[str, list[int]]:
    """Trainable parameters grouped by the module that owns them.

    Keys are module names (``"body.0"``, ``"fc"``; ``""`` for parameters of the root
    module), in order of first appearance in ``named_parameters()``; values are indices
    into :func:`trainable_named_params`. A "layer" of Mo et al. is one such module
    (its weight and bias together).
    """
    groups: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(trainable_named_params(model)):
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        groups.setdefault(owner, []).append(i)
    return groups


def select_layers(model: nn.Module, layers: Sequence[str] | None) -> dict[str, list[int]]:
    """:func:`layer_groups` restricted to ``layers`` (all when ``None``); unknown names raise."""
    groups = layer_groups(model)
    if layers is None:
        return groups
    unknown = [name for name in layers if name not in groups]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; the model's layers are {list(groups)}")
    return {name: groups[name] for name in layers}


def flatten(tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``tensors`` into one vector; ``None`` entries become zeros shaped ``like``."""
    parts = [
        (t if t is not None else torch.zeros_like(ref)).reshape(-1)
        for t, ref in zip(tensors, like, strict=True)
    ]
    return torch.cat(parts)


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into tensors shaped as ``like`` (inverse of :func:`flatten`)."""
    out, start = [], 0
    for ref in like:
        n = ref.numel()
        out.append(vector[start : start + n].view_as(ref))
        start += n
    if start != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the parameters {start}")
    return out


def as_param_vector(
    value: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor], model: nn.Module
) -> torch.Tensor:
    """A parameter-space vector (``d_θ`` entries, trainable parameters in order) from a flat
    tensor, a list of parameter-shaped tensors, or a dict by parameter name (for example
    an :class:`~adversaries.base.Observation`'s ``update``)."""
    named = trainable_named_params(model)
    params = [p for _, p in named]
    d_theta = sum(p.numel() for p in params)
    if isinstance(value, Mapping):
        missing = [n for n, _ in named if n not in value]
        if missing:
            raise ValueError(f"perturbation lacks parameter(s) {missing[:3]}")
        value = [value[n] for n, _ in named]
    if isinstance(value, torch.Tensor):
        if value.numel() != d_theta:
            raise ValueError(
                f"perturbation has {value.numel()} entries, the model {d_theta} parameters"
            )
        return value.reshape(-1)
    if len(value) != len(params):
        raise ValueError(
            f"perturbation has {len(value)} tensors, the model {len(params)} parameters"
        )
    return flatten(list(value), params)


def per_sample_layer_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn = default_loss,
    layers: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients ``g_l(x_i)`` of every layer, each ``(N, d_l)``, detached.

    Sample ``i``'s gradient is that of the loss on ``x[i:i+1]`` alone (batch size 1, as a
    client with one sample would send it). The model's mode (train/eval) is left as is.
    """
    groups = select_layers(model, layers)
    params = [p for _, p in trainable_named_params(model)]
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in groups}
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for name, idx in groups.items():
            rows[name].append(flatten([grads[j] for j in idx], [params[j] for j in idx]).detach())
    return {name: torch.stack(r) for name, r in rows.items()}

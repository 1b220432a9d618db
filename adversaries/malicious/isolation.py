"""Client isolation by model inconsistency: secure aggregation's sum becomes one client's update.

Pasquini, Francati, Ateniese, "Eluding Secure Aggregation in Federated Learning via Model
Inconsistency", ACM CCS 2022 (arXiv:2111.07380). Own implementation.

Secure aggregation hides single updates only when every client trains the same model. A
malicious server sends the target client(s) the real model and every other sampled client a
*decoy* whose update vanishes: here the hidden layer feeding the classifier (through a ReLU)
gets zero weights and bias ``-1``, so its ReLUs are dead for every input. Then

- every parameter before and inside that layer gets an exactly zero gradient (the ReLU's
  slope is 0 everywhere), over every local step, since the layer never changes;
- the classifier's weight gradient is ``δ hᵀ = 0`` (its input ``h`` is 0);
- only the classifier's bias moves (towards the decoy clients' label frequencies).

The securely aggregated update is thus the target's own update, scaled by its share of the
examples, in every parameter but the classifier's bias; any honest-but-curious attack run on
the aggregate (analytic, Inverting Gradients on the leading layers, ...) attacks the target.
The decoy is visible to a client that inspects its model (a layer of zero rows and negative
biases: :mod:`clients.defenses.model_inspection`'s ``zero_rows``), not to one that only looks at
its own update.

Only models whose classifier (last layer with parameters, ``nn.Linear``) reads a ReLU of a
``nn.Linear``/``nn.Conv2d`` layer with bias, through parameter-free layers only, can hold the
decoy (``mlp``, ``convnet``); others are refused before launch. Pure torch; no Flower or Ray.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import nn

from adversaries.malicious.base import Crafted, Modification, ServerView, register_modification
from fl_privsim.core.errors import ConfigError

#: Bias of the decoy's dead layer (any negative value kills its ReLUs; weights are zero).
DEAD_BIAS = -1.0


def dead_layer(model: nn.Module) -> str:
    """Name of the hidden layer whose ReLU feeds the classifier (the decoy's dead layer).

    Walks the leaf modules in registration order (the forward order of this project's
    models) back from the classifier. Raises :class:`ConfigError` when the model has no such
    layer."""
    leaves: list[tuple[str, nn.Module]] = [
        (n, m) for n, m in model.named_modules() if not list(m.children())
    ]
    with_params = [
        i for i, (_, m) in enumerate(leaves) if any(True for _ in m.parameters(recurse=False))
    ]
    if not with_params or not isinstance(leaves[with_params[-1]][1], nn.Linear):
        raise ConfigError(
            "isolation: the model's last layer with parameters must be nn.Linear (the classifier)"
        )
    i = with_params[-1] - 1
    while i >= 0 and not isinstance(leaves[i][1], nn.ReLU):
        if any(True for _ in leaves[i][1].parameters(recurse=False)):
            break
        i -= 1
    if i < 1 or not isinstance(leaves[i][1], nn.ReLU):
        raise ConfigError(
            "isolation: the classifier must read a ReLU through parameter-free layers only; "
            "models that meet it: mlp, convnet (model.name)"
        )
    name, layer = leaves[i - 1]
    if not isinstance(layer, nn.Linear | nn.Conv2d) or layer.bias is None:
        raise ConfigError(
            f"isolation: the ReLU before the classifier must follow nn.Linear or nn.Conv2d with "
            f"bias; found {type(layer).__name__} {name!r}; models that meet it: mlp, convnet "
            "(model.name)"
        )
    return name


def decoy(model: nn.Module, layer: str) -> nn.Module:
    """A copy of ``model`` whose ``layer`` has zero weights and bias :data:`DEAD_BIAS`."""
    out = copy.deepcopy(model)
    dead = cast(nn.Linear | nn.Conv2d, out.get_submodule(layer))  # checked by dead_layer
    with torch.no_grad():
        dead.weight.zero_()
        assert dead.bias is not None  # checked by dead_layer
        dead.bias.fill_(DEAD_BIAS)
    return out


@register_modification("isolation")
class Isolation(Modification):
    """Isolate the target(s) inside the sum with zero-update decoys (Pasquini et al., CCS 2022).

    The target client(s) (``targets.clients``) get the real model, every other sampled client a
    zero-update decoy (module docstring).

    The modification has no parameters. Secrets: ``targets`` (isolated client ids),
    ``decoys`` (the others), ``dead_layer`` (the decoy's dead layer)."""

    needs_target_clients = True

    def check_model(
        self, model: nn.Module, input_shape: tuple[int, int, int], num_classes: int
    ) -> None:
        """Refuse a model that cannot hold the decoy (see :func:`dead_layer`)."""
        dead_layer(model)

    def craft(self, model: nn.Module, view: ServerView) -> Crafted:
        """The honest model for the targets, the decoy for every other sampled client."""
        layer = dead_layer(model)
        others = tuple(c for c in view.clients if c not in view.targets)
        fake = decoy(model, layer)
        secrets: dict[str, Any] = {
            "targets": list(view.targets),
            "decoys": list(others),
            "dead_layer": layer,
        }
        return Crafted(
            model=copy.deepcopy(model), secrets=secrets, per_client={c: fake for c in others}
        )

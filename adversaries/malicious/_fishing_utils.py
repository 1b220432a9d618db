"""Private helpers of :mod:`adversaries.malicious.fishing`: model structure and the singled-out
gradient as an observation that :class:`~adversaries.reconstruction.inverting_gradients.\
InvertingGradientsAttack` can attack (pure torch; no Flower or Ray)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from adversaries.base import Observation
from adversaries.reconstruction._common import layer_grads, num_targets
from fl_privsim.core.errors import ThreatModelError

#: Models of the zoo whose last Linear is a classifier with bias (class fishing).
CLASS_MODELS = ("mlp", "linear", "lenet", "convnet", "resnet18")
#: Models of the zoo whose classifier reads ReLU(Linear(...)) (feature fishing).
FEATURE_MODELS = ("mlp", "convnet")


def classifier(model: nn.Module, num_classes: int) -> tuple[str, nn.Linear] | str:
    """Name and module of the last ``nn.Linear`` if it is a classifier with bias, else why not."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        return "the model has no nn.Linear layer"
    name, layer = found[-1]
    if layer.bias is None:
        # torch types Linear.bias as Tensor; it is None with bias=False
        return f"its last Linear {name!r} has no bias"  # type: ignore[unreachable]
    if layer.out_features != num_classes:
        return f"its last Linear {name!r} has {layer.out_features} outputs, not {num_classes}"
    return name, layer


def feature_layer(
    model: nn.Module, input_shape: tuple[int, int, int], classifier_name: str
) -> tuple[str, nn.Linear] | str:
    """The Linear (with bias) whose ReLU output is exactly the classifier's input, else why not.

    Taken as the last ``nn.Linear`` registered before the classifier and confirmed by one
    forward pass of a copy on a fixed random input: the classifier's input must equal
    ``relu`` of that layer's output.
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = [name for name, _ in linears]
    pos = names.index(classifier_name) if classifier_name in names else -1
    if pos < 1:
        return f"no Linear layer feeds the classifier {classifier_name!r}"
    name, layer = linears[pos - 1]
    if layer.bias is None:
        # torch types Linear.bias as Tensor; it is None with bias=False
        return f"the Linear {name!r} before the classifier has no bias"  # type: ignore[unreachable]
    probe = copy.deepcopy(model).eval()
    mods = dict(probe.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        mods[name].register_forward_hook(lambda _m, _i, out: seen.__setitem__("pen", out.clone())),
        mods[classifier_name].register_forward_pre_hook(
            lambda _m, args: seen.__setitem__("cls", args[0].clone())
        ),
    ]
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            probe(x)
    except Exception as exc:  # noqa: BLE001 - any failure means the structure is not usable
        return f"a probe forward pass failed ({type(exc).__name__})"
    finally:
        for h in hooks:
            h.remove()
    pen, cls = seen.get("pen"), seen.get("cls")
    if (
        pen is None
        or cls is None
        or pen.shape != cls.shape
        or not torch.allclose(torch.relu(pen), cls)
    ):
        return f"the classifier's input is not ReLU of the Linear {name!r}"
    return name, layer


def penultimate_outputs(
    model: nn.Module, layer_name: str, inputs: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """Outputs (pre-activations) of ``layer_name`` on ``inputs`` (a copy in eval mode)."""
    probe = copy.deepcopy(model).eval()
    layer = dict(probe.named_modules())[layer_name]
    outs: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, _i, out: outs.append(out.detach().clone()))
    try:
        with torch.no_grad():
            for start in range(0, inputs.shape[0], chunk):
                probe(inputs[start : start + chunk])
    finally:
        hook.remove()
    return torch.cat(outs).flatten(1)


class FishedHead(nn.Linear):
    """The classifier as the target record sees it: the target logit and one constant logit.

    For a record of the target class ``t`` the crafted classifier (non-target rows: zero
    weights, biases ``c_k``) gives ``CE = -z_t + log(exp(z_t) + Σ_k exp(c_k))``, which is the
    two-logit cross-entropy with label 0 of ``[z_t, logsumexp(c)]``. Only the entries of the
    target row in ``cols`` (and its bias when ``train_bias``) are parameters, so a gradient
    match sees exactly the entries the silenced records do not touch. ``offset`` is subtracted
    from the input columns ``cols`` first (it undoes a shift of the feature, see
    :func:`singled_out_observation`). ``out_features`` is 2.
    """

    # buffers (register_buffer below)
    cols: torch.Tensor
    fixed_row: torch.Tensor
    other: torch.Tensor
    offset: torch.Tensor

    def __init__(
        self,
        row: torch.Tensor,
        bias: torch.Tensor,
        other: torch.Tensor,
        cols: torch.Tensor,
        *,
        train_bias: bool,
        offset: float = 0.0,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features = int(row.numel())
        self.out_features = 2
        row = row.detach().reshape(1, -1)
        self.weight = nn.Parameter(row[:, cols].clone())
        fixed = row.clone()
        fixed[:, cols] = 0
        self.register_buffer("cols", cols.clone())
        self.register_buffer("fixed_row", fixed)
        self.register_buffer("other", other.detach().reshape(1, 1).clone())
        self.register_buffer("offset", torch.tensor(float(offset), dtype=row.dtype))
        b = bias.detach().reshape(1).clone()
        if train_bias:
            self.bias = nn.Parameter(b)
        else:
            self.register_buffer("bias", b)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``[z_t, logsumexp(c)]`` of ``h`` (N, in_features)."""
        picked = h.index_select(1, self.cols) - self.offset
        z = picked @ self.weight.T + h @ self.fixed_row.T + self.bias
        return torch.cat([z, self.other.expand(h.shape[0], 1).to(z.dtype)], dim=1)


def singled_out_observation(
    obs: Observation, secrets: Mapping[str, Any], grads: list[torch.Tensor]
) -> Observation:
    """The singled-out record's gradient as a one-record FedSGD observation of a derived model.

    The derived model is the crafted model with its classifier replaced by a
    :class:`FishedHead` (class mode: the whole target row and its bias are parameters; feature
    mode: only the fished feature's entry). Its update holds every other trainable parameter's
    gradient unchanged and the matching slices of the classifier's; label 0 of the derived
    model is the target class.

    Feature mode: the fished record lies in the window, where unit ``j`` of the feature layer
    is active, but a dummy input outside the window would see a dead ReLU and a flat
    objective. So the derived model shifts that unit's bias by a constant ``C`` (keeping it
    active for every input of the box) and the head subtracts ``C`` again: inside the window
    every gradient (also the head entry's, ``-(s_j - τ)``) equals the real model's, outside it
    the unit is linearised instead of dead. ``C`` is ten times the range of the public
    pre-activations recorded in the secrets (``feature_scale``).
    """
    cls_name = secrets["classifier"]
    t = int(secrets["target_class"])
    model = obs.fresh_model("cpu")
    cls = cast(nn.Linear, model.get_submodule(cls_name))
    with torch.no_grad():
        others = torch.cat([cls.bias[:t], cls.bias[t + 1 :]])
        other = torch.logsumexp(others.double(), dim=0).to(cls.bias.dtype)
    feature = secrets["mode"] == "feature"
    cols = torch.tensor([int(secrets["feature"])]) if feature else torch.arange(cls.in_features)
    shift = 0.0
    if feature:
        shift = 10.0 * float(secrets.get("feature_scale", 1.0)) + 10.0
        pen = cast(nn.Linear, model.get_submodule(secrets["feature_layer"]))
        with torch.no_grad():
            pen.bias[int(secrets["feature"])] += shift
    head = FishedHead(cls.weight[t], cls.bias[t], other, cols, train_bias=not feature, offset=shift)
    model.set_submodule(cls_name, head)
    by_name = dict(zip(obs.param_names(), grads, strict=True))
    update: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name == f"{cls_name}.weight":
            update[name] = by_name[name][t].reshape(1, -1)[:, cols.to(by_name[name].device)]
        elif name == f"{cls_name}.bias":
            update[name] = by_name[name][t].reshape(1)
        else:
            update[name] = by_name[name]
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Observation(
        round=obs.round,
        client_id=obs.client_id,
        protocol="fedsgd",
        model=model,
        global_params=params,
        update=update,
        batch_size=1,
        local_steps=1,
        lr=obs.lr,
        num_examples=1,
        input_shape=obs.input_shape,
        num_classes=2,
        data_mean=obs.data_mean,
        data_std=obs.data_std,
    )


def window_count(obs: Observation, secrets: Mapping[str, Any], grads: list[torch.Tensor]) -> float:
    """Records in the feature window: ``-N · ∂L/∂b_j / α`` (``N = num_targets(obs)``)."""
    g = layer_grads(obs, grads, secrets["feature_layer"])
    if "bias" not in g:
        raise ThreatModelError(
            f"fishing: the update lacks the bias of {secrets['feature_layer']!r}"
        )
    value = float(g["bias"][int(secrets["feature"])])
    return -value * num_targets(obs) / float(secrets["feature_multiplier"])


def class_count(obs: Observation, secrets: Mapping[str, Any], grads: list[torch.Tensor]) -> float:
    """Records of the target class: ``-N · ∂L/∂b_t`` (``N = num_targets``)."""
    g = layer_grads(obs, grads, secrets["classifier"])
    if "bias" not in g:
        raise ThreatModelError(f"fishing: the update lacks the bias of {secrets['classifier']!r}")
    return -float(g["bias"][int(secrets["target_class"])]) * num_targets(obs)

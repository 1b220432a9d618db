"""Variational information bottleneck (VIB; Alemi et al., ICLR 2017) as a defense, one of the
five defenses of Li et al. (arXiv:2408.16913, CCS 2024; methods.md section 1): a stochastic
bottleneck z ~ N(μ(h), diag σ²(h)) on the representation h before the last linear layer,
trained with CE + β·KL(q(z|x) ‖ N(0, I)).

**Design choice: VIB is a model variant plus a training-time defense.** VIB changes the
architecture (the encoder producing μ, σ and a decoder from z), and the server and every
client must build the same global model, so it cannot be a transform of gradients alone:

- the model: ``<base>_vib`` in ``model.name`` (e.g. ``mlp_vib``, ``lenet_vib``,
  ``convnet_vib``, ``cnn6_vib``, ``resnet18_gn_vib``) is the base model of
  :mod:`fl_privsim.core.models` whose last ``nn.Linear`` (h → K logits) is replaced by a
  :class:`VIBHead` (h → [μ, s] → z → K logits, σ = softplus(s − 5) as in Alemi et al.'s code,
  z = μ + σ·ε in training, z = μ in eval mode), built by :func:`build_vib_model`;
- the defense ``vib`` (stage ``per_sample``) adds β·KL to every example's loss, so the
  released gradient is the gradient of the VIB objective; it refuses a model without a
  :class:`VIBHead` with a clear error. Without the defense a ``_vib`` model trains on CE
  alone (a stochastic head without the bottleneck penalty).

The KL term reaches the loss through the per-sample hook because ``local_update`` computes the
plain cross-entropy otherwise; as a per-sample defense ``vib`` cannot be stacked with
``dp_sgd``/``dynamic_dp``/``adversarial_perturbation`` (one per-sample defense per stack), and
like them needs a model without BatchNorm (``resnet18_gn_vib``, not ``resnet18_vib``).

Randomness: the reparameterisation noise ε is part of the model's forward pass (like dropout)
and comes from torch's global RNG, not from the defense ``generator`` (the per-sample hook is
not given one); seed torch (``torch.manual_seed``) for reproducible VIB training.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from clients.defenses.base import PerSampleDefense, Tensors, TrainingInfo, register_defense
from fl_privsim.core import plugins
from fl_privsim.core.errors import ConfigError
from fl_privsim.core.models import MODELS

#: Default width of the bottleneck z.
VIB_DIM = 64
SUFFIX = "_vib"


class VIBHead(nn.Module):
    """h → (μ, σ) → z → logits, replacing a model's last linear layer.

    ``encoder``: Linear(in_features, 2·z_dim) giving μ and s, σ = softplus(s − 5);
    ``decoder``: Linear(z_dim, num_classes). In training mode z = μ + σ·ε, ε ~ N(0, I)
    (``self.noise`` when set, else ``torch.randn_like``); in eval mode z = μ. When
    ``self.kl_sink`` is a list, each forward appends the per-example KL(q(z|h) ‖ N(0, I)).
    """

    def __init__(
        self, in_features: int, num_classes: int, *, z_dim: int = VIB_DIM, bias: bool = True
    ) -> None:
        super().__init__()
        self.z_dim = int(z_dim)
        self.encoder = nn.Linear(in_features, 2 * self.z_dim)
        self.decoder = nn.Linear(self.z_dim, num_classes, bias=bias)
        self.kl_sink: list[torch.Tensor] | None = None
        self.noise: torch.Tensor | None = None

    def moments(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """μ and σ of q(z|h)."""
        mu, s = self.encoder(h).chunk(2, dim=-1)
        return mu, F.softplus(s - 5.0)

    @staticmethod
    def kl(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """KL(N(μ, diag σ²) ‖ N(0, I)) per example: ½ Σ (μ² + σ² − 1 − 2 log σ) ≥ 0."""
        return 0.5 * (mu.pow(2) + sigma.pow(2) - 1.0 - 2.0 * torch.log(sigma)).sum(dim=-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mu, sigma = self.moments(h)
        if self.kl_sink is not None:
            self.kl_sink.append(self.kl(mu, sigma))
        if self.training:
            eps = self.noise if self.noise is not None else torch.randn_like(mu)
            z = mu + sigma * eps
        else:
            z = mu
        return self.decoder(z)


def vib_heads(model: nn.Module) -> list[VIBHead]:
    """The :class:`VIBHead` modules of ``model``."""
    return [m for m in model.modules() if isinstance(m, VIBHead)]


@plugins.MODEL_VARIANTS.register("vib")
def build_vib_model(
    base: str, input_shape: tuple[int, int, int], num_classes: int, *, z_dim: int = VIB_DIM
) -> nn.Module:
    """Model ``base`` of :data:`fl_privsim.core.models.MODELS` with its last ``nn.Linear`` (the
    layer producing the logits) replaced by a :class:`VIBHead` of the same input width."""

    if base not in MODELS:
        raise ConfigError(
            f"model.name: unknown model {base + SUFFIX!r}; allowed: "
            f"{', '.join(list(MODELS) + [m + SUFFIX for m in MODELS])}"
        )
    model = MODELS[base](tuple(int(v) for v in input_shape), int(num_classes))
    last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last or last[-1][1].out_features != num_classes:
        raise ConfigError(
            f"model.name: {base!r} has no final linear layer to the {num_classes} logits; "
            f"it has no VIB variant"
        )
    name, lin = last[-1]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(
        parent,
        name.rpartition(".")[2],
        VIBHead(lin.in_features, num_classes, z_dim=z_dim, bias=lin.bias is not None),
    )
    return model


@register_defense("vib")
class VIB(PerSampleDefense):
    """Train a ``<base>_vib`` model with the VIB objective CE + β·KL(q(z|x) ‖ N(0, I)).

    Parameters
    ----------
    beta:
        KL weight β ≥ 0 (default 1e-3; Alemi et al. use 1e-3 on MNIST; 0 = the stochastic
        head without the penalty).

    Metrics: ``kl`` (mean KL of the batch's examples, in nats), ``ce`` (mean cross-entropy).
    """

    #: The reparameterisation noise comes from torch's global RNG, which local_update seeds
    #: from the defense generator (see ``clients.local_update._per_sample_gradients``).
    uses_global_rng = True

    def __init__(self, *, beta: float = 1e-3) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < math.inf:
            raise ValueError(f"beta (KL weight) must be a finite number >= 0, got {beta!r}")
        self.beta = float(beta)

    @staticmethod
    def head_of(model: nn.Module) -> VIBHead:
        """The model's single :class:`VIBHead`; a ``ValueError`` naming the fix otherwise."""
        heads = vib_heads(model)
        if len(heads) != 1:
            raise ValueError(
                f"the vib defense needs a model with one VIBHead (model.name = '<base>_vib', e.g. "
                f"'mlp_vib'); {type(model).__name__} has {len(heads)}"
            )
        return heads[0]

    def begin(self, model: nn.Module, info: TrainingInfo) -> None:
        super().begin(model, info)
        self.head_of(model)

    def per_sample_gradients(
        self, model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, Tensors]:
        if any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
        ):
            raise ValueError("per-sample gradients need a model without BatchNorm (use GroupNorm)")
        head = self.head_of(model)
        named = dict(model.named_parameters())
        params = {n: named[n].detach() for n in names}
        frozen = {n: p.detach() for n, p in named.items() if n not in params}
        buffers = {n: b.detach() for n, b in model.named_buffers()}
        noise = torch.randn(
            int(y.shape[0]),
            head.z_dim,
            dtype=x.dtype if x.is_floating_point() else None,
            device=x.device,
        )
        beta = self.beta

        def loss_one(
            p: Tensors, xi: torch.Tensor, yi: torch.Tensor, ei: torch.Tensor
        ) -> tuple[torch.Tensor, Any]:
            sink: list[torch.Tensor] = []
            head.kl_sink, head.noise = sink, ei.unsqueeze(0)
            try:
                out = functional_call(model, {**p, **frozen, **buffers}, (xi.unsqueeze(0),))
            finally:
                head.kl_sink, head.noise = None, None
            ce = F.cross_entropy(out, yi.unsqueeze(0))
            kl = sink[0].mean()
            return ce + beta * kl, (ce.detach(), kl.detach())

        grads, (losses, (ce, kl)) = vmap(
            grad_and_value(loss_one, has_aux=True), in_dims=(None, 0, 0, 0), randomness="different"
        )(params, x, y, noise)
        self.record("ce", float(ce.mean()))
        self.record("kl", float(kl.mean()))
        return losses.mean(), grads

    def reduce_per_sample(self, grads: Tensors, *, generator: torch.Generator) -> Tensors:
        return {n: g.mean(dim=0) for n, g in grads.items()}

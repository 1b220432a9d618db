"""The clients' training loss, a mixing knob of Eloul et al. (arXiv:2204.12495; methods.md §5).

Eloul et al. defend the dense layer by *maximising mixing*: identical labels in a batch
(:mod:`clients.defenses.mixing`) and a choice of loss function, since "the de-mixing nature
of CE" lets an attacker separate a batch. methods.md quotes the abstract only and does not
name the alternative loss the paper proposes; this simulator offers the squared error of the
softmax output against the one-hot label (the Brier score) as the alternative, because its
dense-layer coefficients differ from cross-entropy's in a way that matters for de-mixing:

* cross-entropy: ``A[n, k] = ∂L/∂z[n, k] = (p[n, k] - y[n, k]) / N``;
* ``mse``: ``L = (1/N) Σ_n ‖p_n - y_n‖²``, so
  ``A[n, k] = (2/N) p[n, k] (p[n, k] - y[n, k] - ‖p_n‖² + p[n, y_n])``: every coefficient is
  damped by ``p[n, k]`` and tends to 0 for confident samples of either kind.

Whether the alternative really increases mixing is measured, not assumed (the ``mixing_loss``
table of ``fl-privsim reproduce defenses``). Per-sample defenses (``dp_sgd``,
``dynamic_dp``, ``adversarial_perturbation``, ``vib``) compute their own cross-entropy per
sample and are refused with a non-CE loss (:func:`check_loss_config`). Pure torch; no Flower
or Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from clients.defenses.base import DEFENSES, PerSampleDefense
from fl_privsim.core.errors import ConfigError

#: Training losses a client may use (``client.loss``).
LOSSES: tuple[str, ...] = ("cross_entropy", "mse")
#: Attacks whose threat model takes the loss as a parameter (``params.loss``).
LOSS_AWARE_ATTACKS: tuple[str, ...] = ("analytic",)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def softmax_mse(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``‖softmax(z_n) - onehot(y_n)‖²`` (the Brier score)."""
    p = F.softmax(logits, dim=-1)
    y = F.one_hot(labels.long(), p.shape[-1]).to(p.dtype)
    return (p - y).pow(2).sum(-1).mean()


_LOSSES: dict[str, LossFn] = {"cross_entropy": F.cross_entropy, "mse": softmax_mse}


def loss_function(name: str) -> LossFn:
    """The mean training loss ``f(logits, labels)`` called ``name`` (one of :data:`LOSSES`)."""
    if name not in _LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}")
    return _LOSSES[name]


def check_loss_config(cfg: Any) -> None:
    """Cross-checks of ``client.loss`` against ``[[defenses]]`` and ``[[attacks]]``.

    A non-CE loss is refused with a per-sample defense (they differentiate cross-entropy
    per sample) and requires every loss-aware attack (:data:`LOSS_AWARE_ATTACKS`) to be told
    the loss (``params.loss``), since its closed-form coefficients depend on it (threat
    model: the server knows the training loss). Raises :class:`ConfigError`.
    """
    loss = getattr(cfg.client, "loss", "cross_entropy")
    if loss == "cross_entropy":
        return

    for i, spec in enumerate(cfg.defenses):
        if issubclass(DEFENSES.get(spec.name), PerSampleDefense):
            raise ConfigError(
                f"defenses[{i}].name: {spec.name!r} computes a cross-entropy per sample and "
                f"cannot train with client.loss = {loss!r}; use client.loss = 'cross_entropy'"
            )
    for i, atk in enumerate(cfg.attacks):
        if atk.name in LOSS_AWARE_ATTACKS and atk.params.get("loss", "cross_entropy") != loss:
            raise ConfigError(
                f"attacks[{i}].params.loss: the clients train with client.loss = {loss!r}; "
                f"the {atk.name} attack's threat model needs that loss: set "
                f"attacks[{i}].params.loss = {loss!r}"
            )

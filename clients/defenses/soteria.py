"""Soteria-style representation perturbation (Sun et al., "Soteria: Provable Defense against
Privacy Leakage in Federated Learning from Representation Perspective", CVPR 2021).

Idea (the paper's, maths written here): a dense layer ``z = W r + b`` fed the representation
``r = f(x)`` of the input leaks ``r`` through its weight gradient, ``∂L/∂W = (∂L/∂z) rᵀ``: the
column ``j`` of ``∂L/∂W`` is ``r_j`` times a vector that does not depend on ``j``. An attacker
who recovers ``r`` inverts ``f`` to get ``x``; the elements ``r_j`` that reveal the most about
``x`` are those whose value is small relative to their sensitivity to the input, i.e. with a
small ratio

    ρ_j = ‖r_j‖ / ‖∂r_j/∂x‖

(a small change of ``x`` moves ``r_j`` a lot: the reconstruction error of ``x`` is bounded by
the perturbation of ``r_j`` divided by ``‖∂r_j/∂x‖``; Sun et al., Sec. 4). The defense zeroes
the gradient columns of ``W`` that multiply the ``pruning_ratio`` share of elements with the
**smallest** ``ρ_j``, and leaves every other parameter (including the bias of that layer and
all other layers) untouched.

What is computed (and approximated) here:

* ``ρ_j`` is the batch mean of the per-sample ratios ``‖r_{b,j}‖ / ‖∂r_{b,j}/∂x_b‖`` (the
  sum would rank identically). ``r_{b,j}`` is channel ``j`` of the layer's input for sample
  ``b`` (all positions of a sequence/spatial input together). A ratio with a zero
  denominator (``r_j`` constant in ``x``, e.g. a dead ReLU) counts as +∞: it cannot leak ``x``.
* ``∂r_{b,j}/∂x_b`` is read from the gradient of ``Σ_b r_{b,j}`` with respect to the batch
  ``x``; this equals the per-sample derivative when samples do not interact (true in eval-free
  models without BatchNorm; with BatchNorm in training mode the cross-sample terms are
  included — an approximation).
* ``method = "exact"``: one vector-Jacobian product per element ``j`` (batched with
  ``is_grads_batched``, ``chunk`` elements at a time): exact, cost ∝ width. (With several
  positions per sample, e.g. a Linear on a sequence, it is the gradient of the channel's sum
  over positions; the Hutchinson estimate is of the full Jacobian rows of the channel.)
  ``method = "hutchinson"``: the squared row norms of the Jacobian ``J = ∂r/∂x`` are the
  diagonal of ``J Jᵀ`` = ``E_v[(J v)²]`` for ``v ~ N(0, I)``; ``probes`` Jacobian-vector products
  (double-backward trick), with ``v`` drawn from the defense generator, give an unbiased
  estimate of every ``‖∂r_j/∂x‖²`` at a cost independent of the width (the ranking is
  approximate). ``"auto"`` (default) is exact up to ``max_exact_width`` elements.
* The forward pass that computes ``r`` restores BatchNorm running statistics and torch's RNG
  afterwards, so the training step is exactly the undefended one apart from the mask.

Stage ``"step"``: the mask is recomputed on every local batch (via the
:meth:`~clients.defenses.base.Defense.observe_batch` hook) and applied to that step's
gradient; for FedSGD the update is the masked gradient, for FedAvg the delta of ``W`` is zero
only in the columns every step pruned. At most one ``soteria`` per stack (:mod:`stack`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn

from clients.defenses.base import Defense, Stage, Tensors, TrainingInfo, register_defense
from fl_privsim.core.errors import ConfigError

METHODS = ("auto", "exact", "hutchinson")


def _number(name: str, value: object, low: float, high: float, *, integer: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int,) if integer else (int, float))
    if not ok or not low <= float(value) <= high:  # type: ignore[arg-type]
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind} in [{low:g}, {high:g}], got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _resolve_layer(model: nn.Module, layer: str) -> tuple[str, nn.Linear]:
    """``(name, module)`` of the named ``nn.Linear``, or of the first one when ``layer`` is empty."""
    modules = dict(model.named_modules())
    if layer:
        mod = modules.get(layer)
        if not isinstance(mod, nn.Linear):
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise ConfigError(
                f"soteria: layer {layer!r} is not an nn.Linear of the model; "
                f"allowed: {', '.join(map(repr, linears)) or 'none'}"
            )
        return layer, mod
    for name, mod in modules.items():
        if isinstance(mod, nn.Linear):
            return name, mod
    raise ConfigError("soteria: layer: the model has no nn.Linear layer to defend")


@contextlib.contextmanager
def preserved_state(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run the block with torch's RNG forked and restore the model's floating-point buffers
    (BatchNorm running statistics) on exit, after any backward through the block's graph."""
    saved = {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])


def representation(
    model: nn.Module, layer: nn.Linear, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x', r)``: a differentiable copy of ``x`` and the input ``r`` of ``layer`` reshaped
    ``[B, P, in_features]`` (``P`` positions), from a forward pass of ``model`` in its current
    mode (wrap it in :func:`preserved_state` to keep buffers and RNG)."""
    captured: list[torch.Tensor] = []

    def hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if not captured:
            captured.append(inputs[0])

    xg = x.detach().clone().requires_grad_(True)
    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.enable_grad():
            model(xg)
    finally:
        handle.remove()
    if not captured:
        raise ValueError("soteria: the defended layer was not called in the forward pass")
    r = captured[0]
    return xg, r.reshape(r.shape[0], -1, r.shape[-1])


def input_sensitivity_exact(r: torch.Tensor, x: torch.Tensor, *, chunk: int = 64) -> torch.Tensor:
    """``[B, m]``: ``‖∂r_{b,j}/∂x_b‖`` for every sample and element, one VJP per element."""
    b, _, m = r.shape
    out = torch.empty(b, m, dtype=r.dtype, device=r.device)
    for start in range(0, m, chunk):
        idx = torch.arange(start, min(m, start + chunk), device=r.device)
        eye = torch.zeros(len(idx), *r.shape, dtype=r.dtype, device=r.device)
        eye[torch.arange(len(idx)), :, :, idx] = 1.0
        (g,) = torch.autograd.grad(r, x, eye, retain_graph=True, is_grads_batched=True)
        out[:, start : start + len(idx)] = g.reshape(len(idx), b, -1).norm(dim=2).T
    return out


def input_sensitivity_hutchinson(
    r: torch.Tensor, x: torch.Tensor, *, probes: int, generator: torch.Generator
) -> torch.Tensor:
    """``[B, m]``: unbiased estimate of ``‖∂r_{b,j}/∂x_b‖²`` averaged over ``probes`` Gaussian
    probes ``v`` (``E[(J v)²] = diag(J Jᵀ)``), square-rooted."""
    u = torch.zeros_like(r, requires_grad=True)
    (jt_u,) = torch.autograd.grad(r, x, u, create_graph=True)  # Jᵀu, linear in u
    acc = torch.zeros(r.shape, dtype=r.dtype, device=r.device)
    for _ in range(probes):
        v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)  # J v
        acc += jv.detach() ** 2
    return (acc / probes).sum(dim=1).sqrt()


def representation_ratios(r: torch.Tensor, sensitivity: torch.Tensor) -> torch.Tensor:
    """``[m]``: batch mean of ``‖r_{b,j}‖ / ‖∂r_{b,j}/∂x_b‖``; a zero denominator gives +∞."""
    norms = r.detach().norm(dim=1)
    ratio = norms / sensitivity
    ratio = torch.where(sensitivity > 0, ratio, torch.full_like(ratio, math.inf))
    return ratio.mean(dim=0)


@register_defense("soteria")
class Soteria(Defense):
    """Soteria (Sun et al., CVPR 2021): zero the weight-gradient columns of one dense layer
    for the representation elements with the smallest ``‖r_j‖ / ‖∂r_j/∂x‖`` (module docstring).

    Parameters
    ----------
    pruning_ratio:
        Share of the layer's input elements whose gradient columns are zeroed, in [0, 1]
        (default 0.8); ``round(pruning_ratio · in_features)`` columns.
    layer:
        Module name (``model.named_modules()``) of the defended ``nn.Linear``; empty (default)
        = the first ``nn.Linear`` of the model.
    method:
        ``"auto"`` (default), ``"exact"`` or ``"hutchinson"`` (how ``‖∂r_j/∂x‖`` is computed).
    probes:
        Gaussian probes of the Hutchinson estimate, integer ≥ 1 (default 32).
    max_exact_width:
        ``"auto"`` is exact up to this many elements, integer ≥ 1 (default 1024).

    Metric ``pruned_fraction``: share of the layer's columns zeroed per step.
    """

    stage: Stage = "step"
    exclusive: ClassVar[bool] = True
    needs_batch: ClassVar[bool] = True

    def __init__(
        self,
        *,
        pruning_ratio: float = 0.8,
        layer: str = "",
        method: str = "auto",
        probes: int = 32,
        max_exact_width: int = 1024,
    ) -> None:
        self.pruning_ratio = _number("pruning_ratio", pruning_ratio, 0.0, 1.0)
        if not isinstance(layer, str):
            raise ValueError(
                f"layer must be a module name (string; empty = first nn.Linear), got {layer!r}"
            )
        if method not in METHODS:
            raise ValueError(
                f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}"
            )
        self.layer = layer
        self.method = method
        self.probes = int(_number("probes", probes, 1, 1e6, integer=True))
        self.max_exact_width = int(
            _number("max_exact_width", max_exact_width, 1, 1e9, integer=True)
        )
        self._mask: torch.Tensor | None = None

    def check_model(self, model: nn.Module) -> None:
        """The ``layer`` must name an ``nn.Linear`` of ``model`` (the first one if empty)."""
        _resolve_layer(model, self.layer)

    def begin(self, model: nn.Module, info: TrainingInfo) -> None:
        super().begin(model, info)
        name, self._module = _resolve_layer(model, self.layer)
        self.param_name = f"{name}.weight" if name else "weight"
        if not self._module.weight.requires_grad:
            raise ValueError(f"soteria: the weight of layer {name!r} is not trainable")
        self._mask = None

    def column_mask(
        self, model: nn.Module, x: torch.Tensor, *, generator: torch.Generator
    ) -> torch.Tensor:
        """``[in_features]`` boolean: ``True`` for the columns to zero on batch ``x``."""
        if not x.is_floating_point():
            raise ValueError(
                "soteria needs floating-point inputs (it differentiates the representation in x)"
            )
        if x.shape[0] == 0:  # an empty Poisson batch: the gradient is noise only, nothing to hide
            return torch.zeros(self._module.in_features, dtype=torch.bool, device=x.device)
        with preserved_state(model, x.device):
            xg, r = representation(model, self._module, x)
            m = r.shape[-1]
            exact = self.method == "exact" or (self.method == "auto" and m <= self.max_exact_width)
            if exact:
                sens = input_sensitivity_exact(r, xg)
            else:
                sens = input_sensitivity_hutchinson(r, xg, probes=self.probes, generator=generator)
            ratios = representation_ratios(r, sens.detach())
        n_zero = min(m, math.floor(self.pruning_ratio * m + 0.5))
        mask = torch.zeros(m, dtype=torch.bool, device=ratios.device)
        if n_zero:
            # smallest ratios first; stable sort breaks ties by position
            mask[torch.sort(ratios, stable=True).indices[:n_zero]] = True
        return mask

    def observe_batch(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator
    ) -> None:
        self._mask = self.column_mask(model, x, generator=generator)

    def transform_step(self, grads: Tensors, *, generator: torch.Generator) -> Tensors:
        if self._mask is None:
            raise RuntimeError("soteria: transform_step called before observe_batch")
        if self.param_name not in grads:
            raise ValueError(f"soteria: no gradient for {self.param_name!r}")
        out = dict(grads)
        g = grads[self.param_name]
        out[self.param_name] = g.masked_fill(self._mask.to(g.device).unsqueeze(0), 0.0)
        self.record("pruned_fraction", float(self._mask.float().mean()))
        return out

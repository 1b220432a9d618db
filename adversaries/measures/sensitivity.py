"""Per-layer Jacobian sensitivity of the gradient to the input (original-information leakage).

Mo, Borovykh, Malekzadeh, Haddadi, Demetriou, "Quantifying and Localizing Usable Information
Leakage from Neural Network Gradients" (arXiv:2105.13929; predecessor arXiv:2010.08762):
the sensitivity of layer ``l`` is ``S_l = E_x ‖∂g_l(x)/∂x‖_F`` with ``g_l(x) = ∇_{θ_l} L(x)``
the gradient of the layer's parameters for one sample. A layer whose gradient changes a lot
with the input carries much information about the input (reconstruction attacks use it).

Threat model: analyst-side, given the private inputs and labels; no adversary's view.

``∂g_l/∂x`` is the ``d_l × d_x`` block of ``Jᵀ`` in the I²F convention
(``J = ∇_x∇_θL ∈ R^{d_x×d_θ}``, :mod:`adversaries.measures.i2f`). Hutchinson's identity
``‖A‖_F² = E_v ‖A v‖²`` for probes with ``E[vvᵀ] = I`` (Rademacher or standard normal)
gives an unbiased estimate from Jacobian-vector products ``(∂g_l/∂x) v``, one per probe. Two
routes compute it: ``"double_backward"`` (default; ``∇_θ⟨∇_xL, v⟩``, all layers in one pass,
works with any module) and ``"forward"`` (``torch.func.jvp`` of ``x ↦ ∇_θL`` —
forward-over-reverse; needs modules that ``torch.func`` supports, e.g. no BatchNorm in train
mode). Error bars: the standard error of the probe mean (``std/√n_probes``) for ``‖·‖_F²``
and, by the delta method, ``se/(2‖·‖_F)`` for ``‖·‖_F``. "Normalised by dimension" (left
open by the paper) is taken here as the RMS entry, ``‖·‖_F / √(d_l·d_x)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from adversaries.measures._common import LossFn, default_loss, select_layers, trainable_named_params
from adversaries.measures.i2f import InversionJacobian, dense_jacobian

log = logging.getLogger(__name__)

PROBES = ("rademacher", "gaussian")
METHODS = ("double_backward", "forward")


@dataclass(frozen=True)
class LayerSensitivity:
    """Hutchinson estimate of ``‖∂g_l/∂x‖_F`` for one sample and one layer."""

    layer: str
    sample: int
    d_params: int
    d_input: int
    sq_frobenius: float
    sq_frobenius_stderr: float
    frobenius: float
    frobenius_stderr: float
    normalized: float
    n_probes: int

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _slices(model: nn.Module, layers: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """For each layer, the indices of its entries in the flat parameter vector."""
    params = [p for _, p in trainable_named_params(model)]
    offsets = np.cumsum([0] + [p.numel() for p in params])
    return {
        name: torch.cat([torch.arange(int(offsets[j]), int(offsets[j + 1])) for j in idx])
        for name, idx in select_layers(model, layers).items()
    }


def _probe(
    kind: str, shape: torch.Size, generator: torch.Generator | None, dtype: torch.dtype
) -> torch.Tensor:
    if kind == "rademacher":
        return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(dtype)
    return torch.randn(shape, generator=generator, dtype=dtype)


def _forward_jvp(
    model: nn.Module, loss_fn: LossFn, xi: torch.Tensor, yi: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """``(∂∇_θL/∂x) v`` by ``torch.func.jvp`` over ``torch.func.grad`` (flat, d_θ entries)."""
    from torch.func import functional_call, grad, jvp

    named = trainable_named_params(model)
    pdict = {n: p.detach() for n, p in named}
    buffers = dict(model.named_buffers())

    def grad_theta(inp: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = grad(
            lambda pd: loss_fn(functional_call(model, (pd, buffers), (inp,)), yi)
        )(pdict)
        return out

    # torch.func.jvp is typed as a 2- or 3-tuple (has_aux); without has_aux it is 2
    _, tangent = jvp(grad_theta, (xi.detach(),), (v.to(xi.device),))  # type: ignore[misc]
    return torch.cat([tangent[n].reshape(-1) for n, _ in named]).detach()


def jacobian_sensitivity(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_probes: int = 16,
    probe: str = "rademacher",
    method: str = "double_backward",
    layers: Sequence[str] | None = None,
    loss_fn: LossFn = default_loss,
    generator: torch.Generator | None = None,
) -> list[LayerSensitivity]:
    """Hutchinson estimates of ``‖∂g_l(x_i)/∂x_i‖_F`` for every sample ``i`` and layer ``l``.

    ``x`` is a batch ``(N, ...)``; each sample's gradient is taken alone (batch size 1).
    Rows are ordered by sample, then layer (module order). Probes come from ``generator``.
    """
    if n_probes < 2:
        raise ValueError(f"n_probes must be >= 2 (for an error bar), got {n_probes}")
    if probe not in PROBES or method not in METHODS:
        raise ValueError(
            f"probe must be in {PROBES} and method in {METHODS}, got {probe!r}, {method!r}"
        )
    slices = _slices(model, layers)
    rows: list[LayerSensitivity] = []
    for i in range(x.shape[0]):
        xi, yi = x[i : i + 1], y[i : i + 1]
        op = (
            InversionJacobian(model, xi, yi, loss_fn=loss_fn)
            if method == "double_backward"
            else None
        )
        sq: dict[str, list[float]] = {name: [] for name in slices}
        for _ in range(n_probes):
            v = _probe(probe, xi.shape, generator, xi.dtype)
            u = op.vjp(v.reshape(-1)) if op is not None else _forward_jvp(model, loss_fn, xi, yi, v)
            for name, idx in slices.items():
                sq[name].append(float(u[idx.to(u.device)].double().pow(2).sum()))
        d_x = xi.numel()
        for name, idx in slices.items():
            arr = np.asarray(sq[name])
            est, se = float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(arr.size))
            frob = math.sqrt(est)
            frob_se = se / (2 * frob) if frob > 0 else 0.0
            rows.append(
                LayerSensitivity(
                    name,
                    i,
                    int(idx.numel()),
                    d_x,
                    est,
                    se,
                    frob,
                    frob_se,
                    frob / math.sqrt(idx.numel() * d_x),
                    n_probes,
                )
            )
    return rows


def exact_sensitivity(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    layers: Sequence[str] | None = None,
    loss_fn: LossFn = default_loss,
) -> list[dict[str, float | int | str]]:
    """Exact ``‖∂g_l(x_i)/∂x_i‖_F`` from the materialised Jacobian (small models and tests only)."""
    slices = _slices(model, layers)
    rows: list[dict[str, float | int | str]] = []
    for i in range(x.shape[0]):
        jac = dense_jacobian(model, x[i : i + 1], y[i : i + 1], loss_fn=loss_fn)  # (d_x, d_θ)
        for name, idx in slices.items():
            frob = float(jac[:, idx].double().norm())
            rows.append(
                {
                    "layer": name,
                    "sample": i,
                    "frobenius": frob,
                    "sq_frobenius": frob**2,
                    "normalized": frob / math.sqrt(idx.numel() * jac.shape[0]),
                }
            )
    return rows


def summarize_sensitivity(rows: Sequence[LayerSensitivity]) -> list[dict[str, float | int | str]]:
    """Per layer: ``S_l`` = mean over samples of ``‖∂g_l/∂x‖_F`` (and of the normalised value),
    with the standard error over samples (which includes the probe noise); for one sample
    the probe standard error."""
    table: list[dict[str, float | int | str]] = []
    for layer in dict.fromkeys(r.layer for r in rows):
        sub = [r for r in rows if r.layer == layer]
        frob = np.asarray([r.frobenius for r in sub])
        norm = np.asarray([r.normalized for r in sub])
        if len(sub) > 1:
            se, nse = frob.std(ddof=1) / math.sqrt(len(sub)), norm.std(ddof=1) / math.sqrt(len(sub))
        else:
            se = sub[0].frobenius_stderr
            nse = se * sub[0].normalized / sub[0].frobenius if sub[0].frobenius > 0 else 0.0
        table.append(
            {
                "layer": layer,
                "d_params": sub[0].d_params,
                "n_samples": len(sub),
                "sensitivity": float(frob.mean()),
                "sensitivity_stderr": float(se),
                "normalized": float(norm.mean()),
                "normalized_stderr": float(nse),
            }
        )
    return table

"""Bins of the imprint block: measurements, quantile offsets, alone shares, scale calibration.

Helpers of :mod:`adversaries.malicious.imprint` (Fowl, Geiping, Czaja, Goldblum, Goldstein,
"Robbing the Fed: Directly Obtaining Private Data in Federated Learning with Modified Models",
ICLR 2022). Pure torch; no Flower or Ray.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MEASUREMENTS = ("brightness", "random", "dct")
DISTRIBUTIONS = ("aux", "gaussian")


def expected_alone_share(n: int, bins: int) -> float:
    """Expected share of ``n`` i.i.d. records that are alone in their bin, for ``bins``
    equal-mass bins: ``(1 - 1/bins) ** (n - 1)``.

    Derivation: record ``j`` lands in some bin; it is alone there when none of the other
    ``n - 1`` records, drawn independently, lands in the same bin, which has probability
    ``(1 - 1/k) ** (n - 1)`` whatever bin ``j`` took. By linearity of expectation
    ``E[#records alone] = n (1 - 1/k) ** (n - 1)``, and the share is that divided by ``n``.
    Fowl et al. (ICLR 2022) give the same count for the imprint block; e.g. 0.781 for
    ``n = 64``, ``k = 256``. Only records alone in their bin are recovered exactly.

    Parameters
    ----------
    n:
        Records in the observed update (>= 1).
    bins:
        Number of equal-mass bins (>= 1).
    """
    if n < 1 or bins < 1:
        raise ValueError(f"need n >= 1 and bins >= 1, got n={n}, bins={bins}")
    return (1.0 - 1.0 / bins) ** (n - 1)


def alone_share(masses: Sequence[float] | torch.Tensor, n: int) -> float:
    """Expected share of ``n`` i.i.d. records alone in their bin for bins of unequal mass:
    ``sum_i p_i (1 - p_i) ** (n - 1)``.

    Derivation: record ``j`` falls in bin ``i`` with probability ``p_i`` and is then alone
    when the other ``n - 1`` records all miss bin ``i``, probability ``(1 - p_i) ** (n - 1)``;
    summing over bins gives ``P(j alone)``, the same for every record, so
    ``E[#alone] / n = sum_i p_i (1 - p_i) ** (n - 1)``. For ``p_i = 1/k`` this is
    :func:`expected_alone_share`. Mass outside every bin (``sum p_i < 1``) counts as records
    never recovered.

    Parameters
    ----------
    masses:
        Probability of each bin (non-negative, summing to at most 1).
    n:
        Records in the observed update (>= 1).
    """
    p = torch.as_tensor(masses, dtype=torch.float64).flatten()
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    if p.numel() and (bool((p < 0).any()) or float(p.sum()) > 1.0 + 1e-9):
        raise ValueError("masses must be non-negative and sum to at most 1")
    return float((p * (1.0 - p) ** (n - 1)).sum())


def measurement_direction(
    measurement: str,
    input_shape: tuple[int, int, int],
    data_std: Sequence[float],
    generator: torch.Generator,
) -> torch.Tensor:
    """Unit vector ``u`` (float64, length C·H·W) of the measurement ``h(x) = u·x`` on a
    normalised input ``x``.

    - ``brightness``: the mean pixel intensity: ``u`` ∝ the per-channel std, since a pixel is
      ``x·std + mean``. On natural images it is the direction of largest spread, so for a
      given encoder norm it gives the widest bins (most robust to FedAvg's drift).
    - ``random``: a standard normal direction drawn from ``generator``.
    - ``dct``: the lowest non-constant 2-D DCT-II basis function along the height (along the
      width when the height is 1), the same in every channel (top vs bottom brightness).
    """
    c, h, w = (int(v) for v in input_shape)
    if measurement == "brightness":
        std = [float(s) for s in data_std]
        std = std * c if len(std) == 1 else std
        u = torch.tensor(std[:c], dtype=torch.float64).view(c, 1, 1).expand(c, h, w)
    elif measurement == "random":
        u = torch.randn(c, h, w, generator=generator, dtype=torch.float64)
    elif measurement == "dct":
        n = h if h > 1 else w
        k = torch.arange(n, dtype=torch.float64)
        basis = torch.cos(math.pi * (2 * k + 1) / (2 * n))
        u = (basis.view(1, n, 1) if h > 1 else basis.view(1, 1, n)).expand(c, h, w)
    else:
        raise ValueError(
            f"measurement must be one of {', '.join(MEASUREMENTS)}, got {measurement!r}"
        )
    u = u.reshape(-1).clone()
    unit: torch.Tensor = u / u.norm()
    return unit


def quantiles(values: torch.Tensor, probs: torch.Tensor, distribution: str) -> torch.Tensor:
    """Quantiles ``probs`` of the measurement: empirical on ``values`` (``"aux"``, linear
    interpolation) or of the normal fitted to them (``"gaussian"``); float64."""
    values = values.to(torch.float64)
    probs = probs.to(torch.float64)
    if distribution == "aux":
        return torch.quantile(values, probs)
    mu, sd = values.mean(), values.std()
    return mu + sd * math.sqrt(2.0) * torch.erfinv(2.0 * probs - 1.0)


def drift_per_ratio(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    v: torch.Tensor,
    *,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    max_samples: int = 64,
) -> float:
    """How far one record's local SGD step moves another record's measurement, per unit of
    the block's ratio ``R = decoder scale / encoder scale``, in units of the measurement's std.

    With encoder rows ``(s/σ) u`` and decoder columns ``ε v``, a record ``n`` adds
    ``γ_n x_n`` to every active row's weight gradient, ``γ_n = ε v·∂L/∂y_n`` (``L`` the mean
    loss of the client's batch), so one SGD step shifts the pre-activation of record ``m`` by
    ``lr γ_n x_n·x_m``, i.e. its measurement by ``lr R (v·∂L/∂y_n)(x_n·x_m)`` standard
    deviations. Returned: that value with root-mean-square ``v·∂L/∂y_n`` and ``x_n·x_m``
    (``n ≠ m``) on the server's public data, the gradients taken as a client takes them (a copy
    of the model in training mode, cross-entropy averaged over ``batch_size``; BatchNorm's
    batch statistics matter: ResNet-18's input gradients are ~10x larger in training mode).
    Randomness inside the model (dropout) is drawn from ``generator`` in a forked RNG state.
    """
    x = inputs[:max_samples].detach()
    y = labels[:max_samples].detach()
    if x.shape[0] < 2:
        return 0.0
    b = max(int(batch_size), 1)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    m = copy.deepcopy(model).to(device)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    devices = [device] if device.type == "cuda" else []

    def input_gradients(train: bool) -> torch.Tensor:
        m.train(train)
        out = []
        for xb, yb in zip(x.split(min(b, x.shape[0])), y.split(min(b, x.shape[0])), strict=True):
            xg = xb.to(device, torch.float32).clone().requires_grad_(True)
            loss = F.cross_entropy(m(xg), yb.to(device), reduction="sum") / b
            (grad,) = torch.autograd.grad(loss, xg)
            out.append(grad.detach().flatten(1).to("cpu", torch.float64))
        return torch.cat(out)

    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            grads = input_gradients(True)
        except (RuntimeError, ValueError):  # e.g. BatchNorm on one value per channel
            grads = input_gradients(False)
    vg = grads @ v
    xf = x.flatten(1).to("cpu", torch.float64)
    gram = xf @ xf.T
    off = gram[~torch.eye(gram.shape[0], dtype=torch.bool)]
    rms_vg = float(vg.pow(2).mean().sqrt())
    rms_xx = float(off.pow(2).mean().sqrt())
    return float(lr) * rms_vg * rms_xx

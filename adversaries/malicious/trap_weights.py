"""Trap weights: a malicious first dense layer whose neurons fire for few inputs each.

Boenisch, Dziedzic, Schuster, Shamsabadi, Shumailov and Papernot, "When the Curious Abandon
Honesty: Federated Learning Is Not Private", IEEE EuroS&P 2023 (arXiv:2112.02918).

The server replaces the weights of the model's first fully-connected layer (the one that sees
the flattened input) by *trap weights*: in every row a random half of the weights is negative
and the other half positive but scaled down, so that the pre-activation of a typical input is
negative and each ReLU neuron fires for only a few inputs. A neuron that fires for exactly one
record of the batch passes that record's input unchanged into its gradient: for
``h_i = W_i x + b_i``, ``∂L/∂W_i = (∂L/∂h_i) x`` and ``∂L/∂b_i = ∂L/∂h_i``, so
``x = ∂L/∂W_i / ∂L/∂b_i`` (the analytic dense-layer recovery of Phong et al. 2017 and Geiping
et al. 2020). The attack (:class:`TrapWeightsAttack`) collects these ratios and removes the
duplicates (several neurons private to the same record give the same input).

This module imports neither Flower nor Ray.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, ClassVar

import torch
from torch import nn

from adversaries.base import ATTACKS, Attack, AttackResult, Observation, Setup
from adversaries.malicious.base import Crafted, Modification, ServerView, register_modification
from adversaries.reconstruction._common import (
    first_layer,
    group_candidates,
    layer_grads,
    target_gradient,
)
from fl_privsim.core.errors import ConfigError, ThreatModelError

log = logging.getLogger(__name__)

#: Models of the zoo whose first trainable layer is a Linear with bias on the flattened input.
TRAP_MODELS = ("mlp", "linear")


def _trap_layer(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[str, nn.Linear] | str:
    """The first layer if it can hold trap weights, else a one-line reason."""
    try:
        name, layer, before = first_layer(model)
    except ThreatModelError:
        return "the model has no trainable layer"
    c, h, w = input_shape
    if not isinstance(layer, nn.Linear) or layer.bias is None:
        return f"its first trainable layer {name!r} is {type(layer).__name__}" + (
            " without bias" if isinstance(layer, nn.Linear) else ""
        )
    if before:
        return f"the input passes through {', '.join(before)} before {name!r}"
    if layer.in_features != c * h * w:
        return f"{name!r} takes {layer.in_features} features, not the flattened input ({c * h * w})"
    return name, layer


def _normalisation(
    mean: tuple[float, ...], std: tuple[float, ...], input_shape: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of the flattened input (float64)."""
    c, h, w = input_shape
    m = torch.tensor(mean, dtype=torch.float64).reshape(-1, 1, 1).expand(c, h, w).reshape(-1)
    s = torch.tensor(std, dtype=torch.float64).reshape(-1, 1, 1).expand(c, h, w).reshape(-1)
    return m, s


def trap_rows(
    rows: int, features: int, *, sigma: float, scale_factor: float, generator: torch.Generator
) -> torch.Tensor:
    """Trap weights for pixel inputs in [0, 1], shape (rows, features), float64.

    Every row draws magnitudes ``|N(0, sigma)|``; a random half of its entries (``features //
    2``, chosen per row) becomes negative, the other half stays positive and is multiplied by
    ``scale_factor`` (< 1), so that on a non-negative input the negative half usually wins.
    """
    mag = torch.randn(rows, features, generator=generator, dtype=torch.float64).abs_() * sigma
    order = torch.rand(rows, features, generator=generator).argsort(dim=1)
    negative = torch.zeros(rows, features, dtype=torch.bool)
    negative.scatter_(1, order[:, : features // 2], True)
    return torch.where(negative, -mag, mag * scale_factor)


@register_modification("trap_weights")
class TrapWeights(Modification):
    """Plant trap weights in the first dense layer (Boenisch et al., EuroS&P 2023).

    Threat model: a malicious server that may send any weights for the agreed architecture;
    it never sees the clients' data. Its own public data of the same domain
    (:attr:`ServerView.public_inputs`) may be used to calibrate the biases. The model's first
    trainable layer must be an ``nn.Linear`` with bias fed the flattened input (``mlp``,
    ``linear``); every row of that layer is replaced, the rest of the model is kept.

    **Rows.** As in the paper, for pixel inputs in [0, 1]: weights ``~ N(0, sigma)`` in
    magnitude, a random half of each row negative, the other half positive and scaled by
    ``scale_factor`` (:func:`trap_rows`). The clients feed *normalised* inputs
    ``z = (x - mean) / std``, so the rows are folded through the normalisation:
    ``W' = W · diag(std)``, ``b' = b + W · mean`` gives ``W' z + b' = W x + b`` exactly and
    the trap holds on what the clients compute.

    **Biases.** The paper obtains the sparsity from the sign imbalance of the weights alone and
    does not fit the biases to data, so how often a neuron fires depends on the data's
    brightness and contrast; ``calibrate=False`` does that (bias zero in pixel space). With
    ``calibrate`` (the default) each row's bias is instead set from the server's public data
    so that the neuron fires for a share ``activation_rate`` of the public inputs:
    ``b_i = -q_i`` with ``q_i`` the ``1 - activation_rate`` quantile of ``W_i x`` over the
    public images. A neuron singles out one of ``n`` records with probability
    ``n p (1 - p)^(n - 1)``, largest at ``p = 1/n``; the default ``activation_rate`` is
    ``1 / view.records_per_update`` (the batch size for FedSGD; for an attack on the
    aggregate of ``k`` targeted clients, ``1 / (k · records_per_update)`` is the better
    choice). Without public inputs the calibration is skipped (logged). Measured on CIFAR-10
    (``mlp``, 256 rows, one FedSGD batch of 64, 500 public test images, 4 batches): share of
    records matched (one-to-one, minimum MSE) with MSE <= 1e-3: 0.48/0.48/0.42/0.44
    calibrated, 0.27/0.22/0.31/0.28 with ``calibrate=False``. The trap itself is the limit,
    not the recovery: on such batches ~46 % of the records are the only one to fire some
    neuron (records with a strong projection fire many neurons together, so the share stays
    below the ~78 % that independent neurons would give).

    Secrets (under ``"trap_weights"``): ``layer`` (its module name), ``rows`` (int64 indices
    of the planted rows: all of them), ``weight``/``bias`` (the planted rows as sent, in the
    normalised input space), ``activation_rate`` (the share used, ``nan`` when not calibrated).

    Parameters
    ----------
    sigma:
        Standard deviation of the weight magnitudes (> 0; default 0.5, as breaching).
    scale_factor:
        Factor on the positive half of each row (in (0, 1]; default 0.95, as breaching).
    activation_rate:
        Share of public inputs each neuron should fire for (in (0, 1)); ``None`` (default):
        ``1 / records_per_update``, capped at 0.5.
    calibrate:
        Set the biases from the public inputs (default); ``False``: the paper's zero bias.
    """

    def __init__(
        self,
        *,
        sigma: float = 0.5,
        scale_factor: float = 0.95,
        activation_rate: float | None = None,
        calibrate: bool = True,
    ) -> None:
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        if not (isinstance(scale_factor, (int, float)) and 0 < scale_factor <= 1):
            raise ValueError(f"scale_factor must lie in (0, 1], got {scale_factor!r}")
        if activation_rate is not None and not (
            isinstance(activation_rate, (int, float))
            and not isinstance(activation_rate, bool)
            and 0 < activation_rate < 1
        ):
            raise ValueError(
                f"activation_rate must lie in (0, 1) or be None, got {activation_rate!r}"
            )
        if not isinstance(calibrate, bool):
            raise ValueError(f"calibrate must be true or false, got {calibrate!r}")
        self.sigma = float(sigma)
        self.scale_factor = float(scale_factor)
        self.activation_rate = None if activation_rate is None else float(activation_rate)
        self.calibrate = calibrate

    def check_model(
        self, model: nn.Module, input_shape: tuple[int, int, int], num_classes: int
    ) -> None:
        """Refuse a model whose first trainable layer is not a Linear with bias on the input."""
        found = _trap_layer(model, input_shape)
        if isinstance(found, str):
            raise ConfigError(
                "trap_weights needs a first Linear layer with bias on the flattened input "
                f"({found}); models that have one: {', '.join(TRAP_MODELS)}"
            )

    def rate(self, view: ServerView) -> float:
        """The activation rate used for ``view`` (explicit, or ``1 / records_per_update``)."""
        if self.activation_rate is not None:
            return self.activation_rate
        return min(0.5, 1.0 / max(1, view.records_per_update))

    def craft(self, model: nn.Module, view: ServerView) -> Crafted:
        """A copy of ``model`` with trap weights in its first dense layer, and the secrets."""
        self.check_model(model, view.input_shape, view.num_classes)
        crafted = copy.deepcopy(model)
        found = _trap_layer(crafted, view.input_shape)
        assert not isinstance(found, str)  # check_model raised otherwise
        name, layer = found
        rows, features = layer.weight.shape
        w = trap_rows(
            rows,
            features,
            sigma=self.sigma,
            scale_factor=self.scale_factor,
            generator=view.generator,
        )
        mean, std = _normalisation(view.data_mean, view.data_std, view.input_shape)
        b = torch.zeros(rows, dtype=torch.float64)
        rate = math.nan
        public = view.public_inputs
        if self.calibrate and public is not None and public.shape[0] > 0:
            rate = self.rate(view)
            pixels = public.detach().to("cpu", torch.float64).flatten(1) * std + mean
            proj = pixels @ w.T  # (P, rows)
            k = min(proj.shape[0], max(1, math.ceil((1.0 - rate) * proj.shape[0])))
            b = -proj.kthvalue(k, dim=0).values
        elif self.calibrate:
            log.warning("trap_weights: no public inputs; biases left at zero (uncalibrated)")
        with torch.no_grad():
            layer.weight.copy_((w * std).to(layer.weight.dtype))
            layer.bias.copy_((b + w @ mean).to(layer.bias.dtype))
        secrets: dict[str, Any] = {
            "layer": name,
            "rows": torch.arange(rows, dtype=torch.int64),
            "weight": layer.weight.detach().clone(),
            "bias": layer.bias.detach().clone(),
            "activation_rate": rate,
        }
        log.debug("trap_weights: planted %d rows in %r (activation rate %.4g)", rows, name, rate)
        return Crafted(model=crafted, secrets=secrets)


@ATTACKS.register("trap_weights")
class TrapWeightsAttack(Attack):
    """Analytic recovery from the trapped first layer (Boenisch et al., EuroS&P 2023).

    Threat model: the malicious server that planted :class:`TrapWeights` this round (its
    secrets must be in :attr:`Observation.server_secrets`) sees one update (a client's, or an
    aggregate) of that model; it knows the architecture and the weights it sent.

    Every planted row ``i`` with ``|∂L/∂b_i| > tol · max_j |∂L/∂b_j|`` gives the candidate
    ``∂L/∂W_i / ∂L/∂b_i``: exactly a record's (normalised) input when only that record fired
    the neuron, a weighted mixture of records otherwise. Rows private to the same record give
    the same candidate, so candidates closer than ``group_tol`` (relative L2 distance) are
    merged; the distinct candidates are returned, those backed by several rows first (almost
    surely exact records), then by decreasing ``|∂L/∂b|``. With ``drop_out_of_box`` a
    candidate backed by a single row is dropped when a value lies outside
    :meth:`Observation.input_bounds` by more than 1e-3 of the range: a record's own input lies
    in the box, such a candidate mixes records whose coefficients differ in sign. (Kept, such
    candidates can pull the scorer's minimum-MSE one-to-one matching away from exact ones: on
    CIFAR-10, batch 64, 6 batches, records matched with MSE <= 1e-3 rose from 169 to 176 of
    384 with the filter, 20 -> 27 on the worst batch.) The number returned is not the number
    of records: records that fired no private neuron are missing, and in-box mixtures are
    extra (the one-to-one matching leaves them unmatched). Labels are not inferred.

    For a FedSGD aggregate the gradient is the mean over all records of all clients, so the
    same recovery applies (records of different clients firing one neuron mix). For FedAvg
    the converted delta is a trajectory average: exact for one local step, approximate after.

    ``metrics``: ``candidates`` (rows used), ``distinct`` (distinct candidates),
    ``dropped`` (distinct candidates dropped as out of the box), ``returned``, ``confirmed``
    (returned candidates backed by at least two rows), ``out_of_bounds`` (fraction of returned
    values outside :meth:`Observation.input_bounds` by more than 1e-4 of the range),
    ``seconds``.

    Parameters
    ----------
    tol:
        Relative bias-gradient magnitude under which a row is ignored (in [0, 1); 1e-6).
    group_tol:
        Relative L2 distance under which two candidates are the same record (> 0; 1e-3).
    max_candidates:
        Return at most this many (>= 1), in the order above; ``None`` (default): all.
    drop_out_of_box:
        Drop single-row candidates that leave the input box (default ``True``).
    """

    requires: ClassVar[tuple[str, ...]] = (
        "the server planted trap weights (modification 'trap_weights') in the model of this round",
        "first trainable layer is nn.Linear with bias, fed the flattened input",
        "update covers the trapped layer's weight and bias",
    )
    modification: ClassVar[str | None] = "trap_weights"

    def __init__(
        self,
        *,
        tol: float = 1e-6,
        group_tol: float = 1e-3,
        max_candidates: int | None = None,
        drop_out_of_box: bool = True,
    ) -> None:
        if not (isinstance(tol, (int, float)) and 0.0 <= tol < 1.0):
            raise ValueError(f"tol must be in [0, 1), got {tol!r}")
        if not (isinstance(group_tol, (int, float)) and math.isfinite(group_tol) and group_tol > 0):
            raise ValueError(f"group_tol must be a finite number > 0, got {group_tol!r}")
        if max_candidates is not None and (
            isinstance(max_candidates, bool)
            or not isinstance(max_candidates, int)
            or max_candidates < 1
        ):
            raise ValueError(
                f"max_candidates must be an integer >= 1 or None, got {max_candidates!r}"
            )
        if not isinstance(drop_out_of_box, bool):
            raise ValueError(f"drop_out_of_box must be true or false, got {drop_out_of_box!r}")
        self.tol = float(tol)
        self.group_tol = float(group_tol)
        self.max_candidates = max_candidates
        self.drop_out_of_box = drop_out_of_box

    def check_setup(self, setup: Setup) -> None:
        """Refuse a model whose first trainable layer is not a Linear with bias on the flattened
        input: trap weights cannot be planted there (the layer :class:`TrapWeights` uses)."""
        found = _trap_layer(setup.model, setup.input_shape)
        if isinstance(found, str):
            raise ThreatModelError(
                "trap_weights: requires the first trainable layer to be nn.Linear with bias on the "
                f"flattened input, but {found}"
            )

    def check(self, obs: Observation) -> None:
        """Refuse unless the secrets are present, :meth:`check_setup` passes on the observed
        model, and the trapped layer exists in ``obs.model`` with its update present."""
        secrets = self.secrets(obs)
        self.check_setup(Setup.of(obs))
        name = secrets.get("layer") if isinstance(secrets, dict) else None
        modules = dict(obs.model.named_modules())
        layer = modules.get(name) if isinstance(name, str) else None
        if not isinstance(layer, nn.Linear) or layer.bias is None:
            raise ThreatModelError(
                f"trap_weights: the secrets name layer {name!r}, which is not a Linear with bias "
                "of the observed model"
            )
        names = obs.param_names()
        missing = [
            f"{name}.{p}"
            for p in ("weight", "bias")
            if f"{name}.{p}" not in names or f"{name}.{p}" not in obs.update
        ]
        if missing:
            raise ThreatModelError(f"trap_weights: the update lacks {', '.join(missing)}")

    def run(
        self, obs: Observation, *, device: torch.device, generator: torch.Generator
    ) -> AttackResult:
        """The distinct ratio candidates of the trapped rows; ``generator`` is unused."""
        del generator
        start = time.perf_counter()
        secrets = self.secrets(obs)
        name = secrets["layer"]
        g = layer_grads(obs, target_gradient(obs, device), name)
        rows = torch.as_tensor(secrets.get("rows", torch.arange(g["bias"].numel())), device=device)
        g_w, g_b = g["weight"].double()[rows], g["bias"].double()[rows]
        mag = g_b.abs()
        top = float(mag.max()) if mag.numel() else 0.0
        if top == 0.0:
            raise ThreatModelError(
                "trap_weights: every trapped row has a zero bias gradient (no neuron fired); "
                "nothing to invert"
            )
        used = torch.nonzero(mag > self.tol * top).flatten()
        used = used[torch.argsort(mag[used], descending=True)]
        cands = g_w[used] / g_b[used, None]
        groups = group_candidates(cands, self.group_tol)
        # Groups backed by several rows first; inside a size, the one with the largest |∂b|.
        groups.sort(key=lambda members: (-len(members), members[0]))
        distinct = len(groups)
        lower, upper = obs.input_bounds(device)
        if self.drop_out_of_box:
            box = cands.reshape(-1, *obs.input_shape)
            slack = 1e-3 * (upper - lower)
            inside = ((box >= lower - slack) & (box <= upper + slack)).flatten(1).all(1).cpu()
            groups = [grp for grp in groups if len(grp) > 1 or bool(inside[grp[0]])]
        dropped = distinct - len(groups)
        if self.max_candidates is not None:
            groups = groups[: self.max_candidates]
        if not groups:
            raise ThreatModelError(
                "trap_weights: every candidate left the input box; no record fired a neuron alone"
            )
        picked = cands[torch.tensor([grp[0] for grp in groups], device=cands.device)]
        inputs = picked.to(torch.float32).reshape(len(groups), *obs.input_shape)
        slack = 1e-4 * (upper - lower)
        outside = (inputs < lower - slack) | (inputs > upper + slack)
        metrics = {
            "candidates": float(used.numel()),
            "distinct": float(distinct),
            "dropped": float(dropped),
            "returned": float(len(groups)),
            "confirmed": float(sum(len(grp) > 1 for grp in groups)),
            "out_of_bounds": float(outside.float().mean()),
            "seconds": time.perf_counter() - start,
        }
        log.debug("trap_weights attack: %s", metrics)
        return AttackResult(inputs=inputs, labels=None, metrics=metrics)

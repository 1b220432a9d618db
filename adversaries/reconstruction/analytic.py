"""Analytic input recovery from a fully-connected first layer with bias.

For a first layer ``h = W x + b`` every sample contributes ``∂L/∂W_i = a_i x`` and
``∂L/∂b_i = a_i`` to row ``i``, so ``x = ∂L/∂W_i / ∂L/∂b_i`` for any row with
``∂L/∂b_i ≠ 0`` (Phong et al. 2017; Geiping et al., NeurIPS 2020, §"Inverting a fully
connected layer"; Fowl et al., ICLR 2022, "Robbing the Fed").
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import torch
from torch import nn

from adversaries.base import ATTACKS, Attack, AttackResult, Observation
from adversaries.reconstruction._common import (
    first_layer,
    infer_labels,
    layer_grads,
    num_targets,
    target_gradient,
)
from fl_privsim.errors import ThreatModelError

log = logging.getLogger(__name__)


@ATTACKS.register("analytic")
class AnalyticAttack(Attack):
    """Closed-form recovery from the first layer's weight and bias gradients.

    Threat model: honest-but-curious server that sees one update (FedSGD gradient, or a
    FedAvg delta converted by :meth:`Observation.gradient`); the model's first trainable
    layer is ``nn.Linear`` with bias, fed the (flattened) input directly.

    * One sample: every row gives the same input; the row with the largest ``|∂L/∂b_i|``
      (the best-conditioned ratio) is returned. This is exact up to float rounding.
    * A batch of ``B > 1``: a row is exact only when a single sample reaches it (e.g. a
      ReLU neuron activated by one sample); rows reached by several samples give weighted
      averages. Several rows private to the same sample give identical candidates, so
      candidates are grouped by relative L2 distance below ``group_tol`` and the ``B``
      largest groups (ties by ``|∂L/∂b|``) are returned; if there are fewer groups than
      ``B`` the best remaining candidates are added. De-mixing averaged rows (Eloul et al.
      2022) is not attempted here.
    * FedAvg with several local steps: the converted delta is a trajectory average, so the
      ratio is an approximation (exact for one step).

    Labels follow the sign rule on the last linear layer's bias gradient (the classes
    present score negative; the ``B`` most negative are returned). ``B`` is
    ``num_targets(obs)``, the batch size for one FedSGD client. Outputs are in the
    normalised input space and are not clamped; ``metrics["out_of_bounds"]`` reports the
    fraction of values outside :meth:`Observation.input_bounds` (beyond a 1e-4 slack).

    Parameters
    ----------
    tol:
        Rows with ``|∂L/∂b_i| <= tol * max_j |∂L/∂b_j|`` are ignored (ill-conditioned).
    group_tol:
        Relative L2 distance ``‖c_i - c_j‖ / max(‖c_i‖, ‖c_j‖)`` under which two candidates
        count as the same sample.
    """

    requires: ClassVar[tuple[str, ...]] = (
        "first trainable layer is nn.Linear with bias, fed the flattened input",
        "update covers that layer's weight and bias",
        "last nn.Linear outputs the class logits (for labels)",
    )

    def __init__(self, *, tol: float = 1e-6, group_tol: float = 1e-4) -> None:
        if not 0.0 <= tol < 1.0:
            raise ValueError(f"tol must be in [0, 1), got {tol!r}")
        if not group_tol > 0.0:
            raise ValueError(f"group_tol must be > 0, got {group_tol!r}")
        self.tol = float(tol)
        self.group_tol = float(group_tol)

    def check(self, obs: Observation) -> None:
        """Refuse unless the first trainable layer is ``nn.Linear`` with bias on the raw input."""
        name, layer, before = first_layer(obs.model)
        if not isinstance(layer, nn.Linear) or layer.bias is None or not layer.bias.requires_grad:
            raise ThreatModelError(
                "analytic: requires the first trainable layer to be nn.Linear with bias; "
                f"found {type(layer).__name__} {name!r}"
                + ("" if not isinstance(layer, nn.Linear) else " without a trainable bias")
            )
        if before:
            raise ThreatModelError(
                "analytic: requires the input to reach the first nn.Linear (with bias) unchanged; "
                f"it passes through {', '.join(before)} first"
            )
        c, h, w = obs.input_shape
        if layer.in_features != c * h * w:
            raise ThreatModelError(
                f"analytic: first nn.Linear with bias {name!r} takes {layer.in_features} features, "
                f"not the flattened input ({c}*{h}*{w}={c * h * w})"
            )
        g = layer_grads(obs, obs.gradient(), name)
        if "weight" not in g or "bias" not in g:
            raise ThreatModelError(f"analytic: the update lacks the weight or bias of {name!r}")

    def run(
        self, obs: Observation, *, device: torch.device, generator: torch.Generator
    ) -> AttackResult:
        """Recover inputs and labels; ``generator`` is unused (the attack is deterministic)."""
        del generator
        start = time.perf_counter()
        grads = target_gradient(obs, device)
        name, _, _ = first_layer(obs.model)
        g = layer_grads(obs, grads, name)
        g_w, g_b = g["weight"].double(), g["bias"].double()
        n = num_targets(obs)

        mag = g_b.abs()
        if float(mag.max()) == 0.0:
            raise ThreatModelError(
                "analytic: every bias gradient of the first layer is zero; nothing to invert"
            )
        rows = torch.nonzero(mag > self.tol * mag.max()).flatten()
        rows = rows[torch.argsort(mag[rows], descending=True)]
        cands = g_w[rows] / g_b[rows, None]

        metrics = {"candidates": float(rows.numel()), "num_targets": float(n)}
        if n == 1:
            picked = cands[:1]
        else:
            groups = self._group(cands)
            # Largest groups first; inside a size, the group whose best row has the largest |∂b|.
            groups.sort(key=lambda members: (-len(members), members[0]))
            chosen = [grp[0] for grp in groups[:n]]
            if len(chosen) < n:  # fewer candidates than samples: repeat the best ones
                chosen = (chosen * (-(-n // len(chosen))))[:n]
            picked = cands[torch.tensor(chosen, device=cands.device)]
            metrics["groups"] = float(len(groups))
            metrics["largest_group"] = float(len(groups[0]))
            # Returned groups backed by >= 2 identical rows: almost surely single-sample rows.
            metrics["confirmed"] = float(sum(1 for grp in groups[:n] if len(grp) > 1))

        inputs = picked.to(torch.float32).reshape(n, *obs.input_shape)
        labels = infer_labels(obs, grads, n).to(device)
        lower, upper = obs.input_bounds(inputs.device)
        # Not clamped: an exact recovery lies in the box (up to rounding), so values clearly
        # outside it are a sign of mixed rows.
        slack = 1e-4 * (upper - lower)
        outside = (inputs < lower - slack) | (inputs > upper + slack)
        metrics["out_of_bounds"] = float(outside.float().mean())
        metrics["seconds"] = time.perf_counter() - start
        log.debug("analytic: %s", metrics)
        return AttackResult(inputs=inputs, labels=labels, metrics=metrics)

    def _group(self, cands: torch.Tensor) -> list[list[int]]:
        """Greedy grouping of candidates (sorted by |∂b| descending) by relative distance."""
        norms = cands.norm(dim=1)
        dist = torch.cdist(cands, cands, compute_mode="donot_use_mm_for_euclid_dist")
        scale = torch.maximum(norms[:, None], norms[None, :]).clamp_min(
            torch.finfo(cands.dtype).tiny
        )
        close = (dist / scale < self.group_tol).cpu()
        free = torch.ones(cands.shape[0], dtype=torch.bool)
        groups: list[list[int]] = []
        for i in range(cands.shape[0]):
            if not free[i]:
                continue
            members = torch.nonzero(close[i] & free).flatten().tolist()
            if i not in members:
                members = [i, *members]
            free[members] = False
            groups.append(sorted(members))
        return groups

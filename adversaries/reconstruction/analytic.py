"""Analytic input recovery from a fully-connected first layer with bias, with batch de-mixing.

For a first layer ``h = W x + b`` every sample contributes ``∂L/∂W_i = a_i x`` and
``∂L/∂b_i = a_i`` to row ``i``, so ``x = ∂L/∂W_i / ∂L/∂b_i`` for any row with
``∂L/∂b_i ≠ 0`` (Phong et al. 2017; Geiping et al., NeurIPS 2020, §"Inverting a fully
connected layer"; Fowl et al., ICLR 2022, "Robbing the Fed").

For a batch, ``∇W = Aᵀ X`` and ``∇b = Aᵀ 1`` with ``A[n, i] = ∂L/∂h_{n,i}``. When the first
layer is also the classifier (softmax regression, the dense layer of Eloul et al.,
"Enhancing Privacy against Inversion Attacks in Federated Learning by using Mixing
Gradients Strategies", arXiv:2204.12495), ``A[n, k] = (p[n, k] - y[n, k]) / N`` is known up
to the softmax ``p``, so the batch is *de-mixed* by least squares ``X = (Aᵀ)⁺ ∇W`` and a
fixed-point refinement of ``p`` (:func:`demix_dense`).
"""

from __future__ import annotations

import logging
import math
import time
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from adversaries.base import ATTACKS, Attack, AttackResult, Observation, Setup
from adversaries.reconstruction._common import (
    first_layer,
    group_candidates,
    infer_labels,
    last_linear,
    layer_grads,
    model_gradients,
    num_targets,
    target_gradient,
)
from adversaries.reconstruction._dense_demix import (
    DEMIX_LOSSES,
    DEMIX_MODES,
    EPS,
    demix_dense,
    dense_classifier,
    solve_rows,
)
from adversaries.reconstruction.label_counts import bias_counts, counts_to_labels
from fl_privsim.core.errors import ThreatModelError

log = logging.getLogger(__name__)


def dense_input_layer(model: nn.Module, input_shape: tuple[int, int, int]) -> str:
    """Name of the model's first trainable layer if it is ``nn.Linear`` with a trainable bias
    fed the flattened input unchanged; else :class:`ThreatModelError` naming what is not."""
    name, layer, before = first_layer(model)
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
    c, h, w = input_shape
    if layer.in_features != c * h * w:
        raise ThreatModelError(
            f"analytic: first nn.Linear with bias {name!r} takes {layer.in_features} features, "
            f"not the flattened input ({c}*{h}*{w}={c * h * w})"
        )
    return name


@ATTACKS.register("analytic")
class AnalyticAttack(Attack):
    """Closed-form recovery from the first layer's weight and bias gradients.

    Threat model: honest-but-curious server that sees one update (FedSGD gradient, or a
    FedAvg delta converted by :meth:`Observation.gradient`) and knows the architecture,
    the global parameters and the clients' loss (``loss``: mean softmax cross-entropy by
    default, or the squared error of the softmax); the model's first
    trainable layer is ``nn.Linear`` with bias, fed the (flattened) input directly. The
    number of samples is ``N = num_targets(obs)`` (the batch size for one FedSGD client).

    * **One sample**: every row gives the same input; the row with the largest
      ``|∂L/∂b_i|`` (the best-conditioned ratio) is returned. Exact up to float rounding.
    * **Batch, dense classifier** (the first layer outputs the ``K`` logits and is the only
      trainable layer, e.g. the ``linear`` model), with ``demix`` ``"auto"``/``"on"``:
      Eloul et al.'s de-mixing (:func:`demix_dense`): labels from the sign and size of
      ``∇b`` (counts, :func:`~adversaries.reconstruction.label_counts.bias_counts`), least
      squares for ``X`` with ``A`` from ``p = 1/K``, then a fixed point on
      ``p = softmax(X Wᵀ + b)``. Distinct labels (N ≤ K - 1) are recovered exactly;
      samples sharing a label are not separated (their coefficients are nearly equal), so
      identical-label batches return weighted averages: this is the paper's defense.
      ``metrics`` reports ``cond_A`` (condition number of the N×K coefficient matrix),
      ``iterations``, ``residual`` (``‖Aᵀ X - ∇W‖ / ‖∇W‖``) and ``bias_residual``.
    * **Batch, deeper model** (e.g. ``mlp``), or ``demix="off"``: a row is exact only when
      a single sample reaches it (e.g. a ReLU neuron activated by one sample); rows reached
      by several samples give weighted averages. Several rows private to the same sample
      give identical candidates, so candidates are grouped by relative L2 distance below
      ``group_tol`` and the ``N`` largest groups (ties by ``|∂L/∂b|``) are returned; if
      there are fewer groups than ``N`` the best remaining candidates are added. Unless
      ``demix="off"``, the rows not *confirmed* by two or more identical candidates are
      then refined by the general fixed point ``A = ∂L/∂h`` (autograd through the rest of
      the network at the current estimate and labels), ``X_free = (A_freeᵀ)⁺ (∇W -
      A_fixedᵀ X_fixed)`` (:meth:`_refine_deep`). Measured on 8×8 digits with ``mlp``
      (10 batches each): exactly recovered samples 80% → 94% at N = 8, median PSNR
      14 → 29 dB at N = 16, no change at N = 2 or 32. Letting the confirmed rows move too
      (the plain general fixed point) lowered the gradient residual but destroyed the
      exact rows (N = 8: mean PSNR 80 → 36 dB), so they stay fixed.
    * **Aggregates** (``client_id=None``, ``num_clients`` clients): a FedSGD aggregate of
      clients with *equal batch sizes* is the mean gradient of all ``N`` samples, so it is
      attacked as one batch of ``N``; unequal batch sizes weight the samples unequally
      and break the ``1/N`` in ``A``.
    * **FedAvg** with several local steps: the converted delta is a trajectory average, so
      the ratio and the de-mixing are approximations (exact for one step).

    Labels: for the dense classifier, the de-mixed labels (one per returned row). Otherwise
    counts ``c_k = N (p̄_k - ∂L/∂b_k)`` on the last linear layer's bias with ``p̄`` the
    model's mean softmax on the reconstructions (largest-remainder rounding), or, without
    a bias there, the ``N`` most negative rows (:func:`infer_labels`). Outputs are in the
    normalised input space and are not clamped; ``metrics["out_of_bounds"]`` reports the
    fraction of values outside :meth:`Observation.input_bounds` (beyond a 1e-4 slack).

    Parameters
    ----------
    tol:
        Rows with ``|∂L/∂b_i| <= tol * max_j |∂L/∂b_j|`` are ignored (ill-conditioned).
    group_tol:
        Relative L2 distance ``‖c_i - c_j‖ / max(‖c_i‖, ‖c_j‖)`` under which two candidates
        count as the same sample.
    demix:
        ``"auto"`` (default): de-mix batches (dense classifier: :func:`demix_dense`; deeper
        models: grouping, then the refinement, kept only if its full-gradient residual
        ``‖∇θL(X, y) - g‖ / ‖g‖`` is smaller than the grouping's). ``"on"``: the same, but
        the refinement is always kept. ``"off"``: ratio candidates and grouping only (the
        behaviour before de-mixing; on the dense classifier every row is then a mixture).
    demix_iterations:
        Maximum fixed-point iterations of the de-mixing (>= 1; default 100).
    demix_tol:
        Stop when the relative change of X is below this (> 0).
    demix_memory:
        Anderson-acceleration memory of the dense de-mixing's fixed point (>= 0; 0 = the
        plain iteration of the paper). Same fixed point, fewer iterations: on 8×8 digits
        with distinct labels (N = 8) at most 22 instead of up to 125.
    loss:
        The clients' training loss the attacker knows (``client.loss``; the config refuses
        a mismatch): ``"cross_entropy"`` (default) or ``"mse"`` (squared error of the
        softmax, Eloul et al.'s loss choice, :mod:`clients.defenses.losses`). The
        single-sample ratio and the grouping hold for any loss; the dense de-mixing uses the
        loss's coefficients (:func:`~adversaries.reconstruction._dense_demix.coefficients`);
        for deeper models with ``"mse"`` the CE-based refinement and bias-count labels are
        skipped (grouping only, labels by :func:`infer_labels`).
    """

    requires: ClassVar[tuple[str, ...]] = (
        "first trainable layer is nn.Linear with bias, fed the flattened input",
        "update covers that layer's weight and bias",
        (
            "loss is the mean over N = num_targets(obs) equally weighted samples of the `loss` parameter "
            "(softmax cross-entropy by default)"
        ),
        "last nn.Linear outputs the class logits (for labels)",
    )

    def __init__(
        self,
        *,
        tol: float = 1e-6,
        group_tol: float = 1e-4,
        demix: str = "auto",
        demix_iterations: int = 100,
        demix_tol: float = 1e-10,
        demix_memory: int = 5,
        loss: str = "cross_entropy",
    ) -> None:
        if not 0.0 <= tol < 1.0:
            raise ValueError(f"tol must be in [0, 1), got {tol!r}")
        if not group_tol > 0.0:
            raise ValueError(f"group_tol must be > 0, got {group_tol!r}")
        if demix not in DEMIX_MODES:
            raise ValueError(f"demix must be one of {', '.join(DEMIX_MODES)}, got {demix!r}")
        if (
            isinstance(demix_iterations, bool)
            or not isinstance(demix_iterations, int)
            or demix_iterations < 1
        ):
            raise ValueError(f"demix_iterations must be an integer >= 1, got {demix_iterations!r}")
        if not (isinstance(demix_tol, (int, float)) and math.isfinite(demix_tol) and demix_tol > 0):
            raise ValueError(f"demix_tol must be a finite number > 0, got {demix_tol!r}")
        self.tol = float(tol)
        self.group_tol = float(group_tol)
        self.demix = demix
        self.demix_iterations = demix_iterations
        self.demix_tol = float(demix_tol)
        if isinstance(demix_memory, bool) or not isinstance(demix_memory, int) or demix_memory < 0:
            raise ValueError(f"demix_memory must be an integer >= 0, got {demix_memory!r}")
        self.demix_memory = demix_memory
        if loss not in DEMIX_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(DEMIX_LOSSES)}, got {loss!r}")
        self.loss = loss

    def check_setup(self, setup: Setup) -> None:
        """Refuse unless the first trainable layer is ``nn.Linear`` with bias on the raw input
        (:func:`dense_input_layer`), and the clients' loss (when known) is ``loss``."""
        dense_input_layer(setup.model, setup.input_shape)
        if setup.loss is not None and setup.loss != self.loss:
            raise ThreatModelError(
                f"analytic: requires the clients' loss to be its loss parameter "
                f"{self.loss!r}, but client.loss = {setup.loss!r}"
            )

    def check(self, obs: Observation) -> None:
        """:meth:`check_setup`, then refuse an update without that layer's weight and bias."""
        self.check_setup(Setup.of(obs))
        name = dense_input_layer(obs.model, obs.input_shape)
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
        if float(g_b.abs().max()) == 0.0:
            raise ThreatModelError(
                "analytic: every bias gradient of the first layer is zero; nothing to invert"
            )
        metrics: dict[str, float] = {"num_targets": float(n)}
        labels: torch.Tensor | None = None

        if n > 1 and self.demix != "off" and dense_classifier(obs):
            dense = dict(obs.fresh_model(device).named_modules())[name]
            res = demix_dense(
                g_w,
                g_b,
                dense.weight,
                dense.bias,
                n,
                iterations=self.demix_iterations,
                tol=self.demix_tol,
                memory=self.demix_memory,
                loss=self.loss,
            )
            picked, labels = res.x, res.labels
            aligned = True  # de-mixing returns each row with its own label
            metrics.update(
                demixed=1.0,
                cond_A=res.cond,
                iterations=float(res.iterations),
                change=res.change,
                residual=res.residual,
                bias_residual=res.bias_residual,
                converged=float(res.converged),
            )
        else:
            aligned = n == 1  # labels below come from the last layer, apart from the rows
            picked, confirmed = self._ratio(g_w, g_b, n, metrics)
            metrics["demixed"] = 0.0
            if n > 1 and self.demix != "off" and self.loss == "cross_entropy":
                grouped = picked.to(torch.float32).reshape(n, *obs.input_shape)
                labels = self._labels(obs, grads, grouped, n)
                refined = self._refine_deep(obs, grads, name, grouped, labels, confirmed, metrics)
                if refined is not None:
                    picked, labels = refined
        inputs = picked.to(torch.float32).reshape(n, *obs.input_shape)
        if labels is None:
            labels = self._labels(obs, grads, inputs, n)
        labels = labels.to(device=device, dtype=torch.int64)
        lower, upper = obs.input_bounds(inputs.device)
        # Not clamped: an exact recovery lies in the box (up to rounding), so values clearly
        # outside it are a sign of mixed rows.
        slack = 1e-4 * (upper - lower)
        outside = (inputs < lower - slack) | (inputs > upper + slack)
        metrics["out_of_bounds"] = float(outside.float().mean())
        metrics["seconds"] = time.perf_counter() - start
        log.debug("analytic: %s", metrics)
        return AttackResult(inputs=inputs, labels=labels, metrics=metrics, labels_per_input=aligned)

    def _ratio(
        self, g_w: torch.Tensor, g_b: torch.Tensor, n: int, metrics: dict[str, float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ratio candidates ``∇W_i / ∇b_i``: the best one (n = 1) or grouped (batches).

        Also returns, per returned row, whether it is *confirmed*: backed by at least two
        rows giving the same candidate (almost surely a single sample's exact input).
        """
        mag = g_b.abs()
        rows = torch.nonzero(mag > self.tol * mag.max()).flatten()
        rows = rows[torch.argsort(mag[rows], descending=True)]
        cands = g_w[rows] / g_b[rows, None]
        metrics["candidates"] = float(rows.numel())
        if n == 1:
            return cands[:1], torch.zeros(1, dtype=torch.bool)
        groups = self._group(cands)
        # Largest groups first; inside a size, the group whose best row has the largest |∂b|.
        groups.sort(key=lambda members: (-len(members), members[0]))
        chosen = [grp[0] for grp in groups[:n]]
        confirmed = [len(grp) > 1 for grp in groups[:n]]
        if len(chosen) < n:  # fewer candidates than samples: repeat the best ones
            reps = -(-n // len(chosen))
            chosen = (chosen * reps)[:n]
            confirmed = (confirmed + [False] * (len(confirmed) * (reps - 1)))[:n]
        metrics["groups"] = float(len(groups))
        metrics["largest_group"] = float(len(groups[0]))
        metrics["confirmed"] = float(sum(confirmed))
        picked = cands[torch.tensor(chosen, device=cands.device)]
        return picked, torch.tensor(confirmed, dtype=torch.bool)

    def _labels(
        self, obs: Observation, grads: list[torch.Tensor], inputs: torch.Tensor, n: int
    ) -> torch.Tensor:
        """Label multiset: bias counts with ``p̄`` from the reconstructions, else the sign rule."""
        if n == 1 or self.loss != "cross_entropy":
            return infer_labels(obs, grads, n)
        last_name, last = last_linear(obs.model)
        g_last = layer_grads(obs, grads, last_name)
        if last.bias is None or "bias" not in g_last or last.out_features != obs.num_classes:
            return infer_labels(obs, grads, n)
        model = obs.fresh_model(inputs.device).train()
        with torch.no_grad():
            p_mean = F.softmax(model(inputs).double(), dim=1).mean(0)
        counts, _ = bias_counts(g_last["bias"], p_mean, n)
        return counts_to_labels(counts)

    def _refine_deep(
        self,
        obs: Observation,
        grads: list[torch.Tensor],
        name: str,
        grouped: torch.Tensor,
        labels: torch.Tensor,
        confirmed: torch.Tensor,
        metrics: dict[str, float],
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """General fixed point for deeper models: ``A = ∂L/∂h``, ``X = (Aᵀ)⁺ ∇W``.

        ``h`` is the first layer's output; ``A`` (N, H) is computed by autograd through the
        rest of the network (float64 copy, train mode) at the current estimate and labels.
        Confirmed rows stay fixed; the others are re-solved from
        ``∇W - A_fixedᵀ X_fixed``; labels (the multiset ``labels``) are re-assigned to rows
        after each solve (:meth:`_assign`). The iterate with the smallest full-gradient
        residual ``‖∇θL(X, y) - g‖ / ‖g‖`` is kept (the loop stops after
        ``demix_iterations``, when ``‖ΔX‖/‖X‖ < demix_tol``, or after 5 iterations without
        a better residual); with ``demix="auto"`` it replaces the grouped estimate only if
        its residual is smaller. ``metrics`` gets ``residual_grouped``,
        ``residual_refined`` and ``refined`` (1 if used). Returns ``None`` (keep the
        grouping) when nothing is free or the last linear layer is not the classifier.
        """
        free = ~confirmed.to(grouped.device)
        last_name, last = last_linear(obs.model)
        if not bool(free.any()) or last.out_features != obs.num_classes:
            metrics["refined"] = 0.0
            return None
        model = obs.fresh_model(grouped.device).double().train()
        layer = dict(model.named_modules())[name]
        target = [t.double() for t in grads]
        g_w = layer_grads(obs, target, name)["weight"]
        g_last = layer_grads(obs, target, last_name)["weight"]
        shape = (grouped.shape[0], *obs.input_shape)
        counts = torch.bincount(labels.cpu(), minlength=obs.num_classes)

        def residual(x: torch.Tensor, y: torch.Tensor) -> float:
            g = model_gradients(model, x.reshape(shape), y.to(x.device), create_graph=False)
            num = sum(((a - b) ** 2).sum() for a, b in zip(g, target, strict=True))
            den = sum((b**2).sum() for b in target)
            return float(torch.sqrt(cast(torch.Tensor, num / den)))

        x = grouped.double().reshape(shape[0], -1)
        y = self._assign(model, x.reshape(shape), counts, g_last)
        start_res = residual(x, y)
        best = (start_res, x.clone(), y)
        store: dict[str, torch.Tensor] = {}
        hook = layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("h", out))
        stale = 0
        try:
            for _ in range(self.demix_iterations):
                loss = F.cross_entropy(model(x.reshape(shape)), y.to(x.device))
                a = torch.autograd.grad(loss, store["h"])[0].detach()
                rhs = g_w - a[~free].T @ x[~free]
                prev, x = x, x.clone()
                x[free] = solve_rows(a[free].T, rhs)
                y = self._assign(model, x.reshape(shape), counts, g_last)
                res = residual(x, y)
                change = float((x - prev).norm() / x.norm().clamp_min(EPS))
                if res < best[0]:
                    best, stale = (res, x.clone(), y), 0
                else:
                    stale += 1
                log.debug("analytic refine: residual %.3g change %.3g", res, change)
                if change < self.demix_tol or stale >= 5:
                    break
        finally:
            hook.remove()
        metrics["residual_grouped"] = start_res
        metrics["residual_refined"] = best[0]
        use = self.demix == "on" or best[0] < start_res
        metrics["refined"] = float(use)
        return (best[1], best[2]) if use else None

    @staticmethod
    @torch.no_grad()
    def _assign(
        model: nn.Module, x: torch.Tensor, counts: torch.Tensor, g_last: torch.Tensor
    ) -> torch.Tensor:
        """Give each row one label of the multiset ``counts`` (greedy on feature distance).

        With ``G`` the last layer's weight gradient and ``H`` its input features at ``x``,
        ``R = Pᵀ H - N G`` has row ``k`` equal to the sum of the features of the samples of
        class ``k``; row ``n`` goes to the class whose mean ``R_k / c_k`` is nearest its
        features, cheapest pairs first.
        """
        _, last = last_linear(model)
        feats: dict[str, torch.Tensor] = {}
        hook = last.register_forward_pre_hook(lambda _m, args: feats.__setitem__("h", args[0]))
        try:
            logits = model(x)
        finally:
            hook.remove()
        h = feats["h"].double().flatten(1)
        n = h.shape[0]
        r = F.softmax(logits.double(), dim=1).T @ h - n * g_last.double()
        counts = counts.clone().cpu()
        present = torch.nonzero(counts > 0).flatten()
        means = r[present.to(r.device)] / counts[present].to(r).unsqueeze(1)
        cost = torch.cdist(h, means).cpu()
        labels = torch.full((n,), -1, dtype=torch.int64)
        for flat in torch.argsort(cost.flatten()).tolist():
            row, col = divmod(flat, present.numel())
            cls = int(present[col])
            if labels[row] < 0 and counts[cls] > 0:
                labels[row], counts[cls] = cls, counts[cls] - 1
        return labels

    def _group(self, cands: torch.Tensor) -> list[list[int]]:
        """Greedy grouping of candidates (sorted by |∂b| descending) by relative distance."""
        return group_candidates(cands, self.group_tol)

"""iDLG: analytic label recovery plus gradient matching with the label fixed.

Zhao, Mopuri and Bilen, "iDLG: Improved Deep Leakage from Gradients" (arXiv:2001.02610,
2020), building on Zhu et al., "Deep Leakage from Gradients" (NeurIPS 2019).
"""

from __future__ import annotations

import logging
import math
import time
from typing import ClassVar

import torch

from adversaries.base import ATTACKS, Attack, AttackResult, Observation
from adversaries.reconstruction._common import (
    check_classifier,
    infer_labels,
    model_gradients,
    num_targets,
    random_init,
    target_gradient,
)

log = logging.getLogger(__name__)


@ATTACKS.register("idlg")
class IDLGAttack(Attack):
    """Label from the last layer's gradient, then L-BFGS gradient matching on the input.

    Threat model: honest-but-curious server seeing one client's update and knowing the
    architecture, the global parameters and the loss (mean softmax cross-entropy). The
    label rule is exact for one sample when the activations feeding the last linear layer
    are non-negative (sigmoid, ReLU): the true class is then the only row whose gradient is
    negative (``p_c - 1 < 0``). For a batch of ``B > 1`` the ``B`` most negative rows are
    returned, a heuristic (duplicate labels are not resolved).

    The input is then reconstructed by minimising ``Σ_l ‖∇_θ L(x', y) - g_l‖²`` over ``x'``
    only, with L-BFGS (``lr``, torch's default history) from an N(0, 1) start drawn from
    ``generator``; the iterate with the lowest matching loss is returned. For FedAvg
    observations the target ``g`` is ``-delta / (lr * local_steps)``, exact for one local
    step and an approximation for several.

    Parameters
    ----------
    iterations:
        Number of L-BFGS ``step`` calls, as in the reference code (each does up to torch's
        default of 20 inner iterations); ``0`` recovers labels only (``inputs`` is None).
    lr:
        L-BFGS learning rate (1.0 in the paper).
    """

    requires: ClassVar[tuple[str, ...]] = (
        "last nn.Linear outputs the class logits, fed non-negative activations",
        "loss is mean softmax cross-entropy",
        "update covers every trainable parameter",
    )

    def __init__(self, *, iterations: int = 300, lr: float = 1.0) -> None:
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        self.iterations = iterations
        self.lr = float(lr)

    def check(self, obs: Observation) -> None:
        """Refuse without a class-logit linear layer or with an incomplete update."""
        check_classifier(obs, "idlg")
        obs.gradient()

    def run(
        self, obs: Observation, *, device: torch.device, generator: torch.Generator
    ) -> AttackResult:
        """Recover labels and (unless ``iterations == 0``) inputs in the normalised space."""
        start = time.perf_counter()
        target = target_gradient(obs, device)
        n = num_targets(obs)
        labels = infer_labels(obs, target, n).to(device)
        if self.iterations == 0:
            return AttackResult(
                inputs=None, labels=labels, metrics={"seconds": time.perf_counter() - start}
            )

        model = obs.fresh_model(device).train()
        y = labels
        x = random_init((n, *obs.input_shape), generator=generator, device=device).requires_grad_(
            True
        )
        opt = torch.optim.LBFGS([x], lr=self.lr)
        best = {"loss": math.inf, "x": x.detach().clone()}
        evals = 0

        def closure() -> torch.Tensor:
            nonlocal evals
            opt.zero_grad()
            grads = model_gradients(model, x, y, create_graph=True)
            loss = sum(((g - t) ** 2).sum() for g, t in zip(grads, target, strict=True))
            value = float(loss.detach())
            evals += 1
            if math.isfinite(value) and value < best["loss"]:
                best["loss"], best["x"] = value, x.detach().clone()
            loss.backward(inputs=[x])
            return loss

        steps = 0
        for steps in range(1, self.iterations + 1):
            opt.step(closure)
            if not bool(torch.isfinite(x).all()):
                log.warning("idlg: L-BFGS diverged after %d steps; keeping the best iterate", steps)
                break
            if best["loss"] == 0.0:
                break
        metrics = {
            "final_loss": best["loss"],
            "iterations": float(steps),
            "evaluations": float(evals),
            "seconds": time.perf_counter() - start,
        }
        log.debug("idlg: %s", metrics)
        return AttackResult(inputs=best["x"], labels=labels, metrics=metrics)

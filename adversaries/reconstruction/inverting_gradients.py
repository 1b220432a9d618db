"""Inverting Gradients: cosine gradient matching with a total-variation prior.

Geiping, Bauermeister, Dröge and Moeller, "Inverting Gradients — How easy is it to break
privacy in federated learning?" (NeurIPS 2020, arXiv:2003.14053).
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
    total_variation,
)

log = logging.getLogger(__name__)


@ATTACKS.register("inverting_gradients")
class InvertingGradientsAttack(Attack):
    """Minimise ``1 - cos(∇_θ L(x, y), g) + tv_weight · TV(x)`` over the inputs ``x``.

    Threat model: honest-but-curious server seeing one client's update and knowing the
    architecture, the global parameters and the loss (mean softmax cross-entropy); the
    model is run in train mode, as on the client.

    As in the reference code, the cosine is taken once over the concatenation of all
    layers, ``TV(x) = mean|∂_x x| + mean|∂_y x|``, and Adam is fed the *sign* of the input
    gradient; the step size drops ×0.1 at 3/8, 5/8 and 7/8 of the iterations and after
    every step ``x`` is projected into :meth:`Observation.input_bounds`. Each of
    ``restarts`` runs starts from an N(0, 1) draw of ``generator``; the run with the lowest
    final objective is kept. Labels follow the iDLG rule (one sample) or the ``B`` most
    negative rows of the last layer (batches, heuristic).

    FedAvg observations are matched through :meth:`Observation.gradient`
    (``-delta / (lr * local_steps)``): exact for one local step, an approximation for
    several (the paper's unrolled FedAvg variant is not implemented here).

    Parameters
    ----------
    iterations:
        Adam steps per restart. The default, 300, has converged on 8×8 digits with
        ``lenet`` at batch size 1 (no gain from 1000) and takes about a second on a CPU;
        the paper uses 4800–24000 for CIFAR/ImageNet.
    lr:
        Adam step size (0.1 in the paper).
    tv_weight:
        Weight of the TV prior; default 1e-6, the reference value for its ConvNet. The
        cosine term's scale depends on the model: for the sigmoid ``lenet`` at PyTorch's
        default init the gradient barely moves with the input (cosine gaps ~1e-6), so
        the prior dominates. On 8×8 digits at batch size 1 the mean PSNR is 8.5 dB at
        1e-4 (the reference CLI default), 25 dB at 1e-6, 42 dB at 1e-7 and exact at 0.
        ReLU models (``mlp``, ``convnet``) reach >50 dB even at 1e-4. Raise it for
        larger natural images and deep nets (the paper uses up to 1e-1 on ImageNet).
    restarts:
        Independent random starts; the best by final objective is returned.
    """

    requires: ClassVar[tuple[str, ...]] = (
        "last nn.Linear outputs the class logits (for labels)",
        "loss is mean softmax cross-entropy",
        "update covers every trainable parameter",
    )

    def __init__(
        self, *, iterations: int = 300, lr: float = 0.1, tv_weight: float = 1e-6, restarts: int = 1
    ) -> None:
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if not (
            isinstance(tv_weight, (int, float)) and math.isfinite(tv_weight) and tv_weight >= 0
        ):
            raise ValueError(f"tv_weight must be a finite number >= 0, got {tv_weight!r}")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
        self.iterations = iterations
        self.lr = float(lr)
        self.tv_weight = float(tv_weight)
        self.restarts = restarts

    def check(self, obs: Observation) -> None:
        """Refuse without a class-logit linear layer or with an incomplete update."""
        check_classifier(obs, "inverting_gradients")
        obs.gradient()

    def run(
        self, obs: Observation, *, device: torch.device, generator: torch.Generator
    ) -> AttackResult:
        """Reconstruct ``num_targets(obs)`` inputs in the normalised input space."""
        start = time.perf_counter()
        target = target_gradient(obs, device)
        n = num_targets(obs)
        labels = infer_labels(obs, target, n).to(device)
        model = obs.fresh_model(device).train()
        y = labels
        lower, upper = obs.input_bounds(device)

        best_x, best_obj, objectives = None, math.inf, []
        for _ in range(self.restarts):
            x0 = random_init((n, *obs.input_shape), generator=generator, device=device)
            x, obj = self._optimise(model, x0, y, target, lower, upper)
            objectives.append(obj)
            if best_x is None or obj < best_obj:
                best_x, best_obj = x, obj
        metrics = {
            "final_loss": best_obj,
            "worst_restart_loss": max(objectives),
            "iterations": float(self.iterations),
            "restarts": float(self.restarts),
            "seconds": time.perf_counter() - start,
        }
        log.debug("inverting_gradients: %s", metrics)
        return AttackResult(inputs=best_x, labels=labels, metrics=metrics)

    def _objective(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, target: list[torch.Tensor]
    ) -> torch.Tensor:
        grads = model_gradients(model, x, y, create_graph=True)
        dot = sum((g * t).sum() for g, t in zip(grads, target, strict=True))
        norm_g = torch.sqrt(sum((g * g).sum() for g in grads))
        norm_t = torch.sqrt(sum((t * t).sum() for t in target))
        cos = dot / (norm_g * norm_t).clamp_min(torch.finfo(x.dtype).tiny)
        return 1.0 - cos + self.tv_weight * total_variation(x)

    def _optimise(
        self,
        model: torch.nn.Module,
        x0: torch.Tensor,
        y: torch.Tensor,
        target: list[torch.Tensor],
        lower: torch.Tensor,
        upper: torch.Tensor,
    ) -> tuple[torch.Tensor, float]:
        x = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=self.lr)
        milestones = sorted({int(self.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)})
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        for _ in range(self.iterations):
            opt.zero_grad(set_to_none=True)
            obj = self._objective(model, x, y, target)
            (grad,) = torch.autograd.grad(obj, x)
            x.grad = grad.sign()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, upper), lower))
        final = float(self._objective(model, x, y, target).detach())
        if not math.isfinite(final):
            final = math.inf
        return x.detach(), final

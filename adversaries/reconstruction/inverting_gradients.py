"""Inverting Gradients: cosine gradient matching with a total-variation prior.

Geiping, Bauermeister, Dröge and Moeller, "Inverting Gradients — How easy is it to break
privacy in federated learning?" (NeurIPS 2020, arXiv:2003.14053), including the paper's
FedAvg variant that unrolls the client's local SGD steps on the dummy data (Sec. 5,
``rec_mult.py`` / ``inversefed.reconstruction_algorithms.FedAvgReconstructor`` in the
reference code).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from adversaries.base import (
    ATTACKS,
    Attack,
    AttackResult,
    Observation,
    Setup,
    require_cross_entropy,
)
from adversaries.reconstruction._common import (
    LocalPlan,
    infer_labels,
    num_targets,
    random_init,
    target_gradient,
    total_variation,
)
from adversaries.reconstruction.dlg import class_logits_layer
from adversaries.reconstruction.label_search import (
    label_arrangements,
    ranked_labellings,
)
from fl_privsim.core.errors import ThreatModelError

log = logging.getLogger(__name__)

#: One iteration's work: ``(x, y) -> (gradient of the objective at x, its value)``.
_Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

#: Values of the ``variant`` parameter.
VARIANTS = ("auto", "fedsgd", "fedavg")
#: Values of the ``precision`` parameter: the dtype of the matching passes' matrix work.
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}
#: ``restarts="auto"`` on a plan with several mini-batches (FedAvg with several local steps,
#: or an aggregate of several clients); 1 otherwise.
AUTO_RESTARTS_UNROLLED = 2
#: A screened label arrangement is *plausible* when its screen loss is at most this multiple
#: of the best one's; restarts cycle through the plausible arrangements.
PLAUSIBLE_FACTOR = 10.0
#: Unrolled first-order evaluations the label screen may spend, per optimisation iteration,
#: when candidates are ``vmap``-batched (hundreds at once cost about one iteration on small
#: models); one evaluation per iteration when they run in turn (models with BatchNorm).
SCREEN_BUDGET_PER_ITERATION = 10


def _autograd_grads(
    loss_fn: Callable[[list[torch.Tensor]], torch.Tensor],
    params: list[torch.Tensor],
    create_graph: bool,
) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss_fn(params), params, create_graph=create_graph))


def _func_grads(
    loss_fn: Callable[[list[torch.Tensor]], torch.Tensor],
    params: list[torch.Tensor],
    create_graph: bool,
) -> list[torch.Tensor]:
    return list(torch.func.grad(loss_fn)(params))


def trajectory_gradient(
    model: nn.Module,
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    plan: LocalPlan,
    *,
    create_graph: bool = False,
    functional: bool = False,
) -> list[torch.Tensor]:
    """The gradient-like update ``-delta / (lr * local_steps)`` the plan produces on ``x``.

    Unrolls ``plan`` on the samples ``x`` (labels ``y``): client ``k``'s step ``i`` uses
    samples ``j = (k * local_steps + i) * batch_size + 0 .. batch_size - 1`` taken modulo
    ``len(x)`` (so fewer samples than slots are reused cyclically), with mean softmax
    cross-entropy and parameters updated out of place
    (``torch.func.functional_call``). Each client's delta is ``-lr * Σ_i g_i``
    (accumulated, so no cancellation against the weights); the clients' deltas are
    averaged with equal weights. The result, one tensor per name in ``names``, is the
    mean gradient along the trajectories: exactly the FedSGD gradient for one step.

    Parameters
    ----------
    model:
        The architecture (its own values of ``names`` are ignored; ``params`` replace them).
    names, params:
        Trainable parameter names and the global values to start from.
    x, y:
        Samples (N, C, H, W) in the normalised input space and int64 labels (N,).
    plan:
        The local training to simulate.
    create_graph:
        Keep the graph so the result can be differentiated with respect to ``x``.
    functional:
        Take the inner gradients with ``torch.func.grad`` (composable with
        ``torch.func.vmap``/``vjp``) instead of ``torch.autograd.grad``.
    """
    names = list(names)
    n = x.shape[0]
    grads_of = _func_grads if functional else _autograd_grads
    start = (
        list(params)
        if functional
        else [p if p.requires_grad else p.detach().requires_grad_(True) for p in params]
    )
    total: list[torch.Tensor] | None = None
    slot = 0
    for _ in range(plan.num_clients):
        delta: list[torch.Tensor] | None = None  # Σ of this client's gradients so far
        for _ in range(plan.local_steps):
            idx = torch.arange(slot, slot + plan.batch_size, device=x.device) % n
            slot += plan.batch_size
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            if delta is None:
                current = start
            else:
                current = [p - plan.lr * d for p, d in zip(start, delta, strict=True)]

            def loss_fn(
                ps: list[torch.Tensor], xb: torch.Tensor = xb, yb: torch.Tensor = yb
            ) -> torch.Tensor:
                out = functional_call(model, dict(zip(names, ps, strict=True)), (xb,))
                return F.cross_entropy(out, yb)

            g = grads_of(loss_fn, current, create_graph)
            delta = g if delta is None else [d + gi for d, gi in zip(delta, g, strict=True)]
        assert delta is not None
        total = delta if total is None else [t + d for t, d in zip(total, delta, strict=True)]
    assert total is not None
    scale = 1.0 / (plan.num_clients * plan.local_steps)
    return [t * scale for t in total]


def unrolled_delta(
    model: nn.Module,
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    plan: LocalPlan,
) -> dict[str, torch.Tensor]:
    """The weight delta (after minus before) of ``plan`` on ``(x, y)``, by name.

    ``-lr * local_steps * trajectory_gradient(...)``: what a FedAvg client (or the equal-weight
    average of ``num_clients`` of them) would send for these samples.
    """
    g = trajectory_gradient(model, names, params, x, y, plan)
    scale = -plan.lr * plan.local_steps
    return {name: (gi * scale).detach() for name, gi in zip(names, g, strict=True)}


class BatchStatNorm(nn.Module):
    """BatchNorm in training mode written with elementary ops: batch statistics, no buffers.

    ``(z - mean) / sqrt(var + eps) * weight + bias`` with the biased variance over every
    dimension except the channels (dimension 1): the forward pass of ``nn.BatchNormNd`` in
    train mode (Ioffe & Szegedy 2015), up to rounding. Holds the original module's
    ``weight``/``bias`` parameters under the same names. Unlike the native kernel, its
    double backward is plain autograd of elementwise ops, which ``torch.func.vmap`` can batch
    and which is cheaper on CPU than ``native_batch_norm``'s double backward.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.eps = float(bn.eps)
        self.weight = bn.weight
        self.bias = bn.bias

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, z.dim())]
        var, mean = torch.var_mean(z, dim=dims, keepdim=True, correction=0)
        out = (z - mean) * torch.rsqrt(var + self.eps)
        shape = [1, -1] + [1] * (z.dim() - 2)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out


def batch_stat_norm_(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm module of ``model`` (in place) by a :class:`BatchStatNorm`."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, BatchStatNorm(child))
        else:
            batch_stat_norm_(child)
    return model


def attack_model(obs: Observation, device: torch.device) -> nn.Module:
    """A private copy of the model in train mode whose BatchNorm layers always use batch statistics.

    The client trains in train mode, where BatchNorm normalises by the batch's statistics;
    the running statistics only change buffers, not the output. Each BatchNorm module is
    replaced by a :class:`BatchStatNorm` (the same forward pass, no buffers), so that the
    simulation neither mutates state nor breaks under ``vmap``; the forward pass is the
    client's.
    """
    model = obs.fresh_model(device).train()
    return batch_stat_norm_(model)


@ATTACKS.register("inverting_gradients")
class InvertingGradientsAttack(Attack):
    """Minimise ``1 - cos(u(x), u_obs) + tv_weight · TV(x)`` over the inputs ``x``.

    ``u`` is the update the client would produce on ``x``: its gradient (FedSGD, or the
    ``fedsgd`` approximation of a FedAvg update) or its unrolled local training (FedAvg).

    Threat model: honest-but-curious server seeing one client's update (or an aggregate)
    and knowing the architecture, the global parameters and the loss (mean softmax
    cross-entropy); the model is run in train mode, as on the client (BatchNorm uses batch
    statistics). The FedAvg variant also needs the client's declared local steps, learning
    rate and batch size, and assumes plain SGD with one fresh mini-batch per step.

    As in the reference code, the cosine is taken once over the concatenation of all
    layers, ``TV(x) = mean|∂_x x| + mean|∂_y x|``, and Adam is fed the *sign* of the input
    gradient; the step size drops ×0.1 at 3/8, 5/8 and 7/8 of the iterations and after
    every step ``x`` is projected into :meth:`Observation.input_bounds`. Each of
    ``restarts`` runs starts from an N(0, 1) draw of ``generator`` (drawn one restart
    after another); the run with the lowest final objective is kept.

    **Variants** (``variant="auto"`` picks by ``obs.protocol``):

    - ``fedsgd``: ``u(x)`` is the mean-loss gradient of all ``N = num_targets(obs)``
      dummies at once. On a FedAvg observation it is matched to ``Observation.gradient()``
      (``-delta / (lr * local_steps)``): exact for one local step, an approximation for
      several.
    - ``fedavg`` (FedAvg observations only): the paper's unrolled variant. ``u(x)`` is
      the weight delta of ``local_steps`` SGD steps with the declared ``obs.lr``, step
      ``i`` on dummies ``i*B .. (i+1)*B - 1`` (``B = obs.batch_size``), computed
      differentiably (functional parameters, ``create_graph``) and matched to the observed
      delta of the trainable parameters (buffers such as BatchNorm statistics are not
      used). ``N = num_targets(obs) = B * local_steps`` (capped by ``num_examples``; if
      capped, slots reuse dummies cyclically). For an aggregate of ``K = num_clients``
      clients, ``K`` clients with their own ``B * local_steps`` dummies each are simulated
      and their deltas averaged **with equal weights** (exact when the clients trained on
      equally many examples, as the aggregate's example weighting then is uniform).
      Labels: with one mini-batch (one local step, one client) the sign rule
      (:func:`infer_labels`) on ``-delta``, which is gradient-like. With several
      mini-batches, which label belongs to which step matters and is not observable: on
      8×8 digits with ``lenet``, 4 steps × 2 images, the right labels in the right steps
      give 20 dB (TV 1e-6), the right multiset in a random order 4 dB, below the 11.5 dB of
      the mean image, and the sign rule's multiset is wrong in 30 of 40 measured cases (it
      cannot count repeated labels; the bias counts alone are wrong in 5). So by default (``label_screen=True``) the labels come from a screen
      that needs no ground truth
      (:func:`~adversaries.reconstruction.label_search.ranked_labellings`): the bias-count
      multiset and its one-sample neighbours, then their arrangements over the steps, then
      a greedy local search, all scored by the cosine of the update the plan produces on
      fixed mean-colour dummies (one first-order unrolled pass per candidate, at most
      :data:`SCREEN_BUDGET_PER_ITERATION` × ``iterations`` of them, ``iterations`` for
      models with BatchNorm, whose candidates run in turn). Restart ``r`` takes
      the ``r``-th *plausible* arrangement (screen loss at most :data:`PLAUSIBLE_FACTOR`
      times the best), cyclically: a clear winner gets every restart, from different
      starts. ``label_screen=False`` restores the sign rule's labels, restart ``r`` on the
      ``r``-th distinct arrangement (:func:`label_arrangements`). (The reference code is
      given the true labels for multi-image runs.)

      Measured (``experiments/ig_fedavg_defaults.py --cases 16``: 16 clients, each a
      seeded default-init ``lenet`` and 8 train digits, 4 steps × batch 2, client lr 0.1):
      the defaults reach 20.0 dB mean PSNR (min 17.3), the mean image 11.5 dB; every
      client's labels came out in the right steps. Before the screen (one restart, the
      sign rule's labels in their order) 4.35 dB. ``tv_weight=0`` reaches 40.9 dB (min 22.8)
      on the same cases: the default TV weight (1e-6) costs precision on this overdetermined
      setting, as at batch size 1 (see ``tv_weight``).

    **Speed.** Each iteration does one forward, one ``create_graph`` backward and one
    vector–Jacobian product: the cosine's gradient with respect to the simulated update,
    ``v = -t̂/‖u‖ + cos · u/‖u‖²`` (``t̂`` the unit target, flattened and normalised once),
    is formed outside autograd and fed as ``grad_outputs`` of ``∂u/∂x`` (the same
    gradient as differentiating the cosine graph, without building it). The objective
    value comes from the same pass; the final objective of each restart costs one
    first-order pass. BatchNorm layers are evaluated as :class:`BatchStatNorm` (batch
    statistics from elementary ops: the client's train-mode forward pass, without buffers).
    With ``restarts > 1`` and ``batch_restarts=True`` the restarts run as one batched problem
    (``torch.func.vmap`` over the restarts of a ``torch.func`` formulation: separate
    problems with their own BatchNorm statistics, unlike stacking restarts into the batch
    dimension), which pays off where per-op overhead dominates.

    Measured against breaching's own loop (``experiments/benchmarks/bench_breaching.py``:
    its ConvNet with BatchNorm, ``convnet_bn``; CIFAR-10 test images; 4 restarts; 2 threads;
    CPU time on a shared 2-core AMD EPYC with ``OMP_WAIT_POLICY=PASSIVE``; see
    ``docs/methods/inverting_gradients.md``): ×1.03 in turn, ×1.14 with the defaults,
    ×1.21 with ``compile_step`` and ×1.59 with ``precision="bfloat16"`` at batch 1; ×1.00,
    ×0.99, ×1.23 and ×1.66 at batch 4. In float32 ours does the same floating-point work as
    the reference (the convolutions take about 80 % of it), so those gains are small;
    bfloat16 reached the same PSNR within 0.1 dB (CIFAR-10 images 0–2, 500 iterations:
    9.65 against 9.67 dB). ``experiments/benchmarks/bench_inverting.py``
    compares against a straightforward implementation on models without BatchNorm.

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
        Independent random starts; the best by final objective is returned. ``"auto"``
        (default): :data:`AUTO_RESTARTS_UNROLLED` (2) when the ``fedavg`` plan has several
        mini-batches (the image optimisation fails from some starts even with the right
        labels: 1 of 12 measured single starts stayed below 5 dB), else 1. With several mini-batches they also try
        the plausible label arrangements (see above).
    variant:
        ``"auto"`` (by ``obs.protocol``), ``"fedsgd"`` or ``"fedavg"`` (see above).
    batch_restarts:
        Run the restarts as one ``vmap``-batched problem (the same algorithm; results
        differ from running them in turn by rounding, which the sign of the gradient can
        amplify over many iterations). Models with BatchNorm batch too (each restart keeps
        its own batch statistics) when each step has one sample; with larger batches they
        run in turn, which was faster on CPU (see Speed).
    compile_step:
        Run each iteration's work (the ``torch.func`` form, batched or not) through
        ``torch.compile``: the same maths to float32 rounding, with the elementwise ops
        fused. Off by default: the compilation is paid on every :meth:`run` (see Speed).
    precision:
        ``"float32"`` (default) or ``"bfloat16"``: the iterations' matching passes (the
        simulated update and its vector–Jacobian product) run under ``torch.autocast`` in
        bfloat16, so convolutions and matrix products compute in bfloat16 (BatchNorm
        statistics, the cosine, TV, Adam and the final objective that picks the restart stay
        in float32). The input gradient changes by more than rounding (cosine 0.86–0.97 to the
        float32 one in ``tests/unit/test_inverting_precision.py``), but its sign, which the
        optimiser uses, mostly agrees. Pays on CPUs with AVX512-BF16/AMX and on GPUs; BatchNorm
        models then run their restarts in turn. See Speed for the measured speed and PSNR.
    label_screen:
        Screen label multisets and arrangements when the plan has several mini-batches
        (see **Variants**); ``False``: the sign rule's labels in their own order. Measured
        CPU cost of the screen on 8×8 digits, 4 steps × 2 images: about 1 s on ``lenet``,
        about 40 s on ``convnet`` (where it is also less sharp: right steps for 1 of 2
        clients).
    """

    requires: ClassVar[tuple[str, ...]] = (
        "last nn.Linear outputs the class logits (for labels)",
        "loss is mean softmax cross-entropy",
        "update covers every trainable parameter",
        (
            "fedavg variant: known local_steps >= 1, lr > 0 and batch_size >= 1; plain SGD, "
            "one fresh mini-batch per step; aggregates average clients with equal weights"
        ),
    )

    def __init__(
        self,
        *,
        iterations: int = 300,
        lr: float = 0.1,
        tv_weight: float = 1e-6,
        restarts: int | str = "auto",
        variant: str = "auto",
        batch_restarts: bool = True,
        label_screen: bool = True,
        compile_step: bool = False,
        precision: str = "float32",
    ) -> None:
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if not (
            isinstance(tv_weight, (int, float)) and math.isfinite(tv_weight) and tv_weight >= 0
        ):
            raise ValueError(f"tv_weight must be a finite number >= 0, got {tv_weight!r}")
        if restarts != "auto" and (
            isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1
        ):
            raise ValueError(f'restarts must be "auto" or an integer >= 1, got {restarts!r}')
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if not isinstance(batch_restarts, bool):
            raise ValueError(f"batch_restarts must be true or false, got {batch_restarts!r}")
        if not isinstance(label_screen, bool):
            raise ValueError(f"label_screen must be true or false, got {label_screen!r}")
        if not isinstance(compile_step, bool):
            raise ValueError(f"compile_step must be true or false, got {compile_step!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.iterations = iterations
        self.lr = float(lr)
        self.tv_weight = float(tv_weight)
        self.restarts = restarts
        self.variant = variant
        self.batch_restarts = batch_restarts
        self.compile_step = compile_step
        self.label_screen = label_screen
        self.precision = precision

    def resolved_restarts(self, plan: LocalPlan) -> int:
        """The number of restarts on ``plan``: ``restarts`` itself, or for ``"auto"``
        :data:`AUTO_RESTARTS_UNROLLED` when the plan has several mini-batches (whose label
        arrangement is a guess, and whose image optimisation fails from some starts), else 1."""
        if isinstance(self.restarts, int):
            return self.restarts
        return AUTO_RESTARTS_UNROLLED if plan.local_steps * plan.num_clients > 1 else 1

    # ------------------------------------------------------------------ threat model

    def resolved_variant(self, obs: Observation | Setup) -> str:
        """``"fedsgd"`` or ``"fedavg"``: the variant used on ``obs`` (or a run's ``Setup``)."""
        return obs.protocol if self.variant == "auto" else self.variant

    def check_setup(self, setup: Setup) -> None:
        """Refuse without a class-logit linear layer, with clients trained with another loss,
        or (FedAvg variant) without usable local-training metadata."""
        class_logits_layer(setup.model, setup.num_classes, "inverting_gradients")
        require_cross_entropy(setup, "inverting_gradients")
        if setup.protocol == "fedavg" and not (
            isinstance(setup.lr, (int, float)) and math.isfinite(setup.lr) and setup.lr > 0
        ):
            raise ThreatModelError(
                "inverting_gradients: requires the client's learning rate (lr > 0) of a FedAvg "
                f"update, to unroll its local steps or rescale its delta, but lr is {setup.lr!r}"
            )
        if self.resolved_variant(setup) != "fedavg":
            return
        if setup.protocol != "fedavg":
            raise ThreatModelError(
                "inverting_gradients: requires a FedAvg observation (a weight delta) for "
                f"variant 'fedavg', but the protocol is {setup.protocol!r}"
            )
        if setup.local_steps < 1:
            raise ThreatModelError(
                "inverting_gradients: requires the number of local steps (>= 1) to unroll a "
                f"FedAvg update (variant 'fedavg'), but local_steps is {setup.local_steps!r}"
            )
        if setup.batch_size < 1:
            raise ThreatModelError(
                "inverting_gradients: requires the client's batch size (>= 1) to unroll a "
                f"FedAvg update (variant 'fedavg'), but batch_size is {setup.batch_size!r}"
            )

    def check(self, obs: Observation) -> None:
        """:meth:`check_setup`, then refuse an update that lacks a trainable parameter."""
        self.check_setup(Setup.of(obs))
        missing = [name for name in obs.param_names() if name not in obs.update]
        if missing:
            raise ThreatModelError(
                "inverting_gradients: requires the update of every trainable parameter, but "
                f"it lacks {missing[:3]}"
            )

    def plan(self, obs: Observation) -> LocalPlan:
        """The local training simulated on the dummies for ``obs`` (after :meth:`check`)."""
        n = num_targets(obs)
        if self.resolved_variant(obs) == "fedavg":
            return LocalPlan(
                batch_size=obs.batch_size,
                local_steps=obs.local_steps,
                lr=float(obs.lr),
                num_clients=max(obs.num_clients, 1),
            )
        return LocalPlan(batch_size=n, local_steps=1, lr=1.0, num_clients=1)

    # ------------------------------------------------------------------ attack

    def run(
        self, obs: Observation, *, device: torch.device, generator: torch.Generator
    ) -> AttackResult:
        """Reconstruct ``num_targets(obs)`` inputs in the normalised input space."""
        start = time.perf_counter()
        target = target_gradient(obs, device)
        n = num_targets(obs)
        plan = self.plan(obs)
        problem = _Problem(
            obs, attack_model(obs, device), target, plan, self.tv_weight, PRECISIONS[self.precision]
        )
        restarts = self.resolved_restarts(plan)
        lower, upper = obs.input_bounds(device)
        x0 = [
            random_init((n, *obs.input_shape), generator=generator, device=device)
            for _ in range(restarts)
        ]
        ys, arrangements = self._labels(obs, target, problem, restarts, generator, device)
        if restarts > 1 and self.batch_restarts and problem.batches_well(plan):
            batched = self._optimise(
                self._compiled(torch.func.vmap(problem.functional_step)),
                torch.stack(x0),
                torch.stack(ys),
                lower,
                upper,
                leaf=False,
                foreach=True,
            )
            xs = list(batched.unbind(0))
        elif self.compile_step:
            step = self._compiled(problem.functional_step)
            xs = [
                self._optimise(step, x, y, lower, upper, leaf=False)
                for x, y in zip(x0, ys, strict=True)
            ]
        else:
            xs = [
                self._optimise(problem.step, x, y, lower, upper)
                for x, y in zip(x0, ys, strict=True)
            ]
        objectives = [problem.objective(x, y) for x, y in zip(xs, ys, strict=True)]
        best = min(range(len(xs)), key=lambda i: objectives[i])
        metrics = {
            "final_loss": objectives[best],
            "worst_restart_loss": max(objectives),
            "mean_restart_loss": sum(objectives) / len(objectives),
            "iterations": float(self.iterations),
            "restarts": float(restarts),
            "unrolled_steps": float(plan.local_steps),
            "label_arrangements": float(arrangements),
            "seconds": time.perf_counter() - start,
        }
        log.debug("inverting_gradients (%s): %s", self.resolved_variant(obs), metrics)
        return AttackResult(
            inputs=xs[best].detach().clone(),
            labels=ys[best].clone(),
            metrics=metrics,
            labels_per_input=True,
        )

    def _labels(
        self,
        obs: Observation,
        target: list[torch.Tensor],
        problem: _Problem,
        restarts: int,
        generator: torch.Generator,
        device: torch.device,
    ) -> tuple[list[torch.Tensor], int]:
        """The labels of each restart, and how many distinct arrangements they use.

        One mini-batch (FedSGD, one local step), or ``label_screen=False``: the sign rule's
        labels, and restart ``r`` the ``r``-th of :func:`label_arrangements`. Several
        mini-batches: :func:`~adversaries.reconstruction.label_search.ranked_labellings`
        screens multisets and arrangements on data-free dummies; restart ``r`` takes the
        ``r``-th *plausible* one (screen loss at most :data:`PLAUSIBLE_FACTOR` times the
        best), cyclically, so a clear winner gets every restart from different starts.
        """
        plan = problem.plan
        several = plan.local_steps * plan.num_clients > 1
        if not (self.label_screen and several and plan.samples == num_targets(obs)):
            labels = infer_labels(obs, target, num_targets(obs)).to(device)
            arrangements = label_arrangements(labels, plan, restarts, generator)
            return [arrangements[r % len(arrangements)] for r in range(restarts)], len(arrangements)

        ranked, losses = ranked_labellings(
            obs,
            target,
            problem.model,
            problem.simulate,
            problem.unit_target,
            plan,
            generator,
            budget=self.iterations * (1 if problem.has_batch_norm else SCREEN_BUDGET_PER_ITERATION),
            batched=not problem.has_batch_norm,
        )
        bound = float(losses[0]) * PLAUSIBLE_FACTOR
        plausible = [
            y.to(device)
            for i, (y, loss) in enumerate(zip(ranked, losses.tolist(), strict=True))
            if i == 0 or loss <= bound
        ][:restarts]
        return [plausible[r % len(plausible)] for r in range(restarts)], len(plausible)

    def _compiled(self, step: _Step) -> _Step:
        """``step`` through ``torch.compile`` when ``compile_step`` is set, else as is."""
        if not self.compile_step:
            return step
        return cast(_Step, torch.compile(step))

    def _schedule(self, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.MultiStepLR:
        milestones = sorted({int(self.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)})
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)

    def _optimise(
        self,
        step: _Step,
        x0: torch.Tensor,
        y: torch.Tensor,
        lower: torch.Tensor,
        upper: torch.Tensor,
        *,
        leaf: bool = True,
        foreach: bool | None = None,
    ) -> torch.Tensor:
        """Signed-gradient Adam with the step-decay schedule and the box projection.

        ``step(x, y)`` returns the objective's gradient at ``x`` (and its value); it gets
        the leaf ``x`` itself (``leaf=True``, :meth:`_Problem.step`) or a detached copy
        (the ``vmap``-batched :meth:`_Problem.functional_step`)."""
        x = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=self.lr, foreach=foreach)
        sched = self._schedule(opt)
        for _ in range(self.iterations):
            grad, _ = step(x if leaf else x.detach(), y)
            x.grad = grad.sign_()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, upper), lower))
        return x.detach()


class _Problem:
    """One observation's matching problem: objective value and input gradient."""

    def __init__(
        self,
        obs: Observation,
        model: nn.Module,
        target: list[torch.Tensor],
        plan: LocalPlan,
        tv_weight: float,
        low_precision: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.low_precision = low_precision
        named = dict(model.named_parameters())
        self.names = obs.param_names()
        self.params = [named[name].detach() for name in self.names]
        norm = torch.sqrt(cast(torch.Tensor, sum((t.double() ** 2).sum() for t in target)))
        self.unit_target = [
            t / norm.to(t.dtype).clamp_min(torch.finfo(t.dtype).tiny) for t in target
        ]
        self.plan = plan
        self.tv_weight = tv_weight
        self.tiny = torch.finfo(torch.float32).tiny
        self.has_batch_norm = any(isinstance(m, BatchStatNorm) for m in model.modules())
        self._v: list[torch.Tensor] | None = None  # reused buffers for the cosine's gradient

    def simulate(self, x: torch.Tensor, y: torch.Tensor, plan: LocalPlan) -> list[torch.Tensor]:
        """The update ``plan`` produces on ``x`` (labels ``y``) from the global parameters
        (:func:`trajectory_gradient`, functional: no graph kept)."""
        return trajectory_gradient(self.model, self.names, self.params, x, y, plan, functional=True)

    def batches_well(self, plan: LocalPlan) -> bool:
        """Whether ``vmap`` over restarts is worth it: always without BatchNorm; with
        BatchNorm only for one sample per step in float32 (``convnet_bn`` on CPU, 4 restarts:
        ×1.02–1.05 of the in-turn speed at batch 1, ×0.75 at batch 4; in bfloat16 ×0.86 at
        batch 1, ``bench_breaching.py``)."""
        if not self.has_batch_norm:
            return True
        return plan.batch_size == 1 and self.low_precision is None

    def _matching_precision(self, x: torch.Tensor) -> AbstractContextManager[object]:
        """Autocast to ``low_precision`` for the iterations' passes (``precision`` option);
        the final objective that picks the restart stays in float32."""
        if self.low_precision is None:
            return nullcontext()
        return torch.autocast(x.device.type, dtype=self.low_precision)

    def _update(
        self, x: torch.Tensor, y: torch.Tensor, *, create_graph: bool, functional: bool = False
    ) -> list[torch.Tensor]:
        """The simulated update at ``x``; the iterations' passes (``create_graph``) run in the
        ``precision`` option's dtype, the restart-picking objective in float32."""
        with self._matching_precision(x) if create_graph else nullcontext():
            return trajectory_gradient(
                self.model,
                self.names,
                self.params,
                x,
                y,
                self.plan,
                create_graph=create_graph,
                functional=functional,
            )

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the objective with respect to the leaf ``x`` (labels ``y``), and its value."""
        u = self._update(x, y, create_graph=True)
        with torch.no_grad():
            flat = [g.detach().reshape(-1) for g in u]
            dot = sum(
                torch.dot(g, t.reshape(-1)) for g, t in zip(flat, self.unit_target, strict=True)
            )
            norm = torch.sqrt(cast(torch.Tensor, sum(torch.dot(g, g) for g in flat))).clamp_min(
                self.tiny
            )
            cos = dot / norm
            if self._v is None:
                self._v = [torch.empty_like(g) for g in u]
            a, b = -1.0 / norm, cos / (norm * norm)
            for v, g, t in zip(self._v, u, self.unit_target, strict=True):
                torch.mul(g.detach(), b, out=v).addcmul_(t, a)
        pairs = [(g, v) for g, v in zip(u, self._v, strict=True) if g.requires_grad]
        if pairs:
            (grad,) = torch.autograd.grad(
                [g for g, _ in pairs], x, grad_outputs=[v for _, v in pairs], allow_unused=True
            )
            grad = torch.zeros_like(x) if grad is None else grad
        else:
            grad = torch.zeros_like(x)
        value = 1.0 - cos
        if self.tv_weight > 0:
            xt = x.detach().requires_grad_(True)
            tv = total_variation(xt)
            (gtv,) = torch.autograd.grad(tv, xt)
            grad = grad.add_(gtv, alpha=self.tv_weight)
            value = value + self.tv_weight * tv.detach()
        return grad, value

    def functional_step(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`step` in ``torch.func`` form (``x`` a plain tensor), for ``vmap``."""
        # torch.func.vjp is typed as a 2- or 3-tuple (has_aux); without has_aux it is 2
        u, vjp_fn = torch.func.vjp(  # type: ignore[misc]
            lambda z: self._update(z, y, create_graph=True, functional=True), x
        )
        flat = [g.reshape(-1) for g in u]
        dot = sum(g @ t.reshape(-1) for g, t in zip(flat, self.unit_target, strict=True))
        norm = torch.sqrt(sum(g @ g for g in flat)).clamp_min(self.tiny)
        cos = dot / norm
        a, b = -1.0 / norm, cos / (norm * norm)
        v = [torch.addcmul(g * b, t, a) for g, t in zip(u, self.unit_target, strict=True)]
        (grad,) = vjp_fn(v)
        value = 1.0 - cos
        if self.tv_weight > 0:
            gtv, tv = torch.func.grad_and_value(total_variation)(x)
            grad = grad + self.tv_weight * gtv
            value = value + self.tv_weight * tv
        return grad, value

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """``1 - cos + tv_weight · TV`` at ``x`` (one first-order pass); ``inf`` if not finite."""
        with torch.enable_grad():
            u = self._update(x.detach(), y, create_graph=False)
        with torch.no_grad():
            flat = torch.cat([g.reshape(-1) for g in u])
            t = torch.cat([t.reshape(-1) for t in self.unit_target])
            cos = torch.dot(flat, t) / flat.norm().clamp_min(self.tiny)
            value = float(1.0 - cos + self.tv_weight * total_variation(x.detach()))
        return value if math.isfinite(value) else math.inf

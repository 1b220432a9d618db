"""Inverting Gradients: the project's implementation against a straightforward one (not a test).

Usage::

    PYTHONPATH=. python experiments/benchmarks/bench_inverting.py \\
        [--model convnet] [--batch 1] [--restarts 4] [--iterations 100] [--reps 3] \\
        [--protocol fedsgd|fedavg] [--steps 2] [--threads 1]

Builds one client observation (CIFAR-10 images from ``../shared/data/cifar10`` when present,
else smooth random 3×32×32 images) with :func:`fl_privsim.engine.offline.client_observation`, then
runs, interleaved ``--reps`` times on the same observation, seed and iteration count:

- ``reference``: a straightforward implementation (below, self-contained): per restart, a
  Python loop over layers of ``create_graph`` ``torch.autograd.grad``, per-layer dot and norm
  sums, the autograd graph of the cosine differentiated again, restarts one after the
  other, and the final objective recomputed with a double-backward graph. For FedAvg it
  unrolls the local SGD steps the same way and matches the weight difference.
- ``project``: ``inverting_gradients`` as registered, with ``batch_restarts`` true
  (restarts as one ``vmap``-batched problem) and false (restarts in turn).

Both start from the same N(0, 1) draws of the same seeded generator and use the same
labels, schedule, sign-Adam and box projection: the same algorithm. Their first
iterations agree to rounding (``tests/unit/test_inverting_fedavg.py`` checks the gradient
to 1e-10 in float64), but the sign of the gradient turns float32 rounding differences into
different trajectories over hundreds of iterations, so individual restarts end at
different, statistically equivalent losses: compare the best/mean/worst over restarts.
(FedAvg with ``--restarts > 1``: the project's restarts ``r >= 1`` also try other label-to-
step assignments, the reference keeps the inferred order; the cost per iteration is the
same.) It
prints restart-iterations per second of CPU time of each (median over repetitions; CPU
time, because the machine is shared), their ratios and the final losses.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from adversaries import ATTACKS, Observation
from adversaries.reconstruction._common import (
    infer_labels,
    num_targets,
    target_gradient,
    total_variation,
)
from fl_privsim.core.models import build_model
from fl_privsim.engine.offline import client_observation

CIFAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10"


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
    """``n`` images in [0, 1], labels, and the per-channel mean/std."""
    if (CIFAR / "cifar10_exact_subset.npz").exists():
        from fl_privsim.core.data import load_dataset

        data = load_dataset("cifar10_npz", root=CIFAR)
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
        return data.images("train", idx), data.labels("train", idx), data.mean, data.std
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode="bilinear")
    return x, torch.randint(0, 10, (n,), generator=g), (0.5,) * 3, (0.25,) * 3


# ---------------------------------------------------------------- straightforward reference


def reference_update(model, names, params, x, y, obs, create_graph):
    """FedSGD: the gradient on all of ``x``. FedAvg: the unrolled weight difference."""
    if obs.protocol == "fedsgd":
        out = torch.func.functional_call(model, dict(zip(names, params)), (x,))
        return list(torch.autograd.grad(F.cross_entropy(out, y), params, create_graph=create_graph))
    b = obs.batch_size
    current = list(params)
    for i in range(obs.local_steps):
        out = torch.func.functional_call(
            model, dict(zip(names, current)), (x[i * b : (i + 1) * b],)
        )
        grads = torch.autograd.grad(
            F.cross_entropy(out, y[i * b : (i + 1) * b]), current, create_graph=True
        )
        current = [p - obs.lr * g for p, g in zip(current, grads)]
    return [c - p for c, p in zip(current, params)]


def reference_objective(model, names, params, x, y, obs, target, tv_weight):
    grads = reference_update(model, names, params, x, y, obs, create_graph=True)
    dot = sum((g * t).sum() for g, t in zip(grads, target))
    norm_g = torch.sqrt(sum((g * g).sum() for g in grads))
    norm_t = torch.sqrt(sum((t * t).sum() for t in target))
    cos = dot / (norm_g * norm_t).clamp_min(torch.finfo(x.dtype).tiny)
    return 1.0 - cos + tv_weight * total_variation(x)


def reference_attack(obs: Observation, *, iterations, lr, tv_weight, restarts, generator):
    """The straightforward implementation; returns the best, mean and worst final objectives."""
    model = obs.fresh_model("cpu").train()
    names = obs.param_names()
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    grad_like = target_gradient(obs, torch.device("cpu"))
    target = grad_like if obs.protocol == "fedsgd" else [obs.update[n].float() for n in names]
    n = num_targets(obs)
    y = infer_labels(obs, grad_like, n)
    lower, upper = obs.input_bounds("cpu")
    x0s = [torch.randn((n, *obs.input_shape), generator=generator) for _ in range(restarts)]
    finals = []
    milestones = sorted({int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)})
    for x0 in x0s:
        x = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        for _ in range(iterations):
            opt.zero_grad(set_to_none=True)
            obj = reference_objective(model, names, params, x, y, obs, target, tv_weight)
            (grad,) = torch.autograd.grad(obj, x)
            x.grad = grad.sign()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, upper), lower))
        final = float(
            reference_objective(model, names, params, x, y, obs, target, tv_weight).detach()
        )
        finals.append(final if math.isfinite(final) else math.inf)
    return min(finals), sum(finals) / len(finals), max(finals)


# ---------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--batch", type=int, default=1, help="images per step")
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--protocol", choices=("fedsgd", "fedavg"), default="fedsgd")
    parser.add_argument("--steps", type=int, default=2, help="local steps (fedavg)")
    parser.add_argument("--local-lr", type=float, default=1e-2, help="client lr (fedavg)")
    parser.add_argument("--tv-weight", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    steps = args.steps if args.protocol == "fedavg" else 1
    raw, labels, mean, std = images(args.batch * steps, args.seed)
    x = (raw - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    torch.manual_seed(args.seed)
    model = build_model(args.model, (3, 32, 32), 10).train()
    b = args.batch
    batches = [(x[i * b : (i + 1) * b], labels[i * b : (i + 1) * b]) for i in range(steps)]
    obs = client_observation(
        model, batches, protocol=args.protocol, lr=args.local_lr, mean=mean, std=std, num_classes=10
    )
    common = {
        "iterations": args.iterations,
        "lr": 0.1,
        "tv_weight": args.tv_weight,
        "restarts": args.restarts,
    }

    def run_reference() -> tuple[float, float, float]:
        return reference_attack(obs, generator=torch.Generator().manual_seed(args.seed), **common)

    def run_project(batch_restarts: bool):
        attack = ATTACKS.create("inverting_gradients", batch_restarts=batch_restarts, **common)

        def run() -> tuple[float, float, float]:
            metrics = attack(obs, generator=torch.Generator().manual_seed(args.seed)).metrics
            return (
                metrics["final_loss"],
                metrics["mean_restart_loss"],
                metrics["worst_restart_loss"],
            )

        return run

    runs = {
        "reference": run_reference,
        "project_batched": run_project(True),
        "project_sequential": run_project(False),
    }
    if args.restarts == 1:
        del runs["project_batched"]  # the same code path as sequential
    speed: dict[str, list[float]] = defaultdict(list)
    loss: dict[str, tuple[float, float, float]] = {}
    print(
        f"model={args.model} protocol={args.protocol} batch={args.batch} steps={steps} "
        f"restarts={args.restarts} iterations={args.iterations} threads={args.threads} "
        f"images={'cifar10' if (CIFAR / 'cifar10_exact_subset.npz').exists() else 'synthetic'}"
    )
    for rep in range(args.reps):
        for name, fn in runs.items():
            start = time.process_time()
            loss[name] = fn()
            seconds = time.process_time() - start
            speed[name].append(args.iterations * args.restarts / seconds)
            print(
                f"  rep {rep}: {name:19s} {speed[name][-1]:8.2f} restart-it/s (CPU)  "
                "final loss best/mean/worst " + " / ".join(f"{v:.4g}" for v in loss[name])
            )
    ref = statistics.median(speed["reference"])
    print(
        "median restart-iterations per CPU second, ratio to the reference, final loss (best/mean/worst restart):"
    )
    for name in runs:
        med = statistics.median(speed[name])
        print(
            f"  {name:19s} {med:8.2f} it/s  x{med / ref:5.2f}  "
            "final loss " + " / ".join(f"{v:.4g}" for v in loss[name])
        )


if __name__ == "__main__":
    main()

"""Inverting Gradients: ours against breaching's reference loop on its BatchNorm ConvNet (not a test).

Usage::

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python experiments/benchmarks/bench_breaching.py \\
        [--batches 1,4] [--restarts 4] [--iterations 5] [--reps 2] [--threads 2] \\
        [--no-compile] [--psnr-images 0,1,2] [--psnr-iterations 2000] \\
        [--psnr-budgets 100,250,500] [--psnr-precisions float32,bfloat16] [--skip-speed]

(``OMP_WAIT_POLICY=PASSIVE``: on a shared, oversubscribed machine, OpenMP threads that spin
while waiting for a descheduled sibling are counted as CPU time; passive waiting keeps CPU
time a measure of the work. Numbers quoted in ``docs/methods/inverting_gradients.md``.)

Model: ``convnet_bn`` (breaching's / inversefed's ``ConvNet(width=64)`` with BatchNorm),
random init seeded with ``--seed``, train mode. Images: CIFAR-10 test images ``0 .. k-1``
from ``../shared/data/cifar10`` (the exact subset's test split holds the official test
images 0..9 in order). One client observation per setting, FedSGD, built by
:func:`fl_privsim.engine.offline.client_observation`.

``reference`` reimplements, self-contained, the optimisation loop of breaching's
``OptimizationBasedAttacker`` (inversefed's ``GradientReconstructor``; Geiping et al.,
NeurIPS 2020) without depending on breaching: for each restart in turn, a private copy of
the model in train mode (native BatchNorm, running statistics updated as a side effect),
every iteration the task loss on the candidate, ``torch.autograd.grad(create_graph=True)``
over all parameters, ``1 - cos`` over all layers concatenated plus ``tv_weight · TV``,
``backward(inputs=candidate)``, the gradient's sign, Adam (lr 0.1), ``MultiStepLR`` with
milestones ``N // 2.667, N // 1.6, N // 1.142`` (3/8, 5/8, 7/8) and ×0.1, the box
projection; the restart with the lowest recomputed objective wins.
``ours_*`` is ``inverting_gradients`` as registered: ``ours_in_turn`` with ``batch_restarts``
false (restarts in turn), ``ours_default`` with true (one ``vmap``-batched problem; BatchNorm
models do this only at batch 1 and run in turn at larger batches, see
``_Problem.batches_well``), ``ours_compiled`` the default with ``compile_step`` true
(``torch.compile`` of each iteration's work; a first, untimed run fills inductor's cache and
its time is printed; each timed run still recompiles from that cache, which it pays). Both start from the same N(0, 1) draws of the
same seeded generator (one draw per restart, in order) and use the same labels (the
sign rule on the observed gradient), TV definition, schedule and box.

Part 1 (speed): for each batch size, ``--reps`` interleaved repetitions of
``--iterations`` iterations × ``--restarts``; prints restart-iterations per CPU second
(``time.process_time``; the machine is shared) of each, median over repetitions, and the
ratio to the reference. Each timed run includes its own set-up and final scoring.

Part 2 (PSNR per iteration budget, skipped with ``--psnr-iterations 0``): for each image of
``--psnr-images`` (batch 1), the reference runs ``--psnr-iterations`` iterations once
(its PSNR along the way is printed at the budgets, for orientation: a shorter run would
decay its step size earlier), ours runs once per budget of ``--psnr-budgets`` (each a full
run with the schedule scaled to that budget). PSNR of the best restart in [0, 1] pixel
space after clamping. Prints the smallest budget at which ours reaches the reference's
final PSNR (mean over images and per image).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
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
from fl_privsim.core.data import load_dataset
from fl_privsim.core.metrics import psnr
from fl_privsim.core.models import build_model
from fl_privsim.engine.offline import client_observation

CIFAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10"


def cifar_test(indices: list[int]):
    """CIFAR-10 test images ``indices`` in [0, 1], their labels, and the dataset mean/std."""
    data = load_dataset("cifar10_npz", root=CIFAR)
    return data.images("test", indices), data.labels("test", indices), data.mean, data.std


def observe(indices: list[int], seed: int) -> tuple[Observation, torch.Tensor]:
    """FedSGD observation of ``convnet_bn`` (seeded init) on test images ``indices``."""
    raw, labels, mean, std = cifar_test(indices)
    x = (raw - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    torch.manual_seed(seed)
    model = build_model("convnet_bn", (3, 32, 32), 10).train()
    obs = client_observation(
        model, [(x, labels)], protocol="fedsgd", lr=1.0, mean=mean, std=std, num_classes=10
    )
    return obs, raw


# ---------------------------------------------------------------- breaching's loop


def _cosine_objective(model, params, x, y, target, tv_weight, create_graph):
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    dot = sum((g * t).sum() for g, t in zip(grads, target))
    norm_g = sum(g.pow(2).sum() for g in grads).sqrt()
    norm_t = sum(t.pow(2).sum() for t in target).sqrt()
    return 1.0 - dot / (norm_g * norm_t) + tv_weight * total_variation(x)


def reference_attack(
    obs: Observation,
    *,
    iterations: int,
    tv_weight: float,
    restarts: int,
    generator: torch.Generator,
    lr: float = 0.1,
    checkpoints: tuple[int, ...] = (),
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Breaching's optimisation loop; the best restart's input and best inputs at checkpoints."""
    target = target_gradient(obs, torch.device("cpu"))
    n = num_targets(obs)
    y = infer_labels(obs, target, n)
    lower, upper = obs.input_bounds("cpu")
    x0s = [torch.randn((n, *obs.input_shape), generator=generator) for _ in range(restarts)]
    milestones = [int(iterations // 2.667), int(iterations // 1.6), int(iterations // 1.142)]
    finals, losses = [], []
    along: dict[int, list[tuple[float, torch.Tensor]]] = defaultdict(list)
    for x0 in x0s:
        model = obs.fresh_model("cpu").train()
        params = list(model.parameters())
        candidate = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([candidate], lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)

        def closure(candidate=candidate, model=model, params=params, opt=opt) -> torch.Tensor:
            opt.zero_grad()
            obj = _cosine_objective(model, params, candidate, y, target, tv_weight, True)
            obj.backward(inputs=[candidate])
            candidate.grad.sign_()
            return obj

        for it in range(1, iterations + 1):
            opt.step(closure)
            sched.step()
            with torch.no_grad():
                candidate.data = torch.max(torch.min(candidate, upper), lower)
            if it in checkpoints:
                obj = _cosine_objective(model, params, candidate, y, target, tv_weight, False)
                obj = obj.detach()
                along[it].append((float(obj), candidate.detach().clone()))
        final = _cosine_objective(model, params, candidate, y, target, tv_weight, False).detach()
        losses.append(float(final) if torch.isfinite(final) else float("inf"))
        finals.append(candidate.detach().clone())
    best = min(range(restarts), key=lambda i: losses[i])
    at = {it: min(v, key=lambda p: p[0])[1] for it, v in along.items()}
    return finals[best], at


def ours_attack(
    obs: Observation,
    *,
    iterations: int,
    tv_weight: float,
    restarts: int,
    generator: torch.Generator,
    batch_restarts: bool,
    compile_step: bool = False,
    precision: str = "float32",
) -> torch.Tensor:
    attack = ATTACKS.create(
        "inverting_gradients",
        iterations=iterations,
        lr=0.1,
        tv_weight=tv_weight,
        restarts=restarts,
        batch_restarts=batch_restarts,
        compile_step=compile_step,
        precision=precision,
    )
    return attack(obs, generator=generator).inputs


def image_psnr(obs: Observation, x: torch.Tensor, truth01: torch.Tensor) -> float:
    """PSNR (dB) of one reconstructed image (batch 1) in [0, 1] after clamping."""
    mean = torch.tensor(obs.data_mean).view(1, -1, 1, 1)
    std = torch.tensor(obs.data_std).view(1, -1, 1, 1)
    rec = (x.detach() * std + mean).clamp(0, 1)
    return float(psnr(rec, truth01).mean())


# ---------------------------------------------------------------- driver


def speed(args: argparse.Namespace) -> None:
    for batch in args.batches:
        speed_one(batch, args)


def speed_one(batch: int, args: argparse.Namespace) -> None:
    """Interleaved speed runs of the reference and ours on test images ``0 .. batch-1``."""
    obs, _ = observe(list(range(batch)), args.seed)
    common = {"iterations": args.iterations, "tv_weight": args.tv_weight, "restarts": args.restarts}

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(args.seed)

    runs: dict[str, Callable[[], object]] = {
        "reference": lambda: reference_attack(obs, generator=gen(), **common),
        "ours_in_turn": lambda: ours_attack(obs, generator=gen(), batch_restarts=False, **common),
        "ours_default": lambda: ours_attack(obs, generator=gen(), batch_restarts=True, **common),
        "ours_compiled": lambda: ours_attack(
            obs, generator=gen(), batch_restarts=True, compile_step=True, **common
        ),
        "ours_bfloat16": lambda: ours_attack(
            obs, generator=gen(), batch_restarts=True, precision="bfloat16", **common
        ),
    }
    print(
        f"speed: convnet_bn batch={batch} restarts={args.restarts} "
        f"iterations={args.iterations} threads={args.threads}",
        flush=True,
    )
    if args.no_compile:
        del runs["ours_compiled"]
    else:  # the first compilation fills inductor's cache; later runs recompile from it
        wall, cpu = time.perf_counter(), time.process_time()
        runs["ours_compiled"]()
        print(
            f"  ours_compiled first run (compiles): {time.perf_counter() - wall:.1f} s wall, "
            f"{time.process_time() - cpu:.1f} CPU-s in this process",
            flush=True,
        )
    rate: dict[str, list[float]] = defaultdict(list)
    for rep in range(args.reps):
        for name, fn in runs.items():
            start = time.process_time()
            fn()
            seconds = time.process_time() - start
            rate[name].append(args.iterations * args.restarts / seconds)
            print(f"  rep {rep}: {name:13s} {rate[name][-1]:7.3f} restart-it/CPU-s", flush=True)
    ref = statistics.median(rate["reference"])
    for name in runs:
        med = statistics.median(rate[name])
        print(f"  median {name:13s} {med:7.3f} restart-it/CPU-s  x{med / ref:5.2f}", flush=True)


def psnr_budgets(args: argparse.Namespace) -> None:
    budgets = sorted(set(args.psnr_budgets))
    checkpoints = tuple(b for b in budgets if b < args.psnr_iterations)
    ref_final: list[float] = []
    ours: dict[tuple[str, int], list[float]] = defaultdict(list)
    ref_along: dict[int, list[float]] = defaultdict(list)
    print(
        f"psnr: convnet_bn batch=1 restarts={args.restarts} tv_weight={args.tv_weight} "
        f"reference {args.psnr_iterations} iterations, ours at budgets {budgets} "
        f"in {', '.join(args.psnr_precisions)}",
        flush=True,
    )
    for index in args.psnr_images:
        obs, truth = observe([index], args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        start = time.process_time()
        x_ref, at = reference_attack(
            obs,
            iterations=args.psnr_iterations,
            tv_weight=args.tv_weight,
            restarts=args.restarts,
            generator=gen,
            checkpoints=checkpoints,
        )
        ref_final.append(image_psnr(obs, x_ref, truth))
        for it, x in at.items():
            ref_along[it].append(image_psnr(obs, x, truth))
        along = ", ".join(f"{it}: {ref_along[it][-1]:.2f}" for it in sorted(at))
        print(
            f"  image {index}: reference {args.psnr_iterations} it: {ref_final[-1]:.2f} dB "
            f"({time.process_time() - start:.0f} CPU-s; along the run {along})",
            flush=True,
        )
        for precision in args.psnr_precisions:
            for b in budgets:
                start = time.process_time()
                x = ours_attack(
                    obs,
                    iterations=b,
                    tv_weight=args.tv_weight,
                    restarts=args.restarts,
                    generator=torch.Generator().manual_seed(args.seed),
                    batch_restarts=args.psnr_batched,
                    precision=precision,
                )
                ours[precision, b].append(image_psnr(obs, x, truth))
                print(
                    f"  image {index}: ours ({precision}) {b} it: "
                    f"{ours[precision, b][-1]:.2f} dB ({time.process_time() - start:.0f} CPU-s)",
                    flush=True,
                )
    ref_mean = statistics.mean(ref_final)
    print(f"reference after {args.psnr_iterations} iterations: mean {ref_mean:.2f} dB")
    for it in sorted(ref_along):
        print(f"  reference along its run at {it}: mean {statistics.mean(ref_along[it]):.2f} dB")
    for precision in args.psnr_precisions:
        reached = None
        for b in budgets:
            mean = statistics.mean(ours[precision, b])
            print(f"  ours ({precision}) with a budget of {b}: mean {mean:.2f} dB")
            if reached is None and mean >= ref_mean:
                reached = b
        print(
            f"iterations ours ({precision}) needs to reach the reference's mean PSNR: "
            + (f"{reached}" if reached is not None else f"not reached within {budgets[-1]}")
        )


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=_ints, default=[1, 4], help="batch sizes (speed)")
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=5, help="iterations (speed)")
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions (speed)")
    parser.add_argument("--tv-weight", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="leave out ours_compiled")
    parser.add_argument("--psnr-images", type=_ints, default=[0, 1, 2])
    parser.add_argument(
        "--psnr-iterations", type=int, default=0, help="reference budget (0: no PSNR part)"
    )
    parser.add_argument("--psnr-budgets", type=_ints, default=[100, 250, 500])
    parser.add_argument(
        "--psnr-precisions",
        type=lambda text: [v.strip() for v in text.split(",") if v.strip()],
        default=["float32"],
        help="ours' precision option(s) in the PSNR part (float32, bfloat16)",
    )
    parser.add_argument(
        "--psnr-batched", action="store_true", help="ours with batch_restarts in the PSNR part"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (CIFAR / "cifar10_exact_subset.npz").exists():
        raise SystemExit(f"needs CIFAR-10 at {CIFAR} (cifar10_exact_subset.npz)")
    if not args.skip_speed:
        speed(args)
    if args.psnr_iterations > 0:
        psnr_budgets(args)


if __name__ == "__main__":
    main()

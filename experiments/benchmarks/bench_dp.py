"""DP overhead per local step: undefended vs ``dynamic_dp`` vs ``dp_sgd`` (not a test).

Usage: ``PYTHONPATH=. python experiments/benchmarks/bench_dp.py [--reps 7] [--batch 32]``.

For each model (mlp, convnet) on MNIST-shaped random inputs (1×28×28, 10 classes), one FedAvg
local update of ``--steps`` steps is timed per variant; variants are interleaved within each
repetition (so drifting machine load hits all alike) and timed in CPU seconds of this process
(``time.process_time``, one torch thread). The median per step and the ratio to the undefended
step are logged. ``dynamic_dp`` computes per-sample gradients with ``torch.func.vmap``,
``dp_sgd`` with Opacus' ``GradSampleModule`` hooks + ``DPOptimizer``; both also pay clipping,
noise and (once per update) the RDP accounting.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from clients.defenses import build_defenses
from clients.local_update import local_update
from fl_privsim.core.models import build_model

log = logging.getLogger("bench_dp")

VARIANTS: dict[str, list[dict]] = {
    "undefended": [],
    "dynamic_dp": [{"name": "dynamic_dp", "params": {"schedule": "linear", "clipping": "fixed"}}],
    "dp_sgd": [{"name": "dp_sgd", "params": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}],
}


def time_update(model_name: str, variant: str, batches: list, seed: int) -> float:
    """CPU seconds per local step of one FedAvg update (fresh model and defenses)."""
    model = build_model(model_name, (1, 28, 28), 10)
    defenses = build_defenses(VARIANTS[variant])
    start = time.process_time()
    res = local_update(
        model,
        batches,
        protocol="fedavg",
        lr=0.05,
        defenses=defenses,
        generator=torch.Generator().manual_seed(seed),
        server_round=1,
        dataset_size=6000,
    )
    res.metrics  # noqa: B018  (ε is computed inside local_update already)
    return (time.process_time() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions")
    parser.add_argument("--steps", type=int, default=5, help="local steps per timed update")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch, 1, 28, 28, generator=gen),
            torch.randint(0, 10, (args.batch,), generator=gen),
        )
        for _ in range(args.steps)
    ]
    log.info(
        "%-8s %-11s %10s %8s   (B=%d, %d steps, %d reps, CPU ms per step, median)",
        "model",
        "variant",
        "ms/step",
        "ratio",
        args.batch,
        args.steps,
        args.reps,
    )
    for model_name in ("mlp", "convnet"):
        for v in VARIANTS:  # warm-up (lazy imports, allocator)
            time_update(model_name, v, batches[:1], 0)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for rep in range(args.reps):
            for v in VARIANTS:
                times[v].append(time_update(model_name, v, batches, rep))
        base = statistics.median(times["undefended"])
        for v, ts in times.items():
            med = statistics.median(ts)
            log.info("%-8s %-11s %10.2f %8.2f", model_name, v, 1e3 * med, med / base)


if __name__ == "__main__":
    main()

"""Seconds for the I²F lower bound of one sample (not a test).

Usage: ``PYTHONPATH=. python experiments/benchmarks/bench_i2f.py [--reps 3] [--models lenet,convnet,resnet18]``.

For each model on random inputs of its dataset's shape (LeNet: MNIST 1×28×28; ConvNet and
ResNet-18: CIFAR 3×32×32; 10 classes; default init; train mode, as a client computes its
gradient), one sample's lower bound ``‖Jδ‖/λ_max(JJᵀ)`` (Zhang et al., NeurIPS 2023) is timed
end to end: the forward pass and first-order gradients with ``create_graph``, Lanczos
(scipy ``eigsh``, tol 1e-6) for ``λ_max``, and ``Jδ`` for one Gaussian δ (σ² = 1e-3). One
torch thread; wall-clock and CPU seconds of this process (``time.process_time``), median over
``--reps``; also the number of ``JJᵀv`` products Lanczos needed.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time

import torch

from adversaries.measures.i2f import (
    InversionJacobian,
    i2f_for_operator,
    max_eigenvalue,
    sample_noise,
)
from fl_privsim.core.models import build_model

log = logging.getLogger("bench_i2f")

SHAPES = {
    "lenet": (1, 28, 28),
    "convnet": (3, 32, 32),
    "resnet18": (3, 32, 32),
    "mlp": (1, 28, 28),
    "cnn6": (3, 32, 32),
}


def time_lower_bound(name: str, seed: int) -> tuple[float, float, int, float]:
    """(wall s, CPU s, Gram products, lower bound) for one sample on a fresh model."""
    shape = SHAPES[name]
    torch.manual_seed(seed)
    model = build_model(name, shape, 10)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *shape, generator=g)
    y = torch.randint(0, 10, (1,), generator=g)
    wall, cpu = time.perf_counter(), time.process_time()
    op = InversionJacobian(model, x, y)
    calls = 0
    inner_in, inner_par = op.gram_input, op.gram_param

    def count_in(v: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return inner_in(v)

    def count_par(v: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return inner_par(v)

    op.gram_input, op.gram_param = count_in, count_par  # type: ignore[method-assign]
    lam = max_eigenvalue(op, generator=g)
    delta = sample_noise("gaussian", math.sqrt(1e-3), op.d_theta, generator=g)
    res = i2f_for_operator(op, delta, lambda_max=lam, exact=False)
    return time.perf_counter() - wall, time.process_time() - cpu, calls, res.lower_bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--models", default="lenet,convnet,resnet18")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    for name in args.models.split(","):
        runs = [time_lower_bound(name, seed) for seed in range(args.reps)]
        log.info(
            "%-9s %s  wall %.2f s  cpu %.2f s (median of %d)  JJᵀv products %s  I2F_lb %s",
            name,
            "×".join(map(str, SHAPES[name])),
            statistics.median(r[0] for r in runs),
            statistics.median(r[1] for r in runs),
            args.reps,
            [r[2] for r in runs],
            [f"{r[3]:.3g}" for r in runs],
        )


if __name__ == "__main__":
    main()

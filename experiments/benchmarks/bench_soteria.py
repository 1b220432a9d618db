"""Soteria's cost per FedSGD step and the Hutchinson mask's agreement with the exact one.

Usage (from the repository root)::

    PYTHONPATH=. python experiments/benchmarks/bench_soteria.py [--reps 15] [--seeds 10]

**Cost.** For ``mlp`` and ``lenet`` on ``digits`` (1×8×8, 10 classes), one FedSGD gradient of a
batch of 16 training images (:func:`clients.local_update.local_update`) undefended, with
``soteria`` (ratio 0.8) ``method="exact"`` and with ``method="hutchinson"`` (32 probes). The
variants are interleaved within each repetition (drifting load hits all alike) and timed in
CPU seconds of this process (``time.process_time``, one torch thread); the median over
``--reps`` and the ratio to the undefended step are printed.

**Agreement.** On ``lenet``/``digits`` (the defended layer has 48 input elements), batch 16,
ratio 0.8: for each of ``--seeds`` random models and batches, the share of the 48 columns where
the Hutchinson mask (32 and 256 probes) equals the exact mask; mean and range over the seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from clients.defenses import build_defenses
from clients.defenses.base import TrainingInfo
from clients.defenses.soteria import Soteria
from clients.local_update import local_update
from fl_privsim.core.data import load_dataset
from fl_privsim.core.models import build_model
from fl_privsim.core.seeding import seed_int, torch_generator

BATCH = 16
VARIANTS: dict[str, list[dict]] = {
    "undefended": [],
    "exact": [{"name": "soteria", "params": {"pruning_ratio": 0.8, "method": "exact"}}],
    "hutchinson": [{"name": "soteria", "params": {"pruning_ratio": 0.8, "method": "hutchinson"}}],
}


def batch(data, seed: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded batch of ``BATCH`` normalised digits training images and their labels."""
    idx = torch.randperm(len(data), generator=torch_generator(seed, "batch", key))[:BATCH]
    return data.normalize(data.images("train", idx)), data.labels("train", idx)


def model(name: str, data, seed: int, key: int) -> torch.nn.Module:
    """A freshly initialised ``name`` for digits, seeded by ``(seed, key)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_int(seed, "model_init", key))
        return build_model(name, data.input_shape, data.num_classes).train()


def step_seconds(net: torch.nn.Module, xy: tuple, variant: str) -> float:
    """CPU seconds of one FedSGD gradient with ``variant``'s defense stack."""
    stack = build_defenses(VARIANTS[variant])
    start = time.process_time()
    local_update(
        net,
        [xy],
        protocol="fedsgd",
        lr=0.1,
        defenses=stack,
        generator=torch.Generator().manual_seed(0),
        server_round=1,
        expected_batch_size=BATCH,
    )
    return time.process_time() - start


def agreement(data, seeds: int, probes: int) -> list[float]:
    """Per seed: share of lenet's defended columns where the Hutchinson mask equals the exact."""
    out = []
    for s in range(seeds):
        net, (x, _) = model("lenet", data, 0, s), batch(data, 0, s)
        masks = []
        for method in ("exact", "hutchinson"):
            d = Soteria(pruning_ratio=0.8, method=method, probes=probes)
            d.check_model(net)
            d.begin(net, TrainingInfo("fedsgd", 0.1, 1, BATCH, 1, 0, BATCH))
            masks.append(d.column_mask(net, x, generator=torch_generator(0, "defense", s)))
        out.append(float((masks[0] == masks[1]).float().mean()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15, help="interleaved repetitions")
    ap.add_argument("--seeds", type=int, default=10, help="models/batches for the agreement")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("digits")
    print(f"cost per FedSGD step, batch {BATCH}, 1 thread, CPU ms (median of {args.reps})")
    for name in ("mlp", "lenet"):
        net, xy = model(name, data, 0, 0), batch(data, 0, 0)
        for v in VARIANTS:  # warm-up
            step_seconds(net, xy, v)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.reps):
            for v in VARIANTS:
                times[v].append(step_seconds(net, xy, v))
        med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
        row = ", ".join(f"{v} {m:.1f} ms ({m / med['undefended']:.1f}x)" for v, m in med.items())
        print(f"  {name}: {row}")
    print(f"Hutchinson vs exact mask, lenet/digits, batch {BATCH}, ratio 0.8, {args.seeds} seeds")
    for probes in (32, 256):
        agree = agreement(data, args.seeds, probes)
        print(
            f"  {probes} probes: {100 * statistics.mean(agree):.1f}% of columns agree "
            f"(min {100 * min(agree):.1f}%, max {100 * max(agree):.1f}%)"
        )


if __name__ == "__main__":
    main()

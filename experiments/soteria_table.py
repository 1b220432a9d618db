"""Soteria's PSNR table in docs/defenses.md: the analytic attack on one defended FedSGD gradient.

Setting (Sun et al., "Soteria", CVPR 2021, against the analytic attack of Fowl et al. /
Phong et al.): FedSGD, ``mlp`` on ``digits`` (its first layer is the Linear Soteria defends by
default, and the one the analytic attack inverts), one client's gradient of a batch of
``batch`` random training images. Each trial draws a fresh model (``model_init``) and fresh
images (``batch``) from ``(seed, trial, batch)``; the undefended and defended gradients of a
trial share the model and the images. Score: the reconstructions are matched to the images
(:func:`fl_privsim.core.metrics.match_reconstructions`) and the mean PSNR of the matched pairs
is averaged over the trials (a trial where the attack fails or nothing matches is counted and
left out of the mean). The attack never sees the images; only this script's scorer does.

Usage (from the repository root; about a minute on one core)::

    python experiments/soteria_table.py                 # 20 trials, batch 1 and 4, seed 0
    python experiments/soteria_table.py --trials 5 --batches 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from adversaries import ATTACKS
from clients.defenses import build_defenses
from fl_privsim.app.reproduce._defenses_rows import observation
from fl_privsim.core.data import ImageData, load_dataset
from fl_privsim.core.metrics import match_reconstructions, psnr
from fl_privsim.core.models import build_model
from fl_privsim.core.seeding import seed_int, torch_generator

#: (column, defense stack) in table order.
SETTINGS: tuple[tuple[str, list[dict]], ...] = (
    ("undefended", []),
    ("soteria 0.5", [{"name": "soteria", "params": {"pruning_ratio": 0.5}}]),
    ("soteria 0.8", [{"name": "soteria", "params": {"pruning_ratio": 0.8}}]),
)


def matched_psnr(raw: torch.Tensor, rec: torch.Tensor) -> float:
    """Mean PSNR (dB) of the reconstructions matched to the images; NaN when none matches."""
    perm = match_reconstructions(raw, rec)
    ok = perm >= 0
    if not ok.any():
        return float("nan")
    return float(psnr(raw[torch.from_numpy(ok)], rec[torch.from_numpy(perm[ok])]).mean())


def trial_psnrs(data: ImageData, batch: int, trial: int, seed: int) -> list[float]:
    """Matched PSNR of each setting (table order) on one random model and batch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_int(seed, "model_init", trial, batch))
        model = build_model("mlp", data.input_shape, data.num_classes).train()
    gen = torch_generator(seed, "batch", trial, batch)
    idx = torch.randperm(len(data), generator=gen)[:batch]
    raw, y = data.images("train", idx), data.labels("train", idx)
    out = []
    for _, spec in SETTINGS:
        obs = observation(  # the defended FedSGD observation of the defenses reproduction
            model, data.normalize(raw), y, build_defenses(spec), data,
            torch_generator(seed, "defense", trial, batch), 1, len(data),
        )  # fmt: skip
        try:
            result = ATTACKS.create("analytic")(
                obs, device=torch.device("cpu"), generator=torch_generator(seed, "attack", trial)
            )
        except (ValueError, RuntimeError):  # a refused / degenerate gradient: no reconstruction
            out.append(float("nan"))
            continue
        rec = data.denormalize(result.inputs.detach().cpu()).clamp(0, 1)
        out.append(matched_psnr(raw, rec))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("digits")
    t0 = time.process_time()
    print(f"analytic attack, FedSGD, mlp on digits, {args.trials} trials, seed {args.seed}")
    print("| batch | " + " | ".join(name for name, _ in SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for batch in args.batches:
        vals = np.array([trial_psnrs(data, batch, t, args.seed) for t in range(args.trials)])
        cells = []
        for j in range(len(SETTINGS)):
            col = vals[:, j]
            ok = np.isfinite(col)
            cell = f"{col[ok].mean():.1f} dB (min {col[ok].min():.1f})" if ok.any() else "n/a"
            if not ok.all():
                cell += f", {int((~ok).sum())} failed"
            cells.append(cell)
        print(f"| {batch} | " + " | ".join(cells) + " |")
    print(f"CPU time {time.process_time() - t0:.1f} s")


if __name__ == "__main__":
    main()

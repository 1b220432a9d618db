"""Time the reconstruction attacks on digits and print their PSNR (not a test).

Usage: ``PYTHONPATH=. python experiments/benchmarks/bench_attacks.py [--samples 5]``.
Runs each attack on CPU, and on CUDA when available, at batch size 1 (and 4 for the
analytic attack) and prints seconds per attack and PSNR (mean/min) in dB.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from adversaries import ATTACKS, Observation
from fl_privsim.core.metrics import label_accuracy, match_reconstructions, psnr
from fl_privsim.core.models import build_model

SHAPE = (1, 8, 8)


def load() -> tuple[torch.Tensor, torch.Tensor, float, float]:
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(d.target), float(x.mean()), float(x.std())


def observation(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mean: float, std: float
) -> Observation:
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return Observation(
        round=1,
        client_id=0,
        protocol="fedsgd",
        model=model,
        global_params={k: v.detach().clone() for k, v in model.state_dict().items()},
        update=dict(zip(names, grads)),
        batch_size=len(y),
        local_steps=1,
        lr=0.1,
        num_examples=len(y),
        input_shape=SHAPE,
        num_classes=10,
        data_mean=(mean,),
        data_std=(std,),
    )


def score(raw: torch.Tensor, rec: torch.Tensor, mean: float, std: float) -> np.ndarray:
    rec = (rec.detach().cpu().double() * std + mean).clamp(0, 1)
    perm = match_reconstructions(raw.double(), rec)
    return psnr(raw.double(), rec[torch.as_tensor(perm)]).numpy()


CASES = [
    ("analytic", {}, "mlp", 1),
    ("analytic", {}, "mlp", 4),
    ("idlg", {"iterations": 0}, "lenet", 1),
    ("idlg", {}, "lenet", 1),
    ("inverting_gradients", {}, "lenet", 1),
    ("inverting_gradients", {}, "lenet", 4),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=5, help="runs per case")
    args = parser.parse_args()
    x_all, y_all, mean, std = load()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(
        f"{'attack':22s} {'params':18s} {'model':6s} {'B':>2s} {'device':6s} {'sec':>7s} {'psnr':>7s} {'min':>7s} {'labels':>6s}"
    )
    for device in devices:
        for name, params, model_name, batch in CASES:
            rng = np.random.default_rng(0)
            secs, scores, labels = [], [], []
            for k in range(args.samples):
                idx = rng.choice(len(y_all), batch, replace=False)
                raw, y = x_all[idx], y_all[idx]
                torch.manual_seed(k)
                model = build_model(model_name, SHAPE, 10).train()
                obs = observation(model, (raw - mean) / std, y, mean, std)
                attack = ATTACKS.create(name, **params)
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                res = attack(obs, device=device, generator=torch.Generator().manual_seed(k))
                if device == "cuda":
                    torch.cuda.synchronize()
                secs.append(time.perf_counter() - start)
                labels.append(label_accuracy(y, res.labels))
                if res.inputs is not None:
                    scores.extend(score(raw, res.inputs, mean, std))
            p_mean = f"{np.mean(scores):7.2f}" if scores else "      -"
            p_min = f"{np.min(scores):7.2f}" if scores else "      -"
            print(
                f"{name:22s} {params!s:18s} {model_name:6s} {batch:2d} {device:6s} "
                f"{np.mean(secs):7.3f} {p_mean} {p_min} {np.mean(labels):6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""Hand-built run and sweep folders for the HTML report tests (no federation, no Ray): the
files a run writes, through the run folder's own writer, with a summary of realistic keys."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from fl_privsim.core import config as config_mod
from fl_privsim.core.plots import GridRow
from fl_privsim.core.results import RunFolder

CONFIG = """
name = "hand_built"
[[defenses]]
name = "dp_sgd"
[defenses.params]
noise_multiplier = 1.0
max_grad_norm = 1.0
"""

SUMMARY: dict[str, Any] = {
    "name": "hand_built",
    "seed": 7,
    "dataset": "digits",
    "model": "mlp",
    "protocol": "fedsgd",
    "rounds": 2,
    "attacks": {
        "analytic": {
            "psnr": 98.76543,
            "ssim": 0.99987,
            "mse": 1e-10,
            "avd": 0.01234,
            "asr": 1.0,
            "leakage_rate": 0.5,
            "label_accuracy": 0.875,
            "attacked": 2.0,
            "refused": 0.0,
            "failed": 1.0,
            "failed_reasons": ["singular system"],
        },
        "idlg": {
            "attacked": 0.0,
            "refused": 2.0,
            "failed": 0.0,
            "refused_reasons": [
                "batch of 4 records: iDLG recovers one label",
                "FedAvg update: needs a single gradient",
            ],
        },
        "membership": {
            "attacked": 6.0,
            "refused": 0.0,
            "failed": 0.0,
            "trials": 6,
            "positives": 3,
            "auc": 0.83333,
            "auc_ci": [0.5, 1.0],
            "accuracy": 0.66667,
            "advantage": 0.33333,
        },
    },
    "final_accuracy": 0.69921,
    "initial_accuracy": 0.15625,
    "accuracy_by_round": {"0": 0.15625, "1": 0.5, "2": 0.69921},
    "federated_accuracy_by_round": {"1": 0.48, "2": 0.69},
    "fit_seconds_by_round": {"1": 0.4, "2": 0.3},
    "observer_failures": 0,
    "server": {
        "role": "malicious",
        "modifications": ["imprint"],
        "crafted": {"1": {"imprint": [0, 1]}},
    },
    "client_errors": {
        "refused": {"total": 1, "by_round": {"2": 1}, "reasons": ["no secure aggregation"]},
        "failed": {"total": 0, "by_round": {}, "reasons": []},
    },
    "epsilon": 1.45612,
    "epsilon_formal": False,
    "epsilon_delta": 1e-05,
    "epsilon_not_formal_because": ["batches are fixed-size draws, not Poisson-sampled"],
}


def make_run_folder(path: Path, *, finished: bool = True) -> Path:
    """A run folder as ``fl-privsim run`` leaves it (``finished=False``: no summary.json, as
    after an interrupt, with a half-written last metrics line)."""
    cfg = config_mod.loads(CONFIG)
    folder = RunFolder(path)
    folder.write_config(config_mod.to_toml(cfg))
    folder.write_env(seed=7, device="cpu")
    for rnd, acc in SUMMARY["accuracy_by_round"].items():
        folder.log_metric(
            round=int(rnd), client=None, source="server_eval", key="accuracy", value=acc
        )
    for rnd, acc in SUMMARY["federated_accuracy_by_round"].items():
        folder.log_metric(
            round=int(rnd), client=None, source="federated_eval", key="accuracy", value=acc
        )
    for client in (0, 1):
        folder.log_metric(round=1, client=client, source="attack/analytic", key="psnr", value=97.5)
    gen = torch.Generator().manual_seed(0)
    originals = torch.rand(2, 1, 8, 8, generator=gen)
    for client in (0, 1):
        folder.save_grid(
            round=1,
            client=client,
            originals=originals,
            rows=[GridRow("analytic", originals.clone()), GridRow("idlg", None, note="refused")],
            title=f"round 1, client {client}",
        )
    if finished:
        folder.write_summary({**copy.deepcopy(SUMMARY), "run_dir": str(path)})
    else:
        with open(path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write('{"round": 2, "client": 0, "sou')  # cut short by the interrupt
    return path


GRID = ["client.batch_size", "federation.clients_per_round"]


def make_sweep_folder(path: Path) -> Path:
    """A sweep folder per the sweep layout contract: 2 cells x 2 seeds, one failed, the
    finished ones real run folders; sweep.json, results.csv, summary.csv, plots/psnr.png."""
    path.mkdir(parents=True)
    cells = []
    for cell, (bs, cpr) in enumerate(((1, 1), (4, 2))):
        for seed in (0, 1):
            cid = f"c{cell:03d}_s{seed}"
            failed = cell == 1 and seed == 1
            cells.append(
                {
                    "id": cid,
                    "cell": cell,
                    "seed": seed,
                    "values": {GRID[0]: bs, GRID[1]: cpr},
                    "dir": f"cells/{cid}",
                    "status": "failed" if failed else "done",
                    "error": "RuntimeError: out of memory" if failed else None,
                    "seconds": 12.25 + cell,
                }
            )
            make_run_folder(path / "cells" / cid, finished=not failed)
    manifest = {
        "version": 1,
        "name": "hand_sweep",
        "grid_keys": GRID,
        "zip": [],
        "repeats": 2,
        "base_seed": 0,
        "cells": cells,
    }
    (path / "sweep.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    head = (
        "cell,seed,client.batch_size,federation.clients_per_round,aggregate_size,attack,psnr,ssim"
    )
    results = [head]
    for c in cells:
        if c["status"] == "done":
            bs, cpr = c["values"].values()
            results.append(f"{c['cell']},{c['seed']},{bs},{cpr},{bs * cpr},analytic,98.5,0.999")
    (path / "results.csv").write_text("\n".join(results) + "\n", encoding="utf-8")
    summary = [
        "cell,aggregate_size,attack,metric,mean,ci_low,ci_high,n",
        "0,1,analytic,psnr,98.76543,97.1,99.25,2",
        "0,1,analytic,ssim,0.99987,0.9991,1.0,2",
        "1,8,analytic,psnr,31.5,,,1",
        "1,8,analytic,ssim,0.5,,,1",
    ]
    (path / "summary.csv").write_text("\n".join(summary) + "\n", encoding="utf-8")
    (path / "plots").mkdir()
    from fl_privsim.core.plots import accuracy_plot

    accuracy_plot(path / "plots" / "psnr.png", {1: 0.2, 8: 0.9})
    return path

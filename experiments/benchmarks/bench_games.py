"""Speed and AUC of the attribute game on Adult (not a test).

Usage: ``PYTHONPATH=. python experiments/benchmarks/bench_games.py [--root ../shared/data/adult]
[--batches 1 8 64] [--features alignment last] [--json out.json]``.

Each case plays the full game of :mod:`fl_privsim.app.game` (load Adult, pretrain θ, 1000 shadow
trials on the auxiliary pool, 1000 challenge trials, meta-classifier training and scoring,
bootstrap CIs, ROC plot) with one torch thread and reports wall-clock seconds by phase and
the AUC with its CI. Target (issue 5): one case < 5 minutes on the 2-core machine. With
``--exact`` one case also runs the literal path (one ``local_update`` call per trial), for
the speed-up of the vectorised release; ``--dp`` adds a DP-SGD case (exact path, fewer trials).
Where a CUDA GPU is visible every main case also runs with ``game.device = "cuda"`` and the
speed-up of its challenge updates over the CPU is printed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fl_privsim.app.game import load_game_config, run_game


def case(root: str, overrides: list[str]) -> dict:
    cfg = load_game_config(
        None, [f'data.root="{root}"', 'data.name="adult"', 'game.kind="attribute"', *overrides]
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        _, s = run_game(cfg, out=Path(tmp) / "run")
        wall = time.perf_counter() - start
    row = {
        "overrides": overrides,
        "wall_s": round(wall, 2),
        "auc": round(s["auc"], 4),
        "auc_ci": [round(v, 4) for v in s["auc_ci"]],
        "accuracy": s["accuracy"],
        "tpr_at_1pct_fpr": s["tpr_at_1pct_fpr"],
        "release_path": s["release_path"],
        "device": s["device"],
        "seconds": {k: round(v, 2) for k, v in s["seconds"].items()},
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data/adult")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--features", nargs="+", default=["alignment", "last"])
    ap.add_argument("--attack-models", nargs="+", default=["mlp"])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument(
        "--exact", action="store_true", help="also time the literal local_update loop (batch 8)"
    )
    ap.add_argument(
        "--dp", action="store_true", help="also run a dp_sgd case (exact path, 200 trials)"
    )
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = args.trials
    base = [f"game.trials={n}", f"game.shadow_trials={n}"]
    rows = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for model in args.attack_models:
        for feat in args.features:
            for b in args.batches:
                for device in devices:  # the same case on the GPU too, when there is one
                    rows.append(
                        case(
                            args.root,
                            [
                                *base,
                                f"game.batch_size={b}",
                                f'game.features="{feat}"',
                                f'game.attack_model="{model}"',
                                f'game.device="{device}"',
                            ],
                        )
                    )
                if len(devices) > 1:
                    cpu, gpu = rows[-2]["seconds"], rows[-1]["seconds"]
                    print(
                        f"batch {b}, {feat}: challenge updates on cuda "
                        f"{cpu['challenge_updates'] / max(gpu['challenge_updates'], 1e-9):.2f}x "
                        f"faster than cpu ({gpu['challenge_updates']:.2f} s vs "
                        f"{cpu['challenge_updates']:.2f} s)",
                        flush=True,
                    )
    if args.exact:
        rows.append(
            case(
                args.root,
                [*base, "game.batch_size=8", 'game.features="alignment"', "game.exact=true"],
            )
        )
    if args.dp:
        dp = ['defenses=[{name="dp_sgd", params={noise_multiplier=1.0, max_grad_norm=1.0}}]']
        for adv in ("static", "adaptive"):
            rows.append(
                case(
                    args.root,
                    [
                        "game.trials=200",
                        "game.shadow_trials=200",
                        "game.batch_size=8",
                        'game.features="alignment"',
                        f'game.adversary="{adv}"',
                        *dp,
                    ],
                )
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

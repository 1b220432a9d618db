"""Speed and AUC of the attribute game on Adult (not a test).

Usage: ``PYTHONPATH=. python experiments/benchmarks/bench_games.py [--root ../shared/data/adult]
[--batches 1 8 64] [--features alignment last] [--json out.json]``.

Each case plays the full game of :mod:`fl_privsim.app.game` (load Adult, pretrain θ, 1000 shadow
trials on the auxiliary pool, 1000 challenge trials, meta-classifier training and scoring,
bootstrap CIs, ROC plot) with one torch thread and reports wall-clock seconds by phase and
the AUC with its CI. Target (issue 5): one case < 5 minutes on the 2-core machine. With
``--exact`` one case also runs the literal path (one ``local_update`` call per trial), for
the speed-up of the vectorised release; ``--dp`` adds a DP-SGD case (exact path, fewer trials).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from fl_privsim.app.game import load_game_config, run_game

log = logging.getLogger("bench_games")


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
        "seconds": {k: round(v, 2) for k, v in s["seconds"].items()},
    }
    log.info("%s", json.dumps(row))
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
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    n = args.trials
    base = [f"game.trials={n}", f"game.shadow_trials={n}"]
    rows = []
    for model in args.attack_models:
        for feat in args.features:
            for b in args.batches:
                rows.append(
                    case(
                        args.root,
                        [
                            *base,
                            f"game.batch_size={b}",
                            f'game.features="{feat}"',
                            f'game.attack_model="{model}"',
                        ],
                    )
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

"""What SecAgg+'s rounding does to an exact attack: the analytic attack on round 1's aggregate.

The scenario of ``tests/e2e/test_secure_aggregation.py`` (seed 0, 5 clients, ``mlp`` on
``digits``, FedAvg 3 local steps of batch 2, client lr 0.3): one federation through Flower's
real SecAgg+ on Ray (:func:`fl_privsim.app.simulation.run`), which saves the aggregate it
unmasked each round. For round 1 the script recomputes the exact example-weighted mean of the
members' updates with the clients' own code (:func:`clients.client_app.train_client`, the
function both client paths call) and runs the configured analytic attack (same generator as
the run) on

1. the SecAgg+ aggregate (must equal the run's own score: checked and printed);
2. the exact mean (what the plain path's server sees);
3. the exact mean plus i.i.d. uniform noise of width one and two quantisation steps
   (``2C/Q``, :class:`fl_privsim.engine.secure_aggregation.SecAggSettings`), seeded.

Scores (PSNR, ASR) come from the run's scorer (:class:`fl_privsim.engine.scoring.Scorer`),
which alone sees the clients' images.

Usage (from the repository root; one Ray federation, a few minutes on 2 cores)::

    PYTHONPATH=. python experiments/secagg_rounding.py [--out /tmp/secagg_rounding]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from flwr.app import RecordDict

from clients.client_app import train_client
from fl_privsim.app.simulation import run
from fl_privsim.core import config as config_mod
from fl_privsim.core.seeding import torch_generator
from fl_privsim.engine.federated_data import federated_data
from fl_privsim.engine.scoring import Scorer
from fl_privsim.engine.secure_aggregation import resolve
from strategies.honest_but_curious import build_observation
from strategies.server_app import build_plans, initial_model, model_info

#: tests/e2e/test_secure_aggregation.py's BASE + SECAGG (keep in step with the test).
OVERRIDES = [
    'model.name="mlp"',
    'federation.protocol="fedavg"',
    "federation.num_clients=5",
    "federation.clients_per_round=5",
    "federation.rounds=5",
    "federation.server_lr=1.0",
    "federation.fraction_evaluate=0.0",
    'federation.device="cpu"',
    "client.batch_size=2",
    "client.local_steps=3",
    "client.lr=0.3",
    'attacks=[{name="analytic", targets={rounds=[1], clients=[], aggregate=true}}]',
    'federation.secure_aggregation.mode="secagg+"',
    "federation.secure_aggregation.save_aggregates=true",
]


def exact_mean(cfg, seen: dict) -> dict[str, torch.Tensor]:
    """Example-weighted mean of the members' round-1 updates, recomputed on the sent model."""
    updates, counts = [], []
    for pid in seen["members"]:
        model = initial_model(cfg)
        model.load_state_dict(seen["global"])
        reply = train_client(cfg, pid, model, 1, RecordDict(), torch.device("cpu"))
        updates.append(reply.update)
        counts.append(reply.num_examples)
    total = sum(counts)
    return {
        k: (sum(n * u[k].double() for n, u in zip(counts, updates, strict=True)) / total).to(
            seen["update"][k].dtype
        )
        for k in seen["update"]
    }


def attack(cfg, seen: dict, update: dict[str, torch.Tensor]) -> dict[str, float]:
    """The run's analytic attack on ``update`` as round 1's aggregate, scored like the run."""
    info = model_info(cfg)
    info.model.load_state_dict(seen["global"])
    meta = {"protocol": "fedavg", "batch-size": 2, "local-steps": 3, "lr": 0.3}
    members = tuple(seen["members"])
    obs = build_observation(
        info, 1, seen["global"], None, update, meta, seen["num_examples"], len(members), members
    )
    result = build_plans(cfg)[0].attack(
        obs, device=torch.device("cpu"), generator=torch_generator(cfg.seed, 1, -1, "attack")
    )
    return Scorer(cfg, federated_data(cfg)).score(result, 1, list(members)).values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: a temp dir)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="secagg_rounding_")) / "run"
    cfg = config_mod.load(None, OVERRIDES)
    path, summary = run(cfg, out=out, show_progress=False)
    seen = torch.load(path / "secagg_aggregates" / "round_001.pt")
    step = resolve(cfg).quantization_step
    exact = exact_mean(cfg, seen)
    err = max(float((seen["update"][k].double() - exact[k].double()).abs().max()) for k in exact)
    print(f"run folder {path}; quantisation step 2C/Q = {step:.3g}")
    print(f"round 1: largest |SecAgg+ aggregate - exact mean| per entry = {err:.3g}")
    run_score = summary["attacks"]["analytic@aggregate"]
    rows = [
        ("SecAgg+ aggregate (the run's own score)", run_score),
        ("SecAgg+ aggregate (recomputed here)", attack(cfg, seen, seen["update"])),
        ("exact mean", attack(cfg, seen, exact)),
    ]
    gen = torch_generator(cfg.seed, "secagg_rounding", 1)
    for width in (1, 2):
        noisy = {
            k: v + (torch.rand(v.shape, generator=gen, dtype=v.dtype) - 0.5) * width * step
            for k, v in exact.items()
        }
        rows.append((f"exact mean + U(±{width}/2 step)", attack(cfg, seen, noisy)))
    for name, values in rows:
        print(f"  {name}: PSNR {values['psnr']:.2f} dB, ASR {values.get('asr', float('nan')):.3f}")


if __name__ == "__main__":
    main()

"""Peak memory and seconds per round as the federation grows, beside vanilla Flower.

For each size (10, 100, 1000, 10 000 clients; 100 sampled per round, capped at the number of
clients; 3 rounds) it runs, each in its own process tree:

- ``fl-privsim``: ``fl-privsim run`` (FedAvg, 1 local step of batch 4, ``mlp``; an attack on
  2 of round 1's sampled clients; federated evaluation at the default, the round's sampled
  clients);
- ``flower``: vanilla Flower doing the same local work (:mod:`vanilla_flower`: FedAvg, a
  plain ClientApp, evaluation on as many clients), launched the same way with the same Ray
  backend config.

It samples the RSS of every process of each tree (driver, GCS, raylet, agents, client actors;
:mod:`proc_memory`) and prints the peak total, the largest processes at the peak, and seconds
per round (between consecutive central evaluations; the first round includes starting the
client actors, so rounds 2..3 are shown apart), and the CPU seconds of all processes of the
tree (less sensitive than wall time to other load on the machine). Targets (issue 16): peak total RSS < 3 GiB at
1000 clients, < 4 GiB at 10 000. Measured, never asserted.

``digits`` has 1437 training examples, so sizes above that use ``adult`` (UCI Adult, 30 162
training rows, the same ``mlp``); ``--data`` forces one dataset for every size.

    python experiments/benchmarks/bench_scale.py                  # 10 100 1000 10000
    python experiments/benchmarks/bench_scale.py --sizes 10 100   # a quick run
    python experiments/benchmarks/bench_scale.py --sizes 1000 --only fl-privsim
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proc_memory import describe, watch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATA_ROOTS = {"digits": "", "adult": str(ROOT.parent / "shared" / "data" / "adult")}
if not Path(DATA_ROOTS["adult"]).exists():
    DATA_ROOTS["adult"] = "/work/shared/data/adult"
DIGITS_TRAIN = 1437


def _sampled(seed: int, num_clients: int, k: int, server_round: int) -> list[int]:
    """The clients fl-privsim samples in ``server_round`` (FedUpdates.sample_clients)."""
    from fl_privsim.core.seeding import numpy_rng

    if k >= num_clients:
        return list(range(num_clients))
    rng = numpy_rng(seed, server_round, "sampling")
    return sorted(int(c) for c in rng.choice(range(num_clients), size=k, replace=False))


def privsim_config(args: argparse.Namespace, n: int, data: str, folder: Path) -> Path:
    """The fl-privsim run of size ``n`` as a TOML file."""
    k = min(args.per_round, n)
    targets = _sampled(0, n, k, 1)[:2]
    attack = (
        f'[[attacks]]\nname = "{args.attack}"\n[attacks.targets]\nrounds = [1]\n'
        f"clients = {targets}\n"
        if args.attack != "none"
        else ""
    )
    text = f"""name = "scale{n}"
seed = 0
{"attacks = []" if args.attack == "none" else ""}
[data]
name = "{data}"
root = "{DATA_ROOTS[data]}"
[model]
name = "mlp"
[federation]
num_clients = {n}
clients_per_round = {k}
rounds = {args.rounds}
protocol = "fedavg"
server_lr = 1.0
[client]
batch_size = 4
local_steps = 1
lr = 0.1
{attack}"""
    path = folder / f"scale{n}.toml"
    path.write_text(text)
    return path


def run_privsim(args: argparse.Namespace, n: int, data: str, folder: Path) -> dict:
    """One fl-privsim run of size ``n``: peak RSS, processes at the peak, round seconds."""
    cfg = privsim_config(args, n, data, folder)
    out = folder / f"run{n}"
    cmd = [
        sys.executable,
        "-m",
        "fl_privsim.app.cli",
        "run",
        str(cfg),
        "--quiet",
        "--out",
        str(out),
    ]
    w = watch(cmd)
    if w.returncode != 0:
        raise SystemExit(f"fl-privsim run failed ({w.returncode}):\n{w.stdout[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    failed = summary["client_errors"]["failed"]["total"]
    if failed:
        raise SystemExit(f"fl-privsim run {out}: {failed} client replies were errors")
    rounds = summary.get("round_seconds_by_round") or summary.get("fit_seconds_by_round")
    return {"watched": w, "round_seconds": [rounds[k] for k in sorted(rounds, key=int)]}


def run_flower(args: argparse.Namespace, n: int, data: str) -> dict:
    """The vanilla Flower run of size ``n``."""
    cmd = [
        sys.executable,
        str(HERE / "vanilla_flower.py"),
        f"--clients={n}",
        f"--per-round={min(args.per_round, n)}",
        f"--rounds={args.rounds}",
        f"--data={data}",
        f"--root={DATA_ROOTS[data]}",
        "--model=mlp",
    ]
    w = watch(cmd)
    if w.returncode != 0:
        raise SystemExit(f"vanilla Flower failed ({w.returncode}):\n{w.stdout[-3000:]}")
    last = [line for line in w.stdout.splitlines() if line.startswith("{")][-1]
    return {"watched": w, "round_seconds": json.loads(last)["round_seconds"]}


def main(argv: list[str]) -> int:
    """Run the sizes asked for and print one block per size."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", choices=sorted(DATA_ROOTS), default=None)
    p.add_argument("--attack", default="analytic", help='attack on 2 sampled clients ("none": off)')
    p.add_argument("--only", choices=("fl-privsim", "flower"), default=None)
    p.add_argument("--processes", action="store_true", help="list the largest processes at peak")
    args = p.parse_args(argv)
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    folder = Path(tempfile.mkdtemp(prefix="fl-privsim-scale-"))
    print(f"{args.rounds} rounds, {args.per_round} sampled per round; runs under {folder}")
    print(
        f"{'clients':>8} {'data':>7} {'framework':>10} {'peak RSS':>10} {'wall s':>7} "
        f"{'CPU s':>7} {'round 1 s':>9} {'rounds 2+ s/round':>17}"
    )
    for n in args.sizes:
        data = args.data or ("digits" if n <= DIGITS_TRAIN else "adult")
        results = {}
        for name in ("fl-privsim", "flower"):
            if args.only and args.only != name:
                continue
            r = (
                run_privsim(args, n, data, folder)
                if name == "fl-privsim"
                else run_flower(args, n, data)
            )
            w, rs = r["watched"], r["round_seconds"]
            later = sum(rs[1:]) / max(1, len(rs) - 1) if len(rs) > 1 else float("nan")
            results[name] = (w, later)
            print(
                f"{n:>8} {data:>7} {name:>10} {w.peak_kib / 1024**2:>7.2f} GiB {w.wall:>7.1f} "
                f"{w.cpu:>7.1f} {rs[0] if rs else float('nan'):>9.2f} {later:>17.2f}",
                flush=True,
            )
            if args.processes:
                print(describe(w.at_peak))
        if len(results) == 2:
            (a, la), (b, lb) = results["fl-privsim"], results["flower"]
            print(
                f"{'':>8} {'':>7} {'ratio':>10} {a.peak_kib / b.peak_kib:>10.2f} "
                f"{a.wall / b.wall:>7.2f} {a.cpu / b.cpu:>7.2f} {'':>9} {la / lb:>17.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

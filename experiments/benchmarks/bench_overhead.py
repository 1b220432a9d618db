"""What fl-privsim costs on top of the clients' own computation (issue 16, item 3).

The same local work — ``convnet`` on the CIFAR-10 subset (``cifar10_npz``), ``--clients``
clients all sampled each round, ``--rounds`` FedAvg rounds of ``--steps`` SGD steps on batches
of ``--batch``, a central evaluation on the whole test split after every round and before
the first, no federated evaluation — is run four ways, each as a child process whose whole
process tree (Ray's processes and client actors included) is sampled (:mod:`proc_memory`):

- ``plain``: one Python process, a plain torch loop over rounds and clients (the same seeded
  batches, :func:`~fl_privsim.engine.federated_data.client_batch_indices`, and the same
  initial model; one torch thread);
- ``flower``: vanilla Flower (:mod:`vanilla_flower`: ``FedAvg``, a plain ClientApp), same
  launcher and Ray backend config;
- ``fl-privsim off``: ``fl-privsim run`` with no attack;
- ``fl-privsim on``: the same with ``inverting_gradients`` (``--attack-iterations``, 3 by
  default: each iteration replays the client's 50 local steps, so 50 iterations took
  minutes) on client 0 in round 1.

Printed: wall and CPU seconds (all processes of the tree), seconds per round from round 2 on
(the steady state, once the client actors run), peak RSS, the final accuracy, and the ratios
to ``plain`` and to ``flower``. Goal (issue 16): fl-privsim off <= 1.5x plain and <= 1.05x
vanilla Flower. Totals include starting Ray and a Python process per client actor, which the
plain loop does not pay; rounds 2+ show the per-round cost alone. Measured, never asserted.

    python experiments/benchmarks/bench_overhead.py                       # 4 clients x 3 rounds
    python experiments/benchmarks/bench_overhead.py --only plain fl-privsim-off --steps 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from proc_memory import watch

ROOT = HERE.parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
if not CIFAR.exists():
    CIFAR = Path("/work/shared/data/cifar10")
WAYS = ("plain", "flower", "fl-privsim-off", "fl-privsim-on")


def config_text(args: argparse.Namespace, attack: bool) -> str:
    """The fl-privsim run (and the plain loop's settings) as TOML."""
    attacks = (
        '[[attacks]]\nname = "inverting_gradients"\n'
        f"params = {{ iterations = {args.attack_iterations} }}\n"
        "[attacks.targets]\nrounds = [1]\nclients = [0]\n"
        if attack
        else ""
    )
    return f"""name = "overhead"
seed = 0
{"" if attack else "attacks = []"}
[data]
name = "cifar10_npz"
root = "{CIFAR}"
[model]
name = "convnet"
[federation]
num_clients = {args.clients}
clients_per_round = {args.clients}
rounds = {args.rounds}
protocol = "fedavg"
server_lr = 1.0
fraction_evaluate = 0.0
device = "cpu"
[client]
batch_size = {args.batch}
local_steps = {args.steps}
lr = {args.lr}
[output]
save_images = false
{attacks}"""


def plain_loop(cfg_path: str) -> dict[str, Any]:
    """The federation's computation as a plain torch loop (no Flower, no Ray)."""
    import torch
    import torch.nn.functional as F

    from fl_privsim.core.config import load
    from fl_privsim.engine.federated_data import client_batch_indices, federated_data
    from strategies.server_app import initial_model

    torch.set_num_threads(1)
    cfg = load(cfg_path)
    fed = federated_data(cfg)
    model = initial_model(cfg)
    x_test = fed.data.normalize(fed.data.images("test", range(len(fed.data.test_y))))

    @torch.no_grad()
    def accuracy() -> float:
        model.eval()
        return float((model(x_test).argmax(1) == fed.data.test_y).float().mean())

    stamps, acc = [], accuracy()
    stamps.append(time.perf_counter())
    for rnd in range(1, cfg.federation.rounds + 1):
        start = {k: v.clone() for k, v in model.state_dict().items()}
        total: dict[str, torch.Tensor] = {k: torch.zeros_like(v) for k, v in start.items()}
        seen = 0
        for client in range(cfg.federation.num_clients):
            model.load_state_dict(start)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=cfg.client.lr)
            n = 0
            for idx in client_batch_indices(cfg, fed, rnd, client):
                x, y = fed.tensors("train", idx)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                n += len(idx)
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    total[k] += n * (v - start[k])
            seen += n
        model.load_state_dict(
            {k: v + total[k] / seen if v.is_floating_point() else v for k, v in start.items()}
        )
        acc = accuracy()
        stamps.append(time.perf_counter())
    return {
        "round_seconds": [b - a for a, b in itertools.pairwise(stamps)],
        "accuracy": acc,
    }


def run_way(way: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One way as a watched child process: wall, CPU, peak RSS, round seconds, accuracy."""
    cfg = folder / f"{way}.toml"
    cfg.write_text(config_text(args, attack=way == "fl-privsim-on"))
    if way == "plain":
        cmd = [sys.executable, __file__, "--child-plain", str(cfg)]
    elif way == "flower":
        cmd = [
            sys.executable,
            str(HERE / "vanilla_flower.py"),
            f"--clients={args.clients}",
            f"--per-round={args.clients}",
            f"--rounds={args.rounds}",
            "--data=cifar10_npz",
            f"--root={CIFAR}",
            "--model=convnet",
            f"--batch-size={args.batch}",
            f"--local-steps={args.steps}",
            f"--lr={args.lr}",
            "--no-evaluate",
        ]
    else:
        out = folder / way
        cmd = [sys.executable, "-m", "fl_privsim.app.cli", "run", str(cfg), "--quiet"]
        cmd += ["--out", str(out)]
    w = watch(cmd)
    if w.returncode != 0:
        raise SystemExit(f"{way} failed ({w.returncode}):\n{w.stdout[-3000:]}")
    if way.startswith("fl-privsim"):
        summary = json.loads((folder / way / "summary.json").read_text())
        if summary["client_errors"]["failed"]["total"]:
            raise SystemExit(f"{way}: client replies were errors ({folder / way})")
        rs = summary["round_seconds_by_round"]
        res = {
            "round_seconds": [rs[k] for k in sorted(rs, key=int)],
            "accuracy": summary["final_accuracy"],
        }
    else:
        res = json.loads([ln for ln in w.stdout.splitlines() if ln.startswith("{")][-1])
    later = res["round_seconds"][1:] or res["round_seconds"]
    return {
        "wall": w.wall,
        "cpu": w.cpu,
        "peak_gib": w.peak_kib / 1024**2,
        "per_round": sum(later) / len(later),
        "accuracy": res["accuracy"],
    }


def main(argv: list[str]) -> int:
    """Run the ways asked for and print the table and the ratios."""
    if argv[:1] == ["--child-plain"]:
        print(json.dumps(plain_loop(argv[1])), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=50, help="local SGD steps per round")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--attack-iterations", type=int, default=3)
    p.add_argument("--only", nargs="+", choices=WAYS, default=list(WAYS))
    args = p.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="fl-privsim-overhead-"))
    print(
        f"convnet / cifar10_npz, {args.clients} clients x {args.rounds} rounds x {args.steps} "
        f"steps of batch {args.batch}; runs under {folder}"
    )
    print(
        f"{'way':>15} {'wall s':>7} {'CPU s':>7} {'s/round 2+':>10} {'peak GiB':>8} "
        f"{'accuracy':>8}  CPU vs plain  CPU vs flower  round vs plain  round vs flower"
    )
    rows: dict[str, dict[str, Any]] = {}
    for way in args.only:
        r = rows[way] = run_way(way, args, folder)

        def ratio(other: str, key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key] / rows[other][key]:.2f}" if other in rows else "-"

        print(
            f"{way:>15} {r['wall']:>7.1f} {r['cpu']:>7.1f} {r['per_round']:>10.2f} "
            f"{r['peak_gib']:>8.2f} {r['accuracy']:>8.4f}  {ratio('plain', 'cpu'):>12}  "
            f"{ratio('flower', 'cpu'):>13}  {ratio('plain', 'per_round'):>14}  "
            f"{ratio('flower', 'per_round'):>15}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

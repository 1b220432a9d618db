"""A sweep against the same cells run one by one with `fl-privsim run` (issue 15), measured
side by side in one invocation, not asserted.

The grid: 3 batch sizes x 3 clients-per-round values x 3 seeds of the default job (27 cells).
First `fl-privsim sweep` runs them (one process: Ray, the client actors and the data start
once), then the same 27 configs run as 27 `fl-privsim run` calls one after another. Prints both
wall times, their ratio (target < 0.5), the seconds a run spends before its first round, and
checks that every cell's metrics agree between the two ways.

    python experiments/benchmarks/bench_sweep.py [--jobs N] [--cells K]

``--cells K`` runs only the first K of the 27 one-by-one runs and scales their time up (a
shorter check; the printed ratio says so).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = """
[sweep]
repeats = 3
[sweep.grid]
"client.batch_size" = [1, 4, 16]
"federation.clients_per_round" = [2, 5, 10]
"""
TIMING_KEYS = {
    "fit_seconds_by_round",
    "round_seconds_by_round",
    "run_dir",
    "seconds",
    "attack_seconds",
}


def _strip(value: object) -> object:
    """A summary without wall-clock fields (they differ between any two runs)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="sweep --jobs")
    parser.add_argument("--cells", type=int, default=27, help="one-by-one runs to time (<= 27)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fl-privsim-bench-sweep-"))
    default = Path(__file__).resolve().parents[1] / "default.toml"
    config = work / "grid.toml"
    config.write_text(default.read_text(encoding="utf-8") + GRID, encoding="utf-8")
    cli = [sys.executable, "-m", "fl_privsim.app.cli"]

    t0 = time.perf_counter()
    sweep_dir = work / "sweep"
    cmd = [*cli, "sweep", str(config), "--out", str(sweep_dir), "--quiet", "--jobs", str(args.jobs)]
    subprocess.run(cmd, check=True, capture_output=True)
    sweep_s = time.perf_counter() - t0
    manifest = json.loads((sweep_dir / "sweep.json").read_text(encoding="utf-8"))
    cells = manifest["cells"]

    one_s, per_run, agree = 0.0, [], 0
    for cell in cells[: args.cells]:
        sets = [f"{k}={json.dumps(v)}" for k, v in cell["values"].items()] + [
            f"seed={cell['seed']}"
        ]
        out = work / "runs" / cell["id"]
        cmd = [*cli, "run", str(default), "--quiet", "--out", str(out)]
        for s in sets:
            cmd += ["--set", s]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        per_run.append(time.perf_counter() - t)
        one_s += per_run[-1]
        mine = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        swept = json.loads((sweep_dir / cell["dir"] / "summary.json").read_text(encoding="utf-8"))
        agree += _strip(mine) == _strip(swept)
    measured = min(args.cells, len(cells))
    scaled = one_s * len(cells) / measured
    print(f"cells                      {len(cells)} (3 x 3 grid x 3 seeds of the default job)")
    print(f"fl-privsim sweep --jobs {args.jobs}     {sweep_s:7.1f} s")
    note = "" if measured == len(cells) else f" (scaled from {measured} runs)"
    print(f"{len(cells)} x fl-privsim run          {scaled:7.1f} s{note}")
    print(f"ratio sweep / runs         {sweep_s / scaled:7.2f}  (target < 0.5)")
    # what a run pays before and after its rounds: a run's time minus the same cell's time
    # inside the sweep (its later cells, which find Ray and the actors started)
    inside = {c["id"]: c["seconds"] for c in cells[1:]}
    extra = [t - inside[c["id"]] for c, t in zip(cells, per_run, strict=False) if c["id"] in inside]
    if extra:
        print(
            f"start-up per run           {sum(extra) / len(extra):7.1f} s (run time - same cell in the sweep)"
        )
    print(f"cells whose metrics agree  {agree}/{measured} (summary.json without wall-clock fields)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

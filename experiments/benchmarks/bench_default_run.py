"""Time and memory of the default job (`fl-privsim run`), measured, not asserted.

Runs the CLI in a subprocess, samples the resident memory of every process it starts
(driver, Ray's raylet/GCS and the client actors) twice a second, and prints wall time,
peak total RSS and the run's headline numbers. Target (issue 2): < 3 min and < 4 GiB on a
2-core machine, with at least one attack at mean PSNR >= 20 dB.

    python experiments/benchmarks/bench_default_run.py [--set KEY=VALUE ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_kib_total() -> int:
    out = subprocess.run(["ps", "-eo", "rss="], capture_output=True, text=True, check=True).stdout
    return sum(int(v) for v in out.split())


def main(argv: list[str]) -> int:
    out = Path(tempfile.mkdtemp(prefix="fl-privsim-bench-")) / "run"
    base = _rss_kib_total()
    cmd = [sys.executable, "-m", "fl_privsim.app.cli", "run", "--quiet", "--out", str(out), *argv]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _rss_kib_total() - base)
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    text = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        print(text)
        return proc.returncode
    summary = json.loads((out / "summary.json").read_text())
    best = max((v.get("psnr", 0.0), k) for k, v in summary["attacks"].items())
    print(f"wall time            {wall:7.1f} s   (target < 180 s; ratio {wall / 180:.2f})")
    print(
        f"peak total RSS       {peak / 1024:7.0f} MiB (target < 4096 MiB; ratio {peak / 1024 / 4096:.2f})"
    )
    print(f"best mean PSNR       {best[0]:7.2f} dB  ({best[1]}; target >= 20 dB)")
    print(f"final test accuracy  {summary['final_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

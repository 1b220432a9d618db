"""Resident memory of a process tree, sampled from /proc (benchmarks only; Linux).

:func:`watch` runs a command and samples, twice a second, the RSS of the command's process
and every descendant (Ray's GCS, raylet, dashboard agents and client actors are all
descendants of the driver), so processes of other users of the machine are not counted.
It returns the peak total and the per-process breakdown at that peak.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def _rss_kib(pid: int) -> tuple[int, str]:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:90]
    except (OSError, IndexError, ValueError):
        return 0, ""
    return pages * PAGE_KIB, cmd


@dataclass
class Watched:
    """What :func:`watch` saw: return code, wall seconds, peak total RSS (KiB), the
    per-process RSS at the peak, the command's stdout, and the CPU seconds of the tree (each
    process's last sample: a process's CPU after the last sample before it exits is missed,
    at most ``interval`` of it)."""

    returncode: int
    wall: float
    peak_kib: int
    at_peak: list[tuple[int, str]] = field(default_factory=list)
    stdout: str = ""
    cpu: float = 0.0


def watch(cmd: list[str], *, interval: float = 0.5, env: dict[str, str] | None = None) -> Watched:
    """Run ``cmd`` and sample its process tree's total RSS every ``interval`` seconds."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        peak, at_peak = 0, []
        cpu: dict[int, float] = {}
        while proc.poll() is None:
            pids = tree(proc.pid)
            for p in pids:
                cpu[p] = max(cpu.get(p, 0.0), cpu_seconds(p))
            rows = [_rss_kib(p) for p in pids]
            total = sum(r for r, _ in rows)
            if total > peak:
                peak, at_peak = total, sorted(rows, reverse=True)
            time.sleep(interval)
        log.seek(0)
        text = log.read()
    wall = time.perf_counter() - t0
    return Watched(proc.returncode, wall, peak, at_peak, text, sum(cpu.values()))


def describe(at_peak: list[tuple[int, str]], top: int = 8) -> str:
    """The largest processes at the peak, one per line (MiB and command)."""
    lines = [f"      {kib / 1024:7.0f} MiB  {cmd}" for kib, cmd in at_peak[:top] if kib]
    rest = sum(kib for kib, _ in at_peak[top:])
    if rest:
        lines.append(f"      {rest / 1024:7.0f} MiB  ({len(at_peak) - top} more processes)")
    return "\n".join(lines)

"""``fl-privsim sweep CONFIG [--set ...] [--out DIR] [--resume DIR] [--jobs N]``: an
aggregation-size study (or any grid over run-config keys) as one command.

Each cell × seed is an ordinary run folder under ``DIR/cells/``, written by the same
:func:`fl_privsim.app.simulation.run` as ``fl-privsim run``. Cells run one after another in
this process (``--jobs N``: in N worker processes, each with its share of the CPUs); every
process starts Ray, its client actors and the data once and keeps them for all its cells
(:mod:`fl_privsim.app.ray_reuse`). ``sweep.json`` records each cell's state; a sweep stopped
at any moment (Ctrl-C, kill -9, a crashed cell) continues with ``--resume DIR``: finished
cells are kept as they are, others are run again. At the end the tidy tables
(``results.csv``/``.parquet``, ``summary.csv``/``.parquet``), the plots and ``report.html``
are (re)built from the folder.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from fl_privsim.app import sweep_manifest as manifest_mod
from fl_privsim.app.ray_cluster import reach_cluster
from fl_privsim.app.ray_reuse import kept_alive
from fl_privsim.app.report import write_sweep_report
from fl_privsim.app.simulation import run, validate_before_launch
from fl_privsim.app.sweep_config import Cell, SweepPlan, load_sweep
from fl_privsim.app.sweep_plots import plot_sweep
from fl_privsim.app.sweep_results import write_tables
from fl_privsim.core import config as config_mod
from fl_privsim.core.errors import UserError
from fl_privsim.core.progress import configure_logging
from fl_privsim.core.results import atomic_write_text, make_run_dir

log = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    """What a sweep left: its folder and how many cells are done and failed."""

    path: Path
    done: int
    failed: int
    ran: int


class CellProgress:
    """``[####----] cells d/N | failed f | c003_s1 (client.batch_size=4) | 40s | ETA 1m20s``."""

    def __init__(
        self, total: int, done: int, *, jobs: int, enabled: bool, stream: TextIO | None = None
    ) -> None:
        self.total, self.done, self.failed, self.jobs = total, done, 0, jobs
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.ran = 0
        self.running: list[str] = []

    def _eta(self) -> str:
        if not self.ran:
            return "ETA ?"
        left = self.total - self.done - self.failed
        per_cell = (time.perf_counter() - self.t0) / self.ran
        seconds = int(per_cell * left)
        return f"ETA {seconds // 60}m{seconds % 60:02d}s"

    def draw(self) -> None:
        """Redraw the bar (a terminal) or print one line (a log)."""
        if not self.enabled:
            return
        width = 24
        share = (self.done + self.failed) / max(self.total, 1)
        bar = "#" * int(width * share) + "-" * (width - int(width * share))
        now = ", ".join(self.running) or "-"
        text = (
            f"[{bar}] cells {self.done + self.failed}/{self.total} | failed {self.failed} | "
            f"running {now} | {time.perf_counter() - self.t0:.0f}s | {self._eta()}"
        )
        if self.tty:  # one screen line, redrawn in place
            width = shutil.get_terminal_size((120, 20)).columns - 1
            text = text if len(text) <= width else text[: width - 1] + "…"
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def start(self, label: str) -> None:
        """A cell starts."""
        self.running.append(label)
        self.draw()

    def finish(self, label: str, ok: bool) -> None:
        """A cell ended (``ok``: it wrote its summary)."""
        if label in self.running:
            self.running.remove(label)
        self.ran += 1
        if ok:
            self.done += 1
        else:
            self.failed += 1
        self.draw()

    def close(self) -> None:
        """End the bar's line on a terminal."""
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _label(cell: dict[str, Any]) -> str:
    """``c003_s1 (batch_size=4, role=malicious)``: scalar grid values by their last key part
    (a list or table value, e.g. a zipped ``attacks``, is left to the manifest)."""
    values = ", ".join(
        f"{k.rsplit('.', 1)[-1]}={v}"
        for k, v in cell["values"].items()
        if not isinstance(v, (list, dict))
    )
    return f"{cell['id']} ({values})" if values else str(cell["id"])


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text}"


def run_cell(cfg: config_mod.Config, out: str) -> tuple[str, str | None, float]:
    """Run one cell into ``out``; returns (status, error, seconds); never raises an Exception."""
    start = time.perf_counter()
    try:
        run(cfg, out=out, show_progress=False)
    except Exception as exc:  # noqa: BLE001 - a failed cell is recorded, the others go on
        log.warning("cell %s failed: %s", out, _one_line(exc))
        return "failed", _one_line(exc), time.perf_counter() - start
    return "done", None, time.perf_counter() - start


_WORKER_STACK = contextlib.ExitStack()


def _worker_init(ray_cpus: int, verbose: bool) -> None:
    """A ``--jobs`` worker: dies with the sweep (Linux), keeps Ray for its cells, uses
    ``ray_cpus`` CPUs."""
    import atexit
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):  # PR_SET_PDEATHSIG: die with the parent
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the sweep's to handle
    configure_logging(verbose)
    _WORKER_STACK.enter_context(kept_alive(num_cpus=ray_cpus))
    atexit.register(_WORKER_STACK.close)


def check_cells(plan: SweepPlan) -> None:
    """Everything ``fl-privsim run`` checks before it starts Ray (data, model, attack and
    defense parameters, threat models), for each cell × seed, before any cell runs: a bad
    cell is one :class:`UserError` line naming it; an existing Ray cluster a cell joins
    (``federation.ray_address``) must answer."""
    for cell in plan.cells:
        try:
            validate_before_launch(cell.config)
        except UserError as exc:
            shown = ", ".join(f"{k} = {v!r}" for k, v in cell.values.items())
            raise type(exc)(f"[sweep.grid] cell {cell.cell} ({shown}): {exc}") from None
    for address in sorted({c.config.federation.ray_address for c in plan.cells} - {""}):
        reach_cluster(address)  # an existing cluster answers (each run checks it again)


def _start_folder(
    out: str | None, resume: str | None, plan: SweepPlan
) -> tuple[Path, dict[str, Any]]:
    """The sweep folder and its manifest: a fresh one, or the one being resumed."""
    if resume:
        folder = Path(resume)
        manifest = manifest_mod.read_manifest(folder)
        manifest_mod.check_same_plan(folder, manifest, plan)
        return folder, manifest
    folder = make_run_dir(plan.base.output.dir, f"sweep_{plan.base.name}", out)
    atomic_write_text(folder / manifest_mod.CONFIG, plan.to_toml())
    manifest = manifest_mod.new_manifest(plan)
    manifest_mod.write_manifest(folder, manifest)
    return folder, manifest


def run_sweep(
    plan: SweepPlan,
    *,
    out: str | None = None,
    resume: str | None = None,
    jobs: int = 1,
    show_progress: bool = True,
    verbose: bool = False,
) -> SweepOutcome:
    """Run every unfinished cell of ``plan`` and (re)build the tables, plots and report.

    Cells that join an existing Ray cluster run one at a time: each run's client actors take
    the whole cluster, and worker processes that each keep theirs would wait on each other
    for ever, so ``jobs > 1`` is refused there (one :class:`UserError` line)."""
    joined = sorted({c.config.federation.ray_address for c in plan.cells} - {""})
    if jobs > 1 and joined:
        raise UserError(
            f"--jobs {jobs}: cells that join a Ray cluster (federation.ray_address = "
            f"{joined[0]!r}) run one at a time, each using the whole cluster; use --jobs 1"
        )
    check_cells(plan)
    folder, manifest = _start_folder(out, resume, plan)
    with manifest_mod.locked(folder):
        todo = manifest_mod.reconcile(folder, manifest)
        manifest_mod.write_manifest(folder, manifest)
        configs = {c.id: c for c in plan.cells}
        total = len(manifest["cells"])
        progress = CellProgress(total, total - len(todo), jobs=jobs, enabled=show_progress)
        progress.draw()
        try:
            if jobs <= 1:
                _run_here(folder, manifest, todo, configs, progress)
            else:
                _run_in_workers(folder, manifest, todo, configs, progress, jobs, verbose)
        except KeyboardInterrupt:
            for cell in manifest["cells"]:
                if cell["status"] == "running":
                    cell["status"] = "pending"
            manifest_mod.write_manifest(folder, manifest)
            progress.close()
            raise
        progress.close()
        build_outputs(folder)
    done = sum(c["status"] == "done" for c in manifest["cells"])
    failed = sum(c["status"] == "failed" for c in manifest["cells"])
    return SweepOutcome(path=folder, done=done, failed=failed, ran=len(todo))


def _record(
    folder: Path,
    manifest: dict[str, Any],
    cell: dict[str, Any],
    result: tuple[str, str | None, float],
) -> None:
    status, error, seconds = result
    if status == "done" and not (folder / cell["dir"] / "summary.json").is_file():
        status, error = "failed", "the run ended without writing summary.json"
    cell.update(status=status, error=error, seconds=round(seconds, 3))
    manifest_mod.write_manifest(folder, manifest)


def _start(
    folder: Path, manifest: dict[str, Any], cell: dict[str, Any], progress: CellProgress
) -> None:
    """Mark ``cell`` running in the manifest and on the progress bar."""
    cell["status"] = "running"
    manifest_mod.write_manifest(folder, manifest)
    progress.start(_label(cell))


def _run_here(
    folder: Path,
    manifest: dict[str, Any],
    todo: list[dict[str, Any]],
    configs: dict[str, Cell],
    progress: CellProgress,
) -> None:
    with kept_alive():
        for cell in todo:
            _start(folder, manifest, cell, progress)
            result = run_cell(configs[cell["id"]].config, str(folder / cell["dir"]))
            _record(folder, manifest, cell, result)
            progress.finish(_label(cell), cell["status"] == "done")


def _run_in_workers(
    folder: Path,
    manifest: dict[str, Any],
    todo: list[dict[str, Any]],
    configs: dict[str, Cell],
    progress: CellProgress,
    jobs: int,
    verbose: bool,
) -> None:
    import multiprocessing

    cpus = max(1, (os.cpu_count() or 1) // jobs)
    queue = list(todo)
    context = multiprocessing.get_context("spawn")
    while queue:
        running: dict[Future[tuple[str, str | None, float]], dict[str, Any]] = {}
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=context, initializer=_worker_init, initargs=(cpus, verbose)
        ) as pool:
            try:
                while queue or running:
                    while queue and len(running) < jobs:
                        cell = queue.pop(0)
                        _start(folder, manifest, cell, progress)
                        fut = pool.submit(
                            run_cell, configs[cell["id"]].config, str(folder / cell["dir"])
                        )
                        running[fut] = cell
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        cell = running.pop(fut)
                        _record(folder, manifest, cell, fut.result())
                        progress.finish(_label(cell), cell["status"] == "done")
            except BrokenProcessPool as exc:  # a worker died (out of memory, a signal)
                for cell in running.values():
                    _record(folder, manifest, cell, ("failed", f"worker process died: {exc}", 0.0))
                    progress.finish(_label(cell), False)
                running.clear()


def build_outputs(folder: Path) -> None:
    """The tidy tables, the plots and the report of the sweep in ``folder``, from its files."""
    _, summary = write_tables(folder)
    plot_sweep(summary, folder / "plots")
    write_sweep_report(folder)


SWEEP_HELP = """\
Run a grid of federations (cells x seeds) and build one tidy table, confidence intervals,
plots and an HTML report. The config is a run config plus a [sweep] table:

  [sweep]
  repeats = 3                        # seeds per cell: seed, seed+1, ...
  zip = [["a.key", "b.key"]]         # optional: keys that vary together
  [sweep.grid]
  "client.batch_size" = [1, 4, 16, 64]
  "federation.clients_per_round" = [1, 5, 20]

Every cell x seed is an ordinary run folder under DIR/cells/. Ray, the client actors and the
data start once per process, not once per cell. An interrupted sweep (Ctrl-C, kill -9, a
crashed cell) continues with --resume DIR: finished cells are kept, the rest run again.
DIR then holds results.csv/.parquet (one row per cell x seed x attack), summary.csv/.parquet
(mean and bootstrap 95 % CI over seeds), plots/ and report.html. Exit code 1 if a cell failed.
"""


def add_parser(sub: Any) -> None:
    """Register ``fl-privsim sweep`` on the CLI's subparsers."""
    p = sub.add_parser(
        "sweep",
        help="run a grid of federations (cells x seeds) and build the tidy table, plots and report",
        description=SWEEP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config", nargs="?", help="TOML run config with a [sweep] table (optional with --resume)"
    )
    config_mod.add_set_option(p, "override one key of the run config (not a swept key; repeatable)")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        metavar="DIR",
        help="sweep folder to create (default: <output.dir>/<UTC time>_sweep_<name>)",
    )
    where.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the sweep in DIR: keep finished cells, rerun the rest",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="cells run at once, each in its own process (default 1)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="log progress")


def cmd_sweep(args: argparse.Namespace) -> int:
    """The ``sweep`` subcommand."""
    if args.jobs < 1:
        raise UserError(f"--jobs: {args.jobs} is below the minimum 1")
    if args.config:
        plan = load_sweep(args.config, args.overrides)
    elif args.resume:
        saved = Path(args.resume) / manifest_mod.CONFIG
        if not saved.is_file():
            raise UserError(
                f"--resume {args.resume!r}: no {manifest_mod.CONFIG} there; is it a sweep folder?"
            )
        plan = load_sweep(saved, args.overrides)
    else:
        raise UserError("name a sweep config (fl-privsim sweep CONFIG) or a folder to --resume")
    configure_logging(args.verbose)
    outcome = run_sweep(
        plan,
        out=args.out,
        resume=args.resume,
        jobs=args.jobs,
        show_progress=not args.quiet,
        verbose=args.verbose,
    )
    print(f"cells: {outcome.done} done, {outcome.failed} failed, {outcome.ran} run now")
    for name in ("results.csv", "summary.csv", "report.html"):
        print(f"{name}: {outcome.path / name}")
    print(f"sweep folder: {outcome.path}")
    return 1 if outcome.failed else 0

"""Run the ``fl-privsim`` CLI in this process (no interpreter start-up per call) and capture
what it prints, as ``subprocess.run`` would report it."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from fl_privsim.app.cli import main


@dataclass
class CliResult:
    """Exit code and captured output of one CLI call."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: str | Path | None = None) -> CliResult:
    """``fl-privsim ARGS`` in-process, from ``cwd`` (restored afterwards); an exception that
    escapes ``main`` fails the calling test, as a traceback would."""
    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse: --help, usage errors
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        os.chdir(before)
    return CliResult(code, out.getvalue(), err.getvalue())

"""A sweep folder's manifest (``sweep.json``) and its lock.

The manifest lists every cell × seed with its grid values, folder and state (``pending``,
``running``, ``done``, ``failed`` with its error). It is rewritten atomically after every
change, so a sweep killed at any moment leaves a readable one. ``--resume`` trusts only what
the cell folders show: a cell is finished exactly when its ``summary.json`` exists and is not
marked ``"status": "interrupted"`` (a run writes it atomically at its very end, or on
SIGINT/SIGTERM with that mark); every other cell is run again from an empty folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fl_privsim.app.sweep_config import SweepPlan
from fl_privsim.core.errors import UserError
from fl_privsim.core.results import atomic_write_text

MANIFEST = "sweep.json"
CONFIG = "sweep.toml"
VERSION = 1


def new_manifest(plan: SweepPlan) -> dict[str, Any]:
    """The manifest of a sweep that has not run any cell yet."""
    return {
        "version": VERSION,
        "name": plan.base.name,
        "grid_keys": plan.grid_keys,
        "zip": plan.zip,
        "repeats": plan.repeats,
        "base_seed": plan.base.seed,
        "cells": [
            {
                "id": c.id,
                "cell": c.cell,
                "seed": c.seed,
                "values": c.values,
                "dir": f"cells/{c.id}",
                "status": "pending",
                "error": None,
                "seconds": None,
            }
            for c in plan.cells
        ],
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Save ``sweep.json`` atomically."""
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2))


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the sweep in ``folder`` (one :class:`UserError` line when it has none)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"--resume {str(folder)!r}: no {MANIFEST} there; is it a sweep folder?")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--resume: {path} is not valid JSON ({exc})") from None
    if manifest.get("version") != VERSION or not isinstance(manifest.get("cells"), list):
        raise UserError(f"--resume: {path} is not a version-{VERSION} sweep manifest")
    return manifest


def check_same_plan(folder: Path, manifest: dict[str, Any], plan: SweepPlan) -> None:
    """Refuse to resume ``folder`` with a plan other than the one it was started with (its
    ``sweep.toml``: the base config, the grid, repeats and seed)."""
    saved = folder / CONFIG
    fresh = new_manifest(plan)
    before = [(c["id"], c["seed"], c["values"]) for c in manifest["cells"]]
    now = [(c["id"], c["seed"], c["values"]) for c in fresh["cells"]]
    same_cells = before == now and manifest.get("grid_keys") == fresh["grid_keys"]
    if not same_cells or not saved.is_file() or saved.read_text(encoding="utf-8") != plan.to_toml():
        raise UserError(
            f"--resume {str(folder)!r}: the config (with its --set) differs from the one the "
            f"sweep was started with ({saved}); resume without CONFIG and --set to continue it, "
            "or start a new sweep with --out"
        )


def finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` finished: its ``summary.json`` exists and does not say
    ``"status": "interrupted"`` (what a run stopped by SIGINT/SIGTERM writes)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("status") != "interrupted"
    except (OSError, ValueError, AttributeError):  # unreadable: the table counts it as failed
        return True


def reconcile(folder: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Mark each cell by what its folder shows; returns the cells still to run. Finished cells
    (:func:`finished`: ``summary.json`` present, not interrupted) are ``done`` and untouched;
    any other cell goes back to ``pending`` (a failed or interrupted one is retried) and its
    half-written folder is removed."""
    todo = []
    for cell in manifest["cells"]:
        path = folder / cell["dir"]
        if finished(path):
            cell["status"] = "done"
            cell["error"] = None
            continue
        if path.exists():
            shutil.rmtree(path)
        cell.update(status="pending", error=None, seconds=None)
        todo.append(cell)
    return todo


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` for the sweep's lifetime: a second sweep on the same folder is one
    :class:`UserError` line. The kernel releases the lock when the process dies (kill -9
    included), so a killed sweep never blocks its ``--resume``."""
    fd = os.open(folder / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another fl-privsim sweep is running in {str(folder)!r}; wait for it or stop it"
            ) from None
        yield
    finally:
        os.close(fd)

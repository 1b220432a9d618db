"""Run folders: everything a run produces lands here, as it happens.

Layout (``runs/<UTC time>_<name>/`` or ``--out``)::

    config.toml                      the resolved config
    env.json                         versions, seed, device, host
    metrics.jsonl                    one JSON object a line: round, client, source, key, value
                                     (append-only; fsync'd at the end of every round)
    attacks/round_XXX/client_YYY.png originals above reconstructions (one row per attack)
    summary.json                     written atomically at the end ("status": "completed"),
                                     or on SIGINT/SIGTERM ("interrupted", the metrics so far)
    report.html                      the HTML report, from these files (fl_privsim.app.report)
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fl_privsim.core.config import Config, to_toml
from fl_privsim.core.devices import resolve_device
from fl_privsim.core.errors import UserError

log = logging.getLogger(__name__)


def make_run_dir(parent: str | Path, name: str, out: str | Path | None = None) -> Path:
    """Create and return a fresh run folder; never reuses a folder that has files in it."""
    if out:
        path = Path(out)
        if path.exists() and any(path.iterdir()):
            raise UserError(f"--out {str(path)!r} exists and is not empty; choose a new folder")
    else:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "run"
        path = Path(parent) / f"{stamp}_{safe}"
        k = 1
        while path.exists():
            k += 1
            path = Path(parent) / f"{stamp}_{safe}_{k}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create run folder {str(path)!r}: {exc.strerror}") from None
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.Tensor):
        return _jsonable(value.item()) if value.numel() == 1 else value.tolist()
    return value


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _version(dist: str) -> str:
    """Installed version of distribution ``dist`` ("not installed" when absent)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


class RunFolder:
    """Writer for one run folder; safe to call from several threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._metrics = self.path / "metrics.jsonl"

    def write_config(self, toml_text: str) -> None:
        """Save the resolved config."""
        atomic_write_text(self.path / "config.toml", toml_text)

    def write_env(self, *, seed: int, device: str, extra: dict[str, Any] | None = None) -> None:
        """Save versions, seed and device."""
        env = {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "flwr": _version("flwr"),  # read from the installed metadata: no Flower import here
            "ray": _version("ray"),
            "cuda_available": torch.cuda.is_available(),
            "seed": seed,
            "device": device,
            "cpu_count": os.cpu_count(),
            **(extra or {}),
        }
        atomic_write_text(self.path / "env.json", json.dumps(env, indent=2))

    def log_metric(
        self, *, round: int, client: int | str | None, source: str, key: str, value: Any
    ) -> None:
        """Append one metric line to ``metrics.jsonl``."""
        row = {
            "round": round,
            "client": client,
            "source": source,
            "key": key,
            "value": _jsonable(value),
        }
        line = json.dumps(row)
        with self._lock, open(self._metrics, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def flush_round(self) -> None:
        """Force the metric lines written so far onto the disk (``fsync``): called once per
        round, so a killed run keeps every finished round's metrics. Each line is appended
        (never rewritten) as it comes; only this call waits for the disk."""
        if not self._metrics.exists():
            return
        with self._lock, open(self._metrics, "a", encoding="utf-8") as fh:
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every metric line written so far."""
        if not self._metrics.exists():
            return []
        with open(self._metrics, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def save_grid(
        self,
        *,
        round: int,
        client: int | str,
        originals: torch.Tensor,
        rows: Sequence[Any],
        title: str | None = None,
        captions: Sequence[str] | None = None,
    ) -> Path:
        """Save originals above one row of reconstructions per attack (images in [0, 1]); rows
        are :class:`fl_privsim.core.plots.GridRow` or ``(label, images)`` pairs."""
        from fl_privsim.core.plots import image_grid

        folder = self.path / "attacks" / f"round_{round:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"client_{client:03d}.png" if isinstance(client, int) else f"client_{client}.png"
        out = folder / name
        image_grid(out, originals, rows, title=title, captions=captions)
        return out

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """Write ``summary.json`` atomically."""
        out = self.path / "summary.json"
        atomic_write_text(out, json.dumps(summary, indent=2, default=_jsonable))
        return out


def start_run_folder(cfg: Config, path: Path) -> RunFolder:
    """Create the run folder's writer and save ``config.toml`` and ``env.json``."""
    folder = RunFolder(path)
    folder.write_config(to_toml(cfg))
    folder.write_env(seed=cfg.seed, device=str(resolve_device(cfg.federation.device)))
    return folder


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 3 significant decimals, None prints as '-'."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3f}".rstrip("0").rstrip(".")
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)

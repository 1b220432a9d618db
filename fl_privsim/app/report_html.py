"""What the run and sweep reports share: the Jinja2 templates (package data under
``fl_privsim/app/templates``, autoescaped), images inlined as ``data:`` URIs, tolerant readers
of a folder's files and the number formats. Nothing here reaches outside the folder: a report
must open offline."""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jinja2

from fl_privsim.core.results import atomic_write_text

log = logging.getLogger(__name__)

#: The file name of a report, in its run or sweep folder.
REPORT = "report.html"


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("fl_privsim.app", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(template: str, folder: Path, kind: str, **context: Any) -> str:
    """Render ``template`` (e.g. ``run.html.j2``) with ``context``; ``folder`` and ``kind``
    ("run" or "sweep") go into the page footer with the time it was built."""
    context.setdefault("notes", [])
    built = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    page = _environment().get_template(template)
    return page.render(folder=str(folder), kind=kind, generated=built, **context)


def write_page(folder: Path, html: str) -> Path:
    """Write ``folder/report.html`` atomically; returns its path."""
    out = folder / REPORT
    atomic_write_text(out, html)
    log.info("wrote %s", out)
    return out


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI of PNG bytes (the page stays one file)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image(path: Path, caption: str) -> dict[str, str]:
    """An image of the folder, inlined: ``{"uri": data URI, "caption": caption}``."""
    return {"uri": data_uri(path.read_bytes()), "caption": caption}


def read_json(path: Path, notes: list[str]) -> Any:
    """The JSON content of ``path``; ``None`` when it is absent, or unreadable (then a line
    saying so is appended to ``notes``, shown at the top of the page)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"{path.name} could not be read: {exc}")
        return None


def read_text(path: Path) -> str | None:
    """The text of ``path``, ``None`` when absent or unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def fmt(value: Any, spec: str) -> str:
    """``format(value, spec)`` as the CLI prints it: ``-`` for a missing value."""
    return "-" if value is None else format(value, spec)


def plain(value: Any) -> str:
    """A table cell of any value: ``-`` for missing/NaN, ``%.4g`` for floats, TOML-like
    ``true``/``false``, JSON for lists and dicts."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)

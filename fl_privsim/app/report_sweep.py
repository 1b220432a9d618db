"""The sweep page of the HTML reports (:func:`write_sweep_report`): built from a sweep folder's
``sweep.json``, ``results.csv``, ``summary.csv`` and ``plots/*.png`` (the layout of
``fl-privsim sweep``); each of them may be missing, and the page shows what exists."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_privsim.app.report_html import REPORT, fmt, image, plain, read_json, render, write_page

log = logging.getLogger(__name__)

#: ``summary.csv`` columns that hold statistics, not the row's identity.
STAT_COLUMNS = frozenset(
    {"metric", "mean", "ci_low", "ci_high", "n", "n_seeds", "seeds", "std", "sem", "count"}
)
#: How a metric's mean and CI are printed (the CLI's formats); others get ``.4g``.
METRIC_FORMATS = {
    "psnr": ".2f",
    "ssim": ".3f",
    "avd": ".3f",
    "asr": ".2f",
    "leakage_rate": ".2f",
    "label_accuracy": ".3f",
    "auc": ".3f",
    "accuracy": ".3f",
    "advantage": ".3f",
}


def _read_csv(path: Path, notes: list[str]) -> list[dict[str, Any]] | None:
    """The rows of a CSV table (pandas), ``None`` when the file is absent or unreadable."""
    if not path.is_file():
        return None
    import pandas as pd  # about half a second: only when a sweep page is drawn

    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.EmptyDataError) as exc:
        notes.append(f"{path.name} could not be read: {exc}")
        return None
    records: list[dict[str, Any]] = frame.to_dict("records")
    return records


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _numeric_columns(header: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> tuple[int, ...]:
    """Indexes of the columns whose present values are all numbers."""
    return tuple(
        i
        for i, col in enumerate(header)
        if any(not _missing(r.get(col)) for r in rows)
        and all(_is_number(r.get(col)) for r in rows if not _missing(r.get(col)))
    )


def _mean_ci(metric: str, row: Mapping[str, Any]) -> str:
    """``mean [lo, hi]`` in the metric's format (``mean`` alone without a CI)."""
    spec = METRIC_FORMATS.get(metric, ".4g")
    mean = row.get("mean")
    if _missing(mean):
        return "-"
    lo, hi = row.get("ci_low"), row.get("ci_high")
    if _missing(lo) or _missing(hi):
        return fmt(mean, spec)
    return f"{fmt(mean, spec)} [{fmt(lo, spec)}, {fmt(hi, spec)}]"


def _summary_table(
    rows: list[dict[str, Any]], grid_keys: list[str], cells: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """``summary.csv`` pivoted: one row per cell x attack (its grid values, aggregate size...)
    and one ``mean [lo, hi]`` column per metric. A table without ``metric``/``mean`` columns is
    shown as it is."""
    if not rows:
        return None
    columns = list(rows[0])
    if not {"metric", "mean"} <= set(columns):
        return _plain_table(rows)
    ident = [c for c in columns if c not in STAT_COLUMNS]
    values_of = {int(c["cell"]): c.get("values") or {} for c in cells if "cell" in c}
    extra = [k for k in grid_keys if k not in ident] if "cell" in ident and values_of else []
    for row in rows:  # grid values of the cell, when the table names the cell only
        cell = row.get("cell")
        cell_values: Mapping[str, Any] = {}
        if extra and isinstance(cell, int | float) and not _missing(cell):
            cell_values = values_of.get(int(cell)) or {}
        row.update({k: cell_values.get(k) for k in extra})
    if extra:
        at = ident.index("cell") + 1
        ident[at:at] = extra
    metrics = list(dict.fromkeys(str(r["metric"]) for r in rows))
    grouped: dict[tuple[str, ...], dict[str, str]] = {}
    firsts: dict[tuple[str, ...], dict[str, Any]] = {}
    for row in rows:
        key = tuple(plain(row.get(c)) for c in ident)
        grouped.setdefault(key, {})[str(row["metric"])] = _mean_ci(str(row["metric"]), row)
        firsts.setdefault(key, row)
    header = [*ident, *metrics]
    numeric = _numeric_columns(ident, list(firsts.values()))
    table = [[*key, *(by.get(m, "-") for m in metrics)] for key, by in grouped.items()]
    return {
        "header": header,
        "rows": table,
        "numeric": numeric + tuple(range(len(ident), len(header))),
    }


def _plain_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A CSV table as it is, every value through :func:`plain`."""
    header = list(rows[0]) if rows else []
    return {
        "header": header,
        "rows": [[plain(r.get(c)) for c in header] for r in rows],
        "numeric": _numeric_columns(header, rows),
    }


def _cells_table(
    sweep_dir: Path, cells: list[dict[str, Any]], grid_keys: list[str]
) -> dict[str, Any] | None:
    """One row per cell x seed of ``sweep.json``, linking its run report (relative href)."""
    if not cells:
        return None
    header = ["id", "seed", *grid_keys, "status", "error", "seconds", "report"]
    rows = []
    for c in cells:
        folder = str(c.get("dir") or f"cells/{c.get('id')}").replace("\\", "/").rstrip("/")
        page = f"{folder}/{REPORT}"
        link = (
            {"href": page, "text": "report"}
            if (sweep_dir / page).is_file()
            else {"href": None, "text": "no report"}
        )
        seconds = c.get("seconds")
        rows.append(
            [
                plain(c.get("id")),
                plain(c.get("seed")),
                *(plain((c.get("values") or {}).get(k)) for k in grid_keys),
                plain(c.get("status")),
                plain(c.get("error")) if c.get("error") else "",
                fmt(seconds, ".1f") if _is_number(seconds) else "-",
                link,
            ]
        )
    values = [{"seed": c.get("seed"), **(c.get("values") or {})} for c in cells]
    numeric = tuple(i + 1 for i in _numeric_columns(["seed", *grid_keys], values))
    return {"header": header, "rows": rows, "numeric": (*numeric, len(grid_keys) + 4)}


def _grid_table(manifest: Mapping[str, Any], cells: list[dict[str, Any]]) -> list[list[str]]:
    """Per swept key: its values (in grid order) and the keys it is zipped with."""
    zips = [list(map(str, group)) for group in manifest.get("zip") or []]
    rows = []
    for key in manifest.get("grid_keys") or []:
        values = dict.fromkeys(plain((c.get("values") or {}).get(key)) for c in cells)
        partners = [k for group in zips if key in group for k in group if k != key]
        rows.append([str(key), ", ".join(values) or "-", ", ".join(partners) or "-"])
    return rows


def _cells_of(sweep_dir: Path, manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The manifest's cells; without any, the folders under ``cells/`` (done when they have
    a summary.json)."""
    cells = [c for c in manifest.get("cells") or [] if isinstance(c, dict)]
    if cells or not (sweep_dir / "cells").is_dir():
        return cells
    return [
        {
            "id": d.name,
            "dir": f"cells/{d.name}",
            "status": "done" if (d / "summary.json").is_file() else "unknown",
        }
        for d in sorted((sweep_dir / "cells").iterdir())
        if d.is_dir()
    ]


def write_sweep_report(sweep_dir: Path) -> Path:
    """Render ``sweep_dir/report.html`` from the sweep folder's files and return its path:
    the grid, the plots, the summary over seeds, the cells (each linking its own report) and
    the tidy results. Missing files are left out, with a note."""
    sweep_dir = Path(sweep_dir)
    notes: list[str] = []
    manifest = read_json(sweep_dir / "sweep.json", notes)
    if not (sweep_dir / "sweep.json").exists():
        notes.append("no sweep.json: the sweep's manifest is missing")
    manifest = manifest if isinstance(manifest, dict) else {}
    cells = _cells_of(sweep_dir, manifest)
    grid_keys = [str(k) for k in manifest.get("grid_keys") or []]
    results = _read_csv(sweep_dir / "results.csv", notes)
    summary = _read_csv(sweep_dir / "summary.csv", notes)
    if results is None and summary is None:
        notes.append("no results.csv or summary.csv yet: the sweep has not been tabulated")
    statuses = [str(c.get("status", "unknown")) for c in cells]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
    repeats, base_seed = plain(manifest.get("repeats", "?")), plain(manifest.get("base_seed", "?"))
    facts = [
        f"{len(grid_keys)} grid keys",
        f"{repeats} repeats (base seed {base_seed})",
        f"{len(cells)} runs" + (f": {counts}" if counts else ""),
    ]
    html = render(
        "sweep.html.j2",
        sweep_dir,
        "sweep",
        notes=notes,
        name=str(manifest.get("name") or sweep_dir.name),
        facts=facts,
        grid=_grid_table(manifest, cells),
        plots=[
            image(p, f"{p.stem} (plots/{p.name})")
            for p in sorted((sweep_dir / "plots").glob("*.png"))
        ],
        summary=_summary_table(summary or [], grid_keys, cells),
        cells=_cells_table(sweep_dir, cells, grid_keys),
        results=_plain_table(results) if results else None,
    )
    return write_page(sweep_dir, html)

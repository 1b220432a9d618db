"""The sweep's figures (issue 15): each metric against the number of records behind one
observed update, from the summary table of :func:`fl_privsim.app.sweep_results.summarize`.

One PNG per metric of :data:`PLOTTED` that has a value (``plots/<metric>.png``): x is the
``aggregate_size`` (batch x local steps x clients in the observed update, log scale), y the
mean over seeds with its 95 % bootstrap CI as a band, one line per attack and per value of
each other grid key that varies (not a size key, :data:`SIZE_KEYS`). Several cells of one
line at the same x (batch 4 x 5 clients and batch 20 x 1 client) are not averaged away: each
is its own marker with its own CI bar, the line joins their mean and the figure says so.
Run-level metrics (:data:`RUN_LEVEL`: the model's accuracy, ε) are the same for every attack
of a cell: they are drawn once per cell, at the size of the update one client sends (the
aggregate under secure aggregation), one line per value of the other grid keys.

matplotlib is imported where a figure is drawn (start-up time), on an Agg canvas.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fl_privsim.app.sweep_results import AGGREGATE_SUFFIX, grid_columns

log = logging.getLogger(__name__)

#: The metrics drawn, with their axis label.
PLOTTED: dict[str, str] = {
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "asr": "recovered fraction (ASR)",
    "label_accuracy": "label accuracy",
    "auc": "attack ROC-AUC",
    "model_accuracy": "model accuracy (final, test split)",
    "epsilon": "client DP ε",
    "central_epsilon": "central DP ε",
    "leakage_rate": "leakage rate",
}
#: Metrics of the run, not of an attack: one point per cell.
RUN_LEVEL = frozenset({"model_accuracy", "initial_accuracy", "epsilon", "central_epsilon"})
#: Grid keys that only change the x value (the size of the observed update).
SIZE_KEYS = ("client.batch_size", "client.local_steps", "federation.clients_per_round")
XLABEL = "records behind one observed update (batch × local steps × clients)"
SHARED_X_NOTE = (
    "Several cells of a line share an x: each is its own marker (bar: its 95 % CI); "
    "the line joins their mean, the band spans their CIs."
)
RUN_LEVEL_NOTE = "Run-level metric: one point per cell, at the size of one client's update."
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
#: Longest value text in a legend label before it is cut.
MAX_VALUE_CHARS = 32


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def _line_keys(summary: pd.DataFrame) -> list[str]:
    """The grid keys that split lines: those that vary and are not size keys."""
    return [
        k
        for k in grid_columns(summary)
        if k not in SIZE_KEYS and summary[k].astype("str").nunique() > 1
    ]


def _label_keys(summary: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """The line keys a legend names: the fewest scalar-valued keys, taken in grid order, that
    tell the lines apart as well as all of them do (keys that only ride along in a zipped
    scenario, such as ``data.root`` or a list like ``attacks``, then go unnamed); all keys
    when the scalar ones cannot."""

    def distinct(cols: Sequence[str]) -> int:
        return len(summary[["attack", *cols]].astype("str").drop_duplicates())

    full = distinct(keys)
    scalar = [k for k in keys if not summary[k].astype("str").str.startswith(("[", "{")).any()]
    if distinct(scalar) < full:
        return list(keys)
    chosen: list[str] = []
    for key in scalar:
        if distinct(chosen) == full:
            break
        if distinct([*chosen, key]) > distinct(chosen):
            chosen.append(key)
    return chosen


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each key by its last dotted part (``server.role`` -> ``role``) unless two share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _label(
    attack: str | None,
    keys: Sequence[str],
    values: Sequence[Any],
    shown: Sequence[str] | None = None,
) -> str:
    shown = list(keys) if shown is None else list(shown)
    names = _short_names(shown)
    parts = [] if attack is None else [attack or "no attack (run only)"]
    parts += [
        f"{names[k]}={_value_text(v)}" for k, v in zip(keys, values, strict=True) if k in names
    ]
    return ", ".join(parts) or "all cells"


def _as_tuple(name: Any) -> tuple[Any, ...]:
    return name if isinstance(name, tuple) else (name,)


def _points(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The summary rows of ``metric`` to draw (finite mean, positive x); a run-level metric's
    rows reduced to one per cell."""
    rows = summary[summary["metric"] == metric]
    ok = np.isfinite(rows["mean"]) & (rows["aggregate_size"] > 0)
    if not ok.all():
        log.info(
            "%s: %d summary rows without a finite value or size are not drawn",
            metric,
            int((~ok).sum()),
        )
    rows = rows[ok]
    if metric in RUN_LEVEL and len(rows):
        # a client's own update first: the rows of attacks that saw it (not @aggregate)
        agg = rows["attack"].str.endswith(AGGREGATE_SUFFIX)
        rows = rows.assign(_agg=agg).sort_values(["cell", "_agg", "attack"], kind="stable")
        rows = rows.drop_duplicates("cell").drop(columns="_agg")
    return rows


def sweep_figure(summary: pd.DataFrame, metric: str) -> Any:
    """The figure of ``metric`` (a matplotlib ``Figure`` on an Agg canvas); ``None`` when the
    summary has no value of it to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fl_privsim.core.plots import legend_outside, set_log_xticks

    points = _points(summary, metric)
    if points.empty:
        return None
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    keys = _line_keys(summary)
    shown = _label_keys(points, keys)
    by = ([] if metric in RUN_LEVEL else ["attack"]) + keys
    groups = list(points.groupby(by, sort=True, dropna=False)) if by else [((), points)]
    labels = [
        _label(
            None if metric in RUN_LEVEL else str(_as_tuple(name)[0]),
            keys,
            _as_tuple(name)[len(by) - len(keys) :],
            shown,
        )
        for name, _ in groups
    ]
    # the legend sits right of the axes: widen the figure with its longest label
    width = min(5.6 + 0.07 * max(len(t) for t in labels), 16.0)
    fig = Figure(figsize=(width, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    shared = False
    handles: list[Any] = []
    for i, ((_, line), label) in enumerate(zip(groups, labels, strict=True)):
        color, marker = f"C{i % 10}", MARKERS[i % len(MARKERS)]
        line = line.sort_values(["aggregate_size", "cell"], kind="stable")
        per_x = line.groupby("aggregate_size", sort=True)
        xs = np.array(list(per_x.groups), dtype=float)
        shared |= bool((per_x.size() > 1).any())
        ax.fill_between(
            xs, per_x["ci_low"].min(), per_x["ci_high"].max(), color=color, alpha=0.18, lw=0
        )
        ax.plot(xs, per_x["mean"].mean(), color=color, lw=1.5)
        err = np.abs(line[["ci_low", "ci_high"]].to_numpy(float).T - line["mean"].to_numpy(float))
        ax.errorbar(
            line["aggregate_size"],
            line["mean"],
            yerr=err,
            fmt=marker,
            color=color,
            ms=5,
            capsize=2,
            lw=0.8,
        )
        handles.append(Line2D([], [], color=color, marker=marker, ms=5, lw=1.5, label=label))
    lo, hi = float(points["aggregate_size"].min()), float(points["aggregate_size"].max())
    set_log_xticks(ax, lo / 1.3, hi * 1.3)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    if metric == "auc":
        handles.append(ax.axhline(0.5, color="k", ls="--", lw=0.8, label="chance (AUC 0.5)"))
    ax.set_xlabel(XLABEL, fontsize=9)
    ax.set_ylabel(f"{PLOTTED.get(metric, metric)}\nmean over seeds, 95 % bootstrap CI", fontsize=9)
    ax.set_title(PLOTTED.get(metric, metric), fontsize=10)
    ax.tick_params(labelsize=8)
    ax.grid(True, which="major", alpha=0.3)
    legend_outside(ax, handles=handles)
    notes = [n for n, on in ((RUN_LEVEL_NOTE, metric in RUN_LEVEL), (SHARED_X_NOTE, shared)) if on]
    if notes:
        fig.text(0.01, 0.005, "\n".join(notes), fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05 * len(notes), 1, 1))
    return fig


def plot_sweep(summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write ``out_dir/<metric>.png`` for each metric of :data:`PLOTTED` that has a value in
    ``summary``; returns the files written, in :data:`PLOTTED` order."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    for metric in PLOTTED:
        fig = sweep_figure(summary, metric)
        if fig is None:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{metric}.png"
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        tmp.replace(path)
        written.append(path)
    if not written:
        log.info("no metric with a value to plot")
    return written

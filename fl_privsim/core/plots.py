"""Image grids of originals and reconstructions (matplotlib, no display needed).

Large batches (an aggregate of hundreds of records) are capped: at most :data:`MAX_SHOWN`
originals are drawn, :data:`PER_ROW` to a row, and the figure says which records it shows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: Most originals (each with its matched reconstructions) drawn in one grid.
MAX_SHOWN = 32
#: Most tiles in one row; longer rows wrap into blocks.
PER_ROW = 16


@dataclass(frozen=True)
class GridLayout:
    """Where the tiles of :func:`image_grid` go.

    Attributes
    ----------
    total:
        Originals in the batch.
    shown:
        Originals drawn (the first ``shown``).
    columns:
        Tiles per row.
    blocks:
        Row blocks: block ``b`` holds records ``b * columns`` to ``(b + 1) * columns - 1``, one
        row for the originals and one per attack.
    rows_per_block:
        1 + the number of attacks.
    """

    total: int
    shown: int
    columns: int
    blocks: int
    rows_per_block: int

    @property
    def caption(self) -> str | None:
        """The figure's title when not every record is drawn, else ``None``."""
        if self.shown >= self.total:
            return None
        return f"first {self.shown} of {self.total} records (each with its matched reconstructions)"


def grid_layout(
    total: int, attacks: int, *, max_shown: int = MAX_SHOWN, per_row: int = PER_ROW
) -> GridLayout:
    """Layout of a grid of ``total`` originals and ``attacks`` reconstruction rows.

    Up to ``per_row`` originals keep the one-row-per-attack look; more wrap into blocks of
    ``per_row`` columns, and only the first ``max_shown`` are drawn.
    """
    shown = max(1, min(total, max_shown))
    columns = min(shown, max(1, per_row))
    blocks = math.ceil(shown / columns)
    return GridLayout(
        total=total, shown=shown, columns=columns, blocks=blocks, rows_per_block=1 + attacks
    )


@dataclass(frozen=True)
class GridRow:
    """One attack's row of an image grid.

    Attributes
    ----------
    label:
        The row's name (the attack).
    images:
        Reconstructions matched to the originals (N, C, H, W), or ``None`` when the attack
        drew nothing (refused, failed, labels only).
    captions:
        One caption per tile, drawn under it (e.g. its PSNR).
    note:
        Written across the row when ``images`` is ``None`` (e.g. "refused: <reason>").
    """

    label: str
    images: torch.Tensor | None
    captions: Sequence[str] | None = None
    note: str | None = None


def _row(item: GridRow | tuple[str, torch.Tensor | None]) -> GridRow:
    return item if isinstance(item, GridRow) else GridRow(item[0], item[1])


def _show(ax: Axes, img: torch.Tensor) -> None:
    img = img.detach().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def image_grid(
    path: Path,
    originals: torch.Tensor,
    rows: Sequence[GridRow | tuple[str, torch.Tensor | None]],
    *,
    title: str | None = None,
    captions: Sequence[str] | None = None,
    max_shown: int = MAX_SHOWN,
    per_row: int = PER_ROW,
) -> GridLayout:
    """Write a PNG: one row of ``originals`` (N, C, H, W), below it one row per attack of its
    reconstructions, already matched to the originals.

    ``title`` heads the figure (e.g. round, client, protocol); ``captions`` go above the
    originals (e.g. their true labels); a :class:`GridRow`'s captions go under its tiles (e.g.
    PSNR) and a row without images shows its ``note`` (e.g. why the attack refused), never a
    blank. Only the first ``max_shown`` originals are drawn, ``per_row`` to a row: longer
    batches wrap into blocks (originals, then each attack, for records 1-16, then 17-32, ...)
    and the title names the records shown. Returns the layout used.
    """
    grid_rows = [_row(r) for r in rows]
    layout = grid_layout(originals.shape[0], len(grid_rows), max_shown=max_shown, per_row=per_row)
    n_rows = layout.blocks * layout.rows_per_block
    cols = layout.columns
    heading = "\n".join(t for t in (title, layout.caption) if t)
    figsize = (1.3 * cols + 1.2, 1.55 * n_rows + (0.5 if heading else 0.0))
    fig, axes = plt.subplots(n_rows, cols, figsize=figsize, squeeze=False)
    all_rows = [GridRow("original", originals, captions), *grid_rows]
    for b in range(layout.blocks):
        first = b * cols
        for r, row in enumerate(all_rows):
            ax_row = axes[b * layout.rows_per_block + r]
            for c in range(cols):
                i = first + c
                ax = ax_row[c]
                if row.images is not None and i < layout.shown and i < row.images.shape[0]:
                    _show(ax, row.images[i])
                    if row.captions is not None and i < len(row.captions):
                        if r == 0:
                            ax.set_title(row.captions[i], fontsize=6, pad=2)
                        else:
                            ax.set_xlabel(row.captions[i], fontsize=6, labelpad=2)
                elif c == 0:  # no image: keep the row's label visible
                    ax.set_frame_on(False)
                    ax.set_xticks([])
                    ax.set_yticks([])
                else:
                    ax.axis("off")
            if row.images is None and row.note and b == 0:
                note = ax_row[0].text(
                    0.05,
                    0.5,
                    row.note,
                    transform=ax_row[0].transAxes,
                    fontsize=7,
                    ha="left",
                    va="center",
                    color="darkred",
                )
                note.set_in_layout(False)  # it runs across the row's empty tiles
            label = row.label
            if layout.blocks > 1:
                label = f"{label}\n{first + 1}-{min(first + cols, layout.shown)}"
            ax_row[0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    if heading:
        fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return layout


# ----------------------------------------------------------------------------- readable axes
# Helpers for the package's line/bar/histogram figures (not the image grids above): few,
# non-overlapping tick labels on log axes, and legends outside the data area.


def log_ticks(lo: float, hi: float, *, max_ticks: int = 5) -> list[float]:
    """At most ``max_ticks`` round values (1·10ᵏ, then 1/2/5·10ᵏ, then 1…9·10ᵏ) between
    ``lo`` and ``hi`` (> 0) for a log axis, evenly thinned; ``[lo, hi]`` when none are round."""
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(f"log ticks need 0 < lo <= hi, got {lo}, {hi}")
    exps = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 2)
    for subs in ((1,), (1, 2, 5), tuple(range(1, 10))):
        inside = sorted(m * 10.0**e for e in exps for m in subs if lo <= m * 10.0**e <= hi)
        if len(inside) >= 2:
            step = math.ceil(len(inside) / max_ticks)
            return inside[::step]
    return [lo, hi] if hi > lo else [lo]


def set_log_xticks(ax: Axes, lo: float, hi: float, *, max_ticks: int = 5) -> list[float]:
    """Log x axis over [lo, hi] labelled only at :func:`log_ticks` (``%g``), minor ticks
    unlabelled: matplotlib's default labels every minor tick of a short log axis, and they
    overlap. Returns the ticks."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ticks = log_ticks(lo, hi, max_ticks=max_ticks)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.2g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    return ticks


def legend_outside(ax: Axes, **kwargs: object) -> object:
    """The axes' legend right of the axes (never over the data); save the figure with
    ``bbox_inches="tight"`` so it is kept."""
    opts: dict[str, object] = {
        "loc": "upper left",
        "bbox_to_anchor": (1.02, 1.0),
        "borderaxespad": 0.0,
        "fontsize": 8,
        "frameon": False,
    }
    return ax.legend(**(opts | kwargs))


def shared_legend_outside(axes: Sequence[Axes], **kwargs: object) -> object | None:
    """One legend for panels that draw the same series: the labelled handles of all ``axes``
    (first occurrence of each label, in order) right of the last of them, via
    :func:`legend_outside`. ``None`` when nothing is labelled. Give each series the same colour
    in every panel (e.g. ``color=f"C{i}"``) so that one key fits all."""
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if not handles:
        return None
    return legend_outside(axes[-1], handles=list(handles.values()), labels=list(handles), **kwargs)


# ----------------------------------------------------------------------------- accuracy curve


def accuracy_plot(
    out: Path | BinaryIO,
    central: Mapping[int, float],
    federated: Mapping[int, float] | None = None,
) -> None:
    """Write a small PNG of model test accuracy by round to ``out`` (a path or a binary file):
    the server's central evaluation (round 0 is the initial model) and, when given, the
    clients' federated evaluation."""
    fig, ax = plt.subplots(figsize=(5.0, 2.8))
    for label, series, style in (
        ("central test set", central, "o-"),
        ("federated (clients)", federated or {}, "s--"),
    ):
        if series:
            rounds = sorted(series)
            ax.plot(rounds, [series[r] for r in rounds], style, label=label, markersize=4)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    rounds = sorted(set(central) | set(federated or {}))
    if rounds and len(rounds) <= 12:
        ax.set_xticks(rounds)
    legend_outside(ax)
    fig.savefig(out, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)

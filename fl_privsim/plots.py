"""Image grids of originals and reconstructions (matplotlib, no display needed).

Large batches (an aggregate of hundreds of records) are capped: at most :data:`MAX_SHOWN`
originals are drawn, :data:`PER_ROW` to a row, and the figure says which records it shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

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


def _show(ax: plt.Axes, img: torch.Tensor) -> None:
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
    rows: Sequence[tuple[str, torch.Tensor | None]],
    *,
    max_shown: int = MAX_SHOWN,
    per_row: int = PER_ROW,
) -> GridLayout:
    """Write a PNG: one row of ``originals`` (N, C, H, W), below it one row per attack of its
    reconstructions, already matched to the originals (``None`` rows are left blank).

    Only the first ``max_shown`` originals are drawn, ``per_row`` to a row: longer batches
    wrap into blocks (originals, then each attack, for records 1-16, then 17-32, ...) and the
    figure's title names the records shown. Returns the layout used.
    """
    layout = grid_layout(originals.shape[0], len(rows), max_shown=max_shown, per_row=per_row)
    n_rows = layout.blocks * layout.rows_per_block
    cols = layout.columns
    title = layout.caption
    figsize = (1.3 * cols + 1.2, 1.3 * n_rows + (0.4 if title else 0.0))
    fig, axes = plt.subplots(n_rows, cols, figsize=figsize, squeeze=False)
    all_rows: list[tuple[str, torch.Tensor | None]] = [("original", originals), *rows]
    for b in range(layout.blocks):
        first = b * cols
        for r, (label, imgs) in enumerate(all_rows):
            ax_row = axes[b * layout.rows_per_block + r]
            for c in range(cols):
                i = first + c
                ax = ax_row[c]
                if imgs is not None and i < layout.shown and i < imgs.shape[0]:
                    _show(ax, imgs[i])
                elif c == 0:  # blank, but keep the row's label visible
                    ax.set_frame_on(False)
                    ax.set_xticks([])
                    ax.set_yticks([])
                else:
                    ax.axis("off")
            if layout.blocks > 1:
                label = f"{label}\n{first + 1}-{min(first + cols, layout.shown)}"
            ax_row[0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return layout

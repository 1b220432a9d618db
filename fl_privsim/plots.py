"""Image grids of originals and reconstructions (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _show(ax: plt.Axes, img: torch.Tensor) -> None:
    img = img.detach().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def image_grid(path: Path, originals: torch.Tensor, rows: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    """Write a PNG: the first row holds ``originals`` (N, C, H, W), each next row one attack's
    reconstructions, already matched to the originals (``None`` rows are left blank)."""
    n = max(1, originals.shape[0])
    n_rows = 1 + len(rows)
    fig, axes = plt.subplots(n_rows, n, figsize=(1.3 * n + 1.2, 1.3 * n_rows), squeeze=False)
    all_rows: list[tuple[str, torch.Tensor | None]] = [("original", originals), *rows]
    for r, (label, imgs) in enumerate(all_rows):
        for c in range(n):
            ax = axes[r][c]
            if imgs is not None and c < imgs.shape[0]:
                _show(ax, imgs[c])
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

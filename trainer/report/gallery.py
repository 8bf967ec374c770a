"""A gallery of photo thumbnails in labelled rows (``eval/mistakes.png``, ``eval/label_issues.png``).

Thumbnails are decoded from the records' encoded bytes with Pillow; the page
is drawn with matplotlib's Agg backend and written as :mod:`trainer.report.plots`
writes its figures (rendered in memory, then any TF filesystem).
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from trainer.report import plots

THUMBNAIL = 128  # pixels, the longer side
COLUMNS = 8


def thumbnail(encoded: bytes, side: int = THUMBNAIL) -> np.ndarray | None:
    """An RGB ``uint8`` array of at most ``side`` pixels a side, or None when Pillow cannot decode ``encoded``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(encoded)) as image:
            image = image.convert("RGB")
            image.thumbnail((side, side))
            return np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def plot_gallery(rows: Sequence[tuple[str, Sequence[tuple[bytes, str]]]], path: str, *, title: str,
                 columns: int = COLUMNS, empty: str = "nothing to show") -> str:
    """One row of thumbnails per ``(row label, [(encoded image, caption), ...])``; at most ``columns`` a row.

    The row label is written left of its first thumbnail, each caption above
    its thumbnail. With no rows the page says ``empty``.
    """
    import matplotlib.pyplot as plt

    rows = [(label, list(cells)[:columns]) for label, cells in rows if cells]
    if not rows:
        fig, ax = plt.subplots(figsize=(6, 1.6))
        ax.axis("off")
        ax.text(0.5, 0.5, empty, ha="center", va="center", fontsize=11)
        ax.set_title(title)
        return plots._save(fig, path)
    width = max(len(cells) for _, cells in rows)
    title_height = 0.25 + 0.22 * (title.count("\n") + 1)  # inches above the grid
    height = 2.05 * len(rows) + title_height
    fig, axes = plt.subplots(len(rows), width, figsize=(1.75 * width + 1.2, height), squeeze=False)
    for r, (label, cells) in enumerate(rows):
        for c in range(width):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.axis("off")
                continue
            encoded, caption = cells[c]
            image = thumbnail(encoded)
            if image is None:
                ax.text(0.5, 0.5, "undecodable", ha="center", va="center", fontsize=7, color="grey")
            else:
                ax.imshow(image)
            ax.set_title(caption, fontsize=7)
            for spine in ax.spines.values():
                spine.set_color("lightgrey")
            if c == 0:
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center", labelpad=6)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - title_height / height))
    return plots._save(fig, path)

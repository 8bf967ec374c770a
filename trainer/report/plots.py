"""The evaluation figures (matplotlib, Agg backend: no display needed).

Each function draws one PNG from plain numbers, writes it to ``path`` (any
TF filesystem: the figure is rendered in memory, then written with
``tf.io.gfile``) and returns the path. ``trainer.report.evaluate`` computes the numbers.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 120


def _save(fig, path: str) -> str:
    import tensorflow as tf

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        tf.io.gfile.makedirs(parent)
    with tf.io.gfile.GFile(path, "wb") as handle:
        handle.write(buf.getvalue())
    return path


def plot_confusion_matrix(matrix: np.ndarray, labels: Sequence[str], path: str, *,
                          title: str = "Confusion matrix (test split)") -> str:
    """Counts in every cell; colour = the row-normalised share (recall on the diagonal)."""
    matrix = np.asarray(matrix, dtype=np.int64)
    n = len(labels)
    row_sums = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, row_sums, out=np.zeros(matrix.shape), where=row_sums > 0)
    side = max(4.5, 0.75 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.set_label("share of the true class (row-normalised)")
    font = 10 if n <= 10 else 8
    for i in range(n):
        for j in range(n):
            text = f"{matrix[i, j]}\n{shares[i, j]:.0%}" if matrix[i, j] else "0"
            colour = "white" if shares[i, j] > 0.55 else ("black" if matrix[i, j] else "grey")
            ax.text(j, i, text, ha="center", va="center", fontsize=font, color=colour)
    ax.set_xticks(range(n), labels=labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels=labels)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    total = int(matrix.sum())
    correct = int(np.trace(matrix))
    accuracy = correct / total if total else 0.0
    ax.set_title(f"{title}\n{total} examples, {correct} correct (accuracy {accuracy:.1%})")
    return _save(fig, path)


def plot_pr_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], path: str, *,
                   title: str = "Precision-recall, one class vs the rest (test split)") -> str:
    """One step curve per class from ``{name: (precision, recall, average_precision)}``; AP in the legend."""
    fig, ax = plt.subplots(figsize=(8, 6.5))
    cmap = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    for index, (name, (precision, recall, ap)) in enumerate(curves.items()):
        ax.step(recall, precision, where="pre", color=cmap(index % cmap.N), linewidth=1.6,
                label=f"{name} (AP={ap:.3f})")
    mean_ap = float(np.mean([ap for _, _, ap in curves.values()])) if curves else 0.0
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_title(f"{title}\nmean AP {mean_ap:.3f}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=9, title="class (average precision)", title_fontsize=9)
    return _save(fig, path)


def _accuracy_key(history: Mapping[str, Sequence[float]]) -> str | None:
    for key in ("accuracy", "sparse_categorical_accuracy", "categorical_accuracy", "acc"):
        if key in history:
            return key
    return None


def plot_training_curves(history: Mapping[str, Mapping[str, Sequence[float]]], path: str, *,
                         title: str = "Training curves") -> str:
    """Loss and accuracy per epoch, train (solid) and validation (dashed), phases one after another.

    ``history`` maps a phase name to a Keras ``History.history`` dict, in
    order (``{"phase1": ..., "phase2": ...}``). Epochs are numbered across
    phases; each later phase is shaded and named where it starts. Phases with
    no epochs are skipped; a missing series (no validation) is left out.
    """
    phases = [(name, h) for name, h in history.items() if h and len(h.get("loss", [])) > 0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    total = sum(len(h["loss"]) for _, h in phases)
    for ax, panel in zip(axes, ("loss", "accuracy")):
        for prefix, style, name in (("", "-o", "train"), ("val_", "--s", "validation")):
            x, y = [], []
            start = 0
            for _, h in phases:
                key = "loss" if panel == "loss" else _accuracy_key(h)
                epochs = len(h["loss"])
                values = h.get(f"{prefix}{key}") if key else None
                if values is not None and len(values) == epochs:
                    x.extend(range(start + 1, start + epochs + 1))
                    y.extend(float(v) for v in values)
                start += epochs
            if x:
                ax.plot(x, y, style, markersize=4, linewidth=1.6, label=name)
        start = 0
        for index, (phase, h) in enumerate(phases):
            epochs = len(h["loss"])
            if index % 2:
                ax.axvspan(start + 0.5, start + epochs + 0.5, color="grey", alpha=0.08)
            if index > 0:
                ax.axvline(start + 0.5, color="grey", linestyle=":", linewidth=1.2)
            ax.annotate(phase, xy=(start + 0.5, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=8, color="dimgrey")
            start += epochs
        ax.set_xlabel("Epoch (numbered across phases)")
        ax.set_ylabel("Loss (cross-entropy)" if panel == "loss" else "Accuracy")
        ax.set_title("Loss" if panel == "loss" else "Accuracy")
        ax.grid(alpha=0.3)
        if total:
            ax.set_xlim(0.5, total + 0.5)
            ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            # Away from the phase names along the top and from curves that fall (loss) or rise (accuracy).
            ax.legend(fontsize=9, loc="upper right" if panel == "loss" else "lower right")
    fig.suptitle(title)
    return _save(fig, path)

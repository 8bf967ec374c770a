"""Test-split evaluation: the numbers in ``JOB/eval/metrics.json`` and the PNGs beside it.

Two entry points:

* :func:`metrics_from_probabilities` is pure numpy: ``(y_true, probabilities)``
  in, the metrics dict out. Anything that has probabilities (the Keras model,
  the exported SavedModel, a TF Serving gRPC response) can be scored the same
  way, so the end-to-end check compares like with like.
* :func:`evaluate_model` runs a Keras model over a ``tf.data`` dataset, computes
  those metrics, writes ``metrics.json`` and draws the plots (``trainer.report.plots``).

The counts and curves are scikit-learn's (``confusion_matrix``,
``precision_recall_fscore_support`` with 0.0 where undefined,
``precision_recall_curve``, ``average_precision_score``).
Written here: top-k counts a hit when fewer than ``k`` classes score strictly
higher than the true class (``tf.math.in_top_k``'s tie rule; scikit-learn's
``top_k_accuracy_score`` breaks ties by order), AP is 0.0 for a class without
positives (scikit-learn warns and returns a meaningless value), the loss
on the model's own probabilities (``log_loss`` renormalises float32 softmax
rows that miss 1 by rounding, and warns), and the Wilson interval of the accuracy.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from trainer import staging

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CONFUSION_MATRIX_PNG = "confusion_matrix.png"
PR_CURVES_PNG = "pr_curves.png"
TRAINING_CURVES_PNG = "training_curves.png"


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[C, C]``: row = true class, column = predicted class."""
    from sklearn import metrics

    return metrics.confusion_matrix(y_true, y_pred, labels=list(range(num_classes))).astype(np.int64)


def top_k_accuracy(y_true: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """Fraction of examples whose true class is among the ``k`` highest scores (ties count as hits)."""
    true_scores = probabilities[np.arange(len(y_true)), y_true]
    higher = (probabilities > true_scores[:, None]).sum(axis=1)
    return float(np.mean(higher < k)) if len(y_true) else 0.0


def precision_recall_curve(is_positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """One-vs-rest precision and recall at every distinct score threshold, and the average precision.

    Returns ``(precision, recall, ap)``; the arrays start at the highest
    threshold and end at the lowest (recall rising to 1), with a leading point
    ``(precision=1, recall=0)`` so a plotted curve starts at the top left. AP is
    0.0 for a class with no positives.
    """
    from sklearn import metrics

    is_positive = np.asarray(is_positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if not is_positive.any() or len(scores) == 0:
        return np.array([1.0]), np.array([0.0]), 0.0
    precision, recall, _ = metrics.precision_recall_curve(is_positive, scores)
    ap = float(metrics.average_precision_score(is_positive, scores))
    # scikit-learn lists thresholds from low to high and ends at (precision 1, recall 0): turn it around.
    return precision[::-1], recall[::-1], ap


def accuracy_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of an accuracy of ``correct / total`` (95% by default).

    A test split of a few hundred images measures accuracy to about +-3
    points; this says how far apart two runs (or a run and a target) must be
    before the difference means anything.
    """
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def metrics_from_probabilities(y_true: Sequence[int], probabilities: np.ndarray, labels: Sequence[str],
                               top_k: int = 3) -> dict[str, Any]:
    """Every test metric from true class ids ``[N]`` and softmax outputs ``[N, C]`` (class order = ``labels``).

    The returned dict is JSON-ready (plain floats, ints, lists) and is what
    ``metrics.json`` holds::

        num_examples, num_classes, labels, accuracy, accuracy_ci95, top_k, top_k_accuracy, loss,
        per_class: {name: {precision, recall, f1, support, average_precision}},
        macro_avg / weighted_avg: {precision, recall, f1, support},
        macro_average_precision,
        confusion_matrix: {rows: "true", cols: "predicted", labels, matrix}

    ``top_k`` is capped at the number of classes (the cap is what ``top_k`` records).
    ``loss`` is the mean categorical cross-entropy (probabilities clipped at 1e-7).
    ``accuracy_ci95`` is the Wilson 95% interval ``[low, high]`` of ``accuracy``.
    """
    labels = [str(label) for label in labels]
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    num_classes = len(labels)
    if probabilities.ndim != 2 or probabilities.shape != (len(y_true), num_classes):
        raise ValueError(f"probabilities must be [N={len(y_true)}, C={num_classes}], got {probabilities.shape}")
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= num_classes):
        raise ValueError(f"class ids must be in [0, {num_classes}), got {y_true.min()}..{y_true.max()}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    k = min(int(top_k), num_classes)

    from sklearn import metrics as sk

    y_pred = probabilities.argmax(axis=1) if len(y_true) else np.zeros(0, np.int64)
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    classes = list(range(num_classes))
    if len(y_true):
        precision, recall, f1, _ = sk.precision_recall_fscore_support(y_true, y_pred, labels=classes,
                                                                      zero_division=0)
    else:
        precision = recall = f1 = np.zeros(num_classes)
    support = matrix.sum(axis=1)
    ap = [precision_recall_curve(y_true == c, probabilities[:, c])[2] for c in range(num_classes)]
    total = int(support.sum())
    weights = support / total if total else np.zeros(num_classes)
    true_probs = probabilities[np.arange(len(y_true)), y_true]

    per_class = {
        name: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
               "support": int(support[c]), "average_precision": float(ap[c])}
        for c, name in enumerate(labels)
    }
    return {
        "num_examples": int(len(y_true)),
        "num_classes": num_classes,
        "labels": labels,
        "accuracy": float(np.mean(y_pred == y_true)) if len(y_true) else 0.0,
        "accuracy_ci95": list(accuracy_interval(int(np.sum(y_pred == y_true)), len(y_true))),
        "top_k": k,
        "top_k_accuracy": top_k_accuracy(y_true, probabilities, k),
        "loss": float(-np.mean(np.log(np.clip(true_probs, 1e-7, 1.0)))) if len(y_true) else 0.0,
        "per_class": per_class,
        "macro_avg": {"precision": float(precision.mean()), "recall": float(recall.mean()),
                      "f1": float(f1.mean()), "support": total},
        "weighted_avg": {"precision": float(precision @ weights), "recall": float(recall @ weights),
                         "f1": float(f1 @ weights), "support": total},
        "macro_average_precision": float(np.mean(ap)),
        "confusion_matrix": {"rows": "true", "cols": "predicted", "labels": labels, "matrix": matrix.tolist()},
    }


def predict_dataset(model, dataset, total: int | None = None, on_batch=None) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` (as one graph function) over ``(images, labels)`` batches; return ``(y_true [N], probs [N, C])``.

    Labels may be class ids ``[B]`` or one-hot ``[B, C]``. With ``total``
    (images), a progress bar or progress lines say how far it is (:mod:`trainer.progress`).
    Batches may carry more components (``(images, labels, *extra)``); ``on_batch(y_true [B], probs [B, C],
    *extra)`` then sees each batch as numpy (``trainer.report.mistakes`` keeps the misclassified ones).
    """
    import tensorflow as tf

    from trainer.progress import Progress

    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    y_true, probs = [], []
    with Progress("evaluation", total, "images") as progress:
        for images, batch_labels, *extra in dataset:
            out = forward(images)
            probs.append(np.asarray(out, dtype=np.float32))
            progress.add(int(out.shape[0]))
            batch_labels = np.asarray(batch_labels)
            y_true.append(batch_labels.argmax(axis=-1) if batch_labels.ndim == 2 else batch_labels.reshape(-1))
            if on_batch is not None:
                on_batch(y_true[-1], probs[-1], *(np.asarray(e) for e in extra))
    if not probs:
        raise ValueError("the evaluation dataset is empty")
    return np.concatenate(y_true).astype(np.int64), np.concatenate(probs)


def _interval(metrics: Mapping[str, Any]) -> str:
    low, high = metrics.get("accuracy_ci95") or (float("nan"), float("nan"))
    return f"{low:.3f}-{high:.3f}"


def format_report(metrics: Mapping[str, Any]) -> str:
    """A readable per-class table of a metrics dict (what :func:`evaluate_model` logs)."""
    width = max([len("weighted avg")] + [len(name) for name in metrics["labels"]])
    lines = [
        f"test: {metrics['num_examples']} examples, accuracy {metrics['accuracy']:.4f} "
        f"(95% interval {_interval(metrics)}), "
        f"top-{metrics['top_k']} {metrics['top_k_accuracy']:.4f}, loss {metrics['loss']:.4f}",
        f"{'':{width}}  precision  recall      f1      AP  support",
    ]
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:>{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:6.3f}"
                     f"  {row['average_precision']:6.3f}  {row['support']:7d}")
    for key, title in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        row = metrics[key]
        lines.append(f"{title:>{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:6.3f}"
                     f"  {'':6}  {row['support']:7d}")
    return "\n".join(lines)


def write_metrics(metrics: Mapping[str, Any], out_dir: str) -> str:
    """Write ``out_dir/metrics.json`` (any TF filesystem); returns its path."""
    import tensorflow as tf

    tf.io.gfile.makedirs(out_dir)
    path = os.path.join(out_dir, METRICS_FILE)
    staging.write_text(path, json.dumps(metrics, indent=2) + "\n")
    return path


def evaluate_model(model, dataset, labels: Sequence[str], out_dir: str, *,
                   history: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                   top_k: int = 3, total: int | None = None, on_batch=None) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` and write ``out_dir/metrics.json`` and the plots.

    ``dataset`` yields ``(images float32 [B, H, W, 3] in [0, 255], class ids [B])``;
    ``labels`` is the class order of the model's softmax (``labels.txt``).
    Writes ``metrics.json`` (see :func:`metrics_from_probabilities`),
    ``confusion_matrix.png``, ``pr_curves.png`` and, when ``history`` is given
    as ``{"phase1": History.history, "phase2": History.history}`` (any number
    of phases, in order), ``training_curves.png``. Returns the metrics dict.
    ``on_batch``: see :func:`predict_dataset`.
    """
    from trainer.report import plots

    y_true, probabilities = predict_dataset(model, dataset, total, on_batch)
    metrics = metrics_from_probabilities(y_true, probabilities, labels, top_k)
    path = write_metrics(metrics, out_dir)
    log.info("%s\nwrote %s", format_report(metrics), path)

    written = [
        plots.plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]["matrix"]), metrics["labels"],
                                    os.path.join(out_dir, CONFUSION_MATRIX_PNG)),
        plots.plot_pr_curves(
            {name: precision_recall_curve(y_true == c, probabilities[:, c]) for c, name in enumerate(labels)},
            os.path.join(out_dir, PR_CURVES_PNG)),
    ]
    if history:
        written.append(plots.plot_training_curves(history, os.path.join(out_dir, TRAINING_CURVES_PNG)))
    log.info("wrote %s", ", ".join(written))
    return metrics

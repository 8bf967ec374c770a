"""What the evaluation got wrong: ``eval/mistakes.csv`` and the gallery ``eval/mistakes.png``.

:class:`MistakeCollector` rides along the evaluation's one pass over the test
split (``evaluate_model(..., on_batch=collector.add)`` with batches of
``(images, labels, source ids, encoded bytes)``, :func:`trainer.data.records.eval_dataset`)
and stays memory-flat as issue 16 asks: of the correctly classified images
it keeps nothing; of the misclassified ones it keeps the row of the CSV
(source path, true and predicted class ids, two floats) and, in a bounded
heap, the encoded bytes of only the :data:`GALLERY_SIZE` most confident
mistakes, the gallery's thumbnails.

``mistakes.csv`` has one row per misclassified image, the most confident
mistake first: ``path, true_label, predicted_label, score`` (the model's
probability of the predicted class) and ``true_label_score`` (its probability of
the true class). ``mistakes.png`` shows those most confident mistakes grouped
by confusion (true -> predicted), the most frequent confusion of the whole
split first; each row names how often that confusion happened.
"""

from __future__ import annotations

import csv
import heapq
import io
import logging
import os
from typing import Sequence

import numpy as np

from trainer import staging
from trainer.report.gallery import COLUMNS, plot_gallery

log = logging.getLogger("trainer")

MISTAKES_CSV = "mistakes.csv"
MISTAKES_PNG = "mistakes.png"
GALLERY_SIZE = 48  # encoded images kept for the gallery: the most confident mistakes
GALLERY_ROWS = 8  # confusions shown, the most frequent first
CSV_COLUMNS = ("path", "true_label", "predicted_label", "score", "true_label_score")


class MistakeCollector:
    """Keeps the misclassified rows of an evaluation pass; see the module docstring."""

    def __init__(self, labels: Sequence[str], gallery_size: int = GALLERY_SIZE):
        self.labels = [str(label) for label in labels]
        self.gallery_size = int(gallery_size)
        self.examined = 0
        self.confusions = np.zeros((len(self.labels), len(self.labels)), np.int64)  # [true, predicted], mistakes only
        self.rows: list[tuple[str, int, int, float, float]] = []  # (path, true, predicted, score, true score)
        self._heap: list[tuple[float, int, str, int, int, bytes]] = []  # min-heap on score: the gallery
        self._order = 0

    def add(self, y_true, probabilities, sources, encoded) -> None:
        """One batch: class ids ``[B]``, softmax ``[B, C]``, source ids ``[B]`` and encoded images ``[B]`` (bytes)."""
        y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
        probabilities = np.asarray(probabilities)
        predicted = probabilities.argmax(axis=1)
        self.examined += len(y_true)
        for i in np.flatnonzero(predicted != y_true):
            true, guess = int(y_true[i]), int(predicted[i])
            score, true_score = float(probabilities[i, guess]), float(probabilities[i, true])
            source = sources[i]
            path = source.decode("utf-8", "replace") if isinstance(source, bytes) else str(source)
            self.confusions[true, guess] += 1
            self.rows.append((path, true, guess, score, true_score))
            item = (score, self._order, path, true, guess, bytes(encoded[i]))
            self._order += 1
            if len(self._heap) < self.gallery_size:
                heapq.heappush(self._heap, item)
            elif score > self._heap[0][0]:
                heapq.heapreplace(self._heap, item)

    @property
    def count(self) -> int:
        return len(self.rows)

    def csv_text(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for path, true, guess, score, true_score in sorted(self.rows, key=lambda row: (-row[3], row[0])):
            writer.writerow([path, self.labels[true], self.labels[guess], f"{score:.6f}", f"{true_score:.6f}"])
        return buf.getvalue()

    def gallery_rows(self, max_rows: int = GALLERY_ROWS) -> list[tuple[str, list[tuple[bytes, str]]]]:
        """The kept images grouped by (true, predicted), the most frequent confusion first, most confident first."""
        groups: dict[tuple[int, int], list] = {}
        for item in sorted(self._heap, key=lambda entry: (-entry[0], entry[1])):
            groups.setdefault((item[3], item[4]), []).append(item)
        order = sorted(groups, key=lambda pair: (-self.confusions[pair], -groups[pair][0][0]))
        rows = []
        for true, guess in order[:max_rows]:
            label = f"{self.labels[true]}\n-> {self.labels[guess]}\n({self.confusions[true, guess]} x)"
            cells = [(item[5], f"{os.path.basename(item[2])[:22]}\n{self.labels[guess]} {item[0]:.2f}")
                     for item in groups[(true, guess)][:COLUMNS]]
            rows.append((label, cells))
        return rows

    def write(self, out_dir: str) -> dict:
        """Write ``out_dir/mistakes.csv`` and ``out_dir/mistakes.png``; return ``{count, examined, csv, png}``."""
        import tensorflow as tf

        tf.io.gfile.makedirs(out_dir)
        csv_path = os.path.join(out_dir, MISTAKES_CSV)
        staging.write_text(csv_path, self.csv_text())
        rows = self.gallery_rows()
        shown = sum(len(cells) for _, cells in rows)
        title = (f"The most confident mistakes: {shown} of {self.count} misclassified (of {self.examined} images)\n"
                 "by confusion (true -> predicted), the most frequent first; caption: predicted class, its score")
        png_path = plot_gallery(rows, os.path.join(out_dir, MISTAKES_PNG), title=title,
                                empty=f"no misclassified images (of {self.examined})")
        return {"count": self.count, "examined": self.examined, "csv": csv_path, "png": png_path}

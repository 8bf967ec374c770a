"""``eval/mistakes.csv`` and ``eval/mistakes.png``: every misclassified test image, and a gallery of the worst.

Unit-level on synthetic probabilities (the collector alone), then once through
``evaluate_model`` over the records' evaluation read (``records.eval_dataset``)
with an untrained model, whose many mistakes must match metrics.json's
confusion matrix exactly. The run through the whole trainer is in
test_trainer_search.py (its job folder already exists there).
"""

from __future__ import annotations

import csv
import io
import random

import numpy as np
import pytest
from PIL import Image

from preprocessing.sample_data import draw_image
from trainer.report.evaluate import metrics_from_probabilities
from trainer.report.mistakes import CSV_COLUMNS, MISTAKES_CSV, MISTAKES_PNG, MistakeCollector

LABELS = ["circle", "square", "stripes", "triangle"]


def _jpeg(cls: str, seed: int) -> bytes:
    buf = io.BytesIO()
    draw_image(cls, random.Random(seed), 48, 48).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _batches(count=120, batch=16, seed=0):
    """Synthetic evaluation batches: class ids, softmax rows (about 40% wrong), source ids, encoded images."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(LABELS), count)
    logits = rng.normal(0, 1, (count, len(LABELS)))
    logits[np.arange(count), y] += rng.choice([3.0, -1.0], count, p=[0.6, 0.4])
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    sources = np.array([f"test/{LABELS[c]}/{i:03d}.jpg".encode() for i, c in enumerate(y)], dtype=object)
    images = np.array([_jpeg(LABELS[c], i) for i, c in enumerate(y)], dtype=object)
    for start in range(0, count, batch):
        part = slice(start, start + batch)
        yield y[part], probs[part].astype(np.float32), sources[part], images[part]


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_csv_lists_exactly_the_misclassified_images_most_confident_first(tmp_path):
    collector = MistakeCollector(LABELS, gallery_size=10)
    batches = list(_batches())
    for batch in batches:
        collector.add(*batch)
    wrote = collector.write(str(tmp_path))
    y = np.concatenate([b[0] for b in batches])
    probs = np.concatenate([b[1] for b in batches])
    sources = np.concatenate([b[2] for b in batches])
    wrong = np.flatnonzero(probs.argmax(axis=1) != y)
    rows = _read_csv(tmp_path / MISTAKES_CSV)
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert wrote["count"] == len(rows) == len(wrong) > 0 and wrote["examined"] == len(y)
    assert {r["path"] for r in rows} == {sources[i].decode() for i in wrong}
    by_path = {sources[i].decode(): i for i in wrong}
    for row in rows:
        i = by_path[row["path"]]
        assert row["true_label"] == LABELS[y[i]] != row["predicted_label"] == LABELS[probs[i].argmax()]
        assert float(row["score"]) == pytest.approx(probs[i].max(), abs=1e-6)
        assert float(row["true_label_score"]) == pytest.approx(probs[i, y[i]], abs=1e-6)
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    # The same confusions as the evaluation's confusion matrix, off its diagonal.
    matrix = np.array(metrics_from_probabilities(y, probs, LABELS)["confusion_matrix"]["matrix"])
    np.fill_diagonal(matrix, 0)
    assert np.array_equal(collector.confusions, matrix)


def test_only_the_most_confident_mistakes_keep_their_image_bytes(tmp_path):
    collector = MistakeCollector(LABELS, gallery_size=7)
    for batch in _batches(count=200):
        collector.add(*batch)
    kept = sorted(score for score, *_ in collector._heap)
    assert len(kept) == 7 < collector.count
    assert kept == sorted(row[3] for row in collector.rows)[-7:]


def test_the_gallery_groups_by_the_most_frequent_confusion_first(tmp_path):
    collector = MistakeCollector(LABELS, gallery_size=48)
    eye = np.eye(len(LABELS), dtype=np.float32)
    # circle -> square five times (less confident), triangle -> circle twice (more confident).
    y = np.array([0] * 5 + [3] * 2 + [1] * 3)
    probs = np.stack([0.3 * eye[0] + 0.7 * eye[1]] * 5 + [0.05 * eye[3] + 0.95 * eye[0]] * 2 + [eye[1]] * 3)
    sources = np.array([f"{i}.jpg".encode() for i in range(10)], dtype=object)
    images = np.array([_jpeg(LABELS[c], i) for i, c in enumerate(y)], dtype=object)
    collector.add(y, probs, sources, images)
    rows = collector.gallery_rows()
    assert [label.splitlines()[:2] for label, _ in rows] == [["circle", "-> square"], ["triangle", "-> circle"]]
    assert [len(cells) for _, cells in rows] == [5, 2]
    path = collector.write(str(tmp_path))["png"]
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 300


def test_an_evaluation_without_mistakes_still_writes_both_files(tmp_path):
    collector = MistakeCollector(LABELS)
    y = np.array([0, 1, 2])
    collector.add(y, np.eye(4, dtype=np.float32)[y], np.array([b"a", b"b", b"c"], dtype=object),
                  np.array([b"", b"", b""], dtype=object))
    wrote = collector.write(str(tmp_path))
    assert wrote["count"] == 0 and _read_csv(tmp_path / MISTAKES_CSV) == []
    with Image.open(tmp_path / MISTAKES_PNG) as image:
        assert image.format == "PNG" and image.width > 100


def test_evaluate_model_hands_every_batch_to_the_collector_and_the_csv_matches_metrics(tfrecord_data, tmp_path):
    """One evaluation pass over the records (images, labels, source ids, bytes): metrics and mistakes agree."""
    import keras

    from trainer.data import info as data_info
    from trainer.data import records
    from trainer.report.evaluate import evaluate_model

    keras.utils.set_random_seed(3)
    info = data_info.inspect_data(str(tfrecord_data))
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.Conv2D(4, 3, strides=2, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(info.num_classes, activation="softmax")])
    collector = MistakeCollector(info.labels)
    metrics = evaluate_model(model, records.eval_dataset(info, "test", (32, 32), 4), info.labels, str(tmp_path),
                             on_batch=collector.add)
    collector.write(str(tmp_path))
    rows = _read_csv(tmp_path / MISTAKES_CSV)
    matrix = np.array(metrics["confusion_matrix"]["matrix"])
    assert len(rows) == matrix.sum() - np.trace(matrix) == round((1 - metrics["accuracy"]) * info.size("test"))
    assert len(rows) > 0  # an untrained model
    counted = np.zeros_like(matrix)
    for row in rows:
        assert row["path"].startswith(f"test/{row['true_label']}/")  # the records' source ids
        counted[info.labels.index(row["true_label"]), info.labels.index(row["predicted_label"])] += 1
    np.fill_diagonal(matrix, 0)
    assert np.array_equal(counted, matrix)
    with Image.open(tmp_path / MISTAKES_PNG) as image:
        assert image.format == "PNG" and image.width >= 300

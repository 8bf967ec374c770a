"""``eval/label_issues.*``: images whose label the model contradicts, found by confident learning.

Planted label errors must rank at the top (precision@k, k = the number
planted, printed): first on synthetic features (the fit and the ranking alone,
fast), then on generated photos, 10% of them in the wrong class, through real
MobileNetV2 bottleneck features written by the trainer's own feature cache.
The run through the whole trainer is in test_trainer_search.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import random

import numpy as np
import pytest
from PIL import Image

from trainer.report import label_issues

CLASSES = ("circle", "square", "stripes", "triangle")
PLANTED_SHARE = 0.1


def _precision_at_k(ranked, planted) -> float:
    k = len(planted)
    return len(set(list(ranked)[:k]) & set(planted)) / k


def test_planted_label_errors_rank_first_on_synthetic_features():
    rng = np.random.default_rng(0)
    classes, per_class, dims = 4, 150, 64
    centres = rng.normal(0, 1, (classes, dims))
    truth = np.repeat(np.arange(classes), per_class)
    features = (centres[truth] * 1.5 + rng.normal(0, 1, (len(truth), dims))).astype(np.float32)
    planted = rng.choice(len(truth), int(PLANTED_SHARE * len(truth)), replace=False)
    given = truth.copy()
    given[planted] = (truth[planted] + rng.integers(1, classes, len(planted))) % classes
    probabilities = label_issues.out_of_fold_probabilities(features, given, classes)
    assert probabilities.shape == (len(truth), classes)
    assert np.allclose(probabilities.sum(axis=1), 1.0)
    ranked, scores = label_issues.rank_label_issues(given, probabilities)
    precision = _precision_at_k(ranked, planted)
    print(f"synthetic features: {len(ranked)} flagged, precision@{len(planted)} = {precision:.3f}")
    assert precision >= 0.85
    assert scores.shape == (len(truth),)
    assert scores[planted].mean() < scores[np.setdiff1d(np.arange(len(truth)), planted)].mean()


def test_a_class_without_images_is_left_out_of_the_ranking():
    rng = np.random.default_rng(1)
    given = np.array([0] * 30 + [2] * 30)
    features = (rng.normal(0, 1, (60, 8)) + given[:, None] * 2).astype(np.float32)
    probabilities = label_issues.out_of_fold_probabilities(features, given, 3)
    assert np.all(probabilities[:, 1] == 0)
    ranked, scores = label_issues.rank_label_issues(given, probabilities)
    assert len(scores) == 60 and len(ranked) <= 6


def _write_planted_data(root, *, per_class=50, size=64, seed=0):
    """TFRecords of generated photos (train 80%, validation 20%), 10% of them under a wrong class.

    A planted image is one ``draw_image`` drew as one class and the record
    gives another, as if its file had been moved to the wrong class folder.
    Returns the planted source paths.
    """
    import tensorflow as tf

    from preprocessing import tfrecords
    from preprocessing.sample_data import draw_image

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    items = [(cls, i) for cls in CLASSES for i in range(per_class)]
    planted_items = set(rng.sample(items, int(PLANTED_SHARE * len(items))))
    writers = {split: tf.io.TFRecordWriter(str(root / f"{split}-00000-of-00001.tfrecord"))
               for split in ("train", "validation")}
    planted = []
    for cls, i in items:
        split = "train" if i < per_class * 0.8 else "validation"
        given = rng.choice([c for c in CLASSES if c != cls]) if (cls, i) in planted_items else cls
        buf = io.BytesIO()
        draw_image(cls, rng, size, size).save(buf, format="JPEG", quality=92)
        data = buf.getvalue()
        path = f"{split}/{given}/{cls[:2]}{i:03d}.jpg"
        if given != cls:
            planted.append(path)
        writers[split].write(tfrecords.serialize_example(
            encoded=data, image_format="jpeg", height=size, width=size, label=CLASSES.index(given), text=given,
            source_id=path, sha256=hashlib.sha256(data).hexdigest()))
    for writer in writers.values():
        writer.close()
    (root / tfrecords.LABELS_FILE).write_text("\n".join(CLASSES) + "\n")
    return planted


@pytest.fixture(scope="module")
def planted_job(tmp_path_factory, mobilenet_weights):
    """A data folder with planted label errors and a job folder whose cache holds its MobileNetV2 features."""
    from trainer.data.features import FeatureCache
    from trainer.data.info import inspect_data
    from trainer.model.backbones import get_backbone

    base = tmp_path_factory.mktemp("planted")
    planted = _write_planted_data(base / "data")
    info = inspect_data(str(base / "data"))
    cache = FeatureCache(str(base / "job" / "cache"), get_backbone("mobilenet_v2"), str(mobilenet_weights),
                         (64, 64), info, keep_maps=False)
    cache.ensure()
    return base, info, cache.path, planted


def test_planted_label_errors_rank_first_on_real_features(planted_job, tmp_path):
    base, info, cache_path, planted = planted_job
    assert label_issues.find_cache(str(base / "job" / "cache"), info, "mobilenet_v2", (64, 64)) == cache_path
    found = label_issues.find_label_issues(info, cache_path, str(tmp_path))
    with open(found["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(label_issues.CSV_COLUMNS)
    assert found["count"] == len(rows) and found["examined"] == info.size("train") + info.size("validation")
    precision = _precision_at_k([row["path"] for row in rows], planted)
    recall = len({row["path"] for row in rows} & set(planted)) / len(planted)
    print(f"generated photos, MobileNetV2 features: {len(rows)} flagged of {found['examined']}, "
          f"precision@{len(planted)} = {precision:.3f}, recall of all flagged = {recall:.3f}")
    assert precision >= 0.8
    for row in rows:
        split, given = row["path"].split("/")[:2]
        assert row["split"] == split and row["given_label"] == given
        assert row["suggested_label"] in CLASSES and 0.0 <= float(row["score"]) <= 1.0
    scores = [float(row["score"]) for row in rows]
    assert scores == sorted(scores)  # the most suspect (lowest given-label probability) first
    with Image.open(found["png"]) as image:
        image.verify()
    with Image.open(found["png"]) as image:
        assert image.format == "PNG" and image.width >= 800 and image.height >= 400


def test_the_standalone_command_finds_the_jobs_cache(planted_job, tmp_path, capsys):
    base, _, _, planted = planted_job
    rc = label_issues.main(["--job-dir", str(base / "job"), "--data", str(base / "data"), "--out", str(tmp_path)])
    assert rc == 0
    assert (tmp_path / label_issues.LABEL_ISSUES_CSV).is_file() and (tmp_path / label_issues.LABEL_ISSUES_PNG).is_file()


def test_a_cache_of_other_data_is_refused(planted_job, tmp_path):
    """Features whose labels are not the records' (a stale cache) are never matched to the wrong paths."""
    from trainer.data.info import inspect_data

    _, _, cache_path, _ = planted_job
    other = inspect_data(str(_copy_with_other_labels(planted_job[0] / "data", tmp_path / "other")))
    with pytest.raises(label_issues.LabelIssuesError, match="not those of"):
        label_issues.find_label_issues(other, cache_path, str(tmp_path / "out"))


def _copy_with_other_labels(src, dst):
    """The same records, each relabelled to the next class (same counts per split)."""
    import tensorflow as tf

    from preprocessing import tfrecords

    dst.mkdir(parents=True)
    (dst / tfrecords.LABELS_FILE).write_text((src / tfrecords.LABELS_FILE).read_text())
    for path in sorted(src.glob("*.tfrecord")):
        with tf.io.TFRecordWriter(str(dst / path.name)) as writer:
            for serialized in tf.data.TFRecordDataset(str(path)):
                example = tf.train.Example.FromString(serialized.numpy())
                label = example.features.feature[tfrecords.LABEL].int64_list.value
                label[0] = (label[0] + 1) % len(CLASSES)
                example.features.feature[tfrecords.TEXT].bytes_list.value[0] = CLASSES[label[0]].encode()
                writer.write(example.SerializeToString())
    return dst


def test_the_flag_is_on_by_default_and_can_be_turned_off():
    from trainer.cli import build_parser, config_from_args

    base = ["--data", "d", "--job-dir", "j"]
    assert config_from_args(build_parser().parse_args(base)).find_label_issues is None
    assert config_from_args(build_parser().parse_args(base + ["--no-find-label-issues"])).find_label_issues is False
    assert config_from_args(build_parser().parse_args(base + ["--find-label-issues"])).find_label_issues is True


def test_without_a_feature_cache_the_trainer_says_so_in_one_line_and_skips(tfrecord_data, tmp_path, caplog):
    from trainer import finish
    from trainer.config import TrainConfig
    from trainer.data.info import inspect_data

    info = inspect_data(str(tfrecord_data))
    config = TrainConfig(data_dir=str(tfrecord_data), job_dir=str(tmp_path / "job"))
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert finish._label_issues(info, None, "mobilenet_v2", (32, 32), config) is None
    lines = [r.getMessage() for r in caplog.records if "label issues" in r.getMessage()]
    assert len(lines) == 1 and "skipped" in lines[0] and "no cached bottleneck features" in lines[0]
    assert not (tmp_path / "job" / "eval" / label_issues.LABEL_ISSUES_CSV).exists()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert finish._label_issues(info, None, "mobilenet_v2", (32, 32),
                                    config.replace(find_label_issues=False)) is None
    assert not caplog.records


def test_random_weights_skip_label_issues_unless_asked_for(tmp_path, caplog):
    """Random features say nothing about the labels: --weights none skips the step, in one line, before any work."""
    from trainer import finish
    from trainer.config import TrainConfig

    config = TrainConfig(data_dir=str(tmp_path), job_dir=str(tmp_path / "job"), weights="none")
    stale = tmp_path / "job" / "eval" / "label_issues.csv"  # an earlier run's, which the demo would list
    stale.parent.mkdir(parents=True)
    stale.write_text("path,split,given_label\n")
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert finish._label_issues(None, str(tmp_path / "no-cache"), "mobilenet_v2", (32, 32), config) is None
    assert [r.getMessage() for r in caplog.records if "label issues" in r.getMessage()] == [
        "label issues: skipped, --weights none gives random features, which say nothing about the labels "
        "(pass pretrained weights, or --find-label-issues to look anyway)"]
    assert not stale.exists()

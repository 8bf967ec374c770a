"""What the trainer knows about ``DATA`` before it reads an image: classes, splits, shards and counts.

:func:`inspect_data` checks a preprocessing output folder and returns a
:class:`DataInfo`. Counts come from ``stats.json`` (written by preprocessing),
checked against the shards' names and sizes without reading a record; a
folder without one is counted by reading its labels (and says so). When the
data has no validation split, one is carved from train by each record's
sha256 (:func:`preprocessing.tfrecords.carve_bucket`): deterministic, stable
when images are added, and counted from ``stats.json``'s carve histogram.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from dataclasses import dataclass, field

from preprocessing import tfrecords
from trainer.config import UserError

log = logging.getLogger("trainer.data")


@dataclass(frozen=True)
class DataInfo:
    """What the trainer knows about ``DATA`` after checking it."""

    data_dir: str
    labels: list[str]
    record_size: tuple[int, int] | None
    resize_mode: str
    shards: dict[str, list[str]]
    counts: dict[str, list[int]] = field(default_factory=dict)
    carved_validation: bool = False
    validation_fraction: float = 0.2

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def size(self, split: str) -> int:
        return sum(self.counts.get(split, []))

    @property
    def eval_split(self) -> str:
        """The split the final model is evaluated and gated on: test, or validation when there is no test."""
        return "test" if self.size("test") else "validation"

def inspect_data(data_dir: str, validation_fraction: float = 0.2) -> DataInfo:
    """Check ``DATA`` and count its records per split and class; raise :class:`UserError` on bad input."""
    import tensorflow as tf

    if not tf.io.gfile.isdir(data_dir):
        raise UserError(f"--data {data_dir}: no such folder")
    if not tf.io.gfile.listdir(data_dir):
        raise UserError(f"--data {data_dir}: the folder is empty")
    if not tf.io.gfile.exists(os.path.join(data_dir, tfrecords.LABELS_FILE)):
        raise UserError(f"--data {data_dir}: no {tfrecords.LABELS_FILE} (is this a preprocessing output folder?)")
    labels = tfrecords.read_labels(data_dir)
    if len(labels) < 2:
        raise UserError(f"--data {data_dir}: {tfrecords.LABELS_FILE} lists {len(labels)} class(es); "
                        "classification needs at least 2")
    shards = {split: tfrecords.list_shards(data_dir, split) for split in tfrecords.SPLITS}
    if not shards["train"]:
        raise UserError(f"--data {data_dir}: no train shards ({tfrecords.shard_pattern('train')})")
    stats = _read_stats(data_dir)
    options = _options(stats)
    size = options.get("image_size")
    record_size = (int(size[0]), int(size[1])) if size else None
    resize_mode = options.get("resize_mode") or "stretch"
    if resize_mode not in tfrecords.RESIZE_MODES:
        raise UserError(f"--data {data_dir}: stats.json resize_mode {resize_mode!r} is not one of "
                        f"{', '.join(tfrecords.RESIZE_MODES)}")
    counts = _counts_from_stats(data_dir, labels, shards, stats)
    why_count = "no usable stats.json"
    if counts is None:
        counts = {}
        for split in ("validation", "test"):
            if shards[split]:
                log.info("counting the %s records of %s (%s)", split, data_dir, why_count)
                counts.update(_count_split(data_dir, split, shards[split], labels, False, validation_fraction))
    carve = not sum(counts.get("validation", []))  # no validation shard, or only empty ones (--split 80,0,20)
    if carve and "train" in counts:
        carved, why_count = _carved_counts(stats, labels, counts["train"], validation_fraction)
        counts.update(carved or {"validation": None})
    if "train" not in counts or counts.get("validation") is None:
        log.info("counting the train records of %s (%s)", data_dir,
                 f"carving a validation split: {why_count}" if carve else why_count)
        counts.update(_count_split(data_dir, "train", shards["train"], labels, carve, validation_fraction))
    if not sum(counts.get("train", [])):
        raise UserError(f"--data {data_dir}: the train split has no records")
    present = sum(1 for n in counts["train"] if n)
    if present < 2:
        raise UserError(f"--data {data_dir}: the train split holds {present} class; classification needs at least 2")
    info = DataInfo(data_dir, labels, record_size, resize_mode, shards, counts, carve, validation_fraction)
    if carve:
        log.info("no validation split in %s: carving %.0f%% of train by sha256 (%d records)",
                 data_dir, validation_fraction * 100, info.size("validation"))
    if not info.size("validation"):
        raise UserError(f"--data {data_dir}: the validation split is empty (too few train records to carve one)")
    return info

def _counts_from_stats(data_dir: str, labels: list[str], shards: dict[str, list[str]],
                       stats: dict | None) -> dict | None:
    """Per-split, per-class counts from ``stats.json``, checked cheaply against the shards; None when unusable.

    stats.json must name the classes of labels.txt, and every split must have
    exactly its shards, ``{split}-NNNNN-of-NNNNN`` for every N, each of the
    size stats.json records (``shards``; when it records none, not empty
    where the split has records). The records themselves are not read (a
    million-image folder is counted in milliseconds, on every worker).
    """
    import tensorflow as tf

    if stats is None:
        return None
    try:
        by_split = stats["by_split_and_class"]
        named = [str(name) for name in stats["labels"]]
        counts = {split: [int(by_split.get(split, {}).get(name, {}).get("written", 0)) for name in named]
                  for split in tfrecords.SPLITS}
        sizes = stats.get("shards") or {}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if named != list(labels):
        extra = [f"class id {i} {name!r}" for i, name in enumerate(named) if i >= len(labels)]
        differ = [f"{tfrecords.LABELS_FILE} line {i + 1} says {a!r} but stats.json's class {i} is {b!r}"
                  for i, (a, b) in enumerate(zip(labels, named)) if a != b]
        reason = (f"the records use {', '.join(extra)}, which {tfrecords.LABELS_FILE} (with {len(labels)} classes) "
                  "does not list" if extra and not differ else differ[0] if differ else
                  f"{tfrecords.LABELS_FILE} lists {len(labels)} classes, stats.json {len(named)}")
        raise UserError(f"--data {data_dir}: {reason}; re-run preprocessing rather than editing its output")
    for split, files in shards.items():
        names = [os.path.basename(f) for f in files]
        expected = [f"{split}-{i:05d}-of-{len(names):05d}{tfrecords.SHARD_SUFFIX}" for i in range(len(names))]
        if names != expected:
            raise UserError(f"--data {data_dir}: the {split} shards are not a complete set "
                            f"{split}-NNNNN-of-{len(names):05d} (found {', '.join(names[:3])}...); "
                            "a shard is missing or left over from another run")
        if sum(counts[split]) and not files:
            raise UserError(f"--data {data_dir}: stats.json counts {sum(counts[split])} {split} records but "
                            f"there is no {split} shard")
        for path, name in zip(files, names):
            size = tf.io.gfile.stat(path).length
            recorded = sizes.get(split, {}).get(name)
            unrecorded_empty = recorded is None and not size and sum(counts[split])  # a folder from before `shards`
            if (recorded is not None and size != int(recorded)) or unrecorded_empty:
                said = f"stats.json says {int(recorded):,}" if recorded is not None else "stats.json counts records"
                raise UserError(f"--data {data_dir}: {split} shard {name} holds {size:,} bytes but {said} "
                                "(truncated or rewritten); re-run preprocessing")
    return {split: n for split, n in counts.items() if shards[split]}

def _carved_counts(stats: dict, labels: list[str], train: list[int], fraction: float) -> tuple[dict | None, str]:
    """(train, validation) counts of a carve from ``stats.json``'s ``carve_histogram``, or (None, why not).

    The histogram counts train records per class in bins of whole percents of
    the carve bucket, so any whole-percent ``--validation-fraction`` is exact;
    the records are carved per record as they stream (:mod:`trainer.data.records`).
    """
    histogram = stats.get("carve_histogram")
    if not isinstance(histogram, dict) or histogram.get("method") != tfrecords.CARVE_METHOD:
        return None, "stats.json has no carve histogram (an older preprocessing wrote it)"
    bins = int(histogram.get("bins", 0))
    threshold = tfrecords.carve_threshold(fraction)
    width = tfrecords.CARVE_BUCKETS // bins if bins else 0
    if not width or threshold % width:
        return None, f"--validation-fraction {fraction:g} is not a multiple of 1/{bins}"
    per_class = histogram.get("train") or {}
    validation = [sum((per_class.get(name) or [0] * bins)[:threshold // width]) for name in labels]
    if [sum(per_class.get(name) or []) for name in labels] != train:
        return None, "stats.json's carve histogram does not add up to its train counts"
    return {"train": [n - v for n, v in zip(train, validation)], "validation": validation}, ""


def corrupt_shards(files: list[str]) -> list[tuple[str, str]]:
    """``(shard, reason)`` for each file that does not read to its end as TFRecords (one pass per shard)."""
    import tensorflow as tf

    bad = []
    for path in files:
        try:
            for _ in tf.data.TFRecordDataset(path, buffer_size=1 << 20).batch(4096):
                pass
        except tf.errors.DataLossError as error:
            bad.append((path, _op_message(error)))
        except tf.errors.OpError as error:
            bad.append((path, type(error).__name__))
    return bad

def _op_message(error) -> str:
    """TensorFlow's reason without its function-node prefix and op suffix."""
    import re

    text = (error.message or "").strip().splitlines()[-1] if error.message else ""
    text = re.sub(r"\{\{.*?\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:.*$", "", text).strip()
    return text or type(error).__name__

def corrupt_data_error(data_dir: str, shards: dict[str, list[str]]) -> UserError:
    """The one-line error for a ``DataLossError`` while reading ``shards``: which shard of which split, and why.

    TensorFlow's own message names a record offset but not the file, so the
    shards are read once more, one by one, to find the culprit.
    """
    found = [(split, path, reason) for split, files in shards.items() for path, reason in corrupt_shards(files)]
    if not found:
        return UserError(f"--data {data_dir}: a shard of {', '.join(shards)} could not be read to its end "
                         "(corrupt, truncated, or changed while training)")
    named = "; ".join(f"{split} shard {os.path.basename(path)}: {reason}" for split, path, reason in found[:3])
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    return UserError(f"--data {data_dir}: corrupt or truncated TFRecord file: {named}{more}; "
                     "re-run preprocessing to rewrite it")

def read_options(data_dir: str) -> dict:
    """The preprocessing options recorded in ``DATA/stats.json`` (empty without one)."""
    return _options(_read_stats(data_dir))


def _options(stats: dict | None) -> dict:
    return dict((stats or {}).get("options") or {})


def _read_stats(data_dir: str) -> dict | None:
    """``DATA/stats.json`` as a dict, read once per check (None without one)."""
    import tensorflow as tf

    path = os.path.join(data_dir, tfrecords.STATS_FILE)
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path) as handle:
            stats = json.load(handle)
    except ValueError as error:
        raise UserError(f"--data {data_dir}: stats.json is not valid JSON ({error})") from None
    if not isinstance(stats, dict):
        raise UserError(f"--data {data_dir}: stats.json is not valid JSON (not an object)")
    return stats

def _validation_bucket(sha, source_id):
    return tfrecords.carve_bucket_tensor(sha, source_id)

def _count_split(data_dir, split, files, labels, carve, fraction) -> dict[str, list[int]]:
    """Per-class counts of one split (and the carved validation), checking labels against labels.txt."""
    import tensorflow as tf

    spec = {k: v for k, v in tfrecords.feature_spec().items()
            if k in (tfrecords.LABEL, tfrecords.TEXT, tfrecords.SHA256, tfrecords.SOURCE_ID)}
    dataset = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE).batch(1024)
    dataset = dataset.map(lambda s: tf.io.parse_example(s, spec), num_parallel_calls=tf.data.AUTOTUNE)
    counts = {split: [0] * len(labels)}
    if split == "train" and carve:
        counts["validation"] = [0] * len(labels)
    seen_text = {}
    threshold = tfrecords.carve_threshold(fraction)
    try:
        for batch in dataset.as_numpy_iterator():
            buckets = _validation_bucket(batch[tfrecords.SHA256], batch[tfrecords.SOURCE_ID]).numpy()
            for label, text, bucket in zip(batch[tfrecords.LABEL], batch[tfrecords.TEXT], buckets):
                label = int(label)
                if not 0 <= label < len(labels):
                    raise UserError(f"--data {data_dir}: {split} records use class id {label} but "
                                    f"{tfrecords.LABELS_FILE} lists {len(labels)} classes")
                if text:
                    seen_text.setdefault(label, text.decode("utf-8", "replace"))
                target = "validation" if carve and split == "train" and bucket < threshold else split
                counts[target][label] += 1
    except tf.errors.DataLossError:
        raise corrupt_data_error(data_dir, {split: files}) from None
    for label, text in seen_text.items():
        if text != labels[label]:
            raise UserError(f"--data {data_dir}: {split} records name class {label} {text!r} but "
                            f"{tfrecords.LABELS_FILE} line {label + 1} says {labels[label]!r}")
    return counts

def class_weights(info: DataInfo) -> dict[int, float]:
    """``n / (classes * n_c)`` per train class (sklearn's "balanced"), 0 for an absent class.

    From the counts: ``sklearn.utils.class_weight.compute_class_weight`` wants every label as an array.
    """
    counts = info.counts["train"]
    total = sum(counts)
    present = sum(1 for c in counts if c)
    return {i: (total / (present * c) if c else 0.0) for i, c in enumerate(counts)}

def describe_counts(info: DataInfo) -> str:
    parts = []
    for split in tfrecords.SPLITS:
        if split in info.counts:
            parts.append(f"{split}={info.size(split)}")
    per_class = collections.OrderedDict(zip(info.labels, info.counts["train"]))
    return ", ".join(parts) + "; train per class: " + ", ".join(f"{k}={v}" for k, v in per_class.items())

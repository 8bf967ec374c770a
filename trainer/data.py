"""The trainer's input: what the preprocessing job wrote, checked, and read with tf.data.

Records are read with the shared contract module (``preprocessing.tfrecords``)
so the trainer decodes and resizes exactly as the serving graph will. Shards
are interleaved in parallel, decoding runs in parallel, and batches are
prefetched with autotuning; nothing holds the whole dataset in memory unless
``cache="memory"`` is asked for.

When the data has no validation split, one is carved from train by hashing each
record's sha256: deterministic, and stable when images are added.
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

_BUCKETS = 1000


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
    options = read_options(data_dir)
    size = options.get("image_size")
    record_size = (int(size[0]), int(size[1])) if size else None
    resize_mode = options.get("resize_mode") or "stretch"
    if resize_mode not in tfrecords.RESIZE_MODES:
        raise UserError(f"--data {data_dir}: stats.json resize_mode {resize_mode!r} is not one of "
                        f"{', '.join(tfrecords.RESIZE_MODES)}")
    carve = not shards["validation"]
    counts = {}
    for split in tfrecords.SPLITS:
        if shards[split]:
            counts.update(_count_split(data_dir, split, shards[split], labels, carve, validation_fraction))
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
    import tensorflow as tf

    path = os.path.join(data_dir, tfrecords.STATS_FILE)
    if not tf.io.gfile.exists(path):
        return {}
    try:
        with tf.io.gfile.GFile(path) as handle:
            return dict(json.load(handle).get("options") or {})
    except (ValueError, AttributeError) as error:
        raise UserError(f"--data {data_dir}: stats.json is not valid JSON ({error})") from None


def _validation_bucket(sha, source_id):
    import tensorflow as tf

    key = tf.where(tf.strings.length(sha) > 0, sha, source_id)
    return tf.strings.to_hash_bucket_fast(key, _BUCKETS)


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
                target = "validation" if carve and split == "train" and bucket < fraction * _BUCKETS else split
                counts[target][label] += 1
    except tf.errors.DataLossError:
        raise corrupt_data_error(data_dir, {split: files}) from None
    for label, text in seen_text.items():
        if text != labels[label]:
            raise UserError(f"--data {data_dir}: {split} records name class {label} {text!r} but "
                            f"{tfrecords.LABELS_FILE} line {label + 1} says {labels[label]!r}")
    return counts


def _records(info: DataInfo, split: str, *, shuffle: bool, seed: int, ordered: bool = False):
    """Serialized-parsed records of a split (or the carved part of train) as ``(encoded, label)``.

    Shuffled reads may come out of order (faster) unless ``ordered``.
    """
    import tensorflow as tf

    source = "train" if (info.carved_validation and split == "validation") else split
    files = info.shards[source]
    if not files:
        raise UserError(f"--data {info.data_dir}: no {split} shards")
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    deterministic = ordered or not shuffle
    dataset = dataset.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8),
                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    dataset = dataset.map(tfrecords.parse_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    if info.carved_validation and source == "train":
        threshold = int(info.validation_fraction * _BUCKETS)
        keep_validation = split == "validation"

        def _in_split(example):
            bucket = _validation_bucket(example[tfrecords.SHA256], example[tfrecords.SOURCE_ID])
            return (bucket < threshold) if keep_validation else (bucket >= threshold)

        dataset = dataset.filter(_in_split)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(info.size(split)))
    return dataset.map(lambda e: (e[tfrecords.ENCODED], e[tfrecords.LABEL]))


def batch_for_replicas(dataset, batch_size: int, count: int, replicas: int = 1, *, train: bool = False):
    """Batch so that every batch splits evenly over ``replicas`` (several replicas only).

    Keras 3 on a ``MirroredStrategy`` fails on a final batch that does not
    split evenly over the replicas. Training batches drop the remainder;
    evaluation batches keep all but fewer than ``replicas`` examples (the tail
    goes in batches of ``replicas``).
    """
    if replicas <= 1:
        return dataset.batch(batch_size)
    batch_size = max(replicas, (batch_size // replicas) * replicas)
    if train:
        batch_size = max(replicas, min(batch_size, (count // replicas) * replicas))
        return shard_by_data(dataset.batch(batch_size, drop_remainder=True))
    full = (count // batch_size) * batch_size
    return shard_by_data(dataset.take(full).batch(batch_size, drop_remainder=True).concatenate(
        dataset.skip(full).batch(replicas, drop_remainder=True)))


def shard_by_data(dataset):
    """Shard over the workers of a multi-worker strategy by batches, not by files.

    ``MultiWorkerMirroredStrategy`` auto-shards a dataset across workers. By
    files (the default for TFRecords) a worker can get no file at all (fewer
    shards than workers), and workers with files of different sizes take
    different numbers of steps; in-memory features have no files. ``DATA``
    gives every worker the same number of steps: each reads the whole split in
    the same (seeded) order and keeps its own replicas' slices of every global
    batch, whose sizes :func:`batch_for_replicas` makes divisible by the
    replicas. (The cost: every worker decodes every image of a split.) On one
    machine the policy changes nothing.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def image_dataset(info: DataInfo, split: str, image_size: tuple[int, int], batch_size: int, *,
                  shuffle: bool = False, seed: int = 0, augmenter=None, cache: str | None = None,
                  repeat: bool = False, replicas: int = 1, ordered: bool = False):
    """Batches of ``(images float32 [B, H, W, 3] in [0, 255], labels int32 [B])`` of one split.

    ``cache`` is None, ``"memory"`` or a file path prefix (decoded images are
    cached after the first pass). ``augmenter`` (see :mod:`trainer.augment`)
    runs on shuffled training batches only. ``ordered``: the shuffled order
    is a function of ``seed`` alone (the workers of a multi-worker strategy
    must read the same order, see :func:`shard_by_data`); otherwise parallel
    reads and decodes may reorder it.
    """
    import tensorflow as tf

    from trainer.augment import augment_dataset

    size = tuple(int(s) for s in image_size)
    mode = info.resize_mode
    dataset = _records(info, split, shuffle=shuffle, seed=seed, ordered=ordered)
    if shuffle and not cache:
        # Shuffle encoded records (small), not decoded float images (a 224 px image is 600 KB).
        dataset = dataset.shuffle(min(max(info.size(split), 1), 10000), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(lambda encoded, label: (tfrecords.decode_and_resize(encoded, size, mode),
                                                  tf.cast(label, tf.int32)),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered or not shuffle)
    if cache == "memory":
        dataset = dataset.cache()
    elif cache:
        tf.io.gfile.makedirs(os.path.dirname(cache) or ".")
        dataset = dataset.cache(cache)
    if shuffle and cache:
        dataset = dataset.shuffle(min(max(info.size(split), 1), 4096), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = batch_for_replicas(dataset, batch_size, info.size(split), replicas, train=shuffle)
    if shuffle and augmenter is not None:
        dataset = augment_dataset(dataset, augmenter)
    return dataset.prefetch(tf.data.AUTOTUNE)


def encoded_examples(info: DataInfo, split: str, limit: int | None = None) -> tuple[list[bytes], list[int]]:
    """Encoded image bytes and labels of a split, in file order (for export checks and the gate)."""
    dataset = _records(info, split, shuffle=False, seed=0)
    if limit:
        dataset = dataset.take(limit)
    images, labels = [], []
    for encoded, label in dataset.as_numpy_iterator():
        images.append(bytes(encoded))
        labels.append(int(label))
    return images, labels


def class_weights(info: DataInfo) -> dict[int, float]:
    """``n / (classes * n_c)`` per train class (sklearn's "balanced"), 0 for an absent class."""
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

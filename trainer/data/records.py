"""The trainer's input: the records of each split read with tf.data.

Records are read with the shared contract module (``preprocessing.tfrecords``)
so the trainer decodes and resizes exactly as the serving graph will. Shards
are interleaved in parallel, decoding runs in parallel, and batches are
prefetched with autotuning; nothing holds the whole dataset in memory unless
``cache="memory"`` is asked for.

A carved validation split (:mod:`trainer.data.info`) is taken per record as
the train shards stream past.
"""

from __future__ import annotations

import logging
import os

from preprocessing import tfrecords
from trainer.config import UserError
from trainer.data.info import DataInfo, _validation_bucket

log = logging.getLogger("trainer.data.records")


def source_shards(info: DataInfo, split: str) -> list[str]:
    """The shard files a split is read from (train's, for a carved validation split)."""
    return info.shards["train" if (info.carved_validation and split == "validation") else split]


def worker_shards(info: DataInfo, split: str, worker: tuple[int, int]) -> list[str] | None:
    """Worker ``index`` of ``count``'s own shards of ``split`` (every ``count``-th file from ``index``);
    None when there are fewer shards than workers (each worker then reads the whole split)."""
    index, count = worker
    files = source_shards(info, split)
    return files[index::count] if len(files) >= count else None


def _records(info: DataInfo, split: str, *, shuffle: bool, seed: int, ordered: bool = False,
             files: list[str] | None = None, keys: tuple[str, ...] = (tfrecords.ENCODED, tfrecords.LABEL)):
    """Serialized-parsed records of a split (or the carved part of train) as ``(encoded, label)``.

    Shuffled reads may come out of order (faster) unless ``ordered``.
    ``files``: read only these of the split's shards (a worker's own).
    ``keys``: the record fields of each element (default ``(encoded, label)``).
    """
    import tensorflow as tf

    source = "train" if (info.carved_validation and split == "validation") else split
    whole = files is None
    files = info.shards[source] if whole else files
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
        threshold = tfrecords.carve_threshold(info.validation_fraction)
        keep_validation = split == "validation"

        def _in_split(example):
            bucket = _validation_bucket(example[tfrecords.SHA256], example[tfrecords.SOURCE_ID])
            return (bucket < threshold) if keep_validation else (bucket >= threshold)

        dataset = dataset.filter(_in_split)
    if whole:
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(info.size(split)))
    return dataset.map(lambda e: tuple(e[key] for key in keys))


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
                  repeat: bool = False, replicas: int = 1, ordered: bool = False,
                  files: list[str] | None = None):
    """Batches of ``(images float32 [B, H, W, 3] in [0, 255], labels int32 [B])`` of one split.

    ``cache`` is None, ``"memory"`` or a file path prefix (decoded images are
    cached after the first pass). ``augmenter`` (see :mod:`trainer.model.augment`)
    runs on shuffled training batches only. ``ordered``: the shuffled order
    is a function of ``seed`` alone (the workers of a multi-worker strategy
    must read the same order, see :func:`shard_by_data`); otherwise parallel
    reads and decodes may reorder it.

    ``files``: a worker of a multi-worker strategy reads only its own shards
    (:func:`worker_shards`), so each image is decoded once per epoch across
    the cluster. The dataset then repeats, yields global batches, and is not
    sharded again by the strategy; the caller fixes the steps of an epoch.
    """
    import tensorflow as tf

    from trainer.model.augment import augment_dataset

    size = tuple(int(s) for s in image_size)
    mode = info.resize_mode
    dataset = _records(info, split, shuffle=shuffle, seed=seed, ordered=ordered, files=files)
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
    if files is not None:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        dataset = dataset.repeat().batch(batch_size, drop_remainder=True).with_options(options)
    else:
        if repeat:
            dataset = dataset.repeat()
        dataset = batch_for_replicas(dataset, batch_size, info.size(split), replicas, train=shuffle)
    if shuffle and augmenter is not None:
        dataset = augment_dataset(dataset, augmenter)
    return dataset.prefetch(tf.data.AUTOTUNE)


def record_fields(info: DataInfo, split: str, keys: tuple[str, ...], batch_size: int = 256):
    """Batches of the record fields ``keys`` of a split, in the order every unshuffled read sees
    (:func:`image_dataset`, the bottleneck feature cache); ``trainer.report`` matches rows to source paths by it."""
    return _records(info, split, shuffle=False, seed=0, keys=keys).batch(batch_size)


def eval_dataset(info: DataInfo, split: str, image_size: tuple[int, int], batch_size: int):
    """Unshuffled batches of ``(images, labels int32, source ids, encoded bytes)``: :func:`image_dataset`'s
    evaluation read with each image's source path and file bytes beside it (``eval/mistakes.*``)."""
    import tensorflow as tf

    size = tuple(int(s) for s in image_size)
    mode = info.resize_mode
    dataset = _records(info, split, shuffle=False, seed=0,
                       keys=(tfrecords.ENCODED, tfrecords.LABEL, tfrecords.SOURCE_ID))
    dataset = dataset.map(lambda encoded, label, source: (tfrecords.decode_and_resize(encoded, size, mode),
                                                          tf.cast(label, tf.int32), source, encoded),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


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


def encoded_batches(info: DataInfo, split: str, batch_size: int):
    """``(encoded image bytes, label ids)`` batches of a split in file order, streamed (the gate's read)."""
    dataset = _records(info, split, shuffle=False, seed=0).batch(batch_size)
    for encoded, labels in dataset.as_numpy_iterator():
        yield [bytes(e) for e in encoded], [int(label) for label in labels]



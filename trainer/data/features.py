"""Bottleneck features: the frozen backbone's outputs, computed once and kept on disk.

Training a head on a frozen backbone only needs the backbone's output for each
image. Those are computed once per (backbone, weights, input size, resize mode,
data) and saved with ``tf.data.Dataset.save`` under the cache folder; every
trial and every epoch of the search reads them back instead of running the
backbone again (on a CPU that is the difference between minutes and seconds
per epoch). The cache key includes a digest of the weights file and of the
shards, so changed inputs never reuse stale features. Writes go to a temporary
folder that is renamed into place, so concurrent workers of a distributed
search never read a half-written cache.

Two forms are cached, each written batch by batch as it is computed and read
back as a stream with a bounded shuffle buffer, so memory stays flat from ten
thousand to millions of images: globally pooled vectors (average and max;
what a head with ``avg``/``max`` pooling trains on, so a head epoch costs a
fraction of a second) and, only when ``flatten`` pooling is in the search
space, the unpooled maps.

Features are taken without augmentation: the classic recipe trains the head
on clean bottlenecks, and augmentation applies when blocks are fine-tuned.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid

from preprocessing import tfrecords
from trainer.data.info import DataInfo

from trainer.data.records import batch_for_replicas, image_dataset
from trainer.model.backbones import Backbone
from trainer.model.classifier import build_feature_extractor
from trainer.progress import Progress
from trainer.staging import owner, remove_stale

log = logging.getLogger("trainer.data.features")

DONE = "DONE"  # the marker file of a complete saved dataset


def _file_digest(path: str) -> str:
    import tensorflow as tf

    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(backbone: Backbone, weights_path: str | None, image_size, info: DataInfo) -> str:
    """A folder name that changes whenever the features would."""
    import tensorflow as tf

    shards = []
    for split in sorted(info.shards):
        for path in info.shards[split]:
            stat = tf.io.gfile.stat(path)
            shards.append([os.path.basename(path), stat.length, stat.mtime_nsec])
    material = {
        "backbone": backbone.name,
        "weights": _file_digest(weights_path) if weights_path else None,
        "image_size": list(image_size),
        "resize_mode": info.resize_mode,
        "data": os.path.abspath(info.data_dir) if "://" not in info.data_dir else info.data_dir,
        "shards": shards,
        "carved": info.carved_validation and tfrecords.CARVE_METHOD,
        "validation_fraction": info.validation_fraction,
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    return f"{backbone.name}-{image_size[0]}x{image_size[1]}-{digest}"


POOLED = ("avg", "max")
SHUFFLE_BUFFER = 10000  # images; bounds the memory of a shuffled read whatever the split's size


class FeatureCache:
    """The cached features of the train and validation splits for one backbone configuration.

    Two forms are kept, both written in shards while they are computed and
    read back as a stream, so memory does not grow with the number of
    images: the globally pooled features (average and max, one vector per
    image; what a head with ``avg`` or ``max`` pooling trains on) and, when
    ``keep_maps``, the unpooled feature maps (needed only for ``flatten``
    pooling). Shuffled reads shuffle within a buffer of at most
    :data:`SHUFFLE_BUFFER` images.
    """

    def __init__(self, root: str, backbone: Backbone, weights_path: str | None, image_size, info: DataInfo,
                 batch_size: int = 64, keep_maps: bool = True):
        self.backbone = backbone
        self.weights_path = weights_path
        self.image_size = tuple(image_size)
        self.info = info
        self.batch_size = batch_size
        self.keep_maps = keep_maps
        self.path = os.path.join(root, cache_key(backbone, weights_path, self.image_size, info))

    def split_path(self, split: str) -> str:
        return os.path.join(self.path, split)

    def pooled_path(self, split: str) -> str:
        return os.path.join(self.path, f"{split}-pooled")

    def _missing(self, split: str) -> bool:
        if not is_saved(self.pooled_path(split)):
            return True
        return self.keep_maps and not is_saved(self.split_path(split))

    def ready(self, splits=("train", "validation")) -> bool:
        return not any(self._missing(s) for s in splits)

    def ensure(self, splits=("train", "validation")) -> dict[str, float]:
        """Compute the features of ``splits`` that are not cached yet; return seconds spent per split."""
        missing = [s for s in splits if self._missing(s)]
        if not missing:
            log.info("bottleneck features: reusing the cache at %s", self.path)
            return {}
        extractor = build_feature_extractor(self.backbone, self.weights_path, self.image_size)
        spent = {}
        for split in missing:
            start = time.perf_counter()
            count = self._write(extractor, split)
            spent[split] = time.perf_counter() - start
            log.info("bottleneck features: %s, %d images in %.1fs (%.0f images/s) -> %s", split, count,
                     spent[split], count / max(spent[split], 1e-9), self.path)
        return spent

    def _write(self, extractor, split: str) -> int:
        """One pass of the backbone over ``split``; every batch goes to disk as soon as it is computed.

        With ``keep_maps`` the maps are saved first and the pooled vectors are
        then computed from the saved maps (a read, not a second backbone pass).
        """
        import tensorflow as tf

        tf.io.gfile.makedirs(self.path)
        images = image_dataset(self.info, split, self.image_size, self.batch_size)
        shape = tuple(int(d) for d in extractor.output.shape[1:])
        total = self.info.size(split)
        progress = Progress(f"bottleneck features: {split}", total, "images")

        @tf.function(reduce_retracing=True)
        def forward(x):  # a graph call: ~1.45x faster per batch than calling the model eagerly
            return tf.cast(extractor(x, training=False), tf.float32)

        def computed():
            for x, y in images:
                maps = forward(x)
                progress.add(int(y.shape[0]))
                yield maps, y

        maps_spec = (tf.TensorSpec((None, *shape), tf.float32), tf.TensorSpec((None,), tf.int32))
        if self.keep_maps:
            save_dataset(tf.data.Dataset.from_generator(computed, output_signature=maps_spec),
                         self.split_path(split), lambda: {"count": total, "shape": list(shape)})
            maps = tf.data.Dataset.load(self.split_path(split))
        else:
            maps = tf.data.Dataset.from_generator(computed, output_signature=maps_spec)
        pooled = maps.map(lambda m, y: (tf.reduce_mean(m, axis=(1, 2)), tf.reduce_max(m, axis=(1, 2)), y))
        save_dataset(pooled, self.pooled_path(split), lambda: {"count": total, "channels": shape[-1]})
        return total

    def dataset(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, replicas: int = 1,
                pooling: str | None = None):
        """Batches of ``(features float32, labels int32)`` streamed from the cache.

        ``pooling`` ``avg`` or ``max``: pooled vectors ``[B, C]``; None: the
        feature maps ``[B, h, w, C]``.
        """
        import tensorflow as tf

        if pooling in POOLED:
            pick = POOLED.index(pooling)
            dataset = tf.data.Dataset.load(self.pooled_path(split)).map(lambda *e: (e[pick], e[2]))
        else:
            if not self.keep_maps:
                raise ValueError("feature maps were not cached (keep_maps=False)")
            dataset = tf.data.Dataset.load(self.split_path(split))
        dataset = dataset.unbatch().apply(tf.data.experimental.assert_cardinality(self.info.size(split)))
        if shuffle:
            dataset = dataset.shuffle(min(max(self.info.size(split), 1), SHUFFLE_BUFFER), seed=seed,
                                      reshuffle_each_iteration=True)
        dataset = batch_for_replicas(dataset, batch_size, self.info.size(split), replicas, train=shuffle)
        return dataset.prefetch(tf.data.AUTOTUNE)


def save_dataset(dataset, path: str, summary) -> None:
    """``dataset.save`` into a temporary sibling of ``path``, then a DONE marker holding ``summary()``, then publish.

    ``summary`` is called after the save, so it may report what the save
    consumed (a generator's count). Readers check :func:`is_saved`; a
    temporary sibling that a killed run left is never read, and is removed
    here (:mod:`trainer.staging`). A shard
    that stops reading inside a ``from_generator`` dataset reaches the save
    as an ``UnknownError``; it is raised again as the ``DataLossError`` it is,
    so the run names the shard.
    """
    import tensorflow as tf

    remove_stale(os.path.dirname(path), f"{os.path.basename(path)}.tmp-")
    tmp = f"{path}.tmp-{owner()}-{uuid.uuid4().hex}"
    try:
        try:
            dataset.save(tmp)
        except tf.errors.UnknownError as error:
            if "DataLossError" not in (error.message or ""):
                raise
            raise tf.errors.DataLossError(None, None, error.message) from None
        with tf.io.gfile.GFile(os.path.join(tmp, DONE), "w") as handle:
            handle.write(json.dumps(summary()))
    except BaseException:  # a full disk, a bad shard, an interrupt: never leave a half-written cache behind
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
        raise
    _publish(tmp, path)


def is_saved(path: str) -> bool:
    """Whether :func:`save_dataset` published a complete dataset at ``path``."""
    import tensorflow as tf

    return tf.io.gfile.exists(os.path.join(path, DONE))


def _publish(tmp: str, final: str) -> None:
    """Rename ``tmp`` to ``final`` unless another worker got there first."""
    import tensorflow as tf

    def remove():
        if tf.io.gfile.isdir(tmp):
            tf.io.gfile.rmtree(tmp)
        elif tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)

    if tf.io.gfile.exists(final):
        remove()
        return
    try:
        tf.io.gfile.rename(tmp, final)
    except tf.errors.OpError:
        remove()

"""Fine-tuning on cached activations: the frozen lower backbone run once per augmented view, not every step.

When the top ``d`` blocks of a backbone are fine-tuned, every layer below them
is frozen, yet a fine-tune step still decodes, augments and pushes each image
through that whole lower part. On a CPU this is most of the step: for
MobileNetV2 at 224 px the part below the top 5 blocks holds about 70% of the
forward FLOPs, and the augmentation competes with training for the same cores.

``--finetune-cache K`` moves that work out of the training loop. The
*boundary* is the input of the lowest block any trial of the search space may
unfreeze (so one cache serves every fine-tune depth). Its activations are
computed once for ``K`` randomly augmented views of every training image, and
once for the clean validation images, and saved under the cache folder. A
cached fine-tune then trains ``boundary -> upper backbone -> head`` (the same
layer objects as the full classifier, so the full model is what gets
trained); every epoch reads each training image once, in one of its ``K``
views drawn at random.

The price is augmentation diversity: ``K`` views per image instead of a fresh
one per epoch. The search therefore uses the cache to rank configurations
quickly, and the retrain of the best one trains on freshly augmented images
unless asked otherwise (``TrainConfig.finetune_cache_final``).

Writes go to a temporary folder renamed into place (as in
:mod:`trainer.data.features`); the folder name is a digest of everything that
changes the activations: backbone, weights, input size, data, boundary, number
of views, augmentation settings and seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time

from trainer.config import AugmentConfig
from trainer.data.features import cache_key, is_saved, save_dataset
from trainer.data.info import DataInfo
from trainer.data.records import batch_for_replicas, image_dataset
from trainer.model.backbones import Backbone
from trainer.model.classifier import build_feature_extractor
from trainer.progress import Progress

log = logging.getLogger("trainer.data.activations")


class ActivationCache:
    """The boundary activations of ``views`` augmented copies of train and the clean validation split.

    Saved with ``tf.data.Dataset.save``, one element per image:
    ``(activations [V, h, w, c], label int32)``. Train holds ``V = views``
    augmented views as bfloat16 (half the disk and read time of float32, with
    its range, so neither tiny nor huge activations overflow; the rounding is
    far below what augmentation changes); validation holds the clean view as
    float32, so validation scores are those of the full classifier.
    """

    def __init__(self, root: str, backbone: Backbone, weights_path: str | None, image_size, info: DataInfo, *,
                 boundary: str, views: int, augment: AugmentConfig, seed: int, batch_size: int = 32):
        if views < 1:
            raise ValueError(f"views must be at least 1, got {views}")
        self.backbone = backbone
        self.weights_path = weights_path
        self.image_size = tuple(image_size)
        self.info = info
        self.boundary = boundary
        self.views = views
        self.augment = augment
        self.seed = seed
        self.batch_size = batch_size
        material = json.dumps({"boundary": boundary, "views": views, "augment": dataclasses.asdict(augment),
                               "seed": seed}, sort_keys=True)
        digest = hashlib.sha256(material.encode()).hexdigest()[:12]
        name = f"{cache_key(backbone, weights_path, self.image_size, info)}-finetune-{boundary}-{views}v-{digest}"
        self.path = os.path.join(root, name)

    def split_path(self, split: str) -> str:
        return os.path.join(self.path, split)

    def views_of(self, split: str) -> int:
        """Augmented views per image stored for ``split``: ``views`` for train, the clean one otherwise."""
        return self.views if split == "train" else 1

    def _missing(self, split: str) -> bool:
        return not is_saved(self.split_path(split))

    def ready(self, splits=("train", "validation")) -> bool:
        return not any(self._missing(s) for s in splits)

    def ensure(self, splits=("train", "validation")) -> dict[str, float]:
        """Compute the splits that are not cached yet; return seconds spent per split."""
        missing = [s for s in splits if self._missing(s)]
        if not missing:
            log.info("fine-tune cache: reusing %s", self.path)
            return {}
        from trainer.model.augment import build_augmenter

        lower = build_feature_extractor(self.backbone, self.weights_path, self.image_size, up_to=self.boundary)
        augmenter = build_augmenter(self.augment, self.seed + 7)
        spent = {}
        for split in missing:
            views = self.views_of(split)
            start = time.perf_counter()
            count = self._write(lower, augmenter if split == "train" else None, split, views)
            spent[split] = time.perf_counter() - start
            log.info("fine-tune cache: %s, %d images x %d view%s at %s in %.1fs (%.0f views/s) -> %s", split, count,
                     views, "s" if views > 1 else "", self.boundary, spent[split],
                     count * views / max(spent[split], 1e-9), self.split_path(split))
        return spent

    @staticmethod
    def stored_dtype(split: str):
        import tensorflow as tf

        return tf.bfloat16 if split == "train" else tf.float32

    def _write(self, lower, augmenter, split: str, views: int) -> int:
        import tensorflow as tf

        from trainer.model.augment import augment_batch

        tf.io.gfile.makedirs(self.path)
        images = image_dataset(self.info, split, self.image_size, self.batch_size)
        shape = tuple(int(d) for d in lower.output.shape[1:])
        dtype = self.stored_dtype(split)

        @tf.function(reduce_retracing=True)
        def forward(x):
            if augmenter is not None:
                x = augment_batch(augmenter, x)
            return tf.cast(lower(x, training=False), dtype)

        total = self.info.size(split)

        progress = Progress(f"fine-tune cache: {split} ({views} view{'s' if views > 1 else ''} each)", total)

        def elements():
            for x, y in images:
                yield tf.stack([forward(x) for _ in range(views)], axis=1), y
                progress.add(int(y.shape[0]))

        signature = (tf.TensorSpec((None, views, *shape), dtype), tf.TensorSpec((None,), tf.int32))
        dataset = tf.data.Dataset.from_generator(elements, output_signature=signature).unbatch()
        save_dataset(dataset, self.split_path(split),
                     lambda: {"count": total, "views": views, "shape": list(shape), "boundary": self.boundary})
        return total

    def dataset(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, replicas: int = 1):
        """Batches of ``(activations float32 [B, h, w, c], labels int32)``.

        Training reads (``shuffle``) take one of an image's views at random,
        drawn anew every epoch, and shuffle the images; other reads take the
        single clean view in order.
        """
        import tensorflow as tf

        views = self.views_of(split)
        dataset = tf.data.Dataset.load(self.split_path(split))
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(self.info.size(split)))
        if shuffle and views > 1:
            draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
            dataset = tf.data.Dataset.zip((dataset, draws)).map(
                lambda element, draw: (element[0][tf.cast(draw % views, tf.int32)], element[1]),
                num_parallel_calls=tf.data.AUTOTUNE)
        else:
            dataset = dataset.map(lambda acts, label: (acts[0], label))
        if shuffle:
            dataset = dataset.shuffle(min(max(self.info.size(split), 1), 10000), seed=seed,
                                      reshuffle_each_iteration=True)
        dataset = dataset.map(lambda acts, label: (tf.cast(acts, tf.float32), label),
                              num_parallel_calls=tf.data.AUTOTUNE)
        dataset = batch_for_replicas(dataset, batch_size, self.info.size(split), replicas, train=shuffle)
        return dataset.prefetch(tf.data.AUTOTUNE)

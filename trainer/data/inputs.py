"""What a trial trains on: cached bottleneck features, cached activations, and image batches of each split.

:class:`TrialInputs` is the interface the search's hypermodel reads
(``features``, ``images``, ``activations``: callables returning fresh tf.data
datasets of ``(x, labels)``), so a test can hand it any datasets.
:meth:`TrialInputs.from_caches` builds the run's own from the data folder
and the two caches.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from trainer.data import info as data_info

from trainer.data import records
from trainer.data.activations import ActivationCache
from trainer.data.features import FeatureCache

log = logging.getLogger("trainer.data")


class TrialInputs:
    """The data a trial trains on.

    ``features(split, pooling)`` (pooling ``avg``/``max``: pooled vectors;
    None: feature maps) and ``images(split, augment)`` return fresh tf.data
    datasets of ``(x, labels)``; ``class_weight`` is a dict or None.
    ``activations(split)``, when given, returns the cached input of the
    backbone layer ``boundary``, which serves fine-tunes of up to
    ``max_cached_depth`` blocks. ``train_size`` (images per training epoch),
    when known, turns on progress lines for every epoch. ``image_steps(split)``
    fixes an epoch's steps over images a worker reads from its own shards.
    """

    def __init__(self, features: Callable, images: Callable, class_weight: dict | None = None,
                 activations: Callable | None = None, boundary: str | None = None, max_cached_depth: int = 0,
                 train_size: int | None = None, image_steps: Callable | None = None):
        self.train_size = train_size
        self._image_steps = image_steps
        self.features = features
        self.images = images
        self.class_weight = class_weight
        self.activations = activations
        self.boundary = boundary
        self.max_cached_depth = max_cached_depth

    @classmethod
    def from_caches(cls, info: data_info.DataInfo, image_size, batch_size: int, *, features: FeatureCache,
                    activations: ActivationCache | None = None, max_cached_depth: int = 0, augmenter=None,
                    cache_images: str | None = None, class_weight: dict | None = None, seed: int = 0,
                    replicas: int = 1, ordered: bool = False, worker: tuple[int, int] | None = None) -> "TrialInputs":
        """Train batches shuffled with ``seed``, the others in order; ``batch_size`` is the global batch.

        ``cache_images``: None, ``memory``, or a folder under which each
        split's decoded images are cached (``<split>-<H>x<W>``). ``ordered``:
        the shuffled order depends on the seed alone (multi-worker strategies).
        ``worker``: ``(index, count)`` of a multi-worker strategy; each worker
        then reads only its own shards of the images (:func:`records.worker_shards`).
        """
        size = tuple(image_size)
        own = {}
        if worker is not None:
            for split in ("train", "validation"):
                own[split] = records.worker_shards(info, split, worker)
                if own[split] is None:
                    log.info("%s: %d shard(s) for %d workers: every worker reads all of its images",
                             split, len(records.source_shards(info, split)), worker[1])
                else:
                    log.info("%s: worker %d of %d reads its own %d of %d shards (%s)", split, worker[0], worker[1],
                             len(own[split]), len(records.source_shards(info, split)),
                             ", ".join(os.path.basename(f) for f in own[split]))

        def images(split, augment=False):
            cache_to = cache_images
            if cache_to and cache_to != "memory":
                cache_to = os.path.join(cache_to, f"{split}-{size[0]}x{size[1]}")
            return records.image_dataset(info, split, size, batch_size, shuffle=(split == "train"), seed=seed,
                                         augmenter=augmenter if augment else None, cache=cache_to,
                                         replicas=replicas, ordered=ordered, files=own.get(split))

        def image_steps(split):
            if own.get(split) is None:
                return None
            return max(1, info.size(split) // batch_size)

        def pooled(split, pooling=None):
            return features.dataset(split, batch_size, shuffle=(split == "train"), seed=seed, replicas=replicas,
                                    pooling=pooling)

        read_activations = None
        if activations is not None:
            def read_activations(split):
                return activations.dataset(split, batch_size, shuffle=(split == "train"), seed=seed,
                                           replicas=replicas)

        return cls(pooled, images, class_weight, activations=read_activations, image_steps=image_steps,
                   boundary=activations.boundary if activations is not None else None,
                   max_cached_depth=max_cached_depth if activations is not None else 0,
                   train_size=info.size("train"))

    def image_steps(self, split: str) -> int | None:
        """Steps of an epoch over ``split``'s images when each worker reads its own shards; None otherwise."""
        return self._image_steps(split) if self._image_steps is not None else None

    def cached_finetune(self, depth: int) -> bool:
        """Whether a fine-tune of the top ``depth`` blocks reads cached activations (:mod:`trainer.data.activations`)."""
        return self.activations is not None and 0 < depth <= self.max_cached_depth

    def without_activations(self) -> "TrialInputs":
        return TrialInputs(self.features, self.images, self.class_weight, train_size=self.train_size,
                           image_steps=self._image_steps)

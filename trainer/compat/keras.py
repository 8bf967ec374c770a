"""Every private hook into Keras, in one place, each checked against the Keras it was written for.

Each hook says why the public API does not serve. :func:`require` refuses
with one line on any other Keras version, because a private attribute that
moved or changed meaning would otherwise fail obscurely or, worse, train
something different. ``tests/test_trainer_compat.py`` fails when the
installed (pinned) Keras is not :data:`KERAS_VERSION`, so an upgrade makes
someone review these hooks and then move the constant.
"""

from __future__ import annotations

import logging

from trainer.config import UserError

log = logging.getLogger(__name__)

KERAS_VERSION = "3.15.1"
_PATCHED = False


def installed_version() -> str:
    import keras

    return keras.__version__


def require(hook: str) -> None:
    """Refuse ``hook`` unless the installed Keras is the one it was written for."""
    found = installed_version()
    if found != KERAS_VERSION:
        raise UserError(f"{hook} uses Keras internals written for keras=={KERAS_VERSION}, but keras=={found} is "
                        "installed: install the pinned version (constraints.txt) or review trainer/compat/keras.py")


def patch_fit_for_multi_worker() -> bool:
    """Make Keras 3's TensorFlow ``fit``/``evaluate`` work under a multi-worker strategy.

    Keras 3 (up to at least 3.15, keras-team/keras#20585) fails twice when a
    ``MultiWorkerMirroredStrategy`` spans more than one worker:

    1. ``fit``/``evaluate`` start with ``_maybe_symbolic_build``, which takes
       the first distributed batch and calls ``strategy.reduce("MEAN", batch)``
       on the whole ``(x, y[, sample_weight])`` tuple only to learn its shapes
       and dtypes. ``Strategy.reduce`` does not take nested structures; the
       multi-worker strategy tries to convert the tuple to one tensor:
       ``ValueError: Attempt to convert a value (PerReplica...)``. The batch is
       only needed for shapes, so this takes the first local replica's part
       (no cross-worker reduce, no collective).
    2. Every train/test step reduces its (scalar) metric results across
       workers with ``strategy.reduce("MEAN", v, axis=0)``, which fails on a
       scalar (``Invalid reduction dimension 0 for input with 0 dimensions``,
       tensorflow/tensorflow#72388). This uses ``axis=None``: the mean across
       replicas, as Keras does on one machine.

    Only multi-worker strategies take the patched paths; every other strategy
    calls Keras's own code. No public API serves: the failing calls are inside
    ``Model.fit``. Refuses (:class:`~trainer.config.UserError`) on any Keras
    but :data:`KERAS_VERSION`.
    """
    global _PATCHED
    if _PATCHED:
        return True
    require("the multi-worker fix of Model.fit")
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    trainer_class = tf_trainer.TensorFlowTrainer
    original_build = trainer_class._maybe_symbolic_build
    original_reduce = tf_trainer.reduce_per_replica
    in_multi_worker_mode = tf_trainer._collective_all_reduce_multi_worker

    def local_part(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return value.values[0]
        return value

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is None or strategy is None or not in_multi_worker_mode(strategy):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        for _, _, batches in iterator:
            data_batch = tf.nest.map_structure(local_part, next(batches))
            break
        return original_build(self, data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and in_multi_worker_mode(strategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original_reduce(values, strategy, reduction)

    trainer_class._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    _PATCHED = True
    log.debug("Keras %s: Model.fit adapted to MultiWorkerMirroredStrategy", KERAS_VERSION)
    return True


def affine_matrix(layer, **kwargs):
    """``RandomRotation._compute_affine_matrix(**kwargs)``: the 3x3 affine transform Keras's own
    rotation builds, so a combined rotation and zoom resamples once (:class:`trainer.model.augment.RandomRotationZoom`).

    Keras has no public function that composes rotation and scale into one
    transform; ``keras.ops.image.affine_transform`` is public but needs this matrix.
    ``RandomRotation.transform_images`` reads it back from the transformation's
    ``rotation_matrix`` key (also internal, same version).
    """
    require("RandomRotationZoom")
    return layer._compute_affine_matrix(**kwargs)


def seed_generator(layer):
    """The random layer's own seed generator for its backend (``layer._get_seed_generator``), so the
    zoom draws from the same seeded stream as the rotation (reproducible augmentation)."""
    require("RandomRotationZoom")
    return layer._get_seed_generator(layer.backend._backend)

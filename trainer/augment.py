"""Random augmentation of training batches with Keras preprocessing layers.

The layers run inside the tf.data pipeline (``training=True``), so they never
become part of the model that is exported: the serving graph stays free of
random ops without having to strip layers at export time.
"""

from __future__ import annotations

from trainer.config import AugmentConfig


def build_augmenter(config: AugmentConfig, seed: int):
    """A ``keras.Sequential`` of the switched-on augmentations, or None when nothing is on."""
    import keras

    if not config.active:
        return None
    layers = []
    if config.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if config.rotation > 0:
        layers.append(keras.layers.RandomRotation(config.rotation, fill_mode="reflect", seed=seed + 1))
    if config.zoom > 0:
        layers.append(keras.layers.RandomZoom(config.zoom, fill_mode="reflect", seed=seed + 2))
    if config.contrast > 0:
        layers.append(keras.layers.RandomContrast(config.contrast, value_range=(0, 255), seed=seed + 3))
    return keras.Sequential(layers, name="augment")


def augment_dataset(dataset, augmenter):
    """Apply ``augmenter`` in training mode to every ``(images, labels)`` batch, clipping back to [0, 255]."""
    import tensorflow as tf

    if augmenter is None:
        return dataset

    def _apply(images, labels, *rest):
        images = tf.clip_by_value(tf.cast(augmenter(images, training=True), tf.float32), 0.0, 255.0)
        return (images, labels, *rest)

    return dataset.map(_apply, num_parallel_calls=tf.data.AUTOTUNE)

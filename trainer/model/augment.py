"""Random augmentation of training batches with Keras preprocessing layers.

The layers run inside the tf.data pipeline (``training=True``), so they never
become part of the model that is exported: the serving graph stays free of
random ops without having to strip layers at export time.
"""

from __future__ import annotations

import keras

from trainer.compat import keras as compat_keras
from trainer.config import AugmentConfig


class RandomRotationZoom(keras.layers.RandomRotation):
    """Random rotation and zoom as one affine resampling of each image.

    ``keras.layers.RandomRotation`` followed by ``keras.layers.RandomZoom``
    resamples every image twice, and each resampling of a 224x224 batch costs
    about as much as a shallow fine-tuning step on a CPU (bench/RESULTS-trainer.md).
    This layer draws the angle as ``RandomRotation`` does (``factor``, a
    fraction of a full turn) and a scale uniformly in ``[1 - zoom, 1 + zoom]``
    (as ``RandomZoom(zoom)`` with equal height and width factors), and applies
    both with a single ``affine_transform``. Identity outside training.
    """

    def __init__(self, factor, zoom: float = 0.0, **kwargs):
        super().__init__(factor, **kwargs)
        if not 0.0 <= zoom < 1.0:
            raise ValueError(f"zoom must be in [0, 1), got {zoom}")
        self.zoom = float(zoom)

    def get_random_transformation(self, data, training=True, seed=None):
        transformation = super().get_random_transformation(data, training=training, seed=seed)
        if transformation is None or not self.zoom:
            return transformation
        ops = self.backend
        batch_size = transformation["batch_size"]
        scale = ops.random.uniform(shape=(batch_size,), minval=1.0 - self.zoom, maxval=1.0 + self.zoom,
                                   seed=compat_keras.seed_generator(self))
        zeros = ops.numpy.zeros([batch_size])
        matrix = compat_keras.affine_matrix(
            self,
            center_x=0.5, center_y=0.5, angle=transformation["angle"], translate_x=zeros, translate_y=zeros,
            scale=scale, shear_x=zeros, shear_y=zeros,
            height=transformation["image_height"], width=transformation["image_width"])
        if len(ops.core.shape(data["images"] if isinstance(data, dict) else data)) == 3:
            matrix = ops.numpy.squeeze(matrix, axis=0)
        transformation["rotation_matrix"] = matrix
        transformation["scale"] = scale
        return transformation

    def get_config(self):
        return {**super().get_config(), "zoom": self.zoom}


def build_augmenter(config: AugmentConfig, seed: int):
    """A ``keras.Sequential`` of the switched-on augmentations, or None when nothing is on."""
    if not config.active:
        return None
    layers = []
    if config.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if config.rotation > 0 or config.zoom > 0:
        layers.append(RandomRotationZoom(config.rotation, zoom=config.zoom, fill_mode="reflect", seed=seed + 1))
    if config.contrast > 0:
        layers.append(keras.layers.RandomContrast(config.contrast, value_range=(0, 255), seed=seed + 3))
    return keras.Sequential(layers, name="augment")


def augment_dataset(dataset, augmenter):
    """Apply ``augmenter`` in training mode to every ``(images, labels)`` batch, clipping back to [0, 255]."""
    import tensorflow as tf

    if augmenter is None:
        return dataset

    def _apply(images, labels, *rest):
        return (augment_batch(augmenter, images), labels, *rest)

    return dataset.map(_apply, num_parallel_calls=tf.data.AUTOTUNE)


def augment_batch(augmenter, images):
    """One random augmentation of a float batch in [0, 255], clipped back to [0, 255] (float32)."""
    import tensorflow as tf

    return tf.clip_by_value(tf.cast(augmenter(images, training=True), tf.float32), 0.0, 255.0)

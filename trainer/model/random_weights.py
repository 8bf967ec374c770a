"""``--weights none``: a seeded random initialisation saved once, so bottleneck features and fine-tunes share it."""

from __future__ import annotations

import os
import uuid
from typing import Callable

from trainer.model.backbones import Backbone
from trainer.model.classifier import BackbonePreprocess


CALIBRATION_IMAGES = 64

def materialize_random_weights(backbone: Backbone, image_size, cache_root: str, seed: int,
                               calibration_images: Callable[[], object] | None = None) -> str:
    """Save a seeded random initialisation (``--weights none``) so features and fine-tuning share it.

    A freshly initialised deep backbone in inference mode shrinks its
    activations block by block (MobileNetV2's come out near 1e-10 at 64 px):
    every image then gives the same features and the head can learn nothing.
    So the batch-norm statistics are set from a batch of up to
    ``CALIBRATION_IMAGES`` training images, which ``calibration_images()``
    returns (float ``[B, H, W, 3]`` in [0, 255]; called only when the file is written):
    one forward pass in training mode with momentum 0, after which inference
    normalises each layer as that batch did and the random features still
    tell images apart.
    """
    import keras
    import tensorflow as tf

    suffix = "" if calibration_images is None else f"-calibrated-{image_size[0]}x{image_size[1]}"
    path = os.path.join(cache_root, f"{backbone.name}-random-seed{seed}{suffix}.weights.h5")
    if not tf.io.gfile.exists(path):
        tf.io.gfile.makedirs(cache_root)
        keras.utils.set_random_seed(seed)
        model = backbone.build(tuple(image_size), None)
        if calibration_images is not None:
            images = calibration_images()
            norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
            momenta = [layer.momentum for layer in norms]
            for layer in norms:
                layer.momentum = 0.0
            model(BackbonePreprocess(backbone.preprocess)(images), training=True)
            for layer, momentum in zip(norms, momenta):
                layer.momentum = momentum
        tmp = f"{path}.{uuid.uuid4().hex}.weights.h5"
        try:
            model.save_weights(tmp)
            tf.io.gfile.rename(tmp, path, overwrite=True)
        except BaseException:
            if tf.io.gfile.exists(tmp):
                tf.io.gfile.remove(tmp)
            raise
    return path

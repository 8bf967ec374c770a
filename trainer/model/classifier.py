"""The classifier and its parts: ``image [0, 255] -> backbone preprocessing -> backbone -> head -> softmax``.

Everything here builds Keras models from a :class:`~trainer.model.backbones.Backbone`
and plain values; nothing reads data or knows about the search. The other
layers take the parts they need: the search trains :func:`build_classifier`'s
model, the bottleneck cache runs :func:`build_feature_extractor`, the
fine-tune cache runs it ``up_to`` :func:`boundary_layer` and trains
:func:`upper_backbone` plus the head.

The registered layer name ``trainer>BackbonePreprocess`` is part of every
export made since the first release; it must stay loadable.
"""

from __future__ import annotations

from typing import Any

import keras

from trainer.model.backbones import Backbone


@keras.saving.register_keras_serializable(package="trainer")
class BackbonePreprocess(keras.layers.Layer):
    """The preprocessing a backbone's ImageNet weights expect, as part of the model.

    ``tf``: ``x / 127.5 - 1``; ``caffe``: RGB to BGR minus the ImageNet means;
    ``torch``: ``(x / 255 - mean) / std``; ``none``: the backbone does its own.
    Input: float ``[B, H, W, 3]`` in [0, 255], RGB.
    """

    def __init__(self, mode: str = "tf", **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, images):
        from keras import ops

        from trainer.model.backbones import IMAGENET_MEAN_RGB, TORCH_MEAN, TORCH_STD

        images = ops.cast(images, self.compute_dtype)
        if self.mode == "tf":
            return images / 127.5 - 1.0
        if self.mode == "caffe":
            bgr = ops.flip(images, axis=-1)
            return bgr - ops.convert_to_tensor(IMAGENET_MEAN_RGB[::-1], dtype=self.compute_dtype)
        if self.mode == "torch":
            mean = ops.convert_to_tensor([m * 255.0 for m in TORCH_MEAN], dtype=self.compute_dtype)
            std = ops.convert_to_tensor([s * 255.0 for s in TORCH_STD], dtype=self.compute_dtype)
            return (images - mean) / std
        return images

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def set_finetune_depth(backbone_model: keras.Model, backbone: Backbone, depth: int) -> int:
    """Unfreeze the top ``depth`` blocks (all when ``depth`` covers them); BN layers stay frozen.

    Returns the number of layers made trainable.
    """
    blocks = backbone.blocks(backbone_model)
    backbone_model.trainable = True
    for layer in backbone_model.layers:
        layer.trainable = False
    if depth >= len(blocks):
        chosen = [layer for layer in backbone_model.layers if not isinstance(layer, keras.layers.InputLayer)]
    else:
        chosen = [layer for block in blocks[len(blocks) - depth:] for layer in block] if depth > 0 else []
    count = 0
    for layer in chosen:
        if isinstance(layer, keras.layers.BatchNormalization):
            continue
        layer.trainable = True
        count += 1
    if count == 0:
        backbone_model.trainable = False
    return count

def make_optimizer(name: str, learning_rate: float, momentum: float = 0.9):
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)
    return keras.optimizers.Adam(learning_rate=learning_rate)


def build_head(values: dict[str, Any], feature_shape, num_classes: int) -> keras.Model:
    """The head on ``feature_shape`` backbone outputs, from a trial's values (:func:`trainer.search.space.declare_space`).

    ``head`` nests ``head_top`` (everything after the pooling) so that a
    pooled-feature cache can train ``head_top`` alone.
    """
    pooling, dense_layers, dropout, l2 = (values[k] for k in ("pooling", "dense_layers", "dropout", "l2"))
    regularizer = keras.regularizers.L2(l2) if l2 else None
    features = keras.Input(shape=tuple(feature_shape), name="features")
    if pooling == "avg":
        pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    elif pooling == "max":
        pooled = keras.layers.GlobalMaxPooling2D(name="pool")(features)
    else:
        pooled = keras.layers.Flatten(name="pool")(features)
    top_input = keras.Input(shape=tuple(pooled.shape[1:]), name="pooled")
    x = top_input
    if values["head_batchnorm"]:
        x = keras.layers.BatchNormalization(name="head_bn")(x)
    for i in range(1, dense_layers + 1):
        x = keras.layers.Dense(values[f"dense_units_{i}"], activation="relu", kernel_regularizer=regularizer,
                               name=f"dense_{i}")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    if dropout and dense_layers == 0:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    logits = keras.layers.Dense(num_classes, kernel_regularizer=regularizer, name="logits")(x)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
    top = keras.Model(top_input, outputs, name="head_top")
    return keras.Model(features, top(pooled), name="head")


def build_classifier(backbone: Backbone, weights_path: str | None, image_size, num_classes: int,
                     values: dict[str, Any]) -> keras.Model:
    """The full classifier: float32 ``[None, H, W, 3]`` in [0, 255] -> softmax ``[None, C]`` float32.

    The backbone is frozen; layers compute in the global dtype policy.
    """
    backbone_model = backbone.build(tuple(image_size), weights_path)
    backbone_model.trainable = False
    head = build_head(values, backbone_model.output.shape[1:], num_classes)
    inputs = keras.Input(shape=(*image_size, 3), name="image")
    x = BackbonePreprocess(backbone.preprocess, name="backbone_preprocess")(inputs)
    x = backbone_model(x, training=False)
    return keras.Model(inputs, head(x), name=f"{backbone.name}_classifier")


def find_backbone(model: keras.Model) -> keras.Model:
    """The nested backbone of a :func:`build_classifier` model."""
    for layer in model.layers:
        if isinstance(layer, keras.Model) and layer.name != "head":
            return layer
    raise ValueError("model has no nested backbone")


def build_feature_extractor(backbone: Backbone, weights_path: str | None, image_size, up_to: str | None = None):
    """``image [0, 255] -> preprocessing -> frozen backbone``: the part every trial shares.

    ``up_to``: stop at the input of that backbone layer instead of the
    backbone's output (the lower part :mod:`trainer.data.activations` caches).
    """
    backbone_model = backbone.build(tuple(image_size), weights_path)
    backbone_model.trainable = False
    if up_to is not None:
        backbone_model = keras.Model(backbone_model.input, backbone_model.get_layer(up_to).input,
                                     name=f"{backbone_model.name}_below_{up_to}")
    inputs = keras.Input(shape=(*image_size, 3), name="image")
    x = BackbonePreprocess(backbone.preprocess, name="backbone_preprocess")(inputs)
    outputs = backbone_model(x, training=False)
    return keras.Model(inputs, outputs, name=f"{backbone.name}_features" if up_to is None else backbone_model.name)


def boundary_layer(backbone: Backbone, backbone_model, max_depth: int) -> str | None:
    """The name of the first layer of the lowest block a fine-tune of ``max_depth`` blocks unfreezes.

    None when nothing below the boundary stays frozen (``max_depth`` 0 or all
    blocks) or when the part above it needs a tensor from below it (the cache
    could not feed it).
    """
    blocks = backbone.blocks(backbone_model)
    if max_depth <= 0 or max_depth >= len(blocks):
        return None
    first = blocks[len(blocks) - max_depth][0]
    try:
        keras.Model(first.input, backbone_model.output)
    except ValueError:
        return None
    return first.name

def upper_backbone(backbone_model, boundary: str):
    """``boundary activations -> backbone output``, sharing the layers (and weights) of ``backbone_model``."""
    return keras.Model(backbone_model.get_layer(boundary).input, backbone_model.output,
                       name=f"{backbone_model.name}_above_{boundary}")

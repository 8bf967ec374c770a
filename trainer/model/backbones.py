"""The registry of ImageNet backbones a search can use.

Each entry knows how to build the ``keras.applications`` network without its
top, the preprocessing its ImageNet weights expect (built into the model as a
layer, so the exported SavedModel carries it), its default and smallest input
size, and how its layers group into blocks. Fine-tune depth is counted in those
blocks ("unfreeze the top 2 blocks"), never in raw layers, so the same depth
means the same thing on every backbone.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Callable

from trainer.config import UserError

IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    """One backbone: ``preprocess`` is ``tf`` ([-1, 1]), ``caffe`` (BGR minus means), ``torch`` or ``none``."""

    name: str
    app: str
    default_size: int
    min_size: int
    preprocess: str
    block_pattern: str
    stem_blocks: tuple[str, ...] = ()

    def build(self, image_size: tuple[int, int], weights: str | None):
        """The ``include_top=False`` network for ``[H, W, 3]`` inputs; weights: None or a local file."""
        import keras

        check_image_size(self, image_size)
        constructor = getattr(keras.applications, self.app)
        model = constructor(include_top=False, weights=None, input_shape=(image_size[0], image_size[1], 3))
        if weights:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    model.load_weights(weights)
                    error_text = ""
                except Exception as error:  # noqa: BLE001 - any failure means "does not fit"
                    error_text = str(error).strip() or type(error).__name__
            skipped = [str(w.message) for w in caught if "Skipping" in str(w.message) or "mismatch" in str(w.message)]
            if error_text or skipped:
                reason = (error_text or skipped[0]).splitlines()[0]
                raise UserError(
                    f"--weights {weights}: does not fit backbone {self.name!r} ({reason[:160]})") from None
        return model

    def block_of(self, layer_name: str) -> str | None:
        """The block a layer belongs to, or None for a layer that continues the previous block."""
        match = re.match(self.block_pattern, layer_name)
        return match.group(1) if match else None

    def blocks(self, model) -> list[list]:
        """The backbone's layers grouped into blocks, input to output; the stem is excluded.

        A layer whose name matches no block joins the block before it (e.g. a
        final ``out_relu`` joins the last block). The input layer and layers
        before the first block, or in ``stem_blocks``, form the stem, which is
        never unfrozen by a depth short of "all".
        """
        groups: list[tuple[str, list]] = []
        for layer in model.layers:
            if isinstance(layer, _input_layer_type()):
                continue
            key = self.block_of(layer.name)
            if key is not None and (not groups or groups[-1][0] != key):
                groups.append((key, [layer]))
            elif groups:
                groups[-1][1].append(layer)
            else:
                groups.append(("stem", [layer]))
        return [layers for key, layers in groups if key != "stem" and key not in self.stem_blocks]

    def num_blocks(self, image_size: tuple[int, int] | None = None) -> int:
        return _count_blocks(self.name, tuple(image_size or (self.default_size, self.default_size)))


def _input_layer_type():
    import keras

    return keras.layers.InputLayer


_COUNT_CACHE: dict = {}


def _count_blocks(name: str, image_size: tuple[int, int]) -> int:
    key = (name, image_size)
    if key not in _COUNT_CACHE:
        backbone = get_backbone(name)
        size = max(image_size[0], backbone.min_size), max(image_size[1], backbone.min_size)
        _COUNT_CACHE[key] = len(backbone.blocks(backbone.build(size, None)))
    return _COUNT_CACHE[key]


REGISTRY: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("mobilenet_v2", "MobileNetV2", 224, 32, "tf",
                 r"^(Conv1|bn_Conv1|expanded_conv|block_\d+|Conv_1)(?:_|$)", stem_blocks=("Conv1", "bn_Conv1")),
        Backbone("efficientnet_b0", "EfficientNetB0", 224, 32, "none",
                 r"^(stem|block\d[a-z]|top)_", stem_blocks=("stem",)),
        Backbone("resnet50", "ResNet50", 224, 32, "caffe",
                 r"^(conv1|pool1|conv\d_block\d+)_", stem_blocks=("conv1", "pool1")),
        Backbone("vgg16", "VGG16", 224, 32, "caffe", r"^(block\d+)_"),
        Backbone("densenet121", "DenseNet121", 224, 32, "torch",
                 r"^(conv1|pool1|conv\d_block\d+|pool\d)_", stem_blocks=("conv1", "pool1")),
        Backbone("xception", "Xception", 299, 71, "tf", r"^(block\d+)_", stem_blocks=("block1",)),
        # The three families below rescale and normalise inside the network (include_preprocessing=True).
        Backbone("efficientnet_v2_b0", "EfficientNetV2B0", 224, 32, "none",
                 r"^(stem|block\d[a-z]|top)_", stem_blocks=("stem",)),
        Backbone("efficientnet_v2_s", "EfficientNetV2S", 384, 32, "none",
                 r"^(stem|block\d[a-z]|top)_", stem_blocks=("stem",)),
        Backbone("convnext_tiny", "ConvNeXtTiny", 224, 32, "none",
                 r"^convnext_tiny_(prestem|stem|stage_\d+_block_\d+)_?", stem_blocks=("prestem", "stem")),
        Backbone("mobilenet_v3_large", "MobileNetV3Large", 224, 32, "none",
                 r"^(expanded_conv(?:_\d+)?|conv_1|conv)(?:_|$)", stem_blocks=("conv",)),
    )
}


def get_backbone(name: str) -> Backbone:
    if name not in REGISTRY:
        raise UserError(f"--backbone {name!r}: unknown backbone; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def check_image_size(backbone: Backbone, image_size: tuple[int, int]) -> None:
    height, width = image_size
    if height < backbone.min_size or width < backbone.min_size:
        raise UserError(
            f"--image-size {height}x{width}: too small for backbone {backbone.name!r} "
            f"(needs at least {backbone.min_size}x{backbone.min_size})")


DOWNLOAD_TIMEOUT_S = 30


def download_failure(error: BaseException) -> str:
    """The real cause of a failed download, from the exception Keras raised and the one it wrapped."""
    import socket
    import urllib.error

    chain, seen = [], error
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for item in chain:
        if isinstance(item, urllib.error.HTTPError):
            return f"HTTP {item.code} {item.reason}"
        reason = item.reason if isinstance(item, urllib.error.URLError) else item
        if isinstance(reason, socket.gaierror):
            return "DNS lookup failed: no network, or no DNS server answers"
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused"
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return f"no answer within {DOWNLOAD_TIMEOUT_S} s"
        if isinstance(reason, OSError) and reason is not item:
            return f"{type(reason).__name__}: {reason}"
    return f"{type(error).__name__}: {str(error).splitlines()[0][:160]}" if str(error) else type(error).__name__


def resolve_weights(weights: str, backbone: Backbone) -> str | None:
    """``imagenet`` -> a local file from the Keras cache (downloading if online); ``none`` -> None; else the path.

    Offline, ``imagenet`` fails at once with one line naming ``--weights PATH``.
    """
    if weights.lower() == "none":
        return None
    if weights.lower() != "imagenet":
        import tensorflow as tf

        if not tf.io.gfile.exists(weights):
            raise UserError(f"--weights {weights}: no such file")
        return weights
    import socket

    import keras

    constructor: Callable = getattr(keras.applications, backbone.app)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # keras' get_file sets none: offline clusters would hang
    try:
        model = constructor(include_top=False, weights="imagenet",
                            input_shape=(backbone.default_size, backbone.default_size, 3))
    except Exception as error:  # noqa: BLE001 - network failures come in many types
        raise UserError(
            f"--weights imagenet: could not download the {backbone.name} ImageNet weights "
            f"({download_failure(error)}); offline, pass a local file with --weights PATH") from None
    finally:
        socket.setdefaulttimeout(previous)
    cache = os.path.join(os.path.expanduser("~"), ".keras", "models", f"tlp_{backbone.name}_notop.weights.h5")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    if not os.path.exists(cache):
        model.save_weights(cache)
    return cache

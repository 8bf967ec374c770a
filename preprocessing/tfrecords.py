"""The TFRecord contract shared by every stage (docs/contracts.md, section 2).

This module is the one place that knows the feature keys, how a record is
built, how it is parsed, and how an encoded image becomes the float tensor a
model sees. The preprocessing job writes records with :func:`serialize_example`;
the trainer reads them with :func:`parse_example` and :func:`decode_and_resize`;
the exported serving graph calls :func:`decode_and_resize` on raw request
bytes. Training and serving therefore decode and resize with the same ops.

Writing a record needs no TensorFlow: :func:`serialize_example` builds the
``tf.train.Example`` with protobuf alone, from a copy of the message
definitions of ``tensorflow/core/example/{example,feature}.proto`` (TensorFlow
ships those classes only inside the ``tensorflow`` package, and importing
``tensorflow.core.example`` imports all of TensorFlow: seconds of CPU and
~600 MB per Beam worker). The reading side (:func:`feature_spec`,
:func:`parse_example`, the decode/resize functions, :func:`read_labels`,
:func:`list_shards`) imports TensorFlow lazily, so CLIs answer ``--help``
quickly and importing this module never imports TensorFlow.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

# Feature keys (the conventions of TensorFlow's model garden).
ENCODED = "image/encoded"
FORMAT = "image/format"
HEIGHT = "image/height"
WIDTH = "image/width"
LABEL = "image/class/label"
TEXT = "image/class/text"
SOURCE_ID = "image/source_id"
SHA256 = "image/key/sha256"

SPLITS = ("train", "validation", "test")
RESIZE_MODES = ("stretch", "pad", "crop")
IMAGE_FORMATS = ("jpeg", "png")

LABELS_FILE = "labels.txt"
STATS_FILE = "stats.json"
ERRORS_FILE = "errors.jsonl"
SHARD_SUFFIX = ".tfrecord"

# Carving a validation split from train (the trainer, when DATA has none): a record goes to
# validation when its bucket is below ``fraction * CARVE_BUCKETS``. stats.json's
# ``carve_histogram`` counts train records per class in CARVE_BINS bins of whole percents,
# so the trainer knows the carved counts without reading a record.
CARVE_BUCKETS = 1000
CARVE_BINS = 100
CARVE_METHOD = "sha256-prefix-mod-1000"


def carve_bucket(sha256_hex: str) -> int:
    """A record's carve bucket: the first 32 bits of its sha256, modulo :data:`CARVE_BUCKETS`.

    The sha256 is uniform already, so no further hashing is needed, and this
    needs no TensorFlow (Beam workers). :func:`carve_bucket_tensor` is its
    in-graph twin; they agree for every record with a sha256.
    """
    return int(sha256_hex[:8], 16) % CARVE_BUCKETS


def carve_threshold(fraction: float) -> int:
    """Records with a carve bucket below this go to the carved validation split."""
    return round(fraction * CARVE_BUCKETS)


def carve_bucket_tensor(sha256_hex: "tf.Tensor", source_id: "tf.Tensor") -> "tf.Tensor":
    """:func:`carve_bucket` in TensorFlow, elementwise; records without a sha256 hash their source id."""
    import tensorflow as tf

    codes = tf.cast(tf.io.decode_raw(tf.strings.substr(sha256_hex, 0, 8), tf.uint8, fixed_length=8), tf.int64)
    digits = tf.where(codes >= 97, codes - 87, tf.where(codes >= 65, codes - 55, codes - 48))
    value = tf.reduce_sum(digits * tf.constant([16 ** k for k in range(7, -1, -1)], tf.int64), axis=-1)
    fallback = tf.strings.to_hash_bucket_fast(source_id, CARVE_BUCKETS)
    return tf.where(tf.strings.length(sha256_hex) >= 8, value % CARVE_BUCKETS, fallback)


def shard_pattern(split: str) -> str:
    """Glob of a split's shards: ``{split}-NNNNN-of-NNNNN.tfrecord``."""
    return f"{split}-?????-of-?????{SHARD_SUFFIX}"


# The messages of tensorflow/core/example/{feature,example}.proto that a record uses, field
# for field (names, numbers, types, packed int64/float lists, the ``kind`` oneof, the map),
# so protobuf encodes exactly what ``tf.train.Example`` does. Kept in a private descriptor
# pool: no clash with TensorFlow's own classes when both are loaded in one process.
_EXAMPLE_PROTO = """
name: "preprocessing/tf_example.proto" package: "tensorflow" syntax: "proto3"
message_type { name: "BytesList"
  field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_BYTES } }
message_type { name: "FloatList"
  field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_FLOAT options { packed: true } } }
message_type { name: "Int64List"
  field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_INT64 options { packed: true } } }
message_type { name: "Feature"
  oneof_decl { name: "kind" }
  field { name: "bytes_list" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".tensorflow.BytesList" oneof_index: 0 }
  field { name: "float_list" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".tensorflow.FloatList" oneof_index: 0 }
  field { name: "int64_list" number: 3 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".tensorflow.Int64List" oneof_index: 0 } }
message_type { name: "Features"
  field { name: "feature" number: 1 label: LABEL_REPEATED type: TYPE_MESSAGE type_name: ".tensorflow.Features.FeatureEntry" }
  nested_type { name: "FeatureEntry" options { map_entry: true }
    field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".tensorflow.Feature" } } }
message_type { name: "Example"
  field { name: "features" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".tensorflow.Features" } }
"""


@functools.cache
def _example_class() -> type:
    """The ``tensorflow.Example`` message class, built by protobuf (upb) without TensorFlow."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

    pool = descriptor_pool.DescriptorPool()
    pool.Add(text_format.Parse(_EXAMPLE_PROTO, descriptor_pb2.FileDescriptorProto()))
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def serialize_example(
    *,
    encoded: bytes,
    image_format: str,
    height: int,
    width: int,
    label: int,
    text: str,
    source_id: str,
    sha256: str,
) -> bytes:
    """One image as a serialized ``tf.train.Example`` with the contract's keys.

    Does not import TensorFlow. Map keys are written in sorted order
    (deterministic serialization), so the same inputs give the same bytes in
    every process and every run.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    example = _example_class()()
    feature = example.features.feature
    feature[ENCODED].bytes_list.value.append(encoded)
    feature[FORMAT].bytes_list.value.append(image_format.encode())
    feature[HEIGHT].int64_list.value.append(int(height))
    feature[WIDTH].int64_list.value.append(int(width))
    feature[LABEL].int64_list.value.append(int(label))
    feature[TEXT].bytes_list.value.append(text.encode("utf-8"))
    feature[SOURCE_ID].bytes_list.value.append(source_id.encode("utf-8"))
    feature[SHA256].bytes_list.value.append(sha256.encode("ascii"))
    return example.SerializeToString(deterministic=True)


def feature_spec() -> dict:
    """The ``tf.io.parse_*example`` spec of every contract key."""
    import tensorflow as tf

    return {
        ENCODED: tf.io.FixedLenFeature([], tf.string),
        FORMAT: tf.io.FixedLenFeature([], tf.string, default_value="jpeg"),
        HEIGHT: tf.io.FixedLenFeature([], tf.int64),
        WIDTH: tf.io.FixedLenFeature([], tf.int64),
        LABEL: tf.io.FixedLenFeature([], tf.int64),
        TEXT: tf.io.FixedLenFeature([], tf.string, default_value=""),
        SOURCE_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
        SHA256: tf.io.FixedLenFeature([], tf.string, default_value=""),
    }


def parse_example(serialized: "tf.Tensor") -> dict:
    """Parse one serialized record (scalar string tensor) into a dict of tensors."""
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, feature_spec())


def decode_image(encoded: "tf.Tensor") -> "tf.Tensor":
    """Encoded JPEG/PNG/GIF/BMP bytes (scalar string) to a uint8 ``[h, w, 3]`` tensor.

    Grayscale and alpha images come out as 3-channel RGB; an animated GIF gives
    its first frame.
    """
    import tensorflow as tf

    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize_image(image: "tf.Tensor", size: Sequence[int], mode: str = "stretch") -> "tf.Tensor":
    """Resize a ``[h, w, 3]`` image to ``size = (height, width)`` as float32 in [0, 255].

    ``stretch`` ignores the aspect ratio; ``pad`` keeps it and pads with black
    (``tf.image.resize_with_pad``); ``crop`` keeps it and takes the largest
    central crop of the target aspect ratio. Resampling is bilinear with
    antialiasing, which is what Pillow's resize does closest to.
    """
    import tensorflow as tf

    height, width = int(size[0]), int(size[1])
    image = tf.cast(image, tf.float32)
    if mode == "stretch":
        out = tf.image.resize(image, [height, width], method="bilinear", antialias=True)
    elif mode == "pad":
        out = tf.image.resize_with_pad(image, height, width, method="bilinear", antialias=True)
    elif mode == "crop":
        shape = tf.shape(image)
        in_h = tf.cast(shape[0], tf.float32)
        in_w = tf.cast(shape[1], tf.float32)
        target_aspect = width / height
        crop_w = tf.minimum(in_w, in_h * target_aspect)
        crop_h = tf.minimum(in_h, in_w / target_aspect)
        crop_w_i = tf.maximum(tf.cast(tf.round(crop_w), tf.int32), 1)
        crop_h_i = tf.maximum(tf.cast(tf.round(crop_h), tf.int32), 1)
        off_h = (shape[0] - crop_h_i) // 2
        off_w = (shape[1] - crop_w_i) // 2
        cropped = tf.image.crop_to_bounding_box(image, off_h, off_w, crop_h_i, crop_w_i)
        out = tf.image.resize(cropped, [height, width], method="bilinear", antialias=True)
    else:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    out = tf.clip_by_value(out, 0.0, 255.0)
    out.set_shape([height, width, 3])
    return out


def decode_and_resize(encoded: "tf.Tensor", size: Sequence[int], mode: str = "stretch") -> "tf.Tensor":
    """Encoded bytes to a float32 ``[height, width, 3]`` image in [0, 255].

    The one function both the trainer's input pipeline and the exported serving
    signature call, so a model sees the same pixels in training and in serving.
    """
    return resize_image(decode_image(encoded), size, mode)


def parse_image_size(text: str) -> tuple[int, int]:
    """``--image-size`` of every stage: ``"96"`` -> ``(96, 96)``; ``"128x96"`` (WIDTHxHEIGHT) -> ``(96, 128)``.

    Returns ``(height, width)``, the order TensorFlow's image ops take.
    Raises ``ValueError`` with the reason for anything else (``96x``, ``0``,
    ``axb``, three numbers).
    """
    parts = str(text).strip().lower().replace("×", "x").split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"--image-size must be a number or WIDTHxHEIGHT (e.g. 224 or 320x240), got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise ValueError(f"--image-size must be a positive number or WIDTHxHEIGHT (e.g. 224 or 320x240), got {text!r}")
    width, height = values
    return height, width


def read_labels(data_dir: str) -> list[str]:
    """Class names from ``DATA/labels.txt``; line index is the class id."""
    import tensorflow as tf

    path = os.path.join(data_dir, LABELS_FILE)
    with tf.io.gfile.GFile(path, "r") as handle:
        labels = [line.strip() for line in handle.read().splitlines()]
    return [label for label in labels if label]


def list_shards(data_dir: str, split: str) -> list[str]:
    """Sorted shard paths of one split under ``data_dir`` (any TF filesystem)."""
    import tensorflow as tf

    return sorted(tf.io.gfile.glob(os.path.join(data_dir, shard_pattern(split))))

"""Export a trained Keras classifier as a versioned SavedModel for TF Serving.

The contract (docs/contracts.md, section 4): ``EXPORT_BASE/<version>/`` holds a
SavedModel whose only signature, ``serving_default``, takes ``image_bytes``
(DT_STRING ``[-1]``, encoded image files) and returns ``probabilities``
(float ``[-1, C]``), ``class_ids`` (int64 ``[-1]``), ``labels`` (string
``[-1]``) and ``scores`` (float ``[-1]``). Decoding and resizing run inside the
graph through :func:`preprocessing.graph_decode.decode_and_resize_upload`: the
original file is normalised as the preprocessing job normalised it (EXIF
orientation, alpha on white, 8-bit RGB; over ``max_pixels`` refused before
decoding) and resized as the trainer resizes records, so serving sees the
pixels training saw.

Besides the graph a version holds ``assets/labels.txt`` (a tracked asset; the
graph reads its class names from it), ``assets.extra/tf_serving_warmup_requests``
(a TFRecord of ``PredictionLog`` that TF Serving replays before it serves the
version) and ``assets.extra/metadata.json`` (the run's metadata).

Publishing is atomic: the SavedModel is written to a hidden, non-numeric folder
under the export base (``.tmp-<version>-<host>~<pid>``, which neither TF Serving
nor the project's server takes for a version; one a killed export left is
removed by the next, :mod:`trainer.staging`), reloaded and checked against the
Keras model, and only then renamed to ``<version>``. On a local filesystem that
rename is atomic; on object stores (``gs://``, ``s3://``) a "rename" is a copy
and delete, which a watcher could see half done: export locally and upload, if that matters.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from preprocessing.config import DEFAULT_MAX_PIXELS
from trainer.staging import disk_full_message, owner, remove_stale

SIGNATURE_NAME = "serving_default"
INPUT_NAME = "image_bytes"
OUTPUT_NAMES = ("probabilities", "class_ids", "labels", "scores")
LABELS_ASSET = "labels.txt"
WARMUP_FILE = "tf_serving_warmup_requests"
METADATA_FILE = "metadata.json"
ASSETS_EXTRA = "assets.extra"
DEFAULT_WARMUP_COUNT = 3
DECODE_VERSION = "upright-rgb-v1"  # metadata marker: the signature normalises uploads (graph_decode)

_VERSION_RE = re.compile(r"^[0-9]+$")


class ExportError(Exception):
    """The export could not produce a correct, published version (nothing was published)."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` published."""

    version: int
    path: str  # EXPORT_BASE/<version>
    max_abs_diff: float  # reloaded SavedModel vs Keras model on the check images


def list_versions(export_base: str) -> list[int]:
    """Sorted version numbers: the all-digit folder names directly under ``export_base``.

    A missing base gives ``[]``. Temporary folders (``.tmp-*``) and anything
    else non-numeric are ignored, as TF Serving ignores them.
    """
    import tensorflow as tf

    if not tf.io.gfile.isdir(export_base):
        return []
    versions = []
    for name in tf.io.gfile.listdir(export_base):
        name = name.rstrip("/")
        if _VERSION_RE.match(name) and tf.io.gfile.isdir(os.path.join(export_base, name)):
            versions.append(int(name))
    return sorted(versions)


def latest_version(export_base: str) -> int | None:
    """The highest version under ``export_base``, or ``None`` when there is none."""
    versions = list_versions(export_base)
    return versions[-1] if versions else None


def _build_module(model, labels_path: str, image_size: tuple[int, int], resize_mode: str, max_pixels: int):
    """A ``tf.Module`` that tracks the model and the labels asset and serves the signature.

    The signature decodes the client's original file with
    :func:`preprocessing.graph_decode.decode_and_resize_upload` (records were
    normalised by the job; uploads are not).
    """
    import tensorflow as tf

    from preprocessing import graph_decode

    height, width = int(image_size[0]), int(image_size[1])
    module = tf.Module()
    module.model = model
    module.labels_asset = tf.saved_model.Asset(labels_path)
    module.labels_table = tf.lookup.StaticHashTable(
        tf.lookup.TextFileInitializer(
            module.labels_asset,
            key_dtype=tf.int64,
            key_index=tf.lookup.TextFileIndex.LINE_NUMBER,
            value_dtype=tf.string,
            value_index=tf.lookup.TextFileIndex.WHOLE_LINE,
        ),
        default_value="",
    )

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_NAME)])
    def serve(image_bytes):
        images = tf.map_fn(
            lambda encoded: graph_decode.decode_and_resize_upload(encoded, (height, width), resize_mode, max_pixels),
            image_bytes,
            fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32),
        )
        probabilities = tf.cast(module.model(images, training=False), tf.float32)
        class_ids = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
        return {
            "probabilities": probabilities,
            "class_ids": class_ids,
            "labels": module.labels_table.lookup(class_ids),
            "scores": tf.reduce_max(probabilities, axis=-1),
        }

    module.serve = serve
    return module


def _write_warmup(version_dir: str, images: Sequence[bytes]) -> None:
    """``assets.extra/tf_serving_warmup_requests``: one batch-1 request per image, then one with all."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    def request(batch: Sequence[bytes]) -> predict_pb2.PredictRequest:
        req = predict_pb2.PredictRequest()
        req.model_spec.signature_name = SIGNATURE_NAME
        req.inputs[INPUT_NAME].CopyFrom(tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(batch))]),
            string_val=list(batch),
        ))
        return req

    batches = [[image] for image in images]
    if len(images) > 1:
        batches.append(list(images))
    extra = os.path.join(version_dir, ASSETS_EXTRA)
    tf.io.gfile.makedirs(extra)
    with tf.io.TFRecordWriter(os.path.join(extra, WARMUP_FILE)) as writer:
        for batch in batches:
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request(batch)))
            writer.write(log.SerializeToString())


def _keras_probabilities(model, images: Sequence[bytes], image_size, resize_mode, max_pixels: int) -> np.ndarray:
    """The Keras model on ``images`` decoded as the serving signature decodes them (eagerly)."""
    import tensorflow as tf

    from preprocessing import graph_decode

    pixels = tf.stack([
        graph_decode.decode_and_resize_upload(tf.constant(image), image_size, resize_mode, max_pixels)
        for image in images
    ])
    return np.asarray(model(pixels, training=False), dtype=np.float32)


def _remove(path: str) -> None:
    import tensorflow as tf

    try:
        if tf.io.gfile.exists(path):
            tf.io.gfile.rmtree(path)
    except Exception:  # noqa: BLE001 - best effort cleanup; the original error matters more
        pass


def export_model(
    model,
    export_base: str,
    *,
    labels: Sequence[str],
    image_size: tuple[int, int],
    resize_mode: str,
    check_images: Sequence[bytes],
    metadata: dict | None = None,
    version: int | None = None,
    warmup_images: Sequence[bytes] | None = None,
    tolerance: float = 1e-4,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ExportResult:
    """Export ``model`` as ``export_base/<version>`` and return what was published.

    ``model`` maps float32 ``[N, H, W, 3]`` in [0, 255] to softmax ``[N, C]``
    with ``C == len(labels)``. ``version`` ``None`` takes the latest existing
    version + 1 (or 1); an existing version is refused. The reloaded SavedModel
    must agree with ``model`` on ``check_images`` (encoded image bytes) within
    ``tolerance`` (max absolute difference of the probabilities), otherwise
    :class:`ExportError` is raised and nothing is left behind. Warm-up requests
    are built from ``warmup_images`` (default: the first three check images).
    The signature refuses images over ``max_pixels`` (default: the
    preprocessing job's ``--max-pixels``) before decoding them; the limit and
    the decode version are recorded in ``metadata.json``'s ``export`` section.
    """
    import tensorflow as tf

    from preprocessing import tfrecords

    labels = [str(label) for label in labels]
    if not labels:
        raise ExportError("labels must not be empty")
    bad = [label for label in labels if not label or "\n" in label or label != label.strip()]
    if bad:
        raise ExportError(f"labels must be non-empty single lines without surrounding spaces, got {bad[:3]!r}")
    if resize_mode not in tfrecords.RESIZE_MODES:
        raise ExportError(f"resize_mode must be one of {tfrecords.RESIZE_MODES}, got {resize_mode!r}")
    if len(image_size) != 2 or min(int(s) for s in image_size) < 1:
        raise ExportError(f"image_size must be (height, width) of positive ints, got {image_size!r}")
    if int(max_pixels) < 1:
        raise ExportError(f"max_pixels must be positive, got {max_pixels!r}")
    max_pixels = int(max_pixels)
    image_size = (int(image_size[0]), int(image_size[1]))
    check_images = [bytes(image) for image in check_images]
    if not check_images:
        raise ExportError("check_images must hold at least one encoded image to verify the export")
    warmup = [bytes(image) for image in (warmup_images if warmup_images is not None
                                          else check_images[:DEFAULT_WARMUP_COUNT])]

    existing = list_versions(export_base)
    if version is None:
        version = (existing[-1] + 1) if existing else 1
    version = int(version)
    if version < 1:
        raise ExportError(f"version must be a positive integer, got {version}")
    final_dir = os.path.join(export_base, str(version))
    if version in existing or tf.io.gfile.exists(final_dir):
        raise ExportError(f"version {version} already exists at {final_dir}; versions are never overwritten")

    tf.io.gfile.makedirs(export_base)
    remove_stale(export_base, ".tmp-")
    tmp_dir = os.path.join(export_base, f".tmp-{version}-{owner()}")
    staging = f"{tmp_dir}-labels"
    try:
        try:
            expected = _keras_probabilities(model, check_images, image_size, resize_mode, max_pixels)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"the Keras model failed on the check images: {exc}") from exc
        if expected.ndim != 2 or expected.shape[1] != len(labels):
            raise ExportError(
                f"the model outputs shape {list(expected.shape)} but there are {len(labels)} labels")

        tf.io.gfile.makedirs(staging)
        labels_path = os.path.join(staging, LABELS_ASSET)
        with tf.io.gfile.GFile(labels_path, "w") as handle:
            handle.write("\n".join(labels) + "\n")
        module = _build_module(model, labels_path, image_size, resize_mode, max_pixels)
        tf.saved_model.save(module, tmp_dir,
                            signatures={SIGNATURE_NAME: module.serve.get_concrete_function()})
        _remove(staging)

        reloaded = tf.saved_model.load(tmp_dir)
        outputs = reloaded.signatures[SIGNATURE_NAME](**{INPUT_NAME: tf.constant(check_images)})
        got = outputs["probabilities"].numpy()
        if got.shape != expected.shape:
            raise ExportError(f"the SavedModel returns probabilities {list(got.shape)}, the Keras model {list(expected.shape)}")
        max_abs_diff = float(np.max(np.abs(got - expected)))
        if not max_abs_diff <= tolerance:
            raise ExportError(
                f"the SavedModel disagrees with the Keras model: max abs diff {max_abs_diff:.3g} > tolerance {tolerance:.3g}")
        got_labels = [label.decode("utf-8") for label in outputs["labels"].numpy()]
        want_labels = [labels[i] for i in np.argmax(got, axis=-1)]
        if got_labels != want_labels:
            raise ExportError(f"the SavedModel's labels {got_labels[:3]} disagree with labels.txt {want_labels[:3]}")

        _write_warmup(tmp_dir, warmup)
        info: dict[str, Any] = dict(metadata or {})
        info.update({
            "export": {
                "version": version,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "signature": SIGNATURE_NAME,
                "input": INPUT_NAME,
                "outputs": list(OUTPUT_NAMES),
                "labels": labels,
                "image_size": list(image_size),
                "resize_mode": resize_mode,
                "decode": DECODE_VERSION,
                "max_pixels": max_pixels,
                "max_abs_diff": max_abs_diff,
                "tolerance": tolerance,
                "check_images": len(check_images),
                "warmup_requests": len(warmup) + (1 if len(warmup) > 1 else 0),
                "tensorflow": tf.__version__,
            }
        })
        with tf.io.gfile.GFile(os.path.join(tmp_dir, ASSETS_EXTRA, METADATA_FILE), "w") as handle:
            handle.write(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")

        if tf.io.gfile.exists(final_dir):
            raise ExportError(f"version {version} appeared at {final_dir} while exporting; not overwriting it")
        try:
            tf.io.gfile.rename(tmp_dir, final_dir, overwrite=False)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"could not publish {tmp_dir} as {final_dir}: {exc}") from exc
    except ExportError:
        _remove(tmp_dir)
        _remove(staging)
        raise
    except Exception as exc:  # noqa: BLE001 - a failed save must not leave a partial folder either
        _remove(tmp_dir)
        _remove(staging)
        full = disk_full_message(exc, tmp_dir)
        if full:
            raise ExportError(full) from None
        raise ExportError(f"export failed: {type(exc).__name__}: {exc}") from exc
    return ExportResult(version=version, path=final_dir, max_abs_diff=max_abs_diff)


def load_predict_fn(version_dir: str) -> Callable[[Sequence[bytes]], dict[str, np.ndarray]]:
    """Load ``version_dir`` and return a function running ``serving_default`` on encoded images.

    The function returns numpy arrays keyed by output name; ``labels`` come
    back as ``str`` (object array) rather than bytes.
    """
    import tensorflow as tf

    loaded = tf.saved_model.load(version_dir)
    signature = loaded.signatures[SIGNATURE_NAME]

    def predict(images: Sequence[bytes]) -> dict[str, np.ndarray]:
        outputs = signature(**{INPUT_NAME: tf.constant([bytes(image) for image in images], dtype=tf.string)})
        result = {name: value.numpy() for name, value in outputs.items()}
        if "labels" in result:
            result["labels"] = np.array([label.decode("utf-8") for label in result["labels"]], dtype=object)
        return result

    predict.loaded = loaded  # keep the SavedModel's resources alive with the function
    return predict

"""One loaded model version (a servable): its SavedModel, request validation, ``run`` and warm-up.

:class:`LoadedVersion` checks a request against the signature as TF Serving
does (same codes and messages), runs it, and replays the version's
``assets.extra/tf_serving_warmup_requests`` before the version takes traffic.
Which versions are loaded, and when, is :class:`serving.models.ModelManager`'s
job.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Callable

import grpc
import numpy as np

from serving import tensors
from serving.errors import ServingError, failed_precondition, invalid

DEFAULT_SIGNATURE = "serving_default"
WARMUP_PATH = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit

_TF_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _dims(shape_proto) -> list[int] | None:
    if shape_proto.unknown_rank:
        return None
    return [d.size for d in shape_proto.dim]


def _shape_ok(actual: tuple[int, ...], expected: list[int] | None) -> bool:
    if expected is None:
        return True
    return len(actual) == len(expected) and all(e < 0 or e == a for a, e in zip(actual, expected))


class LoadedVersion:
    """One loaded SavedModel version: its signature defs and a thread-safe ``run``.

    Instances are immutable once published; a request keeps the instance it
    resolved, so unloading a version never breaks a request in flight.
    """

    def __init__(self, name: str, version: int, path: str):
        import tensorflow as tf
        from google.protobuf.message import DecodeError
        from tensorflow.core.protobuf import saved_model_pb2

        self.name = name
        self.version = version
        self.path = path
        # A folder that does not load raises the status TensorFlow's loader gives it, as TF Serving reports it
        # (GetModelStatus: END with that status): a missing or unparsable saved_model.pb is NOT_FOUND or
        # DATA_LOSS with the messages of tensorflow/cc/saved_model/reader.cc and ReadBinaryProto.
        pb = os.path.join(path, "saved_model.pb")
        if not tf.io.gfile.exists(pb):
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Could not find SavedModel .pb or .pbtxt at supplied export directory path: {path}")
        proto = saved_model_pb2.SavedModel()
        try:
            with tf.io.gfile.GFile(pb, "rb") as handle:
                proto.ParseFromString(handle.read())
        except DecodeError:
            raise ServingError(grpc.StatusCode.DATA_LOSS, f"Can't parse {pb} as binary proto") from None
        serve = [mg for mg in proto.meta_graphs if "serve" in mg.meta_info_def.tags] or list(proto.meta_graphs)
        if not serve:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find meta graph def matching supplied tags: "
                                                          f"{{ serve }} in {pb}")
        self.signature_defs = dict(serve[0].signature_def)
        try:
            self._loaded = tf.saved_model.load(path, tags=["serve"])
        except (tf.errors.OpError, OSError) as exc:  # variables/ missing: NOT_FOUND (wrapped in FileNotFoundError)
            error = exc if isinstance(exc, tf.errors.OpError) else exc.__cause__
            if isinstance(error, tf.errors.OpError):
                code, message = _TF_CODES.get(error.error_code, grpc.StatusCode.UNKNOWN), error.message or str(error)
            else:
                code = grpc.StatusCode.NOT_FOUND if isinstance(exc, FileNotFoundError) else grpc.StatusCode.UNKNOWN
                message = str(exc)
            lines = message.strip().splitlines()
            raise ServingError(code, lines[0] if lines else type(exc).__name__) from exc
        self._functions = dict(self._loaded.signatures)
        self.batchers: dict = {}
        self._batchers_lock = threading.Lock()
        self._closed = False

    @property
    def signature_names(self) -> list[str]:
        return sorted(self._functions)

    def signature(self, name: str):
        """The SignatureDef of a servable signature, else FAILED_PRECONDITION as TF Serving says it."""
        name = name or DEFAULT_SIGNATURE
        if name not in self._functions or name not in self.signature_defs:
            raise failed_precondition(f'Serving signature key "{name}" not found.')
        return self.signature_defs[name]

    def validate(self, signature_name: str, inputs: dict[str, np.ndarray], output_filter=()) -> list[str]:
        """Check inputs (names, dtypes, shapes) and the output filter; return the output names to send."""
        sig = self.signature(signature_name)
        expected = set(sig.inputs)
        given = set(inputs)
        if len(given) != len(expected):
            raise invalid(
                f"input size does not match signature: {len(given)}!={len(expected)} "
                f"len({{{','.join(sorted(given))}}}) != len({{{','.join(sorted(expected))}}}). "
                f"Sent extra: {{{','.join(sorted(given - expected))}}}. "
                f"Missing but required: {{{','.join(sorted(expected - given))}}}.")
        for alias in sorted(given):
            if alias not in sig.inputs:
                raise invalid(f"input tensor alias not found in signature: {alias}. "
                              f"Inputs expected to be in the set {{{','.join(sorted(expected))}}}.")
        for index, alias in enumerate(sorted(expected)):
            info, array = sig.inputs[alias], inputs[alias]
            got = tensors.dtype_of(array)
            if got != info.dtype:
                raise invalid(f"Expects arg[{index}] to be {tensors.dtype_name(info.dtype)} "
                              f"but {tensors.dtype_name(got)} is provided")
            want_shape = _dims(info.tensor_shape)
            if not _shape_ok(array.shape, want_shape):
                raise invalid(f"input {alias} has shape {list(array.shape)} but the signature expects "
                              f"{want_shape} (-1 is any size)")
        outputs = []
        for alias in output_filter:
            if alias not in sig.outputs:
                raise invalid(f"output tensor alias not found in signature: {alias} Outputs expected to be "
                              f"in the set {{{','.join(sorted(sig.outputs))}}}.")
            if alias in outputs:
                raise invalid(f"duplicate output tensor alias: {alias}")
            outputs.append(alias)
        return outputs or sorted(sig.outputs)

    def run(self, signature_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a signature on validated inputs; TensorFlow errors become their status code."""
        import tensorflow as tf

        name = signature_name or DEFAULT_SIGNATURE
        sig = self.signature_defs[name]
        feed = {}
        for alias, array in inputs.items():
            dtype = tf.dtypes.as_dtype(sig.inputs[alias].dtype)
            feed[alias] = tf.constant(array, dtype=dtype)
        try:
            outputs = self._functions[name](**feed)
        except tf.errors.OpError as exc:
            # The op's own reason ("image too large ...", "Unknown image file format ..."), without
            # TF's "Graph execution error" frame, traceback, node names and "assertion failed: [...]".
            lines = [re.sub(r"^(\{\{function_node [^}]*\}\}\s*)+|\s*\[Op:[^\]]*\]( name:.*)?$", "", line.strip())
                     for line in (exc.message or str(exc)).splitlines()]
            noise = ("Graph execution error", "Detected at node", "File ", "[[", "<stack traces")
            reasons = [line for line in lines if line and not line.startswith(noise)]
            reason = re.sub(r"^assertion failed: \[(.*)\]$", r"\1", reasons[0] if reasons else str(exc))
            raise ServingError(_TF_CODES.get(exc.error_code, grpc.StatusCode.UNKNOWN), reason) from exc
        except (TypeError, ValueError) as exc:
            raise invalid(str(exc).strip().splitlines()[0]) from exc
        return {alias: value.numpy() for alias, value in outputs.items()}

    def warm_up(self) -> int:
        """Replay the version's warm-up PredictionLogs (Predict requests); return how many ran."""
        import tensorflow as tf
        from tensorflow_serving.apis import prediction_log_pb2

        path = os.path.join(self.path, WARMUP_PATH)
        if not tf.io.gfile.exists(path):
            return 0
        count = 0
        for record in tf.data.TFRecordDataset(path).take(MAX_WARMUP_RECORDS):
            entry = prediction_log_pb2.PredictionLog()
            entry.ParseFromString(record.numpy())
            if entry.WhichOneof("log_type") != "predict_log":
                raise ValueError(f"warm-up record {count} is {entry.WhichOneof('log_type')}; only predict_log is supported")
            request = entry.predict_log.request
            inputs = {alias: tensors.from_proto(proto) for alias, proto in request.inputs.items()}
            self.validate(request.model_spec.signature_name, inputs, list(request.output_filter))
            self.run(request.model_spec.signature_name, inputs)
            count += 1
        return count

    def close(self) -> None:
        """Stop the version's batchers (queued requests still finish); later requests run unbatched."""
        with self._batchers_lock:
            self._closed = True
            batchers, self.batchers = list(self.batchers.values()), {}
        for batcher in batchers:
            batcher.close()

    def batcher(self, signature_name: str, factory: Callable):
        """The version's batcher for a signature, made on first use by ``factory(run_fn, label)``.

        None once the version is closed (being unloaded): the caller runs the request directly.
        """
        name = signature_name or DEFAULT_SIGNATURE
        with self._batchers_lock:
            if self._closed:
                return None
            if name not in self.batchers:
                self.batchers[name] = factory(lambda inputs: self.run(name, inputs),
                                              f"{self.name}:{self.version}:{name}")
            return self.batchers[name]

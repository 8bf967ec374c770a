"""Model versions: loading, warm-up, the version policy and watching the base path.

TF Serving serves ``BASE/<version>/`` folders whose names are integers; it
picks the versions to serve with a version policy (by default the latest
one), replays ``assets.extra/tf_serving_warmup_requests`` before a version
takes traffic, and polls the base path so that a new version is loaded and
swapped in while requests keep flowing. :class:`ModelManager` does the same
for one model:

* a new version is loaded and warmed up *before* it becomes visible; the old
  one is unloaded only after that, and requests already holding it finish on
  it (they keep a reference), so a swap fails no request;
* a folder that is not a valid SavedModel (or whose warm-up fails) is logged,
  reported as ``END`` with its error by GetModelStatus, and skipped - the
  policy then chooses among the remaining versions. It is tried again only if
  its modification time changes;
* version labels (``stable``, ``canary``) map to version numbers.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
import numpy as np

from serving import tensors
from serving.errors import ServingError, failed_precondition, invalid, not_found

log = logging.getLogger("serving.models")

DEFAULT_SIGNATURE = "serving_default"
WARMUP_PATH = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit

# ModelVersionStatus.State (tensorflow_serving/apis/get_model_status.proto)
START, LOADING, AVAILABLE, UNLOADING, END = 10, 20, 30, 40, 50
STATE_NAMES = {0: "UNKNOWN", START: "START", LOADING: "LOADING", AVAILABLE: "AVAILABLE",
               UNLOADING: "UNLOADING", END: "END"}

_TF_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions to serve: ``latest`` N (TF Serving's default, N=1), ``all``, or ``specific`` ones."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "VersionPolicy":
        """``latest``, ``latest:N``, ``all`` or ``specific:V1,V2``."""
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "latest":
                policy = cls("latest", int(arg) if arg else 1)
                if policy.num_versions < 1:
                    raise ValueError
                return policy
            if kind == "all" and not arg:
                return cls("all")
            if kind == "specific" and arg:
                return cls("specific", versions=tuple(sorted(int(v) for v in arg.split(","))))
        except ValueError:
            pass
        raise ValueError(f"version policy must be latest[:N], all or specific:V1,V2 - got {text!r}")

    def select(self, candidates: list[int]) -> list[int]:
        candidates = sorted(candidates)
        if self.kind == "all":
            return candidates
        if self.kind == "specific":
            return [v for v in candidates if v in self.versions]
        return candidates[-self.num_versions:]


@dataclass
class VersionState:
    """What GetModelStatus reports for one version."""

    state: int
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""


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
        from tensorflow.core.protobuf import saved_model_pb2

        self.name = name
        self.version = version
        self.path = path
        pb = os.path.join(path, "saved_model.pb")
        if not tf.io.gfile.exists(pb):
            raise ValueError(f"no saved_model.pb in {path}")
        proto = saved_model_pb2.SavedModel()
        with tf.io.gfile.GFile(pb, "rb") as handle:
            proto.ParseFromString(handle.read())
        serve = [mg for mg in proto.meta_graphs if "serve" in mg.meta_info_def.tags] or list(proto.meta_graphs)
        if not serve:
            raise ValueError(f"{pb} holds no MetaGraph")
        self.signature_defs = dict(serve[0].signature_def)
        self._loaded = tf.saved_model.load(path, tags=["serve"])
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


@dataclass
class ModelManager:
    """Serves the versions of one model found under ``base_path`` (see the module docstring)."""

    name: str
    base_path: str
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    labels: dict[str, int] = field(default_factory=dict)
    poll_seconds: float = 1.0
    warmup: bool = True
    on_change: Callable[["ModelManager"], None] | None = None

    def __post_init__(self):
        self._lock = threading.Lock()
        self._available: dict[int, LoadedVersion] = {}
        self._states: dict[int, VersionState] = {}
        self._failed: dict[int, float] = {}  # version -> folder mtime when it failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_empty = False
        # Labels as configured; self.labels holds those in effect (a label moves only once its version is
        # AVAILABLE, see _move_labels). _poll_lock serialises polls of the base path and config changes.
        self._wanted_labels: dict[str, int] = dict(self.labels)
        self._poll_lock = threading.Lock()

    # -- queries -------------------------------------------------------------------------------
    def available_versions(self) -> list[int]:
        with self._lock:
            return sorted(self._available)

    def states(self) -> dict[int, VersionState]:
        """Every version's state, newest first (as TF Serving's ServableStateMonitor orders them)."""
        with self._lock:
            return dict(sorted(self._states.items(), reverse=True))

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> LoadedVersion:
        """The version a request's model spec asks for, or TF Serving's NOT_FOUND/INVALID_ARGUMENT."""
        with self._lock:  # the label and the version map are read together: a label move is atomic
            if label is not None and label != "":
                if name == self.name and label in self.labels:
                    version = self.labels[label]
                else:
                    raise invalid(f"Unrecognized servable version label: {label}")
            if name == self.name:
                if version is None and self._available:
                    return self._available[max(self._available)]
                if version is not None and version in self._available:
                    return self._available[version]
        if version is None:
            raise not_found(f"Servable not found for request: Latest({name})")
        raise not_found(f"Servable not found for request: Specific({name}, {version})")

    # -- loading ---------------------------------------------------------------------------------
    def _candidates(self) -> dict[int, str]:
        import tensorflow as tf

        found = {}
        try:
            names = tf.io.gfile.listdir(self.base_path)
        except Exception:  # noqa: BLE001 - a missing base path just means no versions yet
            return found
        for entry in names:
            entry = entry.rstrip("/")
            if re.fullmatch(r"[0-9]+", entry):
                path = os.path.join(self.base_path, entry)
                if tf.io.gfile.isdir(path):
                    found[int(entry)] = path
        return found

    @staticmethod
    def _mtime(path: str) -> float:
        try:
            return os.stat(path).st_mtime
        except OSError:
            return 0.0

    def _load(self, version: int, path: str) -> None:
        with self._lock:
            self._states[version] = VersionState(LOADING)
        log.info("loading model %s version %d from %s", self.name, version, path)
        started = time.monotonic()
        try:
            loaded = LoadedVersion(self.name, version, path)
            warmed = loaded.warm_up() if self.warmup else 0
        except Exception as exc:  # noqa: BLE001 - any broken folder is skipped, never fatal
            message = (exc.message if isinstance(exc, ServingError) else str(exc)).strip().splitlines()
            message = message[0] if message else type(exc).__name__
            log.error("skipping model %s version %d at %s: not a servable SavedModel: %s",
                      self.name, version, path, message)
            with self._lock:
                self._states[version] = VersionState(END, grpc.StatusCode.UNKNOWN, message)
                self._failed[version] = self._mtime(path)
            return
        with self._lock:
            self._available[version] = loaded
            self._states[version] = VersionState(AVAILABLE)
        log.info("model %s version %d available (loaded in %.1fs, %d warm-up requests)",
                 self.name, version, time.monotonic() - started, warmed)

    def _unload(self, version: int) -> None:
        with self._lock:
            loaded = self._available.pop(version, None)
            if loaded is None:
                return
            self._states[version] = VersionState(UNLOADING)
        loaded.close()
        with self._lock:
            self._states[version] = VersionState(END)
        log.info("model %s version %d unloaded", self.name, version)

    def poll(self) -> bool:
        """Look at the base path once, load and unload per the policy; True if anything changed."""
        with self._poll_lock:
            return self._poll()

    def apply_config(self, policy: "VersionPolicy", labels: dict[str, int]) -> dict[str, int]:
        """Serve ``policy`` and ``labels`` (a re-read model config) without failing a request.

        Newly listed versions are loaded and warmed up first; then the labels
        move, all at once, each only to a version that is AVAILABLE (a label
        whose new version could not be loaded stays where it was while that
        version is still loaded); then versions neither the policy nor a label
        names are unloaded (requests in flight keep their version until they
        finish). Returns the labels now in effect.
        """
        with self._poll_lock:
            self.policy = policy
            self._wanted_labels = dict(labels)
            self._poll()
            with self._lock:
                return dict(self.labels)

    def _move_labels(self) -> bool:
        """Point the labels in effect at the wanted versions that are AVAILABLE; True if any moved."""
        with self._lock:
            current, moved = dict(self.labels), {}
            for label, version in self._wanted_labels.items():
                old = current.get(label)
                if version in self._available or old is None or old not in self._available:
                    moved[label] = version  # a new label may name a version still loading (TF Serving's flag)
                else:
                    moved[label] = old
                    log.warning("label %s of model %s stays at version %d: version %d is not available",
                                label, self.name, old, version)
            changed = moved != current
            self.labels = moved
        return changed

    def _poll(self) -> bool:
        found = self._candidates()
        for version, mtime in list(self._failed.items()):
            if version not in found or self._mtime(found[version]) != mtime:
                self._failed.pop(version)
        changed = False
        while True:  # a version that fails to load drops out, and the policy chooses again
            candidates = [v for v in found if v not in self._failed]
            desired = self.policy.select(candidates)
            missing = sorted(set(desired) - set(self.available_versions()), reverse=True)
            if not missing or self._stop.is_set():
                break
            for version in missing:
                self._load(version, found[version])
                changed = True
        if not found and not self._warned_empty:
            log.warning("no versions of model %s found under %s yet (waiting for one)", self.name, self.base_path)
            self._warned_empty = True
        if self._move_labels():
            changed = True
        available = set(self.available_versions())
        keep = set(desired) & available
        with self._lock:  # never unload a version a label still points to
            keep |= set(self.labels.values()) & available
        if keep:
            for version in sorted(available - keep):
                self._unload(version)
                changed = True
        if changed and self.on_change is not None:
            self.on_change(self)
        return changed

    def start(self) -> None:
        """Poll once now, then keep polling every ``poll_seconds`` on a daemon thread."""
        self.poll()
        if self.poll_seconds > 0:
            self._thread = threading.Thread(target=self._watch, name=f"watch-{self.name}", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the watcher must outlive a bad poll
                log.exception("polling %s failed", self.base_path)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for version in self.available_versions():
            with self._lock:
                loaded = self._available.get(version)
            if loaded is not None:
                loaded.close()

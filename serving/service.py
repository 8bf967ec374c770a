"""What a request does, independent of its transport (gRPC or REST).

Both front ends resolve the model spec, validate against the signature, run
(through the batcher when batching is on), record metrics, and raise
:class:`~serving.errors.ServingError` with TF Serving's code and message. The
gRPC servicers in :mod:`serving.server` and the REST handler in
:mod:`serving.rest` only translate between their wire formats and these calls.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import numpy as np

from serving.batching import Batcher, BatchingConfig
from serving.errors import ServingError, invalid, not_found
from serving.metrics import Metrics
from serving.models import ModelManager, VersionState
from serving.servable import DEFAULT_SIGNATURE, LoadedVersion

SIGNATURE_DEF_FIELD = "signature_def"


@dataclass(frozen=True)
class Spec:
    """A request's model spec: name, and at most one of version and label."""

    name: str
    version: int | None = None
    label: str | None = None
    signature_name: str = ""


class ServingCore:
    """Predict, GetModelMetadata and GetModelStatus over one :class:`ModelManager`."""

    def __init__(self, manager: ModelManager, metrics: Metrics, batching: BatchingConfig | None = None):
        self.manager = manager
        self.metrics = metrics
        self.batching = batching
        self._in_flight = 0
        self._idle = threading.Condition()

    @contextmanager
    def track(self, model_name: str, api: str, entrypoint: str):
        """Count a request in flight and record its status and latency when it ends."""
        started = time.perf_counter()
        with self._idle:
            self._in_flight += 1
        status = "OK"
        try:
            yield
        except ServingError as exc:
            status = exc.code.name
            raise
        except Exception:
            status = grpc.StatusCode.INTERNAL.name
            raise
        finally:
            self.metrics.observe(model_name or "", api, entrypoint, status, time.perf_counter() - started)
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request is in flight (or ``timeout``); True if idle."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def _batcher_factory(self, run_fn, label: str) -> Batcher:
        # TF Serving's batching_session counts each batch run (wrapped_run_count); it has no batch-size metric.
        return Batcher(run_fn, self.batching, label,
                       on_batch=lambda rows: self.metrics.wrapped_run_count.labels().inc())

    def predict(self, spec: Spec, inputs: dict[str, np.ndarray], output_filter=(),
                loaded: LoadedVersion | None = None) -> tuple[LoadedVersion, str, dict]:
        """Run a signature; returns the version that answered, the signature name and the outputs.

        ``loaded`` skips resolving ``spec`` again when the caller already holds the version.
        """
        if not spec.name:
            raise invalid("Missing ModelSpec")
        if loaded is None:
            loaded = self.manager.resolve(spec.name, spec.version, spec.label)
        signature_name = spec.signature_name or DEFAULT_SIGNATURE
        wanted = loaded.validate(signature_name, inputs, output_filter)
        batcher = loaded.batcher(signature_name, self._batcher_factory) if self.batching is not None else None
        started = time.perf_counter()
        outputs = batcher.submit(inputs) if batcher is not None else loaded.run(signature_name, inputs)
        self.metrics.observe_run(spec.name, "Predict", time.perf_counter() - started)  # TF Serving: runtime_latency
        return loaded, signature_name, {alias: outputs[alias] for alias in wanted}

    def metadata(self, spec: Spec, fields) -> tuple[LoadedVersion, object]:
        """The version and its SignatureDefMap (every signature of the MetaGraph, as TF Serving sends)."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        if not spec.name:
            raise invalid("Missing ModelSpec")
        fields = list(fields)
        if not fields:
            raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for field in fields:
            if field != SIGNATURE_DEF_FIELD:
                raise invalid(f"Metadata field {field} is not supported")
        loaded = self.manager.resolve(spec.name, spec.version, spec.label)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, value in loaded.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(value)
        return loaded, signature_map

    def status(self, spec: Spec) -> list[tuple[int, VersionState]]:
        """Version states as GetModelStatus reports them: the version asked for, else all, newest first.

        As TF Serving's get_model_status_impl.cc: only ``version`` narrows the
        answer; a ``version_label`` is not resolved (nor checked), so a label
        route lists every version; versions come newest first (the state
        monitor's map is ordered by ``std::greater``). The caller checks that a
        model spec was given (``Missing ModelSpec``).
        """
        states = self.manager.states() if spec.name == self.manager.name else {}
        if spec.version is not None:
            if spec.version not in states:
                raise not_found(f"Could not find version {spec.version} of model {spec.name}")
            return [(spec.version, states[spec.version])]
        if not states:
            raise not_found(f"Could not find any versions of model {spec.name}")
        return sorted(states.items(), reverse=True)


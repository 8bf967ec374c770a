"""The gRPC client library: :class:`PredictionClient` (import it from :mod:`serving.client`).

The client reads the signature's input and output names from the model's
metadata instead of assuming them: the input is the signature's one DT_STRING
input (encoded image files), the probabilities its float ``[-1, C]`` output,
and class names come from a string ``[-1]`` output when there is one (as in
this project's ``labels``) or from ``labels=``. So it also works for models
exported elsewhere. Large requests are split into batches of ``batch_size``
images. UNAVAILABLE and DEADLINE_EXCEEDED are retried with exponential backoff
(a server restarting or busy); every other error is raised at once as
:class:`~serving.client_types.ServingClientError` with the server's code and
message.

The protos come from ``tensorflow-serving-api``; they import TensorFlow's
framework protos, which load TensorFlow itself, so they are imported only when
a client is made, never for ``--help``.
"""

from __future__ import annotations

import random
import time
from typing import Iterable, Sequence

import numpy as np

from serving.client_types import (ClientOptions, ModelMetadata, Prediction, ServingClientError, Signature, TensorInfo,
                                  VersionStatus)
from serving.images import ImageInput, read_image

RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def _read_pem(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as handle:
        return handle.read()


def _tensor_info(proto) -> TensorInfo:
    from serving import tensors

    shape = None if proto.tensor_shape.unknown_rank else tuple(d.size for d in proto.tensor_shape.dim)
    return TensorInfo(tensors.dtype_name(proto.dtype), shape)


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class PredictionClient:
    """A client bound to one server (``target``, ``host:port``) and one model name."""

    def __init__(self, target: str, model_name: str = "classifier", options: ClientOptions | None = None,
                 *, credentials=None, **overrides):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        opts = options or ClientOptions()
        if overrides:
            opts = ClientOptions(**{**opts.__dict__, **overrides})
        if opts.version is not None and opts.version_label:
            raise ValueError("give a version or a version label, not both")
        if opts.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.target = target
        self.model_name = model_name
        self.options = opts
        channel_options = [("grpc.max_send_message_length", opts.max_message_bytes),
                           ("grpc.max_receive_message_length", opts.max_message_bytes),
                           ("grpc.enable_retries", 0)]
        if credentials is None and opts.tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(opts.root_certificates),
                private_key=_read_pem(opts.client_key),
                certificate_chain=_read_pem(opts.client_certificate))
        self._channel = (grpc.secure_channel(target, credentials, options=channel_options) if credentials
                         else grpc.insecure_channel(target, options=channel_options))
        self._predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._model_stub = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._io: tuple[str, str, str | None] | None = None
        self._learned_labels: dict[int, str] = {}  # class id -> name, from label outputs seen so far

    # -- plumbing ---------------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "PredictionClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _model_spec(self, spec, *, signature: bool = True, version: bool = True) -> None:
        spec.name = self.model_name
        if signature:
            spec.signature_name = self.options.signature_name
        if version and self.options.version is not None:
            spec.version.value = self.options.version
        elif version and self.options.version_label:
            spec.version_label = self.options.version_label

    def _call(self, method, request):
        """Call with a deadline, retrying UNAVAILABLE/DEADLINE_EXCEEDED with jittered exponential backoff."""
        import grpc

        delay = self.options.backoff_initial
        for attempt in range(self.options.retries + 1):
            try:
                return method(request, timeout=self.options.timeout)
            except grpc.RpcError as exc:
                code = exc.code().name if exc.code() is not None else "UNKNOWN"
                if code not in RETRYABLE or attempt == self.options.retries:
                    raise ServingClientError(code, exc.details() or "") from None
            time.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self.options.backoff_max)
        raise AssertionError("unreachable")

    # -- API ----------------------------------------------------------------------------------------
    def metadata(self) -> ModelMetadata:
        """The model's signatures, from GetModelMetadata (``signature_def`` packed as a SignatureDefMap)."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._model_spec(request.model_spec, signature=False)
        request.metadata_field.append("signature_def")
        response = self._call(self._predict_stub.GetModelMetadata, request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        signatures = {
            name: Signature(name, {k: _tensor_info(v) for k, v in sig.inputs.items()},
                            {k: _tensor_info(v) for k, v in sig.outputs.items()}, sig.method_name)
            for name, sig in signature_map.signature_def.items()
        }
        return ModelMetadata(response.model_spec.name, response.model_spec.version.value, signatures)

    def status(self) -> list[VersionStatus]:
        """Every version's state (or the pinned ``version``'s), from GetModelStatus."""
        from tensorflow_serving.apis import get_model_status_pb2

        states = {0: "UNKNOWN", 10: "START", 20: "LOADING", 30: "AVAILABLE", 40: "UNLOADING", 50: "END"}
        request = get_model_status_pb2.GetModelStatusRequest()
        self._model_spec(request.model_spec, signature=False, version=False)
        if self.options.version is not None:
            request.model_spec.version.value = self.options.version
        response = self._call(self._model_stub.GetModelStatus, request)
        from tensorflow.core.protobuf import error_codes_pb2

        return [VersionStatus(s.version, states.get(s.state, str(s.state)),
                              error_codes_pb2.Code.Name(s.status.error_code), s.status.error_message)
                for s in response.model_version_status]

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        """Block until the server serves a version of the model; raise TimeoutError otherwise.

        Works against TF Serving with and without ``--enable_grpc_healthcheck_service``
        (and the development server with and without ``--enable-grpc-healthcheck-service``):

        * with the flag, ``grpc.health.v1`` answers for ``""``, ``ModelService``
          and ``PredictionService`` (TF Serving's model_servers/server.cc); this
          asks for ``PredictionService`` and waits while it is NOT_SERVING
          (starting, draining);
        * without it the health service is UNIMPLEMENTED, and a server that
          registers other names answers NOT_FOUND: either way the health
          service is skipped from then on.

        The model is ready once GetModelStatus shows a version of it
        AVAILABLE - also checked when health says SERVING, since TF Serving's
        health status covers the server, not one model.
        """
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout
        use_health = True
        last = "no answer"
        while time.monotonic() < deadline:
            remaining = max(0.1, min(2.0, deadline - time.monotonic()))
            try:
                if use_health:
                    reply = health.Check(health_pb2.HealthCheckRequest(service="PredictionService"),
                                         timeout=remaining)
                    if reply.status != health_pb2.HealthCheckResponse.SERVING:
                        last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                        time.sleep(0.2)
                        continue
                if any(s.state == "AVAILABLE" for s in self.status()):
                    return
                last = "no version AVAILABLE"
            except grpc.RpcError as exc:
                if use_health and exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
                    use_health = False  # no health service, or not under this name: GetModelStatus decides
                    continue
                last = f"{exc.code().name}: {exc.details()}"
            except ServingClientError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise TimeoutError(f"{self.target} did not serve model {self.model_name} within {timeout:.0f}s ({last})")

    def resolve_signature(self) -> tuple[str, str, str | None]:
        """(image input, probabilities output, label output or None) of the signature, from metadata.

        Asked once per client and cached; ``predict`` calls it on first use.
        """
        if self._io is not None:
            return self._io
        meta = self.metadata()
        name = self.options.signature_name
        if name not in meta.signatures:
            raise ServingClientError("FAILED_PRECONDITION", f'Serving signature key "{name}" not found.')
        sig = meta.signatures[name]
        strings = [k for k, v in sig.inputs.items() if v.dtype == "string"]
        if len(sig.inputs) != 1 or len(strings) != 1:
            raise ServingClientError(
                "INVALID_ARGUMENT", f"signature {name} takes inputs {sorted(sig.inputs)}; this client sends one "
                "string input of encoded images")
        probs = sorted((k for k, v in sig.outputs.items() if v.dtype == "float" and v.shape and len(v.shape) == 2),
                       key=lambda k: (k != "probabilities", k))
        if not probs:
            raise ServingClientError("INVALID_ARGUMENT", f"signature {name} has no float [batch, classes] output")
        label_outputs = sorted((k for k, v in sig.outputs.items() if v.dtype == "string" and v.shape
                                and len(v.shape) == 1), key=lambda k: (k not in ("labels", "classes"), k))
        self._io = (strings[0], probs[0], label_outputs[0] if label_outputs else None)
        return self._io

    def predict_bytes(self, images: Sequence[bytes], output_filter: Sequence[str] | None = None):
        """One Predict call on encoded images; returns ``(response, outputs as numpy arrays)``."""
        from tensorflow_serving.apis import predict_pb2

        from serving import tensors

        image_input, probs, label_output = self.resolve_signature()
        request = predict_pb2.PredictRequest()
        self._model_spec(request.model_spec)
        request.inputs[image_input].dtype = tensors.DT_STRING
        request.inputs[image_input].tensor_shape.dim.add().size = len(images)
        request.inputs[image_input].string_val.extend(images)
        wanted = output_filter if output_filter is not None else [probs] + ([label_output] if label_output else [])
        request.output_filter.extend(wanted)
        response = self._call(self._predict_stub.Predict, request)
        return response, {alias: tensors.from_proto(proto) for alias, proto in response.outputs.items()}

    def predict(self, images: Iterable[ImageInput]) -> list[Prediction]:
        """Classify images (paths or encoded bytes), ``batch_size`` per request, in order."""
        items = [read_image(item, self.options.normalize_on_client) for item in images]
        _, probs_name, label_name = self.resolve_signature()
        known = self.options.labels
        results: list[Prediction] = []
        for start in range(0, len(items), self.options.batch_size):
            chunk = items[start:start + self.options.batch_size]
            response, outputs = self.predict_bytes([data for _, data in chunk])
            probabilities = np.asarray(outputs[probs_name], dtype=np.float64)
            if probabilities.shape[0] != len(chunk):
                raise ServingClientError("INTERNAL", f"asked for {len(chunk)} images, got {probabilities.shape[0]} rows")
            names = outputs.get(label_name) if label_name else None
            if names is not None:
                for row_ids, name in zip(np.argmax(probabilities, axis=1), names):
                    self._learned_labels.setdefault(int(row_ids), _text(name))
            for row, (source, _) in enumerate(chunk):
                class_id = int(np.argmax(probabilities[row]))
                if names is not None:
                    label = _text(names[row])
                elif known is not None and class_id < len(known):
                    label = known[class_id]
                else:
                    label = f"class_{class_id}"
                labels = known if known is not None else tuple(
                    self._learned_labels.get(i, f"class_{i}") for i in range(probabilities.shape[1]))
                results.append(Prediction(
                    source=source, label=label, score=float(probabilities[row, class_id]), class_id=class_id,
                    probabilities=tuple(float(p) for p in probabilities[row]), labels=labels,
                    model_version=response.model_spec.version.value if response.model_spec.HasField("version") else None))
        return results

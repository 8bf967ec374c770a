"""gRPC client for an image classifier behind TF Serving (or the development server).

Library::

    from serving.client import PredictionClient
    with PredictionClient("127.0.0.1:8500", "classifier") as client:
        client.wait_until_ready(timeout=60)
        for p in client.predict(["cat.jpg", open("dog.png", "rb").read()]):
            print(p.source, p.label, p.score, p.top(3))
        client.metadata()   # signatures, read from GetModelMetadata
        client.status()     # version states, from GetModelStatus

The client reads the signature's input and output names from the model's
metadata instead of assuming them: the input is the signature's one DT_STRING
input (encoded image files), the probabilities its float ``[-1, C]`` output,
and class names come from a string ``[-1]`` output when there is one (as in
this project's ``labels``) or from ``labels=``. So it also works for models
exported elsewhere. Large requests are split into batches of ``batch_size``
images. UNAVAILABLE and DEADLINE_EXCEEDED are retried with exponential backoff
(a server restarting or busy); every other error is raised at once as
:class:`ServingClientError` with the server's code and message.

CLI: ``python -m serving.client --server HOST:PORT --model NAME IMAGES_OR_FOLDERS...``
(``metadata`` and ``status`` subcommands; ``--help`` for the rest).

The protos come from ``tensorflow-serving-api``; they import TensorFlow's
framework protos, which load TensorFlow itself, so they are imported only when
a client is made, never for ``--help``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence, Union

import numpy as np

ImageInput = Union[str, os.PathLike, bytes]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED")
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class ServingClientError(Exception):
    """A failed call: the gRPC status code name (``code``) and the server's message."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Prediction:
    """One image's answer. ``probabilities`` are in class-id order; ``labels`` name them when known."""

    source: str
    label: str
    score: float
    class_id: int
    probabilities: tuple[float, ...]
    labels: tuple[str, ...] | None = None
    model_version: int | None = None

    def name_of(self, class_id: int) -> str:
        if self.labels is not None and class_id < len(self.labels):
            return self.labels[class_id]
        return self.label if class_id == self.class_id else f"class_{class_id}"

    @property
    def probability_by_label(self) -> dict[str, float]:
        return {self.name_of(i): p for i, p in enumerate(self.probabilities)}

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        order = np.argsort(-np.asarray(self.probabilities), kind="stable")[:k]
        return [(self.name_of(int(i)), float(self.probabilities[i])) for i in order]

    def to_dict(self, top_k: int | None = None) -> dict:
        out = {"image": self.source, "label": self.label, "score": self.score, "class_id": self.class_id,
               "model_version": self.model_version, "probabilities": self.probability_by_label}
        if top_k:
            out["top"] = [{"label": name, "score": score} for name, score in self.top(top_k)]
        return out


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...] | None  # None: unknown rank; -1: any size


@dataclass(frozen=True)
class Signature:
    name: str
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]
    method_name: str = ""


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    version: int
    signatures: dict[str, Signature]


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: str  # START, LOADING, AVAILABLE, UNLOADING, END
    error_code: str = "OK"
    error_message: str = ""


@dataclass(frozen=True)
class ClientOptions:
    """How the client talks to the server (every field has a CLI flag)."""

    version: int | None = None
    version_label: str | None = None
    signature_name: str = "serving_default"
    timeout: float = 10.0  # deadline of one attempt, seconds
    retries: int = 3  # extra attempts on UNAVAILABLE / DEADLINE_EXCEEDED
    backoff_initial: float = 0.1
    backoff_max: float = 2.0
    batch_size: int = 32  # images per Predict request
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    tls: bool = False
    root_certificates: str | None = None  # PEM file; None: system roots
    client_certificate: str | None = None  # PEM, for mutual TLS
    client_key: str | None = None
    labels: tuple[str, ...] | None = None  # class names, if the model has no string output
    normalize_on_client: bool = False  # for exports before the in-graph decode: send JPEGs upright (to_decodable)


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


_JPEG = b"\xff\xd8\xff"
_GRAPH_DECODES = (_JPEG, b"\x89PNG", b"GIF87a", b"GIF89a", b"BM")  # and WebP (RIFF....WEBP)
_EXIF_ORIENTATION = 0x0112


def _graph_decodes(data: bytes) -> bool:
    return data.startswith(_GRAPH_DECODES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def to_decodable(data: bytes, normalize: bool = False) -> bytes:
    """``data`` as it should travel to the serving graph.

    JPEG, PNG, GIF, BMP and WebP go untouched: the serving graph of an export
    made by this project (``decode: upright-rgb-v1`` in its metadata) applies
    EXIF orientation, composites alpha on white and converts colour modes
    itself, as preprocessing did for the training images, so every client
    gets the same answer for the same bytes. Other formats Pillow reads
    (TIFF...) are sent upright as lossless PNG, since no serving graph decodes
    them. ``normalize`` (``--normalize-on-client``) is for exports made before
    that: it also sends EXIF-rotated JPEGs and WebP upright as PNG, as those
    graphs ignore EXIF. Bytes Pillow cannot read either are sent as they are,
    and the server answers INVALID_ARGUMENT with the decoder's reason.
    """
    graph_decodes = _graph_decodes(data)
    if graph_decodes and not normalize:
        return data
    jpeg = data.startswith(_JPEG)
    if graph_decodes and not jpeg and not data.startswith(b"RIFF"):
        return data  # PNG, GIF, BMP: no EXIF orientation to apply
    try:
        import io

        from PIL import Image, ImageOps
    except ImportError:  # pragma: no cover - Pillow is a project dependency
        return data
    try:
        with Image.open(io.BytesIO(data)) as image:
            if jpeg and image.getexif().get(_EXIF_ORIENTATION, 1) in (0, 1):
                return data
            upright = ImageOps.exif_transpose(image)
            upright = upright.convert("RGBA" if "A" in upright.getbands() else "RGB")
            out = io.BytesIO()
            upright.save(out, format="PNG")
            return out.getvalue()
    except Exception:  # noqa: BLE001 - not an image Pillow knows either: let the server say so
        return data


def read_image(item: ImageInput, normalize: bool = False) -> tuple[str, bytes]:
    """``(source, bytes)`` of a path or of raw bytes, as :func:`to_decodable` sends them."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        source, data = f"<{len(item)} bytes>", bytes(item)
    else:
        source = os.fspath(item)
        with open(source, "rb") as handle:
            data = handle.read()
    return source, to_decodable(data, normalize)


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


# -- CLI ------------------------------------------------------------------------------------------------
COMMANDS = ("predict", "metadata", "status")


def expand_images(paths: Sequence[str]) -> list[str]:
    """Files as given, folders walked (sorted) for image files; a missing path raises FileNotFoundError."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                found.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return found


def _common(parser: argparse.ArgumentParser) -> None:
    d = ClientOptions()
    parser.add_argument("--server", default="127.0.0.1:8500", help="HOST:PORT of the gRPC API (default: %(default)s)")
    parser.add_argument("--model", default="classifier", help="model name (default: %(default)s)")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--model-version", type=int, metavar="N",
                      help="ask for this model version (default: the latest served)")
    pick.add_argument("--label", help="ask for the version with this label, e.g. stable or canary")
    parser.add_argument("--signature", default=d.signature_name, help="signature name (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=d.timeout, help="deadline per attempt, s (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=d.retries,
                        help="retries on UNAVAILABLE/DEADLINE_EXCEEDED (default: %(default)s)")
    parser.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                        help="largest gRPC message sent or received (default: %(default)s)")
    parser.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca-cert)")
    parser.add_argument("--ca-cert", help="PEM file of the root certificates to trust (implies --tls)")
    parser.add_argument("--client-cert", help="PEM client certificate for mutual TLS (implies --tls)")
    parser.add_argument("--client-key", help="PEM client key for mutual TLS")


def build_parser() -> argparse.ArgumentParser:
    from preprocessing import add_version_flag

    parser = argparse.ArgumentParser(
        prog="python -m serving.client",
        description="Query an image classifier served by TF Serving (gRPC). Without a command, "
                    "classifies IMAGES_OR_FOLDERS (the 'predict' command).",
        epilog="examples: python -m serving.client --server 127.0.0.1:8500 --model classifier photos/ | "
               "python -m serving.client status --server 127.0.0.1:8500")
    add_version_flag(parser)
    commands = parser.add_subparsers(dest="command", metavar="{predict,metadata,status}")
    predict = commands.add_parser("predict", help="classify images (the default command)")
    _common(predict)
    predict.add_argument("images", nargs="+", metavar="IMAGES_OR_FOLDERS", help="image files or folders of images")
    predict.add_argument("--top-k", type=int, default=3, help="classes shown per image (default: %(default)s)")
    predict.add_argument("--json", action="store_true", help="one JSON object per image instead of a table")
    predict.add_argument("--batch-size", type=int, default=ClientOptions().batch_size,
                         help="images per request (default: %(default)s)")
    predict.add_argument("--labels", help="labels.txt naming the classes, for models without a labels output")
    predict.add_argument("--normalize-on-client", action="store_true",
                         help="for models exported before the serving graph applied EXIF orientation itself "
                              "(no 'decode' in their assets.extra/metadata.json): send EXIF-rotated JPEGs and "
                              "WebP upright as PNG. Newer exports take every client's bytes untouched")
    for name, text in (("metadata", "print the model's signatures (GetModelMetadata)"),
                       ("status", "print the model's version states (GetModelStatus)")):
        sub = commands.add_parser(name, help=text)
        _common(sub)
        sub.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _options(args) -> ClientOptions:
    labels = None
    if getattr(args, "labels", None):
        with open(args.labels, encoding="utf-8") as handle:
            labels = tuple(line.strip() for line in handle if line.strip())
    return ClientOptions(
        version=args.model_version, version_label=args.label, signature_name=args.signature, timeout=args.timeout,
        retries=args.retries, max_message_bytes=args.max_message_bytes,
        batch_size=getattr(args, "batch_size", ClientOptions().batch_size),
        normalize_on_client=getattr(args, "normalize_on_client", False),
        tls=bool(args.tls or args.ca_cert or args.client_cert), root_certificates=args.ca_cert,
        client_certificate=args.client_cert, client_key=args.client_key, labels=labels)


def _print_table(predictions: list[Prediction], top_k: int) -> None:
    width = max([len("image")] + [len(p.source) for p in predictions])
    lwidth = max([len("label")] + [len(p.label) for p in predictions])
    print(f"{'image':<{width}}  {'label':<{lwidth}}  {'score':>6}  top-{top_k}")
    for p in predictions:
        top = ", ".join(f"{name} {score:.3f}" for name, score in p.top(top_k))
        print(f"{p.source:<{width}}  {p.label:<{lwidth}}  {p.score:6.3f}  {top}")


def _run(args) -> int:
    options = _options(args)
    with PredictionClient(args.server, args.model, options) as client:
        if args.command == "metadata":
            meta = client.metadata()
            if args.json:
                print(json.dumps({"model": meta.name, "version": meta.version, "signatures": {
                    n: {"method_name": s.method_name,
                        "inputs": {k: {"dtype": v.dtype, "shape": v.shape} for k, v in s.inputs.items()},
                        "outputs": {k: {"dtype": v.dtype, "shape": v.shape} for k, v in s.outputs.items()}}
                    for n, s in meta.signatures.items()}}, indent=2))
                return 0
            print(f"model {meta.name} version {meta.version}")
            for name, sig in sorted(meta.signatures.items()):
                if name.startswith("__"):
                    continue
                print(f"signature {name} ({sig.method_name or 'no method'})")
                for kind, tensors_ in (("input", sig.inputs), ("output", sig.outputs)):
                    for alias, info in sorted(tensors_.items()):
                        shape = "unknown" if info.shape is None else list(info.shape)
                        print(f"  {kind:<6} {alias}: {info.dtype} {shape}")
            return 0
        if args.command == "status":
            statuses = client.status()
            if args.json:
                print(json.dumps([s.__dict__ for s in statuses], indent=2))
                return 0
            for s in statuses:
                extra = f" ({s.error_code}: {s.error_message})" if s.error_code != "OK" else ""
                print(f"model {args.model} version {s.version}: {s.state}{extra}")
            return 0
        paths = expand_images(args.images)
        if not paths:
            raise FileNotFoundError("no image files found in " + " ".join(args.images))
        predictions = client.predict(paths)
        if args.json:
            for p in predictions:
                print(json.dumps(p.to_dict(args.top_k)))
        else:
            _print_table(predictions, args.top_k)
    return 0


def _command_first(argv: list[str]) -> list[str]:
    """Put the command first (``--server H:P status`` works too); no command means ``predict``."""
    if not argv or argv[0] in COMMANDS or argv[0] in ("-h", "--help", "--version"):
        return argv
    probe = argparse.ArgumentParser(add_help=False)
    _common(probe)
    takes_value = {opt for action in probe._actions if action.nargs != 0 for opt in action.option_strings}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("-"):
            i += 2 if token in takes_value else 1
            continue
        if token in COMMANDS:
            return [token] + argv[:i] + argv[i + 1:]
        break
    return ["predict"] + argv


def main(argv: list[str] | None = None) -> int:
    argv = _command_first(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return _run(args)
    except ServingClientError as exc:
        print(f"error: {args.server}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

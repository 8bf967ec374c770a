"""TF Serving's REST API (the parts a client of an image classifier uses).

* ``GET  /v1/models/NAME[/versions/N|/labels/L]`` - model status
  (``{"model_version_status": [...]}``);
* ``GET  /v1/models/NAME[/versions/N|/labels/L]/metadata`` - the signature defs;
* ``POST /v1/models/NAME[/versions/N|/labels/L]:predict`` - row format
  ``{"instances": [...]}`` answered with ``{"predictions": [...]}``, or
  columnar ``{"inputs": ...}`` answered with ``{"outputs": ...}``. Binary
  values travel as ``{"b64": "..."}``; outputs whose name ends in ``_bytes``
  come back that way, other strings as text;
* ``GET  /monitoring/prometheus/metrics`` - Prometheus exposition.

Errors are ``{"error": "message"}`` with the HTTP status TF Serving maps the
gRPC code to (400 for INVALID_ARGUMENT and FAILED_PRECONDITION, 404 for
NOT_FOUND, 503 for UNAVAILABLE...). Built on the standard library's
``ThreadingHTTPServer``: one thread per connection, enough for development.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np

from serving import tensors
from serving.errors import ServingError, invalid
from serving.metrics import PROMETHEUS_PATH
from serving.models import STATE_NAMES
from serving.service import ServingCore, Spec

log = logging.getLogger("serving.rest")

_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[^/:]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>[a-z]+))?/?$")
_MAX_BODY = 256 * 1024 * 1024


def _decode_value(value):
    """JSON to Python, turning ``{"b64": ...}`` into bytes and text into UTF-8 bytes."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (ValueError, TypeError) as exc:
                raise invalid(f"Unable to base64 decode: {exc}") from exc
        raise invalid("JSON object other than {\"b64\": ...} is not a valid tensor value")
    if isinstance(value, list):
        return [_decode_value(v) for v in value]
    if isinstance(value, str):
        return value.encode("utf-8")
    return value


def _to_array(alias: str, value, dtype: int) -> np.ndarray:
    value = _decode_value(value)
    try:
        if dtype == tensors.DT_STRING:
            array = np.array(value, dtype=object)
            if any(not isinstance(v, bytes) for v in array.reshape(-1)):
                raise invalid(f"input {alias} expects strings (or {{\"b64\": ...}}) but got other JSON values")
            return array
        return np.array(value, dtype=tensors._NUMPY[dtype])
    except ServingError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise invalid(f"input {alias} cannot be read as {tensors.dtype_name(dtype)}: {exc}") from exc


def _inputs_from_json(body: dict, signature) -> tuple[dict[str, np.ndarray], bool]:
    """The request's inputs as arrays typed by the signature; True when it used the row format."""
    if not isinstance(body, dict):
        raise invalid("Request body must be a JSON object")
    if "instances" in body and "inputs" in body:
        raise invalid("Not both 'instances' and 'inputs' can be specified in the request")
    dtypes = {alias: info.dtype for alias, info in signature.inputs.items()}
    if "instances" in body:
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise invalid("'instances' must be a non-empty JSON list")
        named = all(isinstance(r, dict) and set(r) != {"b64"} for r in rows)
        if named:
            keys = set(rows[0])
            if any(set(r) != keys for r in rows):
                raise invalid("Every instance must name the same inputs")
            columns = {k: [r[k] for r in rows] for k in keys}
        else:
            if len(dtypes) != 1:
                raise invalid(f"The signature has {len(dtypes)} inputs; instances must be JSON objects naming them")
            columns = {next(iter(dtypes)): rows}
        row_format = True
    elif "inputs" in body:
        given = body["inputs"]
        if isinstance(given, dict) and set(given) != {"b64"}:
            columns = dict(given)
        else:
            if len(dtypes) != 1:
                raise invalid(f"The signature has {len(dtypes)} inputs; 'inputs' must be a JSON object naming them")
            columns = {next(iter(dtypes)): given}
        row_format = False
    else:
        raise invalid("Missing 'inputs' or 'instances' key")
    arrays = {}
    for alias, value in columns.items():
        if alias not in dtypes:
            arrays[alias] = np.array([0])  # let validation name the extra input as TF Serving does
            continue
        arrays[alias] = _to_array(alias, value, dtypes[alias])
    return arrays, row_format


def _json_value(alias: str, array: np.ndarray):
    if array.dtype == object or array.dtype.kind in ("S", "U"):
        if alias.endswith("_bytes"):
            convert = lambda v: {"b64": base64.b64encode(v).decode("ascii")}  # noqa: E731
        else:
            convert = lambda v: v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)  # noqa: E731
        return np.vectorize(convert, otypes=[object])(array).tolist() if array.size else array.tolist()
    return array.tolist()


def _outputs_to_json(outputs: dict[str, np.ndarray], row_format: bool):
    if not row_format:
        if len(outputs) == 1:
            alias, value = next(iter(outputs.items()))
            return {"outputs": _json_value(alias, value)}
        return {"outputs": {alias: _json_value(alias, value) for alias, value in outputs.items()}}
    values = {alias: _json_value(alias, value) for alias, value in outputs.items()}
    if len(values) == 1:
        return {"predictions": next(iter(values.values()))}
    rows = len(next(iter(values.values())))
    return {"predictions": [{alias: values[alias][i] for alias in values} for i in range(rows)]}


class _Handler(BaseHTTPRequestHandler):
    server_version = "tlp-serving"
    protocol_version = "HTTP/1.1"
    core: ServingCore

    def log_message(self, fmt, *args):  # route http.server's access log to logging at DEBUG
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload) -> None:
        self._send(status, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))

    def _error(self, exc: ServingError) -> None:
        self._json(exc.http_status, {"error": exc.message})

    def do_GET(self):  # noqa: N802
        if self.path.split("?")[0] == PROMETHEUS_PATH:
            body, content_type = self.core.metrics.exposition()
            self._send(200, body, content_type)
            return
        self._route("GET")

    def do_POST(self):  # noqa: N802
        self._route("POST")

    def _route(self, method: str) -> None:
        match = _PATH.match(self.path.split("?")[0])
        if method == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY:
                self._error(ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"Request body of {length} bytes is too large"))
                self.close_connection = True
                return
            raw = self.rfile.read(length) if length else b""
        ok_get = match and method == "GET" and not match["verb"]
        ok_post = match and method == "POST" and match["verb"] and not match["metadata"]
        if not (ok_get or ok_post):
            self._error(invalid(f"Malformed request: {method} {self.path}") if match else
                        ServingError(grpc.StatusCode.NOT_FOUND, f"Malformed request: {method} {self.path}"))
            return
        spec = Spec(name=match["name"], version=int(match["version"]) if match["version"] else None,
                    label=match["label"])
        try:
            if method == "GET" and match["metadata"]:
                self._json(200, self._metadata(spec))
            elif method == "GET":
                self._json(200, self._status(spec))
            elif match["verb"] == "predict":
                self._json(200, self._predict(spec, raw))
            else:
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                                   f"The development server supports :predict only, not :{match['verb']}")
        except ServingError as exc:
            self._error(exc)
        except Exception as exc:  # noqa: BLE001
            log.exception("REST %s %s failed", method, self.path)
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"})

    def _status(self, spec: Spec) -> dict:
        with self.core.track(spec.name, "GetModelStatus", "REST"):
            states = self.core.status(spec)
        return {"model_version_status": [
            {"version": str(version), "state": STATE_NAMES.get(state.state, "UNKNOWN"),
             "status": {"error_code": state.error_code.name, "error_message": state.error_message}}
            for version, state in states]}

    def _metadata(self, spec: Spec) -> dict:
        from google.protobuf import json_format

        with self.core.track(spec.name, "GetModelMetadata", "REST"):
            loaded, signature_map = self.core.metadata(spec, ["signature_def"])
        signature = json_format.MessageToDict(signature_map, preserving_proto_field_name=True)
        signature["@type"] = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
        return {"model_spec": {"name": loaded.name, "signature_name": "", "version": str(loaded.version)},
                "metadata": {"signature_def": signature}}

    def _predict(self, spec: Spec, raw: bytes) -> dict:
        with self.core.track(spec.name, "Predict", "REST"):
            try:
                body = json.loads(raw.decode("utf-8") or "null")
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise invalid(f"JSON Parse error: {exc}") from exc
            if isinstance(body, dict) and "signature_name" in body:
                if not isinstance(body["signature_name"], str):
                    raise invalid("'signature_name' key must be a string value.")
                spec = Spec(spec.name, spec.version, spec.label, body["signature_name"])
            loaded = self.core.manager.resolve(spec.name, spec.version, spec.label)
            signature = loaded.signature(spec.signature_name)
            inputs, row_format = _inputs_from_json(body, signature)
            _, _, outputs = self.core.predict(spec, inputs, loaded=loaded)
        return _outputs_to_json(outputs, row_format)


def make_rest_server(core: ServingCore, host: str, port: int) -> ThreadingHTTPServer:
    """A bound (not yet serving) REST server; call ``serve_forever`` on a thread."""
    handler = type("RestHandler", (_Handler,), {"core": core})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server

"""TF Serving's REST API (the parts a client of an image classifier uses), as TF Serving answers it.

* ``GET  /v1/models/NAME[/versions/N|/labels/L]`` - model status
  (``{"model_version_status": [...]}``, newest version first; a label does
  not narrow the list, as in TF Serving);
* ``GET  /v1/models/NAME[/versions/N|/labels/L]/metadata`` - the signature defs;
* ``POST /v1/models/NAME[/versions/N|/labels/L]:predict`` - row format
  ``{"instances": [...]}`` answered with ``{"predictions": [...]}``, or
  columnar ``{"inputs": ...}`` answered with ``{"outputs": ...}``. Binary
  values travel as ``{"b64": "..."}``; outputs whose name ends in ``_bytes``
  come back that way, other strings as text. ``:classify`` and ``:regress``
  are parsed and checked as TF Serving checks them, but not run;
* ``GET  /monitoring/prometheus/metrics`` - Prometheus exposition (see
  :mod:`serving.metrics`).

The URL grammar is TF Serving's (``http_rest_api_util.cc``): the regular
expressions match the whole path including any query string, ignore case,
and take no trailing slash; any other path under ``/v1/`` (or another method)
is ``400 {"error": "Malformed request: METHOD PATH"}``, a path outside ``/v1/``
is 404. Request bodies with ``Content-Encoding: gzip`` are inflated first, as
TF Serving's net_http does. Errors are ``{"error": "message"}`` with the HTTP
status TF Serving maps the gRPC code to (400 for INVALID_ARGUMENT and
FAILED_PRECONDITION, 404 for NOT_FOUND, 503 for UNAVAILABLE...). Built on the
standard library's ``ThreadingHTTPServer``: one thread per connection, enough
for development. The URL grammar lives in :mod:`serving.rest_routes`, the
JSON bodies in :mod:`serving.rest_json`; this module is the HTTP handler.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

from serving.errors import ServingError, invalid
from serving.metrics import PROMETHEUS_PATH
from serving.rest_json import ALWAYS_PRINT, debug_json, inputs_from_json, outputs_to_json, parse_json
from serving.rest_routes import DISPATCH, Route
from serving.servable import DEFAULT_SIGNATURE
from serving.service import SIGNATURE_DEF_FIELD, ServingCore, Spec

log = logging.getLogger("serving.rest")

_MAX_BODY = 256 * 1024 * 1024
_MAX_UNCOMPRESSED = 100 * 1024 * 1024  # net_http's ZLib::kMaxUncompressedBytes


def _gunzip(raw: bytes) -> bytes:
    """net_http's auto-uncompress: the whole body, up to 100 MiB; anything it cannot inflate reads as empty."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        body = inflater.decompress(raw, _MAX_UNCOMPRESSED + 1)
    except zlib.error:
        return b""
    if len(body) > _MAX_UNCOMPRESSED or not inflater.eof:
        return b""
    return body


_NOT_FOUND_PAGE = (b"<HTML><HEAD>\n<TITLE>404 Not Found</TITLE>\n</HEAD><BODY>\n<H1>Not Found</H1>\n"
                   b"</BODY></HTML>\n")


class _Handler(BaseHTTPRequestHandler):
    server_version = "tlp-serving"
    protocol_version = "HTTP/1.1"
    core: ServingCore

    def log_message(self, fmt, *args):  # route http.server's access log to logging at DEBUG
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, content_type: str | None = "application/json") -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload) -> None:
        self._send(status, (json.dumps(payload, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))

    def _error(self, exc: ServingError) -> None:
        # MakeJsonFromStatus: rapidjson's PrettyWriter (4 spaces), UTF-8 as is, no final newline.
        self._send(exc.http_status, json.dumps({"error": exc.message}, indent=4, ensure_ascii=False).encode("utf-8"))

    def _body(self) -> bytes | None:
        """The request body, gunzipped when Content-Encoding says gzip; None once a too-large body was answered."""
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._error(ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"Request body of {length} bytes is too large"))
            self.close_connection = True
            return None
        raw = self.rfile.read(length) if length else b""
        if raw and "gzip" in (self.headers.get("Content-Encoding") or ""):  # absl::StrContains: case-sensitive
            raw = _gunzip(raw)
        return raw

    def _route(self, method: str) -> None:
        raw = self._body()
        if raw is None:
            return
        path = self.path  # TF Serving matches uri_path(): the path with its ?query and #fragment
        if path.split("?")[0].split("#")[0] == PROMETHEUS_PATH:
            self._prometheus(path)
        elif not DISPATCH.fullmatch(path):
            self._send(404, _NOT_FOUND_PAGE, "text/html; charset=ISO-8859-1")  # no handler: libevent's page
        elif method == "OPTIONS":
            self._preflight()
        else:
            self._api(method, path, raw)

    def _prometheus(self, path: str) -> None:
        if path != PROMETHEUS_PATH:  # http_server.cc ProcessPrometheusRequest
            self._send(400, f"Unexpected path: {path}. Should be {PROMETHEUS_PATH}".encode("utf-8"), "text/plain")
            return
        body, content_type = self.core.metrics.exposition()
        self._send(200, body, content_type)

    def _preflight(self) -> None:
        """A CORS preflight (http_server.cc): OK with an Origin header naming http(s)://, else 400; no body."""
        try:
            with self.core.track("", "", "REST"):
                if not re.search("https?://", self.headers.get("Origin") or ""):
                    raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                       "Origin header is missing in CORS preflight")
        except ServingError as exc:
            self._send(exc.http_status, b"", None)
            return
        self._send(200, b"", None)

    def _api(self, method: str, path: str, raw: bytes) -> None:
        """HttpRestApiHandler::ProcessRequest: parse the path, dispatch, answer JSON (errors as {"error": ...})."""
        route = Route(method, path)
        try:
            with self.core.track(route.name, route.verb, "REST"):
                payload = self._dispatch(route, raw)
        except ServingError as exc:
            if exc is route.error:  # ParseModelInfo failed: TF Serving returns before writing any JSON
                self._send(exc.http_status, b"")
            else:
                self._error(exc)
            return
        except Exception as exc:  # noqa: BLE001
            log.exception("REST %s %s failed", method, path)
            self._error(ServingError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
            return
        self._json(200, payload)

    def _dispatch(self, route: Route, raw: bytes) -> dict:
        if route.error is not None:
            raise route.error
        if route.ok and route.method == "POST":
            if route.verb == "predict":  # the verbs compare case-sensitively although the regex ignores case
                return self._predict(route, raw)
            if route.verb in ("classify", "regress"):
                return self._classify_or_regress(route, raw)
        elif route.ok and route.method == "GET":
            if route.subresource == "metadata":
                return self._metadata(route.spec())
            return self._status(route.spec())
        raise invalid(f"Malformed request: {route.method} {route.path}")

    def _status(self, spec: Spec) -> dict:
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_status_pb2

        if not spec.name:
            raise invalid("Missing model name in request.")
        response = get_model_status_pb2.GetModelStatusResponse()
        for version, state in self.core.status(spec):
            entry = response.model_version_status.add()
            entry.version = version
            entry.state = state.state
            entry.status.error_code = state.error_code.value[0]
            entry.status.error_message = state.error_message
        return json_format.MessageToDict(response, **ALWAYS_PRINT)

    def _metadata(self, spec: Spec) -> dict:
        from google.protobuf import json_format
        from tensorflow_serving.apis import model_pb2

        if not spec.name:
            raise invalid("Missing model name in request.")
        loaded, signature_map = self.core.metadata(spec, [SIGNATURE_DEF_FIELD])
        model_spec = model_pb2.ModelSpec(name=loaded.name)
        model_spec.version.value = loaded.version
        # http_rest_api_util.cc ToJsonString: both printed with always-print and proto field names, the
        # SignatureDefMap unpacked from its Any (so no "@type").
        return {"model_spec": json_format.MessageToDict(model_spec, preserving_proto_field_name=True, **ALWAYS_PRINT),
                "metadata": {"signature_def": json_format.MessageToDict(
                    signature_map, preserving_proto_field_name=True, **ALWAYS_PRINT)}}

    def _signature(self, route: Route, body: dict):
        """The version and SignatureDef a REST call names (HttpRestApiHandler::GetInfoMap)."""
        spec = route.spec(body.get("signature_name", ""))
        loaded = self.core.manager.resolve(spec.name, spec.version, spec.label)
        key = spec.signature_name or DEFAULT_SIGNATURE
        if key not in loaded.signature_defs:
            raise invalid(f'Serving signature name: "{key}" not found in signature def')
        return spec, loaded, loaded.signature_defs[key]

    def _predict(self, route: Route, raw: bytes) -> dict:
        body = parse_json(raw)
        spec, loaded, _ = self._signature(route, body)
        signature = loaded.signature(spec.signature_name)
        inputs, row_format = inputs_from_json(body, signature)
        _, _, outputs = self.core.predict(spec, inputs, loaded=loaded)
        return outputs_to_json(outputs, row_format)

    def _classify_or_regress(self, route: Route, raw: bytes) -> dict:
        """``:classify``/``:regress``: checked as TF Serving checks them; the development server runs neither.

        The body must hold a non-empty ``examples`` list (json_tensor.cc), the
        servable and the signature must exist (classifier.cc, regressor.cc),
        and the signature's method_name must be classify (regress), as with
        ``--enable_signature_method_name_check``; a signature that passes is
        answered UNIMPLEMENTED (501).
        """
        body = parse_json(raw)
        examples = body.get("examples")
        if "examples" not in body:
            raise invalid(f"JSON Value: {debug_json(body)} When method is classify, key 'examples' is expected "
                          "and was not found")  # TF Serving says "classify" for :regress too
        if not isinstance(examples, list):
            raise invalid(f"JSON Value: {debug_json(body)} Expecting 'examples' value to be an list/array")
        if not examples:
            raise invalid(f"JSON Value: {debug_json(body)} 'examples' value is an empty array")
        spec = route.spec(body.get("signature_name", ""))
        loaded = self.core.manager.resolve(spec.name, spec.version, spec.label)
        key = spec.signature_name or DEFAULT_SIGNATURE
        if key not in loaded.signature_defs:
            raise invalid(f"No signature was found with the name: {key}")
        kind, method_name = (("classification", "tensorflow/serving/classify") if route.verb == "classify"
                             else ("regression", "tensorflow/serving/regress"))
        if loaded.signature_defs[key].method_name != method_name:
            raise invalid(f"Expected {kind} signature method_name to be {method_name}. "
                          f"Was: {loaded.signature_defs[key].method_name}")
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                           f"The development server does not run :{route.verb}; use :predict")


# http.server dispatches METHOD to do_METHOD; every method goes through the one router, as TF Serving's does.
for _method in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
    setattr(_Handler, f"do_{_method}", lambda self, method=_method: self._route(method))
del _method


def make_rest_server(core: ServingCore, host: str, port: int) -> ThreadingHTTPServer:
    """A bound (not yet serving) REST server; call ``serve_forever`` on a thread."""
    handler = type("RestHandler", (_Handler,), {"core": core})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server

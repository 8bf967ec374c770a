"""The development server answers as tensorflow/serving answers: expectations ported from TF Serving's sources.

Each test names the TF Serving file (and test, where there is one) its
expectation comes from, at github.com/tensorflow/serving (read at commit
9d981c5c2708d23c5407c7c1e30309e6f9798874, July 2026). The server here holds
two versions of the tiny model (1 and 2, the same SavedModel), policy ``all``,
label ``stable=1``, batching on and the gRPC health service on.
"""

from __future__ import annotations

import base64
import gzip
from http.client import HTTPConnection
import json
import re
import shutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_fixtures import start_server
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from serving.client import PredictionClient

pytest_plugins = ["serving_fixtures"]  # one registration: session fixtures built once per run

INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1


@pytest.fixture(scope="module")
def two_versions(exported_base, tmp_path_factory):
    base = tmp_path_factory.mktemp("parity")
    shutil.copytree(exported_base / "1", base / "1")
    shutil.copytree(exported_base / "1", base / "2")
    return base


@pytest.fixture(scope="module")
def server(two_versions):
    with start_server(two_versions, model_version_policy="all", version_labels={"stable": 1},
                      enable_batching=True, max_batch_size=8, batch_timeout_micros=1000,
                      health_service=True) as running:
        yield running


@pytest.fixture(scope="module")
def rest(server):
    """``rest(method, path, body=None, headers=None)`` -> (status, headers, raw body)."""

    def call(method, path, body=None, headers=None):
        connection = HTTPConnection("127.0.0.1", server.rest_port, timeout=60)
        try:
            data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
            connection.request(method, path, body=data, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    return call


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as opened:
        yield opened


def _error(raw: bytes) -> str:
    payload = json.loads(raw)
    assert set(payload) == {"error"}
    return payload["error"]


def _instances(images):
    return {"instances": [{"b64": base64.b64encode(image).decode("ascii")} for image in images]}


# -- REST URL grammar --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/foo"),
    ("POST", "/v1/foo"),
    ("GET", "/v1/models/debug/model_name"),
    ("POST", "/v1/models"),
    ("GET", "/v1/models/foo:predict"),
    ("GET", "/v1/models/foo/version/50:predict"),
    ("POST", "/v1/models/foo/version/50:regress"),
    ("POST", "/v1/models/foo/versions/HELLO:regress"),
    ("POST", "/v1/models/foo/metadata"),
    ("POST", "/v1/models/foo/label/some_label:regress"),
    ("POST", "/v1/models/foo/versions/50/labels/some_label:regress"),
    ("POST", "/v1/models/foo/versions/some_label:regress"),
])
def test_unsupported_api_calls_are_malformed_requests(rest, method, path):
    """model_servers/http_rest_api_handler_test.cc, UnsupportedApiCalls: INVALID_ARGUMENT "Malformed request"."""
    status, headers, raw = rest(method, path, b"{}" if method == "POST" else None)
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert _error(raw) == f"Malformed request: {method} {path}"


def test_a_version_and_a_label_together_are_a_malformed_request(rest):
    """http_rest_api_util.cc, kPredictionApiGegex / kModelStatusApiRegex: versions/N and labels/L are alternatives."""
    status, _, raw = rest("GET", "/v1/models/classifier/versions/1/labels/stable")
    assert status == 400 and _error(raw) == "Malformed request: GET /v1/models/classifier/versions/1/labels/stable"


def test_status_without_a_model_name_is_missing_model_name(rest):
    """http_rest_api_handler_test.cc, UnsupportedApiCalls: GET /v1/models -> "Missing model name in request."."""
    status, _, raw = rest("GET", "/v1/models")
    assert status == 400 and _error(raw) == "Missing model name in request."


@pytest.mark.parametrize("version", [UINT64_MAX, INT64_MAX + 1])
def test_a_version_beyond_int64_fails_to_convert_with_an_empty_body(rest, version):
    """http_rest_api_handler_test.cc, UnsupportedApiCalls ("Failed to convert version"); http_rest_api_util.cc
    ParseModelInfo returns before http_rest_api_handler.cc writes any JSON, so the 400 has an empty body."""
    status, headers, raw = rest("POST", f"/v1/models/foo/versions/{version}:regress", b"{}")
    assert (status, raw) == (400, b"") and headers["Content-Type"] == "application/json"


def test_the_largest_int64_version_is_a_version_not_found(rest):
    """http_rest_api_util.cc ParseModelInfo: absl::SimpleAtoi into int64_t accepts up to INT64_MAX."""
    status, _, raw = rest("GET", f"/v1/models/classifier/versions/{INT64_MAX}")
    assert status == 404 and _error(raw) == f"Could not find version {INT64_MAX} of model classifier"


def test_paths_are_case_insensitive(rest, split_images):
    """http_rest_api_util.cc: both path regexes start with (?i)."""
    status, _, raw = rest("GET", "/V1/MODELS/classifier/VERSIONS/1")
    assert status == 200 and json.loads(raw)["model_version_status"][0]["version"] == "1"
    status, _, raw = rest("POST", "/v1/Models/classifier/Labels/stable:predict", _instances(split_images["test"][:1]))
    assert status == 200 and len(json.loads(raw)["predictions"]) == 1


def test_the_verb_itself_compares_case_sensitively(rest, split_images):
    """http_rest_api_handler.cc ProcessRequest: the captured verb is compared with "predict" exactly."""
    status, _, raw = rest("POST", "/v1/models/classifier:PREDICT", _instances(split_images["test"][:1]))
    assert status == 400 and _error(raw) == "Malformed request: POST /v1/models/classifier:PREDICT"


def test_an_upper_case_metadata_suffix_answers_the_status(rest):
    """http_rest_api_handler.cc ProcessRequest: only a subresource equal to "metadata" routes to metadata."""
    status, _, raw = rest("GET", "/v1/models/classifier/METADATA")
    assert status == 200 and "model_version_status" in json.loads(raw)


@pytest.mark.parametrize("path", ["/v1/models/classifier/", "/v1/models/classifier/metadata/",
                                  "/v1/models/classifier:predict/"])
def test_a_trailing_slash_is_malformed(rest, path):
    """http_rest_api_util.cc: RE2::FullMatch of the whole path; no regex allows a trailing slash."""
    method = "POST" if ":" in path else "GET"
    status, _, raw = rest(method, path, b"{}" if method == "POST" else None)
    assert status == 400 and _error(raw) == f"Malformed request: {method} {path}"


def test_a_query_string_becomes_part_of_the_model_name(rest):
    """http_rest_api_util.cc: the regexes run over net_http's uri_path(), which keeps the query
    (util/net_http/server/internal/evhttp_request.cc, path_and_query), and [^/:]+ takes it into the name."""
    status, _, raw = rest("GET", "/v1/models/classifier?pretty=1")
    assert status == 404 and _error(raw) == "Could not find any versions of model classifier?pretty=1"


def test_a_path_outside_v1_is_not_found(rest):
    """model_servers/http_server.cc: only (?i)/v1/.* reaches the handler; net_http answers others 404."""
    status, headers, _ = rest("GET", "/v2/models/classifier")
    assert status == 404 and "json" not in headers.get("Content-Type", "")


def test_model_name_and_label_are_percent_decoded(rest):
    """http_rest_api_util.cc ParseModelInfo: DecodeArg (curl_easy_unescape) on the name and the label."""
    status, _, raw = rest("GET", "/v1/models/classif%69er/labels/st%61ble/metadata")
    assert status == 200 and json.loads(raw)["model_spec"]["version"] == "1"


def test_other_methods_are_malformed_requests(rest):
    """http_rest_api_handler.cc ProcessRequest: only POST and GET are dispatched; the rest keep "Malformed request"."""
    status, _, raw = rest("PUT", "/v1/models/classifier", b"{}")
    assert status == 400 and _error(raw) == "Malformed request: PUT /v1/models/classifier"


def test_a_cors_preflight_needs_an_origin(rest):
    """model_servers/http_server.cc ProcessRequest: OPTIONS is OK with an rest(s):// Origin, else
    FAILED_PRECONDITION (400), with no body either way."""
    assert rest("OPTIONS", "/v1/models/classifier")[0::2] == (400, b"")
    assert rest("OPTIONS", "/v1/models/classifier", headers={"Origin": "https://app.example"})[0::2] == (200, b"")


# -- :classify and :regress --------------------------------------------------------------------------------

def test_classify_on_a_predict_signature_is_invalid_argument(rest):
    """servables/tensorflow/classifier.cc GetClassificationSignatureDef (method name check)."""
    status, _, raw = rest("POST", "/v1/models/classifier:classify", {"examples": [{"x": 1.0}]})
    assert status == 400 and _error(raw) == ("Expected classification signature method_name to be "
                                             "tensorflow/serving/classify. Was: tensorflow/serving/predict")


def test_regress_with_an_unknown_signature_is_invalid_argument(rest):
    """servables/tensorflow/regressor.cc GetRegressionSignatureDef: "No signature was found with the name"."""
    status, _, raw = rest("POST", "/v1/models/classifier:regress", {"signature_name": "nope", "examples": [{}]})
    assert status == 400 and _error(raw) == "No signature was found with the name: nope"


def test_classify_without_examples_is_invalid_argument(rest):
    """util/json_tensor.cc FillClassifyRegressRequestFromJson: the 'examples' key is required."""
    status, _, raw = rest("POST", "/v1/models/classifier:classify", {"context": {}})
    assert status == 400
    assert _error(raw).endswith("When method is classify, key 'examples' is expected and was not found")


# -- request bodies ----------------------------------------------------------------------------------------

def test_a_gzip_request_body_is_inflated(rest, split_images):
    """util/net_http/server/internal/evhttp_request.cc: Content-Encoding containing "gzip" is uncompressed
    (RequestHandlerOptions::auto_uncompress_input defaults to true)."""
    body = gzip.compress(json.dumps(_instances(split_images["test"][:2])).encode())
    status, _, raw = rest("POST", "/v1/models/classifier:predict", body,
                          {"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert status == 200 and len(json.loads(raw)["predictions"]) == 2


def test_a_body_that_does_not_inflate_reads_as_empty(rest):
    """evhttp_request.cc ReadRequestGzipBytes: an uncompress failure yields no body, so ParseJson sees none."""
    status, _, raw = rest("POST", "/v1/models/classifier:predict", b"not gzip", {"Content-Encoding": "gzip"})
    assert status == 400 and _error(raw) == "JSON Parse error: The document is empty"


def test_an_empty_body_is_an_empty_document(rest):
    """model_servers/http_rest_api_handler_test.cc, PredictRequestErrors: "JSON Parse error: The document is empty"."""
    status, _, raw = rest("POST", "/v1/models/classifier:predict", b"")
    assert status == 400 and _error(raw) == "JSON Parse error: The document is empty"


def test_badly_formatted_json_is_an_invalid_value(rest):
    """http_rest_api_handler_test.cc, PredictRequestErrors: "JSON Parse error: Invalid value"."""
    status, _, raw = rest("POST", "/v1/models/classifier:predict", b"instances = [1, 2]")
    assert status == 400 and _error(raw).startswith("JSON Parse error: Invalid value")


def test_a_signature_name_that_is_not_a_string_is_invalid(rest):
    """http_rest_api_handler_test.cc, PredictRequestErrors: "'signature_name' key must be a string value."."""
    status, _, raw = rest("POST", "/v1/models/classifier:predict", {"signature_name": 100})
    assert status == 400 and "'signature_name' key must be a string value." in _error(raw)


def test_an_unknown_version_label_is_invalid_argument(rest):
    """http_rest_api_handler_test.cc, PredictRequestErrors: "Unrecognized servable version label"."""
    status, _, raw = rest("POST", "/v1/models/classifier/labels/Version_Nonexistent:predict", {"instances": ["x"]})
    assert status == 400 and "Unrecognized servable version label" in _error(raw)


# -- model status --------------------------------------------------------------------------------------------

def test_status_lists_versions_newest_first_over_rest(rest):
    """model_servers/get_model_status_impl.cc walks ServableStateMonitor::VersionMap, ordered by
    std::greater (core/servable_state_monitor.h)."""
    status, _, raw = rest("GET", "/v1/models/classifier")
    assert status == 200
    assert [v["version"] for v in json.loads(raw)["model_version_status"]] == ["2", "1"]


def test_status_lists_versions_newest_first_over_grpc(channel):
    """model_servers/get_model_status_impl.cc, as above, through ModelService.GetModelStatus."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "classifier"
    response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=30)
    assert [s.version for s in response.model_version_status] == [2, 1]


def test_status_prints_every_field(rest):
    """model_servers/tensorflow_model_server_test.py, testGetStatusREST; http_rest_api_handler_test.cc, GetStatus."""
    status, _, raw = rest("GET", "/v1/models/classifier/versions/1")
    assert status == 200 and json.loads(raw) == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}


@pytest.mark.parametrize("label", ["stable", "no_such_label"])
def test_status_does_not_resolve_a_version_label(rest, label):
    """model_servers/get_model_status_impl.cc GetModelStatusWithModelSpec: only has_version() narrows the
    answer; a version_label is neither resolved nor checked, so every version is listed."""
    status, _, raw = rest("GET", f"/v1/models/classifier/labels/{label}")
    assert status == 200
    assert [v["version"] for v in json.loads(raw)["model_version_status"]] == ["2", "1"]


def test_grpc_status_without_a_model_spec_is_missing_model_spec(channel):
    """model_servers/get_model_status_impl.cc GetModelStatus: INVALID_ARGUMENT "Missing ModelSpec"."""
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(), timeout=30)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")


# -- metadata ------------------------------------------------------------------------------------------------

def test_metadata_json_has_no_type_and_prints_default_fields(rest):
    """model_servers/http_rest_api_util.cc ToJsonString(GetModelMetadataResponse): the SignatureDefMap is
    unpacked from its Any and printed with always_print_fields_with_no_presence and proto field names
    (expected shape: servables/tensorflow/testdata/saved_model_half_plus_two_2_versions_metadata.json,
    used by http_rest_api_handler_test.cc GetModelMetadata)."""
    status, _, raw = rest("GET", "/v1/models/classifier/metadata")
    body = json.loads(raw)
    assert status == 200 and list(body) == ["model_spec", "metadata"]
    assert body["model_spec"] == {"name": "classifier", "signature_name": "", "version": "2"}
    signature_map = body["metadata"]["signature_def"]
    assert list(signature_map) == ["signature_def"]
    serving = signature_map["signature_def"]["serving_default"]
    assert serving["method_name"] == "tensorflow/serving/predict"
    image = serving["inputs"]["image_bytes"]
    assert image["dtype"] == "DT_STRING" and image["name"]
    assert image["tensor_shape"] == {"dim": [{"size": "-1", "name": ""}], "unknown_rank": False}


# -- Prometheus -------------------------------------------------------------------------------------------------

def _metrics(rest) -> str:
    status, headers, raw = rest("GET", "/monitoring/prometheus/metrics")
    assert status == 200 and headers["Content-Type"] == "text/plain"
    return raw.decode()


def test_prometheus_page_has_type_lines_and_no_help(rest):
    """util/prometheus_exporter.cc GeneratePage (tensorflow_model_server_test.py, testPrometheusEndpoint
    checks "# TYPE"); prometheus_exporter_test.cc: no "# HELP" lines."""
    text = _metrics(rest)
    assert "# TYPE :tensorflow:serving:request_count counter" in text
    assert "# TYPE :tensorflow:serving:request_latency histogram" in text
    assert "# HELP" not in text and text.endswith("\n")


def test_a_prometheus_scraper_reads_the_page(rest):
    """The page is valid exposition text: prometheus_client's own parser (a scraper's view of the format) reads
    every family with the type TF Serving declares. (That parser names counter samples ``..._total`` whatever
    the page says; the page's own spelling is checked below.)"""
    from prometheus_client.parser import text_string_to_metric_families

    rest("GET", "/v1/models/classifier")
    families = {family.name: family for family in text_string_to_metric_families(_metrics(rest))}
    assert families[":tensorflow:serving:request_latency"].type == "histogram"
    count = families[":tensorflow:serving:request_count"]
    assert count.type == "counter"
    assert any(sample.labels == {"model_name": "classifier", "status": "OK"} and sample.value >= 1
               for sample in count.samples)


def test_request_count_has_no_total_suffix(rest):
    """servables/tensorflow/util.cc: /tensorflow/serving/request_count{model_name,status}; prometheus_exporter.cc
    SerializeScalar prints the name as is with an integer value (prometheus_exporter_test.cc, Counter)."""
    rest("GET", "/v1/models/classifier")
    text = _metrics(rest)
    assert re.search(r'^:tensorflow:serving:request_count\{model_name="classifier",status="OK"\} \d+$', text, re.M)
    assert "_total" not in text


def test_latency_buckets_are_tf_servings_exponential_buckets(rest):
    """servables/tensorflow/util.cc: request_latency uses Buckets::Exponential(10, 1.8, 33);
    prometheus_exporter.cc SerializeHistogram prints the limits with StrCat and the last as +Inf."""
    rest("GET", "/v1/models/classifier")
    text = _metrics(rest)
    bounds = re.findall(r'^:tensorflow:serving:request_latency_bucket\{model_name="classifier",API="",'
                        r'entrypoint="REST",le="([^"]+)"\}', text, re.M)
    assert len(bounds) == 34 and bounds[:4] == ["10", "18", "32.4", "58.32"] and bounds[-1] == "+Inf"
    assert float(bounds[-2]) == pytest.approx(10 * 1.8**32, rel=1e-5)
    assert re.search(r'^:tensorflow:serving:request_latency_count\{model_name="classifier",API="",'
                     r'entrypoint="REST"\} \d+$', text, re.M)


def test_rest_latency_is_labelled_with_the_url_verb(rest, split_images):
    """model_servers/http_server.cc: RecordRequestLatency(model_name, api=method, entrypoint="REST"), where method
    is the verb of the URL (empty for the GET routes)."""
    assert rest("POST", "/v1/models/classifier:predict", _instances(split_images["test"][:1]))[0] == 200
    assert 'request_latency_count{model_name="classifier",API="predict",entrypoint="REST"}' in _metrics(rest)


def test_grpc_predict_is_recorded_and_metadata_is_not(server, channel, split_images):
    """model_servers/prediction_service_impl.cc: Predict records request_count and request_latency
    (API "Predict", entrypoint "GRPC"); GetModelMetadata and ModelService.GetModelStatus
    (model_service_impl.cc) record nothing."""
    import tensorflow as tf

    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata.model_spec.name = "grpc-only"
    with pytest.raises(grpc.RpcError):
        stub.GetModelMetadata(metadata, timeout=30)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "classifier"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(split_images["test"][:1], dtype=tf.string))
    stub.Predict(request, timeout=60)
    text = server.metrics.exposition()[0].decode()
    assert 'request_latency_count{model_name="classifier",API="Predict",entrypoint="GRPC"}' in text
    assert "grpc-only" not in text


def test_failures_are_counted_but_not_timed(server, rest):
    """model_servers/http_server.cc: RecordModelRequestCount for every request, RecordRequestLatency only when OK;
    a request whose path does not parse is counted with an empty model name."""
    rest("GET", "/v1/models/missing-model")
    rest("GET", "/v1/foo")
    text = _metrics(rest)
    assert ':tensorflow:serving:request_count{model_name="missing-model",status="NOT_FOUND"} 1' in text
    assert 'model_name="missing-model",API' not in text
    assert re.search(r'^:tensorflow:serving:request_count\{model_name="",status="INVALID_ARGUMENT"\} \d+$',
                     text, re.M)


def test_runtime_latency_times_the_model_run(rest, split_images):
    """servables/tensorflow/predict_util.cc: RecordRuntimeLatency(name, "Predict", "TF1") around the session's
    Run; servables/tensorflow/util.cc defines /tensorflow/serving/runtime_latency{model_name,API,runtime}."""
    rest("POST", "/v1/models/classifier:predict", _instances(split_images["test"][:1]))
    assert 'runtime_latency_count{model_name="classifier",API="Predict",runtime="TF1"}' in _metrics(rest)


def test_batching_exposes_only_tf_servings_batching_metric(rest, split_images):
    """batching/batching_session.cc: /tensorflow/serving/batching_session/wrapped_run_count counts batches run;
    TF Serving has no processed_batch_size or model_available_versions metric."""
    rest("POST", "/v1/models/classifier:predict", _instances(split_images["test"][:1]))
    text = _metrics(rest)
    assert re.search(r"^:tensorflow:serving:batching_session:wrapped_run_count\{\} [1-9]\d*$", text, re.M)
    assert "processed_batch_size" not in text and "model_available_versions" not in text


def test_metrics_path_with_a_query_is_unexpected(rest):
    """model_servers/http_server.cc ProcessPrometheusRequest: uri_path() must equal the path, else
    INVALID_ARGUMENT "Unexpected path: ... Should be ..." as text/plain."""
    status, headers, raw = rest("GET", "/monitoring/prometheus/metrics?x=1")
    assert status == 400 and headers["Content-Type"] == "text/plain"
    assert raw == b"Unexpected path: /monitoring/prometheus/metrics?x=1. Should be /monitoring/prometheus/metrics"


# -- gRPC health -----------------------------------------------------------------------------------------------

def test_health_answers_the_names_tf_serving_registers(channel):
    """model_servers/server.cc BuildAndStart: EnableDefaultHealthCheckService ("" for the server) and
    SetServingStatus("ModelService") / ("PredictionService"), short names."""
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "ModelService", "PredictionService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING, service


def test_health_does_not_know_the_fully_qualified_names(channel):
    """model_servers/server.cc registers no "tensorflow.serving.PredictionService": gRPC answers NOT_FOUND."""
    with pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="tensorflow.serving.PredictionService"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_service_is_off_by_default(exported_base):
    """model_servers/server.h: enable_grpc_healthcheck_service defaults to false (main.cc flag
    --enable_grpc_healthcheck_service), so grpc.health.v1 is UNIMPLEMENTED."""
    with start_server(exported_base, rest_port=-1) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as opened:
            with pytest.raises(grpc.RpcError) as info:
                health_pb2_grpc.HealthStub(opened).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_flag_is_named_like_tf_servings():
    """model_servers/main.cc: --enable_grpc_healthcheck_service; the development server spells it with dashes."""
    from serving.server import build_parser, config_from_args

    base = ["--model-base-path", "/tmp/none"]
    assert config_from_args(build_parser().parse_args(base)).health_service is False
    assert config_from_args(build_parser().parse_args(
        base + ["--enable-grpc-healthcheck-service"])).health_service is True


def test_wait_until_ready_with_the_health_service_on(server):
    """model_servers/server.cc: with the flag, "PredictionService" is what the client asks for and finds SERVING."""
    with PredictionClient(f"127.0.0.1:{server.port}", timeout=10) as client:
        client.wait_until_ready(timeout=20)


def test_wait_until_ready_with_the_health_service_off(exported_base):
    """model_servers/server.h (flag off by default): UNIMPLEMENTED, so the client falls back to GetModelStatus."""
    with start_server(exported_base, rest_port=-1) as server:
        with PredictionClient(f"127.0.0.1:{server.port}", timeout=10) as client:
            client.wait_until_ready(timeout=20)


def test_wait_until_ready_when_health_does_not_know_the_name(exported_base, monkeypatch):
    """A health service without "PredictionService" answers NOT_FOUND (grpc health checking protocol); the
    client falls back to GetModelStatus instead of waiting out its timeout."""
    import serving.server as server_module

    monkeypatch.setattr(server_module, "HEALTH_SERVICES", ("",))
    with start_server(exported_base, rest_port=-1, health_service=True) as server:
        with PredictionClient(f"127.0.0.1:{server.port}", timeout=10) as client:
            client.wait_until_ready(timeout=20)


# -- the exporter's text format, unit by unit -------------------------------------------------------------------

def test_exporter_prints_a_counter():
    """util/prometheus_exporter_test.cc, Counter."""
    from serving.metrics import Counter, render

    counter = Counter("/test/path/total", "A counter.", "name")
    counter.labels("abc").inc(2)
    assert render([counter]) == '# TYPE :test:path:total counter\n:test:path:total{name="abc"} 2\n'


def test_exporter_prints_a_histogram():
    """util/prometheus_exporter_test.cc, Histogram (Buckets::Exponential(1, 2, 10), values 2, 20, 200)."""
    from serving.metrics import Sampler, exponential_buckets, render

    histogram = Sampler("/test/path/histogram", "A histogram.", exponential_buckets(1, 2, 10), "status")
    for value in (2, 20, 200):
        histogram.labels("good").observe(value)
    counts = dict(zip(["1", "2", "4", "8", "16", "32", "64", "128", "256", "512", "+Inf"],
                      [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]))
    expected = ["# TYPE :test:path:histogram histogram"]
    expected += [f':test:path:histogram_bucket{{status="good",le="{le}"}} {n}' for le, n in counts.items()]
    expected += [':test:path:histogram_sum{status="good"} 222', ':test:path:histogram_count{status="good"} 3']
    assert render([histogram]) == "\n".join(expected) + "\n"


def test_exporter_escapes_label_values():
    """util/prometheus_exporter_test.cc, SanitizeLabelValue: backslash and double quote escaped."""
    from serving.metrics import Counter, render

    counter = Counter("/test/path/total", "A counter.", "name")
    counter.labels('"abc\\"').inc(2)
    assert ':test:path:total{name="\\"abc\\\\\\""} 2\n' in render([counter])


def test_exporter_sanitizes_label_and_metric_names():
    """util/prometheus_exporter_test.cc, SanitizeLabelName and SanitizeMetricName."""
    from serving.metrics import Counter, render

    labelled = Counter("/test/path/total", "A counter.", "my-name+1")
    labelled.labels("abc").inc(2)
    assert ':test:path:total{my_name_1="abc"} 2' in render([labelled])
    numbered = Counter("0/path-total_count", "A counter.", "name")
    numbered.labels("abc").inc(2)
    assert render([numbered]) == '# TYPE _0:path:total_count counter\n_0:path:total_count{name="abc"} 2\n'

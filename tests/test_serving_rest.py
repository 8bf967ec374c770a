"""TF Serving's REST API and Prometheus metrics on the development server's REST port."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest_plugins = ["serving_fixtures"]  # one registration: session fixtures built once per run


@pytest.fixture(scope="module")
def rest(serving_server):
    base = f"http://127.0.0.1:{serving_server.rest_port}"

    def call(path, body=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(base + path, data=data, method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                payload = response.read().decode()
                return response.status, (json.loads(payload) if "json" in response.headers["Content-Type"] else payload)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read().decode())

    return call


def _b64(images):
    return [{"b64": base64.b64encode(image).decode("ascii")} for image in images]


def test_model_status(rest):
    assert rest("/v1/models/classifier") == (200, {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})


def test_model_metadata_has_the_signature_def_map(rest):
    status, body = rest("/v1/models/classifier/versions/1/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": "classifier", "signature_name": "", "version": "1"}
    signature_map = body["metadata"]["signature_def"]
    assert "@type" not in signature_map  # TF Serving unpacks the Any (http_rest_api_util.cc)
    assert signature_map["signature_def"]["serving_default"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"


def test_predict_with_b64_instances_answers_predictions_per_image(rest, split_images, expected_outputs):
    images = split_images["test"][:4]
    status, body = rest("/v1/models/classifier:predict", {"instances": _b64(images)})
    assert status == 200
    rows = body["predictions"]
    assert [r["labels"] for r in rows] == list(expected_outputs["labels"][:4])
    assert [r["class_ids"] for r in rows] == expected_outputs["class_ids"][:4].tolist()
    np.testing.assert_allclose([r["probabilities"] for r in rows], expected_outputs["probabilities"][:4], atol=1e-6)


def test_predict_with_named_instances_and_a_label_route(rest, split_images, expected_outputs):
    instances = [{"image_bytes": item} for item in _b64(split_images["test"][:2])]
    status, body = rest("/v1/models/classifier/labels/stable:predict", {"instances": instances})
    assert status == 200 and [r["labels"] for r in body["predictions"]] == list(expected_outputs["labels"][:2])


def test_predict_columnar_inputs_answer_outputs(rest, split_images, expected_outputs):
    status, body = rest("/v1/models/classifier:predict",
                        {"signature_name": "serving_default", "inputs": {"image_bytes": _b64(split_images["test"][:3])}})
    assert status == 200
    assert body["outputs"]["labels"] == list(expected_outputs["labels"][:3])
    assert len(body["outputs"]["probabilities"]) == 3


@pytest.mark.parametrize("path, body, raw, status, message", [
    ("/v1/models/nope:predict", {"instances": [{"b64": ""}]}, None, 404, "Servable not found for request: Latest(nope)"),
    ("/v1/models/classifier/versions/9", None, None, 404, "Could not find version 9 of model classifier"),
    ("/v1/models/classifier:predict", {"signature_name": "nope", "instances": [{"b64": ""}]}, None, 400,
     'Serving signature name: "nope" not found in signature def'),
    ("/v1/models/classifier:predict", {"instances": [{"b64": base64.b64encode(b"junk").decode()}]}, None, 400, None),
    ("/v1/models/classifier:predict", None, b"{not json", 400, None),
    ("/v1/models/classifier:predict", {"rows": []}, None, 400, "Missing 'inputs' or 'instances' key"),
    ("/v1/models/classifier/labels/nightly:predict", {"instances": [{"b64": ""}]}, None, 400,
     "Unrecognized servable version label: nightly"),
])
def test_rest_errors_are_json_with_tf_servings_http_status(rest, path, body, raw, status, message):
    got_status, got = rest(path, body, raw)
    assert got_status == status and set(got) == {"error"}
    if message is not None:
        assert got["error"] == message


def test_prometheus_metrics_count_requests_by_model_and_status(rest):
    rest("/v1/models/classifier")
    rest("/v1/models/nope")
    status, text = rest("/monitoring/prometheus/metrics")
    assert status == 200
    assert ':tensorflow:serving:request_count{model_name="classifier",status="OK"}' in text
    assert ':tensorflow:serving:request_count{model_name="nope",status="NOT_FOUND"}' in text
    assert ":tensorflow:serving:request_latency_bucket{" in text
    assert "_total" not in text

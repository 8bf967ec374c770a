"""The client library against the development server over real gRPC channels on 127.0.0.1."""

from __future__ import annotations

import io
import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from serving_fixtures import start_server
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from serving.client import PredictionClient, ServingClientError, VersionStatus
from serving.loadtest import LoadTestConfig, run_load

pytest_plugins = ["serving_fixtures"]  # one registration: session fixtures built once per run


@pytest.fixture()
def client(grpc_target):
    with PredictionClient(grpc_target, "classifier", timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def stubs(grpc_target):
    channel = grpc.insecure_channel(grpc_target, options=[("grpc.max_send_message_length", 64 << 20)])
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel), model_service_pb2_grpc.ModelServiceStub(channel)
    channel.close()


def _request(images, **spec) -> predict_pb2.PredictRequest:
    """A PredictRequest built the way TF Serving's example clients build one (tf.make_tensor_proto)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = spec.pop("name", "classifier")
    request.model_spec.signature_name = spec.pop("signature_name", "serving_default")
    if "version" in spec:
        request.model_spec.version.value = spec.pop("version")
    request.inputs[spec.pop("input", "image_bytes")].CopyFrom(
        tf.make_tensor_proto(images, dtype=spec.pop("dtype", tf.string), shape=[len(images)]))
    request.output_filter.extend(spec.pop("output_filter", []))
    assert not spec
    return request


def _code(stub_call, request):
    with pytest.raises(grpc.RpcError) as info:
        stub_call(request, timeout=30)
    return info.value.code(), info.value.details()


def test_health_service_reports_serving_for_the_names_tf_serving_registers(exported_base):
    """With the flag on, the names tensorflow_model_server registers (model_servers/server.cc) are SERVING."""
    with start_server(exported_base, rest_port=-1, health_service=True) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "ModelService", "PredictionService"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_predict_returns_label_score_and_probabilities_of_the_savedmodel(client, split_images, expected_outputs):
    client.wait_until_ready(timeout=30)
    predictions = client.predict(split_images["test"])
    assert [p.label for p in predictions] == list(expected_outputs["labels"])
    assert [p.class_id for p in predictions] == expected_outputs["class_ids"].tolist()
    np.testing.assert_allclose([p.score for p in predictions], expected_outputs["scores"], atol=1e-6)
    np.testing.assert_allclose([p.probabilities for p in predictions], expected_outputs["probabilities"], atol=1e-6)
    assert {p.model_version for p in predictions} == {1}
    first = predictions[0]
    assert first.top(1) == [(first.label, first.score)]
    assert set(first.probability_by_label) <= {"circle", "square", "triangle"} | {f"class_{i}" for i in range(3)}


def test_a_large_request_is_split_into_batches_and_keeps_the_order(grpc_target, split_images, expected_outputs):
    images = split_images["test"]
    with PredictionClient(grpc_target, "classifier", batch_size=5) as small_batches:
        predictions = small_batches.predict(images)
    assert len(predictions) == len(images)
    assert [p.label for p in predictions] == list(expected_outputs["labels"])


def test_predict_accepts_paths_and_bytes(client, split_images, tmp_path, expected_outputs):
    path = tmp_path / "one.jpg"
    path.write_bytes(split_images["test"][0])
    by_path, by_bytes = client.predict([path, split_images["test"][0]])
    assert by_path.source == str(path) and by_bytes.source.startswith("<")
    assert by_path.label == by_bytes.label == expected_outputs["labels"][0]


def test_metadata_describes_the_serving_signature(client):
    meta = client.metadata()
    assert (meta.name, meta.version) == ("classifier", 1)
    sig = meta.signatures["serving_default"]
    assert {k: (v.dtype, v.shape) for k, v in sig.inputs.items()} == {"image_bytes": ("string", (-1,))}
    assert {k: (v.dtype, v.shape) for k, v in sig.outputs.items()} == {
        "probabilities": ("float", (-1, 3)), "class_ids": ("int64", (-1,)),
        "labels": ("string", (-1,)), "scores": ("float", (-1,))}


def test_status_reports_the_loaded_version_available(client):
    assert client.status() == [VersionStatus(1, "AVAILABLE", "OK", "")]


def test_version_labels_select_versions_and_unknown_ones_fail_as_tf_serving_fails(grpc_target, split_images):
    image = split_images["test"][:1]
    with PredictionClient(grpc_target, version_label="stable") as stable:
        assert stable.predict(image)[0].model_version == 1
    with PredictionClient(grpc_target, version=1) as pinned:
        assert pinned.predict(image)[0].model_version == 1
    with PredictionClient(grpc_target, version_label="canary", retries=0) as canary:
        with pytest.raises(ServingClientError) as info:
            canary.predict(image)
        assert (info.value.code, info.value.message) == ("NOT_FOUND", "Servable not found for request: Specific(classifier, 2)")
    with PredictionClient(grpc_target, version_label="nightly", retries=0) as unknown:
        with pytest.raises(ServingClientError) as info:
            unknown.predict(image)
        assert (info.value.code, info.value.message) == ("INVALID_ARGUMENT", "Unrecognized servable version label: nightly")


def test_a_client_written_with_only_the_generated_stubs_gets_the_same_answers(stubs, split_images, expected_outputs):
    predict, _ = stubs
    response = predict.Predict(_request(split_images["test"]), timeout=30)
    assert (response.model_spec.name, response.model_spec.version.value, response.model_spec.signature_name) == (
        "classifier", 1, "serving_default")
    assert set(response.outputs) == {"probabilities", "class_ids", "labels", "scores"}
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["probabilities"]),
                               expected_outputs["probabilities"], atol=1e-6)
    assert [b.decode() for b in tf.make_ndarray(response.outputs["labels"])] == list(expected_outputs["labels"])
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["class_ids"]), expected_outputs["class_ids"])


def test_output_filter_returns_only_the_outputs_asked_for(stubs, split_images):
    predict, _ = stubs
    response = predict.Predict(_request(split_images["test"][:2], output_filter=["scores"]), timeout=30)
    assert list(response.outputs) == ["scores"]


def test_get_model_metadata_packs_a_signature_def_map_in_an_any(stubs):
    predict, _ = stubs
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "classifier"
    response = predict.GetModelMetadata(request, timeout=30)
    packed = response.metadata["signature_def"]
    assert packed.type_url == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert packed.Unpack(signature_map)
    assert signature_map.signature_def["serving_default"].method_name == "tensorflow/serving/predict"
    assert (response.model_spec.name, response.model_spec.version.value) == ("classifier", 1)


def test_get_model_status_answers_the_raw_request(stubs):
    _, model = stubs
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "classifier"
    response = model.GetModelStatus(request, timeout=30)
    [status] = response.model_version_status
    assert (status.version, status.state, status.status.error_code, status.status.error_message) == (
        1, get_model_status_pb2.ModelVersionStatus.AVAILABLE, 0, "")


def _bad_predict_requests(images):
    jpeg = images[:1]
    extra = _request(jpeg)
    extra.inputs["extra"].CopyFrom(tf.make_tensor_proto([1.0]))
    missing = _request(jpeg)
    del missing.inputs["image_bytes"]
    return [
        ("unknown model", _request(jpeg, name="nope"), grpc.StatusCode.NOT_FOUND,
         "Servable not found for request: Latest(nope)"),
        ("unknown version", _request(jpeg, version=9), grpc.StatusCode.NOT_FOUND,
         "Servable not found for request: Specific(classifier, 9)"),
        ("unknown signature", _request(jpeg, signature_name="nope"), grpc.StatusCode.FAILED_PRECONDITION,
         'Serving signature key "nope" not found.'),
        ("missing input", missing, grpc.StatusCode.INVALID_ARGUMENT,
         "input size does not match signature: 0!=1 len({}) != len({image_bytes}). Sent extra: {}. "
         "Missing but required: {image_bytes}."),
        ("extra input", extra, grpc.StatusCode.INVALID_ARGUMENT,
         "input size does not match signature: 2!=1 len({extra,image_bytes}) != len({image_bytes}). "
         "Sent extra: {extra}. Missing but required: {}."),
        ("renamed input", _request(jpeg, input="images"), grpc.StatusCode.INVALID_ARGUMENT,
         "input tensor alias not found in signature: images. Inputs expected to be in the set {image_bytes}."),
        ("wrong dtype", _request([1.0], dtype=tf.float32), grpc.StatusCode.INVALID_ARGUMENT,
         "Expects arg[0] to be string but float is provided"),
        ("undecodable image", _request([b"not an image"]), grpc.StatusCode.INVALID_ARGUMENT, None),
        ("unknown output", _request(jpeg, output_filter=["logits"]), grpc.StatusCode.INVALID_ARGUMENT,
         "output tensor alias not found in signature: logits Outputs expected to be in the set "
         "{class_ids,labels,probabilities,scores}."),
    ]


def test_each_bad_predict_gets_tf_servings_status_code_and_the_server_keeps_serving(stubs, split_images):
    predict, _ = stubs
    for name, request, code, message in _bad_predict_requests(split_images["test"]):
        got_code, got_message = _code(predict.Predict, request)
        assert got_code == code, name
        if message is not None:
            assert got_message == message, name
        else:
            assert got_message, name
    assert predict.Predict(_request(split_images["test"][:1]), timeout=30).outputs["labels"].string_val


def test_an_oversized_message_is_resource_exhausted(stubs, split_images):
    predict, _ = stubs
    huge = split_images["test"][0] + b"\0" * (9 * 1024 * 1024)  # the fixture server accepts 8 MiB
    code, _ = _code(predict.Predict, _request([huge]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert predict.Predict(_request(split_images["test"][:1]), timeout=30).outputs


def test_a_request_above_grpcs_default_4_mib_goes_through(client, split_images):
    padded = [image + b"\0" * (1024 * 1024) for image in split_images["test"][:5]]  # ~5 MiB, JPEG ignores the tail
    assert len(client.predict(padded)) == 5


def test_metadata_and_status_errors_match_tf_serving(stubs):
    predict, model = stubs
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "classifier"
    assert _code(predict.GetModelMetadata, request) == (
        grpc.StatusCode.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field")
    request.metadata_field.append("graph")
    assert _code(predict.GetModelMetadata, request) == (
        grpc.StatusCode.INVALID_ARGUMENT, "Metadata field graph is not supported")
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "nope"
    assert _code(model.GetModelStatus, status) == (grpc.StatusCode.NOT_FOUND, "Could not find any versions of model nope")
    status.model_spec.name = "classifier"
    status.model_spec.version.value = 7
    assert _code(model.GetModelStatus, status) == (grpc.StatusCode.NOT_FOUND, "Could not find version 7 of model classifier")


def test_an_undecodable_image_fails_only_its_own_request_when_batched_with_others(stubs, split_images):
    predict, _ = stubs
    good, results = _request(split_images["test"][:2]), {}

    def send(key, request):
        try:
            results[key] = predict.Predict(request, timeout=30).model_spec.version.value
        except grpc.RpcError as exc:
            results[key] = exc.code()

    threads = [threading.Thread(target=send, args=(i, good if i % 2 else _request([b"garbage"]))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(8)] == [grpc.StatusCode.INVALID_ARGUMENT, 1] * 4


def test_the_client_retries_unavailable_and_then_reports_it():
    with PredictionClient("127.0.0.1:1", retries=2, backoff_initial=0.01, timeout=2) as client:
        with pytest.raises(ServingClientError) as info:
            client.status()
    assert info.value.code == "UNAVAILABLE"


def test_the_client_does_not_retry_a_client_error(grpc_target, serving_server, monkeypatch):
    # TF Serving's request_count leaves GetModelStatus out, so count the calls the server sees.
    calls = []
    observe = serving_server.metrics.observe
    monkeypatch.setattr(serving_server.metrics, "observe",
                        lambda name, api, *rest: (calls.append((name, api)), observe(name, api, *rest)))
    with PredictionClient(grpc_target, "nope", retries=3) as client:
        with pytest.raises(ServingClientError) as info:
            client.status()
    assert info.value.code == "NOT_FOUND"
    assert calls.count(("nope", "GetModelStatus")) == 1


def test_a_full_batching_queue_is_unavailable_and_the_server_recovers(exported_base, split_images):
    with start_server(exported_base, enable_batching=True, max_batch_size=1, max_enqueued_batches=1,
                      num_batch_threads=1, rest_port=-1) as server:
        with PredictionClient(f"127.0.0.1:{server.port}", retries=0, batch_size=2) as client:
            with pytest.raises(ServingClientError) as info:
                client.predict(split_images["test"][:2])  # 2 one-row batches, room for 1
            assert (info.value.code, info.value.message) == (
                "UNAVAILABLE", "The batch scheduling queue to which this task was submitted is full")
            assert len(client.predict(split_images["test"][:1])) == 1


def test_the_client_reads_names_from_metadata_so_foreign_models_work(tmp_path, split_images):
    """A SavedModel not exported by this project: other input/output names, no labels output."""

    class Foreign(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def serve(self, jpeg):
            mean = tf.map_fn(lambda b: tf.reduce_mean(tf.cast(tf.io.decode_jpeg(b), tf.float32)), jpeg,
                             fn_output_signature=tf.float32)
            return {"probs": tf.stack([mean / 255.0, 1.0 - mean / 255.0], axis=1)}

    module = Foreign()
    tf.saved_model.save(module, str(tmp_path / "5"), signatures={"predict_images": module.serve.get_concrete_function()})
    with start_server(tmp_path, model_name="other", rest_port=-1, file_system_poll_wait_seconds=0) as server:
        with PredictionClient(f"127.0.0.1:{server.port}", "other", signature_name="predict_images",
                              labels=("bright", "dark")) as client:
            [p] = client.predict(split_images["test"][:1])
    assert p.label in ("bright", "dark") and p.model_version == 5
    assert pytest.approx(sum(p.probabilities)) == 1.0


def test_a_bounded_concurrent_load_finishes_with_zero_errors(grpc_target, split_images):
    result = run_load(split_images["test"], LoadTestConfig(server=grpc_target, concurrency=4, requests=60,
                                                           batch=2, duration=60))
    assert (result.requests, result.ok, result.errors) == (60, 60, {})
    assert result.versions == {1: 60}
    assert set(result.latency_ms) >= {"p50", "p95", "p99"}


def test_undecodable_png_header_is_invalid_argument(stubs):
    predict, _ = stubs
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    truncated = buf.getvalue()[:20]
    code, _ = _code(predict.Predict, _request([truncated]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_tls_clients_get_answers_and_plaintext_clients_do_not(exported_base, split_images, tmp_path):
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    with start_server(exported_base, rest_port=-1, ssl_cert_file=str(cert), ssl_key_file=str(key)) as server:
        target = f"127.0.0.1:{server.port}"
        with PredictionClient(target, tls=True, root_certificates=str(cert)) as secure:
            assert secure.predict(split_images["test"][:1])[0].model_version == 1
        with PredictionClient(target, retries=0, timeout=5) as plaintext:
            with pytest.raises(ServingClientError) as info:
                plaintext.status()
    assert info.value.code == "UNAVAILABLE"


def test_formats_the_graph_cannot_decode_are_sent_as_png(client, split_images, expected_outputs):
    jpeg = Image.open(io.BytesIO(split_images["test"][0]))
    webp = io.BytesIO()
    jpeg.save(webp, format="WEBP", lossless=True)
    [p] = client.predict([webp.getvalue()])
    assert p.label == expected_outputs["labels"][0]
    np.testing.assert_allclose(p.probabilities, expected_outputs["probabilities"][0], atol=1e-5)


def test_wait_until_ready_falls_back_to_model_status_on_a_server_without_health_service(exported_base):
    with start_server(exported_base, rest_port=-1, health_service=False) as server:
        with PredictionClient(f"127.0.0.1:{server.port}") as client:
            client.wait_until_ready(timeout=30)
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                with pytest.raises(grpc.RpcError) as info:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

"""An export written before the trainer moved to layers (issue 17) still loads, serves and answers the same.

``tests/fixtures/export-pre-layers`` was written by ``trainer.export`` when
``BackbonePreprocess`` lived in ``trainer.hypermodel``; its ``expected.json``
holds the Keras model's probabilities for the first four test images of
``conftest.write_tfrecord_data()``.
"""

from __future__ import annotations

import base64
import json
import pathlib
import shutil
import urllib.request

import numpy as np
import pytest

from serving_fixtures import read_split, start_server

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "export-pre-layers"


@pytest.fixture(scope="module")
def expected():
    return json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture(scope="module")
def images(tfrecord_data):
    return read_split(tfrecord_data, "test")[0][:4]


@pytest.fixture
def old_export(tmp_path):
    """A writable copy (the server and the gate may write nothing, but a fixture stays pristine)."""
    return pathlib.Path(shutil.copytree(FIXTURE, tmp_path / "export", ignore=shutil.ignore_patterns("expected.json")))


def test_an_old_export_loads_and_predicts_as_it_did(old_export, images, expected):
    from trainer.publish.export import load_predict_fn

    outputs = load_predict_fn(str(old_export / "1"))(images)
    np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], atol=1e-4)


def test_the_development_server_serves_an_old_export(old_export, images, expected):
    body = json.dumps({"instances": [{"b64": base64.b64encode(i).decode()} for i in images]}).encode()
    with start_server(old_export) as server:
        request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}/v1/models/classifier:predict",
                                         data=body, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            predictions = json.loads(response.read())["predictions"]
    np.testing.assert_allclose([p["probabilities"] for p in predictions], expected["probabilities"], atol=1e-4)


def test_the_gate_scores_an_old_export_as_the_latest_version(old_export, images, expected):
    from trainer.publish.gate import score_version

    score = score_version(str(old_export / "1"), images, expected["labels"])
    right = np.argmax(expected["probabilities"], axis=1) == np.array(expected["labels"])
    assert score == pytest.approx(right.mean())


def test_the_saved_layer_name_of_old_models_still_resolves():
    import keras

    from trainer.model.classifier import BackbonePreprocess

    old = {"module": "trainer.hypermodel", "class_name": "BackbonePreprocess",
           "registered_name": "trainer>BackbonePreprocess",
           "config": {"name": "backbone_preprocess", "mode": "caffe", "trainable": True, "dtype": "float32"}}
    layer = keras.saving.deserialize_keras_object(old)
    assert isinstance(layer, BackbonePreprocess) and layer.mode == "caffe"
    assert keras.saving.serialize_keras_object(layer)["registered_name"] == "trainer>BackbonePreprocess"

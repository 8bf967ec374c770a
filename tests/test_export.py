"""trainer.publish.export: the SavedModel serving contract (docs/contracts.md, section 4) and atomic publishing."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import tensorflow as tf
from serving_fixtures import IMAGE_SIZE, export_tiny
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

from preprocessing import tfrecords
from trainer.publish import export

pytest_plugins = ["serving_fixtures"]  # one registration: session fixtures built once per run


def _signatures(version_dir) -> dict:
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    return {k: v for k, v in proto.meta_graphs[0].signature_def.items() if not k.startswith("__")}


def _shape(info) -> list[int]:
    return [d.size for d in info.tensor_shape.dim]


def test_serving_default_is_the_only_signature_with_the_contract_names_dtypes_and_shapes(exported_base):
    signatures = _signatures(exported_base / "1")
    assert list(signatures) == ["serving_default"]
    sig = signatures["serving_default"]
    assert {k: (v.dtype, _shape(v)) for k, v in sig.inputs.items()} == {
        "image_bytes": (tf.string.as_datatype_enum, [-1])}
    assert {k: (v.dtype, _shape(v)) for k, v in sig.outputs.items()} == {
        "probabilities": (tf.float32.as_datatype_enum, [-1, 3]),
        "class_ids": (tf.int64.as_datatype_enum, [-1]),
        "labels": (tf.string.as_datatype_enum, [-1]),
        "scores": (tf.float32.as_datatype_enum, [-1]),
    }


def test_labels_asset_holds_the_class_names_in_id_order(exported_base, tiny_model):
    _, labels = tiny_model
    assert (exported_base / "1" / "assets" / "labels.txt").read_text().splitlines() == labels


def test_reloaded_model_predicts_what_the_keras_model_predicts(exported_base, tiny_model, split_images):
    model, labels = tiny_model
    images = split_images["test"]
    outputs = export.load_predict_fn(str(exported_base / "1"))(images)
    pixels = tf.stack([tfrecords.decode_and_resize(tf.constant(i), IMAGE_SIZE) for i in images])
    expected = model(pixels).numpy()
    np.testing.assert_allclose(outputs["probabilities"], expected, atol=1e-5)
    np.testing.assert_array_equal(outputs["class_ids"], expected.argmax(-1))
    assert list(outputs["labels"]) == [labels[i] for i in expected.argmax(-1)]
    np.testing.assert_allclose(outputs["scores"], expected.max(-1), atol=1e-5)
    assert len(set(outputs["class_ids"].tolist())) > 1, "the tiny model should not predict a single class"


def test_warmup_file_is_a_tfrecord_of_predict_logs_for_the_signature(exported_base, split_images):
    path = exported_base / "1" / "assets.extra" / "tf_serving_warmup_requests"
    logs = []
    for record in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record.numpy())
        logs.append(log)
    assert logs
    for log in logs:
        assert log.WhichOneof("log_type") == "predict_log"
        request = log.predict_log.request
        assert request.model_spec.signature_name == "serving_default"
        assert list(request.inputs) == ["image_bytes"]
        tensor = request.inputs["image_bytes"]
        assert tensor.dtype == tf.string.as_datatype_enum
        assert [d.size for d in tensor.tensor_shape.dim] == [len(tensor.string_val)]
        assert set(tensor.string_val) <= set(split_images["test"][:3])


def test_metadata_json_keeps_the_run_metadata_and_describes_the_export(exported_base, tiny_model):
    meta = json.loads((exported_base / "1" / "assets.extra" / "metadata.json").read_text())
    assert meta["test"] is True
    assert meta["export"]["version"] == 1
    assert meta["export"]["labels"] == tiny_model[1]
    assert meta["export"]["image_size"] == list(IMAGE_SIZE)
    assert meta["export"]["max_abs_diff"] <= meta["export"]["tolerance"]


def test_versions_count_up_from_the_latest_and_an_existing_version_is_refused(tiny_model, split_images, tmp_path):
    model, labels = tiny_model
    images = split_images["test"][:2]
    assert export.latest_version(str(tmp_path / "missing")) is None
    assert export_tiny(model, labels, tmp_path, images).version == 1
    (tmp_path / "not-a-version").mkdir()
    (tmp_path / ".tmp-9-1").mkdir()
    assert export_tiny(model, labels, tmp_path, images, version=7).version == 7
    result = export_tiny(model, labels, tmp_path, images)
    assert (result.version, result.path) == (8, str(tmp_path / "8"))
    assert export.list_versions(str(tmp_path)) == [1, 7, 8]
    with pytest.raises(export.ExportError, match="version 7 already exists"):
        export_tiny(model, labels, tmp_path, images, version=7)


def _model_that_differs_in_the_graph(model):
    """Wraps ``model`` so traced (SavedModel) calls add 0.01 to the output that eager calls do not."""
    import keras

    class GraphOnlyOffset(keras.layers.Layer):
        def call(self, x):
            return x if tf.executing_eagerly() else x + 0.01

    inputs = keras.Input((*IMAGE_SIZE, 3))
    return keras.Model(inputs, GraphOnlyOffset()(model(inputs)))


def test_a_savedmodel_that_disagrees_with_keras_fails_the_export_and_leaves_nothing(tiny_model, split_images, tmp_path):
    model, labels = tiny_model
    with pytest.raises(export.ExportError, match=r"max abs diff 0\.01"):
        export_tiny(_model_that_differs_in_the_graph(model), labels, tmp_path, split_images["test"][:2])
    assert os.listdir(tmp_path) == []


def test_labels_that_do_not_match_the_model_output_fail_before_writing(tiny_model, split_images, tmp_path):
    model, labels = tiny_model
    with pytest.raises(export.ExportError, match=f"{len(labels) + 1} labels"):
        export_tiny(model, labels + ["extra"], tmp_path, split_images["test"][:2])
    assert os.listdir(tmp_path) == []


def test_a_version_folder_is_complete_from_the_moment_it_appears(tiny_model, split_images, tmp_path):
    model, labels = tiny_model
    required = ["saved_model.pb", "variables/variables.index", "assets/labels.txt",
                "assets.extra/tf_serving_warmup_requests", "assets.extra/metadata.json"]
    seen_names, incomplete = set(), []
    done = threading.Event()

    def watch():
        while not done.is_set():
            for name in os.listdir(tmp_path):
                seen_names.add(name)
                if name.isdigit() and not all((tmp_path / name / f).exists() for f in required):
                    incomplete.append(name)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        export_tiny(model, labels, tmp_path, split_images["test"][:2])
    finally:
        done.set()
        watcher.join()
    assert incomplete == []
    assert "1" in os.listdir(tmp_path)
    assert any(name.startswith(".tmp-") for name in seen_names), "the export should stage in a hidden folder"
    assert [n for n in os.listdir(tmp_path) if not n.isdigit()] == []


def test_a_mixed_float16_model_exports_float16_ops_which_the_float32_check_would_catch(tiny_model, split_images,
                                                                                        tmp_path):
    """The detector behind the mixed-precision export test (test_trainer_distributed.py) sees float16 compute."""
    import keras
    from serving_fixtures import float16_ops

    _, labels = tiny_model
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((*IMAGE_SIZE, 3)), keras.layers.Conv2D(4, 3),
                                  keras.layers.GlobalAveragePooling2D(),
                                  keras.layers.Dense(len(labels), activation="softmax", dtype="float32")])
    finally:
        keras.mixed_precision.set_global_policy(previous)
    result = export_tiny(model, labels, tmp_path, split_images["test"][:2], tolerance=1e-2)
    assert "Conv2D" in float16_ops(tmp_path / str(result.version))

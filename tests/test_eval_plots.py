"""evaluate_model on a real tiny Keras model trained on the sample TFRecords: metrics.json and the PNGs."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from preprocessing import tfrecords
from trainer.report import plots
from trainer.report.evaluate import evaluate_model

SIZE = (32, 32)


def _dataset(data_dir, split):
    def to_pair(serialized):
        parsed = tfrecords.parse_example(serialized)
        return tfrecords.decode_and_resize(parsed[tfrecords.ENCODED], SIZE), parsed[tfrecords.LABEL]

    files = tfrecords.list_shards(str(data_dir), split)
    return tf.data.TFRecordDataset(files).map(to_pair).batch(8)


def _png_size(path):
    with open(path, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.fixture(scope="module")
def evaluated(tfrecord_data, tmp_path_factory):
    """A conv net fitted in two one-epoch phases, evaluated on the test split."""
    keras.utils.set_random_seed(0)
    labels = tfrecords.read_labels(str(tfrecord_data))
    model = keras.Sequential([
        keras.Input((*SIZE, 3)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(labels), activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    train, val = _dataset(tfrecord_data, "train"), _dataset(tfrecord_data, "validation")
    history = {"phase1": model.fit(train, validation_data=val, epochs=1, verbose=0).history,
               "phase2": model.fit(train, validation_data=val, epochs=1, verbose=0).history}
    out_dir = tmp_path_factory.mktemp("eval")
    test = _dataset(tfrecord_data, "test")
    metrics = evaluate_model(model, test, labels, str(out_dir), history=history, top_k=2)
    _, keras_accuracy = model.evaluate(test, verbose=0)
    return metrics, out_dir, labels, keras_accuracy


def test_metrics_json_is_what_evaluate_model_returns(evaluated):
    metrics, out_dir, labels, _ = evaluated
    assert json.loads((out_dir / "metrics.json").read_text()) == metrics
    assert metrics["labels"] == labels


def test_accuracy_agrees_with_keras_evaluate(evaluated):
    metrics, _, _, keras_accuracy = evaluated
    assert metrics["accuracy"] == pytest.approx(keras_accuracy, abs=1e-6)


def test_confusion_matrix_accounts_for_every_test_example(evaluated):
    metrics, _, labels, _ = evaluated
    matrix = np.array(metrics["confusion_matrix"]["matrix"])
    assert matrix.shape == (len(labels), len(labels))
    assert matrix.sum() == metrics["num_examples"] == 9  # 3 classes x the last 3 of 16 images
    assert matrix.sum(axis=1).tolist() == [metrics["per_class"][name]["support"] for name in labels]


def test_confusion_matrix_pr_curves_and_training_curves_are_drawn(evaluated):
    _, out_dir, _, _ = evaluated
    for name in ("confusion_matrix.png", "pr_curves.png", "training_curves.png"):
        width, height = _png_size(out_dir / name)
        assert width > 400 and height > 300, name


def test_training_curves_are_skipped_without_history(tfrecord_data, tmp_path):
    model = keras.Sequential([keras.Input((*SIZE, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3, activation="softmax")])
    evaluate_model(model, _dataset(tfrecord_data, "test"), ["a", "b", "c"], str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion_matrix.png", "metrics.json", "pr_curves.png"]


def test_training_curves_draw_a_phase_without_validation(tmp_path):
    history = {"phase1": {"loss": [1.0, 0.8], "accuracy": [0.5, 0.6]}, "phase2": {"loss": [], "accuracy": []}}
    path = plots.plot_training_curves(history, str(tmp_path / "curves.png"))
    assert _png_size(path)[0] > 400

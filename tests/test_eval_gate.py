"""The publishing gate against real exported versions (trainer.publish.export) scored on the sample test images.

The baselines are models that always answer one class, so their accuracy on
the 9 test images (3 circles, 3 squares, 3 triangles) is known exactly.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from preprocessing import tfrecords
from trainer.publish.export import export_model
from trainer.publish.gate import GateDecision, decide, score_version

SIZE = (32, 32)
LABELS = ["circle", "square", "triangle"]


def _always(class_id: int, num_classes: int = 3) -> keras.Model:
    """A real Keras classifier (float32 [N, 32, 32, 3] in [0, 255] -> softmax) that always picks ``class_id``."""
    inputs = keras.Input((*SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    dense = keras.layers.Dense(num_classes, activation="softmax")
    model = keras.Model(inputs, dense(pooled))
    bias = np.zeros(num_classes, np.float32)
    bias[class_id] = 5.0
    dense.set_weights([np.zeros((3, num_classes), np.float32), bias])
    return model


@pytest.fixture(scope="module")
def test_split(tfrecord_data):
    images, labels = [], []
    for record in tf.data.TFRecordDataset(tfrecords.list_shards(str(tfrecord_data), "test")):
        parsed = tfrecords.parse_example(record)
        images.append(parsed[tfrecords.ENCODED].numpy())
        labels.append(int(parsed[tfrecords.LABEL]))
    assert tfrecords.read_labels(str(tfrecord_data)) == LABELS and len(images) == 9
    return images, labels


def _export(model, base, images, labels=LABELS):
    return export_model(model, str(base), labels=labels, image_size=SIZE, resize_mode="stretch",
                        check_images=images[:2])


@pytest.fixture(scope="module")
def served(tmp_path_factory, test_split):
    """An export base with version 1 (always circle) and version 2, the latest (always triangle)."""
    base = tmp_path_factory.mktemp("export")
    images, _ = test_split
    assert _export(_always(0), base, images).version == 1
    assert _export(_always(2), base, images).version == 2
    return base


def test_first_version_is_published_when_it_meets_the_minimum(tmp_path, test_split):
    decision = decide(0.6, str(tmp_path / "export"), *test_split, min_accuracy=0.5)
    assert decision == GateDecision(publish=True, reason=decision.reason, new_score=0.6, min_accuracy=0.5,
                                    previous_version=None, previous_score=None, forced=False)
    assert "no earlier version" in decision.reason


def test_below_the_minimum_is_refused(tmp_path, test_split):
    decision = decide(0.4, str(tmp_path / "export"), *test_split, min_accuracy=0.5)
    assert (decision.publish, decision.forced) == (False, False)
    assert "below the minimum" in decision.reason


def test_the_latest_version_is_scored_on_the_same_images(served, test_split):
    decision = decide(0.5, str(served), *test_split)
    assert (decision.previous_version, decision.previous_score) == (2, pytest.approx(1 / 3))
    assert decision.publish


def test_a_candidate_worse_than_the_served_version_is_refused(served, test_split):
    decision = decide(0.3, str(served), *test_split)
    assert not decision.publish
    assert "worse than version 2's 0.3333" in decision.reason


def test_a_tie_with_the_served_version_is_published(served, test_split):
    assert decide(3 / 9, str(served), *test_split).publish


def test_force_publishes_a_refused_candidate_and_says_so(served, test_split):
    decision = decide(0.1, str(served), *test_split, min_accuracy=0.5, force=True)
    assert (decision.publish, decision.forced) == (True, True)
    assert decision.reason.startswith("forced: published although accuracy 0.1000 is below the minimum")


def test_only_versions_before_the_candidate_are_the_baseline(served, test_split):
    images, labels = test_split
    circles_and_squares = [i for i, label in enumerate(labels) if label < 2]
    subset = [images[i] for i in circles_and_squares], [labels[i] for i in circles_and_squares]
    decision = decide(0.25, str(served), *subset, candidate_version=2)
    assert (decision.previous_version, decision.previous_score, decision.publish) == (1, 0.5, False)


def test_decision_is_written_as_json(served, test_split, tmp_path):
    out = tmp_path / "job" / "gate.json"
    decision = decide(0.5, str(served), *test_split, out_path=str(out))
    record = json.loads(out.read_text())
    assert {k: record[k] for k in decision.to_dict()} == decision.to_dict()
    assert record["num_test_images"] == 9 and record["decided_at"]


def test_baseline_predictions_are_matched_by_class_name_when_names_are_given(tmp_path, test_split):
    images, labels = test_split
    _export(_always(0), tmp_path, images, labels=["square", "circle", "triangle"])  # another class order
    squares = [images[i] for i, label in enumerate(labels) if label == 1]
    version_dir = str(tmp_path / "1")  # always answers id 0, which it calls "square"
    assert score_version(version_dir, squares, [1, 1, 1], label_names=LABELS) == 1.0
    assert score_version(version_dir, squares, [1, 1, 1]) == 0.0  # ids alone would compare 0 with 1


def test_a_baseline_that_cannot_be_loaded_does_not_block(tmp_path, test_split):
    (tmp_path / "export" / "1").mkdir(parents=True)  # an empty, broken version folder
    decision = decide(0.5, str(tmp_path / "export"), *test_split)
    assert (decision.publish, decision.previous_version, decision.previous_score) == (True, 1, None)
    assert "could not be scored" in decision.reason

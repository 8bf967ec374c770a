"""Test-split metrics from (true class ids, probabilities), checked against values worked out by hand.

The example: 7 images, classes cat/dog/owl, supports 3/2/2.

    true  probabilities (cat, dog, owl)  predicted
    cat   0.70 0.20 0.10                 cat
    cat   0.30 0.60 0.10                 dog
    dog   0.10 0.80 0.10                 dog
    dog   0.50 0.40 0.10                 cat
    owl   0.20 0.20 0.60                 owl
    owl   0.60 0.30 0.10                 cat   (owl is 3rd: a top-2 miss)
    cat   0.90 0.05 0.05                 cat
"""

import math

import numpy as np
import pytest

from trainer.report.evaluate import accuracy_interval, metrics_from_probabilities, precision_recall_curve

LABELS = ["cat", "dog", "owl"]
Y_TRUE = [0, 0, 1, 1, 2, 2, 0]
PROBS = np.array([
    [0.70, 0.20, 0.10],
    [0.30, 0.60, 0.10],
    [0.10, 0.80, 0.10],
    [0.50, 0.40, 0.10],
    [0.20, 0.20, 0.60],
    [0.60, 0.30, 0.10],
    [0.90, 0.05, 0.05],
])


@pytest.fixture(scope="module")
def metrics():
    return metrics_from_probabilities(Y_TRUE, PROBS, LABELS, top_k=2)


def test_accuracy_is_the_share_of_argmax_hits(metrics):
    assert metrics["num_examples"] == 7
    assert metrics["accuracy"] == pytest.approx(4 / 7)


def test_top_k_accuracy_counts_the_true_class_among_the_k_best(metrics):
    assert metrics["top_k"] == 2
    assert metrics["top_k_accuracy"] == pytest.approx(6 / 7)


def test_confusion_matrix_rows_are_true_classes_and_columns_predictions(metrics):
    cm = metrics["confusion_matrix"]
    assert (cm["rows"], cm["cols"], cm["labels"]) == ("true", "predicted", LABELS)
    assert cm["matrix"] == [[2, 1, 0],
                            [1, 1, 0],
                            [1, 0, 1]]


def test_per_class_precision_recall_f1_and_support(metrics):
    expected = {  # precision = diagonal / column sum, recall = diagonal / row sum
        "cat": (2 / 4, 2 / 3, 4 / 7, 3),
        "dog": (1 / 2, 1 / 2, 1 / 2, 2),
        "owl": (1 / 1, 1 / 2, 2 / 3, 2),
    }
    for name, (precision, recall, f1, support) in expected.items():
        row = metrics["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision, recall, f1)), name
        assert row["support"] == support


def test_macro_average_weighs_classes_equally_and_weighted_average_by_support(metrics):
    assert metrics["macro_avg"] == pytest.approx({"precision": 2 / 3, "recall": 5 / 9, "f1": 73 / 126, "support": 7})
    assert metrics["weighted_avg"] == pytest.approx(
        {"precision": 9 / 14, "recall": 4 / 7, "f1": 85 / 147, "support": 7})


def test_average_precision_steps_through_thresholds_and_groups_tied_scores(metrics):
    # cat scores, best first: 0.9+ 0.7+ 0.6- 0.5- 0.3+ ... -> precision at each positive 1, 1, 3/5
    assert metrics["per_class"]["cat"]["average_precision"] == pytest.approx((1 + 1 + 3 / 5) / 3)
    # owl: 0.6+ gives (P=1, R=1/2); five tied 0.1 scores hold the other positive: (P=2/6, R=1)
    assert metrics["per_class"]["owl"]["average_precision"] == pytest.approx(1 / 2 * 1 + 1 / 2 * 2 / 6)


def test_loss_is_mean_cross_entropy_of_the_true_class(metrics):
    true_probs = [0.7, 0.3, 0.8, 0.4, 0.6, 0.1, 0.9]
    assert metrics["loss"] == pytest.approx(-sum(math.log(p) for p in true_probs) / 7)


def test_precision_of_a_class_never_predicted_is_zero_not_nan():
    metrics = metrics_from_probabilities([0, 1, 2], [[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.3, 0.1]], LABELS)
    owl = metrics["per_class"]["owl"]
    assert (owl["precision"], owl["recall"], owl["f1"]) == (0.0, 0.0, 0.0)


def test_top_k_larger_than_the_class_count_is_capped():
    metrics = metrics_from_probabilities(Y_TRUE, PROBS, LABELS, top_k=5)
    assert (metrics["top_k"], metrics["top_k_accuracy"]) == (3, 1.0)


def test_pr_curve_starts_at_full_precision_and_ends_at_full_recall():
    precision, recall, ap = precision_recall_curve(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1]))
    assert precision.tolist() == pytest.approx([1.0, 1.0, 1 / 2, 2 / 3, 2 / 4])
    assert recall.tolist() == pytest.approx([0.0, 1 / 2, 1 / 2, 1.0, 1.0])
    assert ap == pytest.approx(1 / 2 * 1 + 1 / 2 * 2 / 3)


def test_probabilities_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="probabilities must be"):
        metrics_from_probabilities(Y_TRUE, PROBS[:, :2], LABELS)


def test_accuracy_interval_is_the_wilson_95_percent_interval():
    low, high = accuracy_interval(50, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)
    low, high = accuracy_interval(100, 100)
    assert high == 1.0 and 0.96 < low < 0.97


def test_metrics_carry_the_accuracy_interval_around_the_accuracy(metrics):
    low, high = metrics["accuracy_ci95"]
    assert low < metrics["accuracy"] < high

"""Accuracy and macro-F1 against hand-computed cases (and scikit-learn where it is installed)."""

from __future__ import annotations

import random

import pytest
import torch

import rankshare as rs
from rankshare.finetune.metrics import classification_metrics


def test_perfect_predictions():
    perfect = {"accuracy": 1.0, "macro_f1": 1.0, "examples": 4, "predicted": [1, 2, 1]}
    assert classification_metrics([0, 1, 2, 1], [0, 1, 2, 1], num_classes=3) == perfect


def test_hand_computed_case():
    # class 0: TP 1, support 2, predicted 1 -> F1 = 2·1 / (2 + 1) = 2/3
    # class 1: TP 1, support 1, predicted 2 -> F1 = 2/3
    # class 2: TP 1, support 1, predicted 1 -> F1 = 1
    result = classification_metrics([0, 0, 1, 2], [0, 1, 1, 2], num_classes=3)
    assert result["examples"] == 4
    assert result["accuracy"] == pytest.approx(3 / 4)
    assert result["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert result["predicted"] == [1, 2, 1]


def test_classes_absent_from_labels_and_predictions_are_not_averaged():
    # Five classes, only 0 and 1 occur: the absent three do not pull the average down.
    result = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], num_classes=5)
    assert result["accuracy"] == pytest.approx(3 / 4)
    assert result["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_a_class_only_predicted_counts_with_f1_zero():
    # Class 2 never occurs in the labels but is predicted once: its F1 is 0 and it is averaged.
    result = classification_metrics([0, 1], [0, 2], num_classes=3)
    assert result["accuracy"] == 0.5
    assert result["macro_f1"] == pytest.approx((1 + 0 + 0) / 3)


def test_accepts_tensors_and_returns_plain_python_numbers():
    result = classification_metrics(torch.tensor([1, 0, 1]), torch.tensor([[1], [1], [1]]), num_classes=2)
    assert result.pop("predicted") == [0, 3]
    assert result == pytest.approx({"accuracy": 2 / 3, "macro_f1": (0 + 0.8) / 2, "examples": 3})
    assert type(result["accuracy"]) is float and type(result["macro_f1"]) is float and type(result["examples"]) is int


def test_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for num_classes in (2, 3, 7):
        labels = [rng.randrange(num_classes) for _ in range(60)]
        predictions = [label if rng.random() < 0.6 else rng.randrange(num_classes) for label in labels]
        result = classification_metrics(labels, predictions, num_classes)
        assert result["accuracy"] == pytest.approx(metrics.accuracy_score(labels, predictions))
        assert result["macro_f1"] == pytest.approx(metrics.f1_score(labels, predictions, average="macro"))


@pytest.mark.parametrize(
    ("labels", "predictions", "num_classes", "message"),
    [
        ([0, 1], [0], 2, "2 labels but 1 predictions"),
        ([], [], 2, "No examples"),
        ([0, 3], [0, 1], 3, r"labels must be class indices in \[0, 3\)"),
        ([0, 1], [-1, 1], 2, "predictions must be class indices"),
        ([0], [0], 0, "num_classes must be"),
    ],
)
def test_bad_inputs_are_errors(labels, predictions, num_classes, message):
    with pytest.raises(rs.RankshareError, match=message):
        classification_metrics(labels, predictions, num_classes)

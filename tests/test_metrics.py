"""Segmentation metrics on hand-made predictions."""

from __future__ import annotations

import math

import pytest
import torch

from semisup.columns import IGNORE_INDEX
from semisup.metrics import confusion_matrix, majority_class_miou, scores


def test_perfect_prediction_scores_one() -> None:
    target = torch.tensor([[0, 1], [2, IGNORE_INDEX]])
    result = scores(confusion_matrix(target.clamp(max=2), target, 3))
    assert result["miou"] == 1.0 and result["dice"] == 1.0 and result["pixel_accuracy"] == 1.0


def test_known_confusion_gives_known_scores() -> None:
    target = torch.tensor([0, 0, 1, 1, IGNORE_INDEX])
    prediction = torch.tensor([0, 1, 1, 1, 0])
    confusion = confusion_matrix(prediction, target, 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    result = scores(confusion)
    iou = result["iou_per_class"]
    assert isinstance(iou, list)
    assert iou[0] == pytest.approx(1 / 2) and iou[1] == pytest.approx(2 / 3) and math.isnan(iou[2])
    assert result["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert result["dice"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert result["pixel_accuracy"] == pytest.approx(3 / 4)


def test_confusions_add_across_batches() -> None:
    a, b = torch.randint(0, 4, (2, 50)), torch.randint(0, 4, (2, 50))
    whole = confusion_matrix(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]), 4)
    assert torch.equal(confusion_matrix(a[0], a[1], 4) + confusion_matrix(b[0], b[1], 4), whole)


def test_majority_class_floor() -> None:
    target = torch.tensor([0] * 8 + [1] * 2)
    confusion = confusion_matrix(torch.zeros_like(target), target, 2)
    assert majority_class_miou(confusion) == pytest.approx(0.8 / 2)

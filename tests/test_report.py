"""Pseudo-label calibration math and the per-class comparison of a run report."""

from __future__ import annotations

import numpy as np
import pytest

from semisup.calibration import calibration, confidence_bins
from semisup.report import per_class_table, pick_showcase_tiles


def test_bins_count_pixels_correct_and_confidence() -> None:
    confidence = np.array([0.05, 0.15, 0.95, 1.0, 0.99])
    correct = np.array([False, True, True, True, False])
    counts = confidence_bins(confidence, correct, bins=10)
    assert counts["pixels"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 3]  # 1.0 falls in the last bin
    assert counts["correct"][9] == 2 and counts["confidence_sum"][9] == pytest.approx(2.94)


def test_a_calibrated_teacher_has_zero_error_and_the_threshold_reaches_the_target() -> None:
    rng = np.random.default_rng(0)
    confidence = rng.random(200_000)
    correct = rng.random(200_000) < confidence  # correct with probability = confidence
    counts = confidence_bins(confidence, correct, bins=10)
    result = calibration(counts["pixels"], counts["correct"], counts["confidence_sum"], 0.87)
    assert result["expected_calibration_error"] < 0.01
    # confidence >= 0.7 is right 85 % of the time, >= 0.8 90 %: 0.8 is the first edge for 87 %
    assert result["suggested_threshold"] == pytest.approx(0.8)
    assert result["kept_fraction"] == pytest.approx(0.2, abs=0.01)
    above = result["accuracy_above"]
    assert all(a <= b + 1e-9 for a, b in zip(above, above[1:], strict=False))


def test_an_overconfident_teacher_is_flagged() -> None:
    confidence = np.full(1000, 0.99)
    correct = np.arange(1000) < 500  # right half of the time at 99 % confidence
    counts = confidence_bins(confidence, correct)
    result = calibration(counts["pixels"], counts["correct"], counts["confidence_sum"], 0.9)
    assert result["expected_calibration_error"] == pytest.approx(0.49)
    assert result["suggested_threshold"] is None and result["kept_fraction"] == 0.0


def test_per_class_table_takes_each_run_at_its_best_epoch() -> None:
    def run(best: int, ious: list[list[float | None]]) -> dict:
        return {
            "best_epoch": best,
            "epochs": [{"epoch": e, "iou_per_class": v} for e, v in enumerate(ious)],
        }

    only = run(1, [[0.1, 0.2], [0.3, None]])
    semi = run(0, [[0.5, 0.6], [0.0, 0.0]])
    zero = {"per_class": [{"class_id": 1, "box_iou": 0.7}]}
    table = per_class_table(["a", "b"], zero, only, semi)
    assert table == [
        {
            "class": "a",
            "zero_shot_box_iou": None,
            "labels_only_iou": 0.3,
            "semi_supervised_iou": 0.5,
        },
        {
            "class": "b",
            "zero_shot_box_iou": 0.7,
            "labels_only_iou": None,
            "semi_supervised_iou": 0.6,
        },
    ]


def test_showcase_tiles_are_mostly_valid_and_spread_over_the_classes() -> None:
    # tiles 0-2: edge slivers (a tenth valid) that hold many classes; tiles 3-6 fully valid
    valid_share = np.array([0.1, 0.1, 0.12, 1.0, 0.95, 1.0, 0.92])
    class_share = np.array(
        [
            [0.02, 0.03, 0.03, 0.02],
            [0.03, 0.03, 0.02, 0.02],
            [0.03, 0.03, 0.03, 0.03],
            [0.9, 0.1, 0.0, 0.0],  # classes 0, 1
            [0.95, 0.05, 0.0, 0.0],  # classes 0, 1 again
            [0.0, 0.0, 0.5, 0.5],  # classes 2, 3
            [0.5, 0.0, 0.0, 0.01],  # class 0 (3 is under 2 %)
        ]
    )
    picks = pick_showcase_tiles(valid_share, class_share, count=2)
    assert sorted(picks) == [3, 5]  # every class in two tiles, no sliver
    assert set(pick_showcase_tiles(valid_share, class_share, count=4)) == {3, 4, 5, 6}
    # fewer mostly-valid tiles than asked: the most valid ones
    assert pick_showcase_tiles(valid_share[:3], class_share[:3], count=2) == [2, 0]

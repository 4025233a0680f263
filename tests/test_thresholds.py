"""Adaptive thresholds follow the teacher's confidence per class (hand-made confidence maps)."""

from __future__ import annotations

import pytest
import torch

from semisup.columns import IGNORE_INDEX
from semisup.thresholds import (
    ThresholdSettings,
    class_thresholds,
    initial_statistics,
    pixel_weights,
    update_statistics,
)


def _settings(mode: str, base: float = 0.9, **kwargs: float) -> ThresholdSettings:
    return ThresholdSettings(mode=mode, num_classes=3, base_threshold=base, momentum=0.5, **kwargs)  # type: ignore[arg-type]


def _maps(unsure: float = 0.4, sure: float = 0.97) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 predicted with confidence ``sure``, class 1 with ``unsure``, class 2 at 0.8,
    a strip of nodata (IGNORE_INDEX, confidence 0)."""
    target = torch.zeros(2, 8, 8, dtype=torch.int64)
    target[:, :, 3:6] = 1
    target[:, :, 6:] = 2
    target[:, 0] = IGNORE_INDEX
    confidence = torch.full((2, 8, 8), sure)
    confidence[:, :, 3:6] = unsure
    confidence[:, :, 6:] = 0.8
    confidence[:, 0] = 0.0
    return confidence, target


@pytest.mark.parametrize("mode", ["freematch", "flexmatch"])
def test_a_class_the_teacher_is_unsure_of_gets_a_lower_threshold(mode: str) -> None:
    settings = _settings(mode, base=0.75)  # FlexMatch: classes 0 and 2 have pixels above it
    statistics = initial_statistics(3)
    confidence, target = _maps()
    for _ in range(10):
        update_statistics(statistics, confidence, target, settings)
    cut = class_thresholds(statistics, settings)
    assert cut[1] < cut[2] < cut[0] <= 0.97
    # the confident class keeps its pixels, and the unsure one is not shut out entirely
    weights = pixel_weights(confidence, target, statistics, settings)
    assert weights[target == 0].mean() == 1.0 and weights[target == IGNORE_INDEX].sum() == 0
    if mode == "freematch":
        assert weights[target == 1].mean() == 1.0  # 0.4 passes a threshold scaled to its class


def test_freematch_thresholds_rise_as_the_teacher_grows_confident() -> None:
    settings = _settings("freematch")
    statistics = initial_statistics(3)
    confidence, target = _maps(unsure=0.4, sure=0.5)
    update_statistics(statistics, confidence, target, settings)
    early = class_thresholds(statistics, settings).clone()
    for _ in range(10):
        update_statistics(statistics, *_maps(unsure=0.9, sure=0.99), settings)
    later = class_thresholds(statistics, settings)
    assert (later > early).all()
    assert later[0] == pytest.approx(float(statistics["confidence_mean"]), rel=1e-6)


def test_softmatch_weighs_softly_below_the_mean_confidence() -> None:
    settings = _settings("softmatch")
    statistics = initial_statistics(3)
    confidence, target = _maps()
    for _ in range(10):
        update_statistics(statistics, confidence, target, settings)
    weights = pixel_weights(confidence, target, statistics, settings)
    mean = float(statistics["confidence_mean"])
    assert 0.4 < mean < 0.8  # 0.71: classes 0 and 2 lie above it, class 1 below
    assert weights[target == 0].min() == 1.0 and weights[target == 2].min() == 1.0
    assert 0 < weights[target == 1].max() < 1
    assert weights[target == IGNORE_INDEX].sum() == 0


def test_fixed_and_calibrated_cuts() -> None:
    confidence, target = _maps()
    statistics = initial_statistics(3)
    fixed = pixel_weights(confidence, target, statistics, _settings("fixed"))
    assert torch.equal(fixed.bool(), (confidence > 0.9) & (target != IGNORE_INDEX))
    calibrated = pixel_weights(
        confidence, target, statistics, _settings("calibrated", calibrated_threshold=0.7)
    )
    assert torch.equal(calibrated.bool(), (confidence > 0.7) & (target != IGNORE_INDEX))
    with pytest.raises(ValueError, match="needs the teacher's calibration"):
        pixel_weights(confidence, target, statistics, _settings("calibrated"))


def test_a_step_without_valid_pixels_leaves_the_statistics() -> None:
    statistics = initial_statistics(3)
    before = {k: v.clone() for k, v in statistics.items()}
    empty = torch.full((1, 4, 4), IGNORE_INDEX)
    update_statistics(statistics, torch.zeros(1, 4, 4), empty, _settings("freematch"))
    assert all(torch.equal(before[k], statistics[k]) for k in before)

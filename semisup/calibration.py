"""How often a model's (or teacher's) labels are right at each confidence (pure numpy).

Counts per confidence bin add up over batches, tiles and workers; ``calibration`` turns them
into accuracy per bin, the expected calibration error and the lowest confidence above which the
labels are right a target share of the time. The training loop measures it on the validation
(monitor) tiles every epoch, so a labels-only teacher's run records the threshold a student can
use (``ssl.threshold_mode=calibrated``); ``semisup report`` measures the store's pseudo-labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CALIBRATION_BINS = 20  # equal bins of [0, 1]: 0.05 wide, fine enough near the usual thresholds
TARGET_ACCURACY = 0.9  # the accuracy the calibrated threshold is chosen for


def confidence_bins(
    confidence: np.ndarray, correct: np.ndarray, bins: int = 10
) -> dict[str, np.ndarray]:
    """Per-bin pixel count, correct count and confidence sum over ``bins`` equal bins of [0, 1].

    ``confidence``: N float in [0, 1]; ``correct``: N bool (pseudo-label == ground truth).
    Counts from several batches add up, so callers may accumulate them.
    """
    which = np.clip((np.asarray(confidence, np.float64) * bins).astype(np.int64), 0, bins - 1)
    return {
        "pixels": np.bincount(which, minlength=bins),
        "correct": np.bincount(which, weights=np.asarray(correct, np.float64), minlength=bins),
        "confidence_sum": np.bincount(which, weights=confidence, minlength=bins),
    }


def calibration(
    pixels: np.ndarray, correct: np.ndarray, confidence_sum: np.ndarray, target_accuracy: float
) -> dict[str, Any]:
    """Accuracy per bin, expected calibration error, and the threshold that reaches a target.

    ``suggested_threshold`` is the lowest bin edge t such that pseudo-labels with confidence
    >= t are correct at least ``target_accuracy`` of the time (None if no edge reaches it);
    ``kept_fraction`` is the share of labelled pixels above it.
    """
    bins = len(pixels)
    total = max(int(pixels.sum()), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(pixels > 0, correct / pixels, np.nan)
        mean_confidence = np.where(pixels > 0, confidence_sum / pixels, np.nan)
    ece = float(np.nansum(pixels / total * np.abs(accuracy - mean_confidence)))
    above_pixels = np.cumsum(pixels[::-1])[::-1]  # pixels with confidence >= each bin's edge
    above_correct = np.cumsum(correct[::-1])[::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        above_accuracy = np.where(above_pixels > 0, above_correct / above_pixels, np.nan)
    edges = np.arange(bins) / bins
    reach = np.flatnonzero(above_accuracy >= target_accuracy)
    threshold = float(edges[reach[0]]) if len(reach) else None
    return {
        "bin_edges": edges.tolist(),
        "pixels": pixels.astype(int).tolist(),
        "accuracy": [None if np.isnan(a) else float(a) for a in accuracy],
        "mean_confidence": [None if np.isnan(c) else float(c) for c in mean_confidence],
        "accuracy_above": [None if np.isnan(a) else float(a) for a in above_accuracy],
        "expected_calibration_error": ece,
        "overall_accuracy": float(correct.sum() / total),
        "target_accuracy": target_accuracy,
        "suggested_threshold": threshold,
        "kept_fraction": float(above_pixels[reach[0]] / total) if len(reach) else 0.0,
    }

"""Segmentation metrics from a confusion matrix (pure functions; sums are exact across workers).

A K×K confusion matrix (rows = target class, columns = predicted class) is accumulated over
batches and, in distributed runs, summed across workers before the scores are computed, so the
metrics are those of the whole validation set rather than means of per-batch scores.
"""

from __future__ import annotations

import math

import torch

from semisup.columns import IGNORE_INDEX


def confusion_matrix(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """K×K int64 counts of (target, prediction) over pixels whose target is not IGNORE_INDEX.

    ``prediction``, ``target``: any matching shape of int class ids.
    """
    keep = target != IGNORE_INDEX
    pairs = target[keep].long() * num_classes + prediction[keep].long()
    return torch.bincount(pairs, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores(confusion: torch.Tensor) -> dict[str, float | list[float]]:
    """mIoU, mean Dice, pixel accuracy and per-class IoU/Dice from a confusion matrix.

    Classes with no target pixel and no prediction get NaN per-class scores and are left out of
    the means (the usual convention, e.g. mmsegmentation's ``nanmean``).
    """
    confusion = confusion.double()
    true_positive = confusion.diag()
    target_count = confusion.sum(1)
    predicted_count = confusion.sum(0)
    union = target_count + predicted_count - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.nan)
    dice_denominator = target_count + predicted_count
    dice = torch.where(
        dice_denominator > 0, 2 * true_positive / dice_denominator.clamp(min=1), torch.nan
    )
    total = confusion.sum()
    return {
        "miou": _nanmean(iou),
        "dice": _nanmean(dice),
        "pixel_accuracy": float(true_positive.sum() / total) if total > 0 else math.nan,
        "iou_per_class": iou.tolist(),
        "dice_per_class": dice.tolist(),
    }


def _nanmean(values: torch.Tensor) -> float:
    present = values[~values.isnan()]
    return float(present.mean()) if present.numel() else math.nan


def majority_class_miou(confusion: torch.Tensor) -> float:
    """The mIoU of always predicting the most frequent target class: the floor to beat."""
    num_classes = confusion.shape[0]
    majority = int(confusion.sum(1).argmax())
    constant = torch.zeros_like(confusion)
    constant[:, majority] = confusion.sum(1)
    present = confusion.sum(1) > 0
    iou = scores(constant)["iou_per_class"]
    assert isinstance(iou, list)
    return _nanmean(torch.tensor([iou[k] if present[k] else math.nan for k in range(num_classes)]))

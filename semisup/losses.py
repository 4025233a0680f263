"""Losses of the student: supervised cross-entropy + Dice, and confidence-masked consistency.

All are pure functions of tensors. Shapes: ``logits`` B×K×H×W float; ``target`` B×H×W int64 with
IGNORE_INDEX where a pixel carries no supervision; ``confidence`` B×H×W float in [0, 1].

Every mean is over the pixels of the *global* batch: sums and counts go through a ``Collective``
(``semisup.collective``), so N data-parallel workers compute the loss one worker computes on the
whole batch. The default ``LOCAL`` is one worker.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from semisup.collective import LOCAL, Collective
from semisup.columns import IGNORE_INDEX


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    eps: float = 1.0,
    collective: Collective = LOCAL,
) -> torch.Tensor:
    """Soft multi-class Dice loss over labelled pixels, averaged over classes.

    Intersections and sizes are summed over the global batch before the ratio is taken.

    Classes absent from both target and prediction would give 0/0; ``eps`` (1.0, the usual
    Laplace smoothing of V-Net-style Dice) keeps them at a loss of 0.
    """
    num_classes = logits.shape[1]
    labelled = (target != IGNORE_INDEX).unsqueeze(1)  # B×1×H×W
    probs = logits.float().softmax(1) * labelled
    one_hot = F.one_hot(target.clamp(max=num_classes - 1), num_classes).permute(0, 3, 1, 2)
    one_hot = one_hot.float() * labelled  # B×K×H×W
    intersection = collective.global_sum((probs * one_hot).sum((0, 2, 3)))  # K
    sizes = collective.global_sum(probs.sum((0, 2, 3)) + one_hot.sum((0, 2, 3)))  # K
    return 1.0 - ((2 * intersection + eps) / (sizes + eps)).mean()


def supervised_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    dice_weight: float = 1.0,
    collective: Collective = LOCAL,
) -> dict[str, torch.Tensor]:
    """Cross-entropy (mean over labelled pixels) + ``dice_weight`` × Dice; 0 when none is labelled.

    The graph is kept even then: DDP's gradient hooks need every worker to backpropagate.
    """
    labelled = collective.sum((target != IGNORE_INDEX).sum().float())
    ce_sum = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    ce = collective.global_sum(ce_sum) / labelled.clamp(min=1)
    dice = dice_loss(logits, target, collective=collective)
    return {"loss_sup": ce + dice_weight * dice, "loss_ce": ce, "loss_dice": dice}


def confidence_mask(
    confidence: torch.Tensor,
    target: torch.Tensor,
    threshold: float | torch.Tensor,
) -> torch.Tensor:
    """B×H×W bool: pixels whose target is set and whose confidence exceeds the threshold.

    ``threshold`` is a scalar, or a K-vector of per-class thresholds indexed by the target class.
    """
    has_target = target != IGNORE_INDEX
    if isinstance(threshold, torch.Tensor) and threshold.ndim == 1:
        per_pixel = threshold[target.clamp(max=threshold.numel() - 1)]
        return has_target & (confidence > per_pixel)
    return has_target & (confidence > threshold)


def consistency_loss(
    student_logits: torch.Tensor,
    target: torch.Tensor,
    confidence: torch.Tensor,
    threshold: float | torch.Tensor,
    collective: Collective = LOCAL,
) -> dict[str, torch.Tensor]:
    """Cross-entropy of the student against a target, counted only where confident.

    Averaged over *all* pixels of the global batch (FixMatch's convention), so that a batch with
    few confident pixels contributes little. Returns ``loss_cons`` and ``mask_ratio`` (fraction
    counted).
    """
    mask = confidence_mask(confidence, target, threshold)
    safe_target = torch.where(mask, target, torch.zeros_like(target))
    per_pixel = F.cross_entropy(student_logits.float(), safe_target, reduction="none")
    pixels = collective.sum(torch.tensor(float(mask.numel()), device=mask.device))
    loss = collective.global_sum((per_pixel * mask).sum()) / pixels
    return {"loss_cons": loss, "mask_ratio": collective.sum(mask.float().sum()) / pixels}


def class_balanced_thresholds(
    confidence: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    base_threshold: float,
    collective: Collective = LOCAL,
) -> torch.Tensor:
    """Per-class thresholds scaled by each class's mean confidence (FlexMatch-style).

    A class the teacher is less sure of (typical of rare classes in imbalanced agricultural
    scenes) gets a proportionally lower threshold: t_k = base · c̄_k / max_j c̄_j, where c̄_k is
    the mean confidence of pixels the target assigns to class k (over the global batch). Classes
    not seen keep the base.
    """
    valid = target != IGNORE_INDEX
    sums = torch.bincount(target[valid], weights=confidence[valid].float(), minlength=num_classes)
    sums = collective.sum(sums)
    counts = collective.sum(torch.bincount(target[valid], minlength=num_classes).float())
    means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    if means.max() <= 0:
        return torch.full((num_classes,), base_threshold, device=confidence.device)
    scaled = base_threshold * means / means.max()
    return torch.where(counts > 0, scaled, torch.full_like(scaled, base_threshold))


def ramp_up(step: int, ramp_steps: int) -> float:
    """Sigmoid-shaped ramp from 0 to 1 over ``ramp_steps`` (Laine & Aila 2017: exp(-5(1-t)²))."""
    if ramp_steps <= 0:
        return 1.0
    t = min(max(step / ramp_steps, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)

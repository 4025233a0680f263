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
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft multi-class Dice loss over labelled pixels, averaged over classes.

    Intersections and sizes are summed over the global batch before the ratio is taken.
    ``weight`` (B×H×W in [0, 1]) scales each pixel's part in both sums: a consistency target's
    per-pixel weight, so a pixel half-trusted counts half; None counts every labelled pixel once.

    Classes absent from both target and prediction would give 0/0; ``eps`` (1.0, the usual
    Laplace smoothing of V-Net-style Dice) keeps them at a loss of 0.
    """
    num_classes = logits.shape[1]
    labelled = (target != IGNORE_INDEX).float()  # B×H×W
    if weight is not None:
        labelled = labelled * weight.float()
    labelled = labelled.unsqueeze(1)  # B×1×H×W
    probs = logits.float().softmax(1)
    one_hot = F.one_hot(target.clamp(max=num_classes - 1), num_classes).permute(0, 3, 1, 2)
    one_hot = one_hot.float()  # B×K×H×W
    intersection = collective.global_sum((labelled * probs * one_hot).sum((0, 2, 3)))  # K
    sizes = collective.global_sum((labelled * (probs + one_hot)).sum((0, 2, 3)))  # K
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


def consistency_loss(
    student_logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    valid: torch.Tensor,
    collective: Collective = LOCAL,
    truth: torch.Tensor | None = None,
    dice_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Cross-entropy of the student against a target, each pixel weighted by ``weight``.

    ``weight`` (B×H×W in [0, 1], 0 where the target is not set) comes from
    ``semisup.thresholds.pixel_weights``. The sum is divided by the valid pixels of the global
    batch (``valid``: not nodata, not rotated in from outside the tile), so a batch with few
    confident pixels contributes little (FixMatch's convention, without counting nodata).

    ``dice_weight`` > 0 adds the pixel-weighted soft Dice of the target (``dice_loss``), as the
    labelled term has: Dice weighs a rare class like a common one, which cross-entropy does
    not. It is scaled by ``mask_ratio`` (no gradient through it), so that it too shrinks with
    the share of pixels used instead of taking full strength from a handful of them.

    Returns ``loss_cons``; ``mask_ratio``, the mean weight over valid pixels; ``mask_share``
    (K), the part of it per target class; and, where ``truth`` (the tiles' ground truth,
    IGNORE_INDEX where unknown) is given, ``pseudo_correct`` and ``pseudo_judged``: the weight on
    pixels whose target equals the truth, and on pixels with a truth, per valid pixel (their
    ratio is the weight-weighted accuracy of the targets).
    """
    num_classes = student_logits.shape[1]
    weight = weight.float() * valid
    safe_target = torch.where(weight > 0, target, torch.zeros_like(target))
    per_pixel = F.cross_entropy(student_logits.float(), safe_target, reduction="none")
    pixels = collective.sum(valid.sum().float()).clamp(min=1)
    shares = torch.bincount(
        safe_target[weight > 0], weights=weight[weight > 0], minlength=num_classes
    )
    parts = {
        "loss_cons": collective.global_sum((per_pixel * weight).sum()) / pixels,
        "mask_ratio": collective.sum(weight.sum()) / pixels,
        "mask_share": collective.sum(shares[:num_classes]) / pixels,
    }
    if dice_weight > 0:
        dice = dice_loss(student_logits, safe_target, collective=collective, weight=weight)
        parts["loss_cons_dice"] = dice
        parts["loss_cons"] = parts["loss_cons"] + dice_weight * parts["mask_ratio"].detach() * dice
    if truth is not None:
        judged = weight * (truth != IGNORE_INDEX)
        correct = judged * (truth == target)
        parts["pseudo_correct"] = collective.sum(correct.sum()) / pixels
        parts["pseudo_judged"] = collective.sum(judged.sum()) / pixels
    return parts


def ramp_up(step: int, ramp_steps: int) -> float:
    """Sigmoid-shaped ramp from 0 to 1 over ``ramp_steps`` (Laine & Aila 2017: exp(-5(1-t)²))."""
    if ramp_steps <= 0:
        return 1.0
    t = min(max(step / ramp_steps, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)

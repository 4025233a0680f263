"""Turning SAM masks into per-pixel pseudo-labels and confidences (pure tensor functions).

SAM's mask decoder gives, per prompt, mask logits (threshold 0) and a predicted IoU. The teacher
modes reduce those to one map per tile:

- automatic: filter masks by predicted IoU, stability and area, then paint them into an
  instance map (0 = background) and a foreground map;
- prompted: one mask per box/point prompt, painted the same way, instance id = prompt index + 1;
- semantic: class probabilities -> argmax label and max-probability confidence, optionally
  refined by SAM's automatic segments.

Every function is Ray-free and SAM-free, so it is tested on hand-made tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.utils.amg import calculate_stability_score

from semisup.columns import IGNORE_INDEX


@dataclass(frozen=True)
class MaskFilter:
    """Which automatic masks to keep. Defaults are SamAutomaticMaskGenerator's."""

    min_predicted_iou: float = 0.88
    min_stability: float = 0.95
    stability_offset: float = 1.0  # logit offset of the stability score
    min_area_px: int = 16
    max_area_fraction: float = 0.95  # a mask covering nearly the whole tile is background


def keep_masks(
    logits: torch.Tensor, predicted_iou: torch.Tensor, rules: MaskFilter
) -> torch.Tensor:
    """Boolean keep-vector over masks.

    ``logits``: N×H×W float mask logits (SAM's threshold is 0); ``predicted_iou``: N float.
    """
    if logits.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=logits.device)
    stability = calculate_stability_score(logits, 0.0, rules.stability_offset)
    area = (logits > 0).flatten(1).sum(1)
    tile_area = logits.shape[-1] * logits.shape[-2]
    return (
        (predicted_iou >= rules.min_predicted_iou)
        & (stability >= rules.min_stability)
        & (area >= rules.min_area_px)
        & (area <= rules.max_area_fraction * tile_area)
    )


def paint_instances(
    logits: torch.Tensor, scores: torch.Tensor, background_confidence: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint masks into one instance map; where masks overlap, the higher-scoring one wins.

    ``logits``: N×H×W mask logits; ``scores``: N in [0, 1] (predicted IoU).
    Returns ``instances`` H×W int64 (0 = background, k = mask k-1) and ``confidence`` H×W
    float32 in [0, 1]: the winning mask's score times its pixel probability, or, on background,
    ``background_confidence`` times the probability that no mask covers the pixel.
    """
    n, height, width = logits.shape
    instances = torch.zeros(height, width, dtype=torch.int64, device=logits.device)
    confidence = torch.full((height, width), background_confidence, device=logits.device)
    if n == 0:
        return instances, confidence
    probs = torch.sigmoid(logits.float())
    # Painting in ascending score order lets each higher-scoring mask overwrite lower ones.
    for k in torch.argsort(scores.float()).tolist():
        inside = logits[k] > 0
        instances[inside] = k + 1
        confidence[inside] = scores[k].float().clamp(0, 1) * probs[k][inside]
    background = instances == 0
    uncovered = 1.0 - probs.max(0).values  # H×W: probability that no mask covers the pixel
    confidence[background] = background_confidence * uncovered[background]
    return instances, confidence.clamp(0, 1)


def foreground(instances: torch.Tensor) -> torch.Tensor:
    """H×W uint8: 1 where any mask was painted, 0 on background."""
    return (instances > 0).to(torch.uint8)


def probabilities_to_label(class_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantic teacher: ``class_probs`` K×H×W (softmax output) -> (label H×W int64, confidence)."""
    confidence, label = class_probs.float().max(0)
    return label, confidence


def refine_with_segments(
    label: torch.Tensor, confidence: torch.Tensor, segments: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Let each SAM segment take the majority class of its pixels.

    ``label``: H×W int64 class ids (IGNORE_INDEX pixels do not vote); ``confidence``: H×W in
    [0, 1]; ``segments``: H×W int64, 0 = no segment. Inside a segment every pixel gets the
    majority class, and its confidence is the segment's mean confidence times the vote share of
    that class: a split vote lowers confidence. Pixels outside segments are unchanged.
    """
    segment_count = int(segments.max()) + 1
    voting = (segments > 0) & (label != IGNORE_INDEX)
    flat = segments[voting] * num_classes + label[voting]  # one bin per (segment, class)
    votes = torch.bincount(flat, minlength=segment_count * num_classes)
    votes = votes.reshape(segment_count, num_classes).float()  # S×K
    total = votes.sum(1)
    share, majority = (votes / total.clamp(min=1)[:, None]).max(1)  # S, S
    conf_sum = torch.bincount(
        segments[voting], weights=confidence[voting].float(), minlength=segment_count
    )
    mean_conf = conf_sum / total.clamp(min=1)
    refined_label, refined_conf = label.clone(), confidence.clone().float()
    inside = (segments > 0) & (total[segments] > 0)
    refined_label[inside] = majority[segments[inside]]
    refined_conf[inside] = (mean_conf * share)[segments[inside]]
    return refined_label, refined_conf


def mask_unconfident(
    label: torch.Tensor, confidence: torch.Tensor, threshold: float
) -> torch.Tensor:
    """``label`` with IGNORE_INDEX wherever ``confidence`` is not above ``threshold``."""
    return torch.where(confidence > threshold, label, torch.full_like(label, IGNORE_INDEX))

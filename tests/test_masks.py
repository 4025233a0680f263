"""Mask-to-label conversion on hand-made masks, without SAM."""

from __future__ import annotations

import torch

from semisup.columns import IGNORE_INDEX
from semisup.masks import (
    MaskFilter,
    foreground,
    keep_masks,
    mask_unconfident,
    paint_instances,
    probabilities_to_label,
    refine_with_segments,
)


def _square_logits(size: int, y0: int, x0: int, side: int, sharp: float = 20.0) -> torch.Tensor:
    logits = torch.full((size, size), -sharp)
    logits[y0 : y0 + side, x0 : x0 + side] = sharp
    return logits


def test_keep_masks_applies_iou_stability_and_area_rules() -> None:
    sharp = _square_logits(32, 0, 0, 10)
    blurry = _square_logits(32, 0, 0, 10, sharp=0.5)  # flips with a ±1 logit offset: unstable
    tiny = _square_logits(32, 5, 5, 2)
    whole = _square_logits(32, 0, 0, 32)
    logits = torch.stack([sharp, sharp, blurry, tiny, whole])
    iou = torch.tensor([0.95, 0.5, 0.95, 0.95, 0.95])
    keep = keep_masks(logits, iou, MaskFilter(min_area_px=16))
    assert keep.tolist() == [True, False, False, False, False]
    assert keep_masks(torch.zeros(0, 8, 8), torch.zeros(0), MaskFilter()).shape == (0,)


def test_overlaps_go_to_the_higher_score_and_confidence_is_in_range() -> None:
    a = _square_logits(16, 0, 0, 8)
    b = _square_logits(16, 4, 4, 8)
    instances, confidence = paint_instances(torch.stack([a, b]), torch.tensor([0.9, 0.7]))
    assert instances.dtype == torch.int64 and instances.shape == (16, 16)
    assert instances[5, 5] == 1  # overlap: mask 0 scores higher
    assert instances[10, 10] == 2 and instances[15, 0] == 0
    assert torch.isclose(confidence[5, 5], torch.tensor(0.9), atol=1e-4)
    assert torch.isclose(confidence[10, 10], torch.tensor(0.7), atol=1e-4)
    assert confidence.min() >= 0 and confidence.max() <= 1
    assert foreground(instances).sum() == (instances > 0).sum()


def test_no_masks_gives_background_everywhere() -> None:
    instances, confidence = paint_instances(torch.zeros(0, 8, 8), torch.zeros(0), 0.3)
    assert (instances == 0).all() and torch.allclose(confidence, torch.full((8, 8), 0.3))


def test_semantic_argmax_and_confidence() -> None:
    probs = torch.tensor([[[0.7, 0.2]], [[0.3, 0.8]]])  # K=2, H=1, W=2
    label, confidence = probabilities_to_label(probs)
    assert label.tolist() == [[0, 1]]
    assert torch.allclose(confidence, torch.tensor([[0.7, 0.8]]))


def test_segment_refinement_takes_majority_and_lowers_split_votes() -> None:
    label = torch.tensor([[0, 0, 1, 2], [0, 1, 2, 2]])
    confidence = torch.full((2, 4), 0.8)
    segments = torch.tensor([[1, 1, 1, 0], [1, 1, 2, 2]])
    refined, refined_conf = refine_with_segments(label, confidence, segments, num_classes=3)
    # segment 1: classes 0,0,1,0,1 -> majority 0 with share 3/5; segment 2: all class 2
    assert refined.tolist() == [[0, 0, 0, 2], [0, 0, 2, 2]]
    assert torch.allclose(refined_conf[0, 0], torch.tensor(0.8 * 3 / 5))
    assert torch.allclose(refined_conf[1, 3], torch.tensor(0.8))
    assert refined_conf[0, 3] == 0.8  # outside every segment: unchanged


def test_ignored_pixels_do_not_vote_and_unconfident_pixels_are_ignored() -> None:
    label = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1]])
    refined, _ = refine_with_segments(
        label, torch.ones(1, 3), torch.ones(1, 3, dtype=torch.int64), 2
    )
    assert refined.tolist() == [[1, 1, 1]]
    masked = mask_unconfident(torch.tensor([3, 4]), torch.tensor([0.96, 0.5]), 0.95)
    assert masked.tolist() == [3, IGNORE_INDEX]

"""Uncertainty maps and tile pooling on hand-made probability maps."""

from __future__ import annotations

import math

import pytest
import torch

from semisup import columns as C
from semisup import uncertainty


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("num_classes", [2, 5])
def test_uniform_map_is_maximal_and_one_hot_map_is_zero(num_classes: int) -> None:
    uniform = torch.full((2, num_classes, 4, 4), 1.0 / num_classes)
    one_hot = _one_hot(torch.randint(0, num_classes, (2, 4, 4)), num_classes)
    for measure in (uncertainty.entropy_map, uncertainty.margin_map):
        assert torch.allclose(measure(uniform), torch.ones(2, 4, 4), atol=1e-5)
        assert torch.allclose(measure(one_hot), torch.zeros(2, 4, 4), atol=1e-5)
        # any other distribution lies strictly between
        mixed = torch.softmax(torch.randn(2, num_classes, 4, 4) * 3, dim=1)
        values = measure(mixed)
        assert values.shape == (2, 4, 4) and (values >= 0).all() and (values <= 1).all()


def test_entropy_and_margin_values() -> None:
    p = torch.tensor([0.7, 0.2, 0.1]).view(1, 3, 1, 1)
    expected = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)
    assert uncertainty.entropy_map(p).item() == pytest.approx(expected, rel=1e-5)
    assert uncertainty.margin_map(p).item() == pytest.approx(1 - (0.7 - 0.2), rel=1e-5)


def test_disagreement_with_the_teacher_label() -> None:
    probs = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1).expand(1, 2, 1, 3).contiguous()
    reference = torch.tensor([[[0, 1, C.IGNORE_INDEX]]])
    values = uncertainty.disagreement_map(probs, reference)
    assert values[0, 0].tolist() == pytest.approx([0.1, 0.9, 0.0])
    # a student that is sure of the teacher's class has nothing to disagree about
    sure = _one_hot(torch.tensor([[[1, 0, 1]]]), 2)
    assert uncertainty.disagreement_map(sure, torch.tensor([[[1, 0, 1]]])).abs().max() == 0


def test_tta_disagreement_is_zero_for_an_equivariant_model_and_high_for_a_biased_one() -> None:
    image = torch.rand(2, 3, 8, 8)

    def equivariant(x: torch.Tensor) -> torch.Tensor:  # logits from the pixels themselves
        return torch.stack([x[:, 0], x[:, 1] * 2, x[:, 2]], 1) * 5

    views = uncertainty.tta_probabilities(equivariant, image)
    assert views.shape == (len(uncertainty.TTA_VIEWS), 2, 3, 8, 8)
    assert uncertainty.tta_disagreement_map(views).abs().max() < 1e-5

    def left_half_is_class_0(x: torch.Tensor) -> torch.Tensor:  # depends on the image frame
        logits = torch.zeros(x.shape[0], 3, *x.shape[-2:])
        logits[:, 0, :, : x.shape[-1] // 2] = 20
        logits[:, 1, :, x.shape[-1] // 2 :] = 20
        return logits

    biased = uncertainty.tta_disagreement_map(
        uncertainty.tta_probabilities(left_half_is_class_0, image)
    )
    assert biased.mean() > 0.3 and biased.max() <= 1.0
    # views that each put all mass on a different class disagree maximally
    distinct = _one_hot(torch.arange(3).view(3, 1, 1).expand(3, 2, 2), 3).unsqueeze(1)
    assert torch.allclose(uncertainty.tta_disagreement_map(distinct), torch.ones(1, 2, 2))


def test_pooling_uses_valid_pixels_and_top_fraction() -> None:
    pixel_scores = torch.tensor([[[0.0, 0.2], [0.4, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
    valid = torch.tensor([[[True, True], [True, False]], [[False, False], [False, False]]])
    scores = uncertainty.pool_tile_scores(pixel_scores, valid)
    assert scores.tolist() == pytest.approx([0.2, 0.0])  # the invalid 1.0 does not count
    top = uncertainty.pool_tile_scores(
        pixel_scores, valid, top_fraction=0.34
    )  # 2 of 3 valid pixels
    assert top.tolist() == pytest.approx([0.3, 0.0])
    with pytest.raises(ValueError, match="top_fraction"):
        uncertainty.pool_tile_scores(pixel_scores, valid, top_fraction=0)

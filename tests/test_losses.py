"""Losses and the EMA teacher, on hand-made tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from semisup.columns import IGNORE_INDEX
from semisup.ema import ema_update, make_ema_teacher
from semisup.losses import (
    consistency_loss,
    dice_loss,
    ramp_up,
    supervised_loss,
)


def _logits_for(target: torch.Tensor, num_classes: int, scale: float = 30.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(target, num_classes).permute(0, 3, 1, 2).float() * scale


ALL_VALID = torch.ones(2, 8, 8, dtype=torch.bool)


def test_consistency_loss_is_zero_when_student_equals_target() -> None:
    target = torch.randint(0, 4, (2, 8, 8))
    out = consistency_loss(_logits_for(target, 4), target, torch.ones(2, 8, 8), ALL_VALID)
    assert out["loss_cons"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["mask_ratio"].item() == 1.0
    assert out["mask_share"].sum().item() == pytest.approx(1.0)


def test_fully_unconfident_target_contributes_nothing() -> None:
    target = torch.randint(0, 4, (2, 8, 8))
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = consistency_loss(logits, target, torch.zeros(2, 8, 8), ALL_VALID)
    assert out["loss_cons"].item() == 0.0 and out["mask_ratio"].item() == 0.0
    out["loss_cons"].backward()
    assert logits.grad is not None and (logits.grad == 0).all()


def test_consistency_weighs_pixels_over_the_valid_ones_only() -> None:
    target = torch.zeros(1, 1, 3, dtype=torch.int64)
    logits = torch.zeros(1, 3, 1, 3)  # uniform prediction: CE = ln 3 per pixel
    weight = torch.tensor([[[1.0, 0.5, 0.0]]])
    valid = torch.tensor([[[True, True, False]]])  # the third pixel is nodata
    out = consistency_loss(logits, target, weight, valid)
    assert out["mask_ratio"].item() == pytest.approx(0.75)  # (1 + 0.5) / 2 valid pixels
    assert out["loss_cons"].item() == pytest.approx(1.5 * torch.log(torch.tensor(3.0)).item() / 2)
    assert out["mask_share"].tolist() == pytest.approx([0.75, 0.0, 0.0])


def test_consistency_dice_weighs_pixels_and_scales_with_the_share_used() -> None:
    target = torch.tensor([[[0, 0, 0, 1]]])  # class 1 is rare
    logits = torch.zeros(1, 2, 1, 4)  # uniform prediction: p = 0.5 everywhere
    weight = torch.tensor([[[1.0, 1.0, 0.0, 0.5]]])
    valid = torch.ones(1, 1, 4, dtype=torch.bool)
    plain = consistency_loss(logits, target, weight, valid)
    out = consistency_loss(logits, target, weight, valid, dice_weight=2.0)
    # weighted sums: class 0 has p·y = 0.5 + 0.5, sizes (0.5 + 1)·2 + 0.5·0.5; class 1
    # p·y = 0.25, sizes 0.5·2 + (0.5 + 1)·0.5; the third pixel (weight 0) is left out
    dice = 1 - ((2 * 1.0 + 1) / (3.25 + 1) + (2 * 0.25 + 1) / (1.75 + 1)) / 2
    assert out["loss_cons_dice"].item() == pytest.approx(dice)
    assert out["mask_ratio"].item() == pytest.approx(2.5 / 4)
    expected = plain["loss_cons"].item() + 2.0 * (2.5 / 4) * dice
    assert out["loss_cons"].item() == pytest.approx(expected)
    assert "loss_cons_dice" not in plain  # off by default: cross-entropy only


def test_consistency_dice_pulls_a_rare_class_harder_than_cross_entropy() -> None:
    target = torch.zeros(1, 1, 64, dtype=torch.int64)
    target[..., 0] = 1  # one pixel of class 1 in 64
    weight, valid = torch.ones(1, 1, 64), torch.ones(1, 1, 64, dtype=torch.bool)
    grads = []
    for dice_weight in (0.0, 1.0):
        logits = torch.zeros(1, 2, 1, 64, requires_grad=True)
        consistency_loss(logits, target, weight, valid, dice_weight=dice_weight)[
            "loss_cons"
        ].backward()
        assert logits.grad is not None
        grads.append(-logits.grad[0, 1, 0, 0].item())  # pull towards class 1 on its pixel
    assert grads[1] > 2 * grads[0] > 0


def test_pseudo_accuracy_weighs_the_targets_against_the_truth() -> None:
    target = torch.tensor([[[0, 1, 2, 2]]])
    truth = torch.tensor([[[0, 2, 2, IGNORE_INDEX]]])
    weight = torch.tensor([[[1.0, 1.0, 0.5, 1.0]]])
    out = consistency_loss(
        torch.zeros(1, 3, 1, 4), target, weight, torch.ones(1, 1, 4, dtype=torch.bool), truth=truth
    )
    # judged: pixels with a truth (weights 1 + 1 + 0.5); right: pixels 0 and 2 (1 + 0.5)
    assert (out["pseudo_correct"] / out["pseudo_judged"]).item() == pytest.approx(1.5 / 2.5)


def test_supervised_loss_ignores_unlabelled_pixels() -> None:
    target = torch.randint(0, 3, (2, 8, 8))
    perfect = supervised_loss(_logits_for(target, 3), target)
    assert perfect["loss_ce"].item() == pytest.approx(0.0, abs=1e-6)
    assert perfect["loss_dice"].item() == pytest.approx(0.0, abs=1e-4)
    wrong = (target + 1) % 3
    corrupted = target.clone()
    corrupted[:, :4] = IGNORE_INDEX  # the ignored half may be predicted anything
    logits = _logits_for(target, 3)
    logits[:, :, :4] = _logits_for(wrong, 3)[:, :, :4]
    assert supervised_loss(logits, corrupted)["loss_sup"].item() == pytest.approx(0.0, abs=1e-4)
    assert supervised_loss(logits, target)["loss_sup"].item() > 1.0
    nothing = supervised_loss(torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), IGNORE_INDEX))
    assert nothing["loss_sup"].item() == 0.0


def test_dice_is_between_zero_and_one() -> None:
    target = torch.randint(0, 3, (2, 8, 8))
    value = dice_loss(torch.randn(2, 3, 8, 8), target).item()
    assert 0.0 < value < 1.0


def test_ramp_up_is_monotone_and_reaches_one() -> None:
    values = [ramp_up(step, 100) for step in range(0, 151, 10)]
    assert values == sorted(values) and values[0] < 0.01 and values[-1] == 1.0
    assert ramp_up(5, 0) == 1.0


def test_ema_averages_parameters_and_buffers() -> None:
    student = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    teacher = make_ema_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(4, 1, 3, 3) + 5)  # moves BatchNorm running stats
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, momentum=0.75)
    student_state = student.state_dict()
    for name, value in teacher.state_dict().items():
        if value.dtype.is_floating_point:
            expected = 0.75 * before[name] + 0.25 * student_state[name]
            assert torch.allclose(value, expected), name
        else:
            assert torch.equal(value, student_state[name]), name
    assert not torch.equal(teacher[1].running_mean, before["1.running_mean"])
    with pytest.raises(ValueError, match="momentum"):
        ema_update(teacher, student, 1.5)

"""The Faster R-CNN student: both backbones, fine-tuning modes, checkpoints (saved here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semisup.detection.model import (
    DetectorCheckpointError,
    body_stages,
    build_detector,
    load_detector_checkpoint,
    set_trainable,
    train_mode,
)

MOBILE = "fasterrcnn_mobilenet_v3_large_fpn"
RESNET = "fasterrcnn_resnet50_fpn_v2"


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def mobile() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(2, arch=MOBILE, finetune="full", tile_size=128)


def test_a_training_step_gives_every_loss_and_eval_gives_boxes(mobile: torch.nn.Module) -> None:
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[0.0, 0.0, 30.0, 30.0], [60, 60, 120, 100]]),
            "labels": torch.tensor([2, 1]),
        },
    ]
    losses = train_mode(mobile)(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    mobile.eval()
    with torch.no_grad():
        out = mobile(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "labels", "scores"}
    assert out[0]["boxes"].shape[1] == 4 and (out[0]["labels"] >= 1).all()  # 0 is background


def test_fine_tuning_modes_choose_what_trains(mobile: torch.nn.Module) -> None:
    set_trainable(mobile, "head")
    head = _trainable(mobile)
    assert head and not any(n.startswith("backbone.") for n in head)
    assert any(n.startswith("rpn.") for n in head) and any(n.startswith("roi_heads.") for n in head)
    stages = body_stages(mobile.backbone.body)
    assert len(stages) == 6 and stages[0] == ["16"] and stages[-1] == ["0", "1"]  # torchvision's
    set_trainable(mobile, "backbone_layers", 1)
    body = {n.split(".")[2] for n in _trainable(mobile) if n.startswith("backbone.body.")}
    assert body == set(stages[0]) and any(n.startswith("backbone.fpn.") for n in _trainable(mobile))
    set_trainable(mobile, "backbone_layers", 0)
    assert not any(n.startswith("backbone.body.") for n in _trainable(mobile))
    with pytest.raises(ValueError, match="expected 0..6"):
        set_trainable(mobile, "backbone_layers", 7)
    set_trainable(mobile, "full")
    assert _trainable(mobile) == {n for n, _ in mobile.named_parameters()}


def test_resnet_stages_and_frozen_batch_norms_stay_put() -> None:
    torch.manual_seed(0)
    model = build_detector(
        1, arch=RESNET, finetune="backbone_layers", trainable_backbone_layers=2, tile_size=64
    )
    body = {n.split(".")[2] for n in _trainable(model) if n.startswith("backbone.body.")}
    assert body == {"layer4", "layer3"}
    frozen_bn = model.backbone.body.layer1[0].bn1
    before = frozen_bn.running_mean.clone()
    train_mode(model)(
        [torch.rand(3, 64, 64)],
        [{"boxes": torch.tensor([[4.0, 4, 40, 40]]), "labels": torch.tensor([1])}],
    )
    assert not frozen_bn.training and torch.equal(frozen_bn.running_mean, before)
    assert model.backbone.body.layer4[0].bn1.training  # a trained stage's norm still learns


def test_checkpoints_load_with_weights_only(mobile: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "detector.pth"
    torch.save({"model": mobile.state_dict(), "epoch": 3}, path)  # the reference scripts' layout
    again = build_detector(2, arch=MOBILE, checkpoint=path, tile_size=128)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in mobile.state_dict().items())
    # a detector of other classes: all but the box predictor loads, the predictor fits this task
    other = build_detector(5, arch=MOBILE, checkpoint=path, tile_size=128)
    assert other.roi_heads.box_predictor.cls_score.out_features == 6
    key = "backbone.body.0.0.weight"
    assert torch.equal(other.state_dict()[key], mobile.state_dict()[key])
    with pytest.raises(DetectorCheckpointError, match=r"has shape .* \(another arch\?\)"):
        load_detector_checkpoint(build_detector(2, arch=RESNET, tile_size=64), path)
    state = mobile.state_dict()
    torch.save({k: v for k, v in state.items() if "rpn" not in k}, tmp_path / "partial.pth")
    with pytest.raises(DetectorCheckpointError, match="missing key 'rpn."):
        load_detector_checkpoint(mobile, tmp_path / "partial.pth")
    torch.save({"model": mobile}, tmp_path / "pickled.pth")  # a whole module: refused unread
    with pytest.raises(DetectorCheckpointError, match="cannot load"):
        load_detector_checkpoint(mobile, tmp_path / "pickled.pth")
    with pytest.raises(DetectorCheckpointError, match="no such file"):
        load_detector_checkpoint(mobile, tmp_path / "absent.pth")

"""The detection student's step on real NEON crown tiles: it learns the labeled boxes, and on
unlabeled tiles learns only classification from the EMA teacher's pseudo-boxes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from semisup.detection.model import build_detector
from semisup.detection.steps import (
    BoxBatch,
    DetectionRecipe,
    detection_losses,
    detection_step,
    pseudo_boxes,
    union_nms,
)
from semisup.ema import make_ema_teacher
from semisup.tile_boxes import boxes_in_tile

SIZE = 128


@pytest.fixture(scope="module")
def crowns(shared_data: Path) -> BoxBatch:
    """Two 128 px tiles of OSBS_029.tif with their crowns (one class, id 1)."""
    import rasterio

    neon = shared_data / "neon_trees"
    with rasterio.open(neon / "OSBS_029.tif") as src:
        raster = src.read((1, 2, 3)).astype(np.float32) / 255
    rows = list(csv.DictReader((neon / "OSBS_029.csv").open()))
    boxes = np.array([[float(r[c]) for c in ("xmin", "ymin", "xmax", "ymax")] for r in rows])
    images, tile_boxes = [], []
    for y0, x0 in ((0, 0), (128, 128)):
        images.append(raster[:, y0 : y0 + SIZE, x0 : x0 + SIZE])
        tile_boxes.append(torch.from_numpy(boxes_in_tile(boxes, y0, x0, SIZE, 2, 0.5)[0]))
    assert all(len(b) for b in tile_boxes)
    return BoxBatch(
        torch.from_numpy(np.stack(images)),
        tile_boxes,
        [torch.ones(len(b), dtype=torch.int64) for b in tile_boxes],
    )


def test_steps_learn_the_crowns_and_move_the_teacher(crowns: BoxBatch) -> None:
    torch.manual_seed(0)
    model = build_detector(
        1, arch="fasterrcnn_mobilenet_v3_large_fpn", finetune="full", tile_size=SIZE
    )
    teacher = make_ema_teacher(model)
    before = teacher.roi_heads.box_predictor.cls_score.weight.clone()
    # at 1e-3 the classifier loss bounced (0.3 to 0.7 by step 7, and on 1 thread otherwise
    # than on 2); at 3e-4 it falls and stays down on either
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    recipe = DetectionRecipe(ema_momentum=0.9)
    losses = [
        float(
            detection_step(
                model, optimizer, crowns, None, teacher=teacher, recipe=recipe, step=step
            )["loss_classifier"]
        )
        for step in range(8)
    ]
    assert np.mean(losses[4:]) < 0.6 * losses[0], losses  # the last four steps against the first
    assert not torch.equal(teacher.roi_heads.box_predictor.cls_score.weight, before)


def _assert_classification_only(model: torch.nn.Module, parts: dict[str, torch.Tensor]) -> None:
    """The unlabeled losses reach the classifier and not the box regression."""
    model.zero_grad()
    (parts["loss_classifier_unlabeled"] + parts["loss_objectness_unlabeled"]).backward()
    predictor = model.roi_heads.box_predictor
    assert predictor.cls_score.weight.grad.abs().sum() > 0
    assert (
        predictor.bbox_pred.weight.grad is None or predictor.bbox_pred.weight.grad.abs().sum() == 0
    )


def test_pseudo_boxes_teach_classification_only(crowns: BoxBatch) -> None:
    torch.manual_seed(0)
    model = build_detector(
        1,
        arch="fasterrcnn_mobilenet_v3_large_fpn",
        finetune="full",
        tile_size=SIZE,
        score_threshold=0.0,
    )
    teacher = make_ema_teacher(model)
    boxes, labels, scores = pseudo_boxes(teacher, crowns.images, 0.0)
    assert sum(len(b) for b in boxes) > 0 and all((s >= 0).all() for s in scores)
    cut = float(torch.cat(scores).max())
    _, _, kept = pseudo_boxes(teacher, crowns.images, cut)
    assert 0 < sum(len(k) for k in kept) == int((torch.cat(scores) >= cut).sum())
    recipe = DetectionRecipe(pseudo_score=0.0, ramp_up_steps=0)
    parts = detection_losses(model, crowns, crowns.images, teacher=teacher, recipe=recipe, step=0)
    assert "loss_box_reg_unlabeled" not in parts and float(parts["pseudo_boxes"]) > 0
    _assert_classification_only(model, parts)
    value = {name: float(part.detach()) for name, part in parts.items()}
    supervised = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
    assert value["loss"] == pytest.approx(
        sum(value[k] for k in supervised)
        + 4.0 * (value["loss_classifier_unlabeled"] + value["loss_objectness_unlabeled"]),
        rel=1e-5,
    )


def test_sam_pseudo_boxes_teach_classification_without_a_teacher(crowns: BoxBatch) -> None:
    """``target: pseudo``: the unlabeled tiles' boxes are SAM's (here the crowns themselves,
    scored 0.9), learnt by classification only, with no EMA teacher at all."""
    torch.manual_seed(0)
    model = build_detector(
        1, arch="fasterrcnn_mobilenet_v3_large_fpn", finetune="full", tile_size=SIZE
    )
    sam = BoxBatch(
        crowns.images,
        crowns.boxes,
        crowns.labels,
        [torch.full((len(b),), 0.9) for b in crowns.boxes],
    )
    recipe = DetectionRecipe(target="pseudo", ramp_up_steps=0)
    parts = detection_losses(model, crowns, sam, teacher=None, recipe=recipe, step=0)
    assert torch.isfinite(parts["loss"]) and float(parts["loss_classifier_unlabeled"].detach()) > 0
    # every crown box survives the weak view, and most the strong one
    total = sum(len(b) for b in crowns.boxes)
    assert 0.5 * total / 2 <= float(parts["pseudo_boxes"]) <= total / 2
    _assert_classification_only(model, parts)
    empty = BoxBatch(
        crowns.images,
        [torch.zeros(0, 4)] * 2,
        [torch.zeros(0, dtype=torch.int64)] * 2,
        [torch.zeros(0)] * 2,
    )
    none = detection_losses(model, crowns, empty, teacher=None, recipe=recipe, step=0)
    assert float(none["pseudo_boxes"]) == 0  # no SAM box, no pseudo-box: nothing invented
    both = DetectionRecipe(target="both", ramp_up_steps=0, pseudo_score=0.0)
    joined = detection_losses(
        model, crowns, sam, teacher=make_ema_teacher(model), recipe=both, step=0
    )
    assert torch.isfinite(joined["loss"]) and float(joined["pseudo_boxes"]) > 0


def test_both_keeps_the_union_of_sam_and_teacher_boxes_once() -> None:
    sam = (
        torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]]),
        torch.tensor([1, 1]),
        torch.tensor([0.9, 0.8]),
    )
    teacher = (
        torch.tensor([[1.0, 0, 10, 10], [20, 20, 30, 30]]),
        torch.tensor([1, 1]),
        torch.tensor([0.95, 0.7]),
    )
    boxes, labels = union_nms(sam, teacher, 0.5)
    # the two near-equal boxes are one (the teacher's, higher score); the others stay
    assert boxes.tolist() == [[1, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]]
    assert labels.tolist() == [1, 1, 1]
    other_class = (teacher[0], torch.tensor([2, 2]), teacher[2])
    assert len(union_nms(sam, other_class, 0.5)[0]) == 4  # NMS is class-wise

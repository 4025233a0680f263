"""One training step of the detection student (Ray-free, torch only).

Labeled tiles train Faster R-CNN on a weak view with all four of its losses. Unlabeled tiles
follow Unbiased Teacher (Liu et al., 2021):
- the EMA teacher detects on the weak view; detections scoring at least ``pseudo_score``
  become pseudo-boxes (0.7 in Unbiased Teacher);
- the student sees a strong view of the same tiles (rotation and scale move the pseudo-boxes,
  colour changes the image);
- only the classification losses (the RPN's objectness and the box head's classifier) learn
  from pseudo-boxes: a detector's score says nothing about how well a box fits, so regressing to
  pseudo-box coordinates would teach the teacher's localisation errors.

The pseudo-boxes may instead come offline, from SAM's instances (``DetectionRecipe.target``, as
``ssl.target`` for masks): ``pseudo`` trains on them alone, ``both`` on their union with the EMA
teacher's, reduced by class-wise NMS (SAM boxes scored by their predicted IoU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import batched_nms

from semisup.config import AugmentConfig
from semisup.detection.box_augment import BoxView, strong_box_view, weak_box_view
from semisup.detection.model import train_mode
from semisup.ema import ema_update
from semisup.losses import ramp_up

UNLABELED_LOSSES = ("loss_objectness", "loss_classifier")  # no box regression on pseudo-boxes


@dataclass(frozen=True)
class DetectionRecipe:
    """What a detection step optimises (Unbiased Teacher's defaults where it has them)."""

    augment: AugmentConfig = AugmentConfig()
    pseudo_score: float = 0.7  # teacher detections at least this confident become pseudo-boxes
    unlabeled_weight: float = 4.0  # Unbiased Teacher's λ_u
    ramp_up_steps: int = 200
    ema_momentum: float = 0.9996  # Unbiased Teacher's teacher momentum
    target: str = "ema"  # pseudo-boxes: "ema" teacher, "pseudo" SAM's, "both" (module doc)
    nms_iou: float = 0.5  # "both": class-wise NMS of the union (torchvision's detector NMS)


@dataclass(frozen=True)
class BoxBatch:
    """Tiles with their boxes: ``images`` B×3×S×S in [0, 1]; per tile ``boxes`` N×4 pixel-edge
    xyxy and ``labels`` N class ids ≥ 1 (0 is Faster R-CNN's background); ``scores`` N in [0, 1]
    per tile for pseudo-boxes (None for the truth)."""

    images: torch.Tensor
    boxes: Sequence[torch.Tensor]
    labels: Sequence[torch.Tensor]
    scores: Sequence[torch.Tensor] | None = None


def targets(view: BoxView | BoxBatch) -> list[dict[str, torch.Tensor]]:
    """torchvision's target dicts of a view."""
    return [
        {"boxes": b.float(), "labels": label.long()}
        for b, label in zip(view.boxes, view.labels, strict=True)
    ]


@torch.no_grad()
def pseudo_boxes(
    teacher: nn.Module, images: torch.Tensor, min_score: float
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's detections scoring at least ``min_score``: (boxes, labels, scores) per tile."""
    teacher.eval()
    found = teacher(list(images))
    keep = [d["scores"] >= min_score for d in found]
    return (
        [d["boxes"][k] for d, k in zip(found, keep, strict=True)],
        [d["labels"][k] for d, k in zip(found, keep, strict=True)],
        [d["scores"][k] for d, k in zip(found, keep, strict=True)],
    )


def union_nms(
    first: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    second: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    iou: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile's two sets of (boxes N×4, labels N, scores N) joined, then class-wise NMS at
    ``iou``: (boxes M×4, labels M), highest score first."""
    boxes, labels, scores = (torch.cat([a.to(b), b]) for a, b in zip(first, second, strict=True))
    keep = batched_nms(boxes.float(), scores.float(), labels, iou)
    return boxes[keep], labels[keep]


def unlabeled_targets(
    teacher: nn.Module | None,
    weak: BoxView,
    sam_scores: Sequence[torch.Tensor] | None,
    recipe: DetectionRecipe,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pseudo-boxes and labels per tile of the unlabeled weak view, by ``recipe.target``: the
    view's own boxes (SAM's, ``pseudo``), the EMA teacher's detections (``ema``) or both."""
    if recipe.target == "pseudo":
        return list(weak.boxes), list(weak.labels)
    assert teacher is not None, f"target {recipe.target!r} needs the EMA teacher"
    boxes, labels, scores = pseudo_boxes(teacher, weak.images, recipe.pseudo_score)
    if recipe.target == "ema":
        return boxes, labels
    assert sam_scores is not None, "target 'both' needs SAM's boxes with their scores"
    merged = [
        union_nms(sam, found, recipe.nms_iou)
        for sam, found in zip(
            zip(weak.boxes, weak.labels, sam_scores, strict=True),
            zip(boxes, labels, scores, strict=True),
            strict=True,
        )
    ]
    return [b for b, _ in merged], [label for _, label in merged]


def detection_losses(
    model: nn.Module,
    labeled: BoxBatch,
    unlabeled: torch.Tensor | BoxBatch | None,
    *,
    teacher: nn.Module | None,
    recipe: DetectionRecipe,
    step: int,
    keys: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None,) * 3,
) -> dict[str, torch.Tensor]:
    """``loss`` (with graph) and its parts. ``unlabeled``: B×3×S×S images, or (targets
    ``pseudo`` and ``both``) a BoxBatch of them with SAM's pseudo-boxes and scores. ``keys``:
    the per-sample augmentation keys of the labeled weak view, the unlabeled weak view and the
    unlabeled strong view (None: torch's RNG). Parts of the unlabeled term are
    ``{name}_unlabeled``, with ``pseudo_boxes`` per tile."""
    train_mode(model)
    weak = weak_box_view(labeled.images, labeled.boxes, labeled.labels, recipe.augment, keys[0])
    parts = model(list(weak.images), targets(weak))
    loss = torch.stack(list(parts.values())).sum()
    if unlabeled is None or (teacher is None and recipe.target != "pseudo"):
        return {"loss": loss, **parts}
    if isinstance(unlabeled, torch.Tensor):
        empty = [torch.zeros(0, 4)] * len(unlabeled)
        unlabeled = BoxBatch(unlabeled, empty, [torch.zeros(0, dtype=torch.int64)] * len(empty))
    weak_u = weak_box_view(
        unlabeled.images, unlabeled.boxes, unlabeled.labels, recipe.augment, keys[1]
    )
    boxes, labels = unlabeled_targets(teacher, weak_u, unlabeled.scores, recipe)
    strong = strong_box_view(weak_u.images, boxes, labels, recipe.augment, keys[2])
    unsup = model(list(strong.images), targets(strong))
    loss_u = torch.stack([unsup[name] for name in UNLABELED_LOSSES]).sum()
    weight = recipe.unlabeled_weight * ramp_up(step, recipe.ramp_up_steps)
    return {
        "loss": loss + weight * loss_u,
        **parts,
        **{f"{name}_unlabeled": unsup[name] for name in UNLABELED_LOSSES},
        "pseudo_boxes": torch.tensor(sum(len(b) for b in strong.boxes) / len(unlabeled.images)),
        "unlabeled_weight": torch.tensor(weight),
    }


def detection_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    labeled: BoxBatch,
    unlabeled: torch.Tensor | BoxBatch | None,
    *,
    teacher: nn.Module | None,
    recipe: DetectionRecipe,
    step: int,
    keys: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None,) * 3,
) -> dict[str, float]:
    """One optimiser step and EMA update; the loss and its parts as floats. ``model`` may be
    wrapped in DistributedDataParallel (the teacher follows the module inside); ``keys`` as
    ``detection_losses`` takes them."""
    optimizer.zero_grad(set_to_none=True)
    parts = detection_losses(
        model, labeled, unlabeled, teacher=teacher, recipe=recipe, step=step, keys=keys
    )
    parts["loss"].backward()
    optimizer.step()
    if teacher is not None:
        ema_update(teacher, getattr(model, "module", model), recipe.ema_momentum)
    return {name: float(value.detach()) for name, value in parts.items()}

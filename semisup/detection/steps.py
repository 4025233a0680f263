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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

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


@dataclass(frozen=True)
class BoxBatch:
    """Tiles with their boxes: ``images`` B×3×S×S in [0, 1]; per tile ``boxes`` N×4 pixel-edge
    xyxy and ``labels`` N class ids ≥ 1 (0 is Faster R-CNN's background)."""

    images: torch.Tensor
    boxes: Sequence[torch.Tensor]
    labels: Sequence[torch.Tensor]


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


def detection_losses(
    model: nn.Module,
    labeled: BoxBatch,
    unlabeled: torch.Tensor | None,
    *,
    teacher: nn.Module | None,
    recipe: DetectionRecipe,
    step: int,
    keys: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None,) * 3,
) -> dict[str, torch.Tensor]:
    """``loss`` (with graph) and its parts. ``keys``: the per-sample augmentation keys of the
    labeled weak view, the unlabeled weak view and the unlabeled strong view (None: torch's RNG).
    Parts of the unlabeled term are ``{name}_unlabeled``, with ``pseudo_boxes`` per tile."""
    train_mode(model)
    weak = weak_box_view(labeled.images, labeled.boxes, labeled.labels, recipe.augment, keys[0])
    parts = model(list(weak.images), targets(weak))
    loss = torch.stack(list(parts.values())).sum()
    if unlabeled is None or teacher is None:
        return {"loss": loss, **parts}
    empty = [torch.zeros(0, 4)] * len(unlabeled)
    weak_u = weak_box_view(unlabeled, empty, [torch.zeros(0)] * len(unlabeled), recipe.augment,
                           keys[1])  # fmt: skip
    boxes, labels, _ = pseudo_boxes(teacher, weak_u.images, recipe.pseudo_score)
    strong = strong_box_view(weak_u.images, boxes, labels, recipe.augment, keys[2])
    unsup = model(list(strong.images), targets(strong))
    loss_u = torch.stack([unsup[name] for name in UNLABELED_LOSSES]).sum()
    weight = recipe.unlabeled_weight * ramp_up(step, recipe.ramp_up_steps)
    return {
        "loss": loss + weight * loss_u,
        **parts,
        **{f"{name}_unlabeled": unsup[name] for name in UNLABELED_LOSSES},
        "pseudo_boxes": torch.tensor(sum(len(b) for b in strong.boxes) / len(unlabeled)),
        "unlabeled_weight": torch.tensor(weight),
    }


def detection_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    labeled: BoxBatch,
    unlabeled: torch.Tensor | None,
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

"""Views of detection tiles: the segmentation student's augmentations, with boxes moved along.

The same draws as ``semisup.augment`` (so a sample's key gives the same view in both tasks):
- weak: flips and quarter turns, exact, so a box maps to a box;
- strong: rotation and scale about the tile centre, then the photometric changes (colour
  jitter, blur) on the image only. A rotated box becomes the axis-aligned box around its four
  turned corners. No CutMix: a pasted square cuts boxes in ways no target describes.

Boxes are pixel-edge coordinates (x0, y0, x1, y1; a pixel i spans [i, i + 1)); after a view they
are clipped to the tile and kept when at least ``min_visible`` of their transformed area and
``min_side_px`` of each side remain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from kornia.geometry.transform import warp_affine

from semisup.augment import photometric, rotation_scale_matrices, strong_draws, weak_draws
from semisup.config import AugmentConfig
from semisup.tile_boxes import visible_part


@dataclass(frozen=True)
class BoxView:
    """A batch of views: ``images`` B×C×S×S; per sample, ``boxes`` N×4 and ``labels`` N."""

    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]


def turn_boxes(boxes: torch.Tensor, flip: bool, turns: int, size: int) -> torch.Tensor:
    """Boxes of a S×S tile after an optional left-right mirror, then ``turns`` quarter turns
    counter-clockwise (``torch.rot90`` on the last two dims): exact."""
    out = boxes.clone()
    if flip:
        out = torch.stack([size - out[:, 2], out[:, 1], size - out[:, 0], out[:, 3]], 1)
    for _ in range(turns % 4):  # (x, y) -> (y, S - x)
        out = torch.stack([out[:, 1], size - out[:, 2], out[:, 3], size - out[:, 0]], 1)
    return out


def affine_boxes(boxes: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """The axis-aligned boxes around each box's four corners moved by ``matrix`` (2×3, as
    ``kornia.geometry.transform.warp_affine`` takes it: pixel centres at integer coordinates)."""
    x0, y0, x1, y1 = boxes.unbind(1)
    corners = torch.stack(
        [torch.stack(p, -1) for p in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))], 1
    )  # N×4×2, pixel edges
    centred = corners - 0.5  # kornia's frame: the first pixel's centre is 0
    # .to(boxes): the matrix is drawn on the CPU, a teacher's boxes may be on the GPU
    moved = centred @ matrix[:, :2].T.to(boxes) + matrix[:, 2].to(boxes) + 0.5
    return torch.cat([moved.min(1).values, moved.max(1).values], 1)


def weak_box_view(
    images: torch.Tensor,
    boxes: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    config: AugmentConfig,
    keys: torch.Tensor | None = None,
) -> BoxView:
    """Flips and quarter turns of square tiles, boxes moved exactly."""
    size = images.shape[-1]
    flips, turns = weak_draws(config, keys, images.shape[0])
    views, moved = [], []
    for i in range(images.shape[0]):
        view = images[i].flip(-1) if flips[i] else images[i]
        views.append(torch.rot90(view, int(turns[i]), dims=(-2, -1)))
        moved.append(turn_boxes(boxes[i], bool(flips[i]), int(turns[i]), size))
    return BoxView(torch.stack(views), moved, list(labels))


def strong_box_view(
    images: torch.Tensor,
    boxes: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    config: AugmentConfig,
    keys: torch.Tensor | None = None,
    *,
    min_visible: float = 0.5,
    min_side_px: float = 2.0,
) -> BoxView:
    """Rotation and scale, then colour; boxes enclose their turned corners, clipped and
    filtered (see the module's docstring)."""
    size = images.shape[-1]
    draws = strong_draws(keys, images.shape[0])
    matrices = rotation_scale_matrices(draws, size, size, config).to(images.dtype)
    warped = warp_affine(images, matrices.to(images.device), (size, size), mode="bilinear")
    out_boxes, out_labels = [], []
    for i in range(images.shape[0]):
        moved, kept = visible_part(
            affine_boxes(boxes[i], matrices[i]), size, min_side_px, min_visible
        )
        out_boxes.append(moved[kept])
        out_labels.append(labels[i][kept])
    return BoxView(photometric(warped, config, draws=draws), out_boxes, out_labels)

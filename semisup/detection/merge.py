"""Boxes of overlapping windows merged into one set per raster (Ray-free, torch only).

Each window of ``semisup predict`` is detected on its own, so an object near a window border is
seen by up to four windows: whole by some, cut by the border of others. ``merge_window_boxes``
keeps one box per object, in raster pixel coordinates:

1. a box is *cut* when one of its sides lies within ``edge_px`` of a border of its window that
   lies inside the raster (a neighbouring window continues there; the raster's own edges cut
   nothing, no window sees beyond them);
2. a cut box is dropped when a box of the same class that is not cut, from another window,
   covers at least ``contained`` of its area: the neighbour saw the object whole. A cut box
   without such a box stays (the neighbour missed the object, or it is larger than the overlap);
3. what remains goes through class-wise non-maximum suppression at ``iou`` (torchvision's
   ``batched_nms``, the IoU the detector used inside each window): two whole boxes of one
   object from overlapping windows become the higher-scoring one.

With an overlap at least as wide as the largest object, every object lies whole in some window,
so the rule leaves no piece of it at a seam.
"""

from __future__ import annotations

from typing import Final

import torch
from torchvision.ops import batched_nms

EDGE_PX: Final = 2.0  # px; torchvision clips boxes to the window, a cut box ends on its border
CONTAINED: Final = 0.7  # share of a cut box's area a whole box must cover to stand in for it
CHUNK: Final = 1024  # cut boxes compared with every whole box at a time (bounds the memory)


def cut_boxes(
    boxes: torch.Tensor,
    origins: torch.Tensor,
    *,
    tile: int,
    height: int,
    width: int,
    edge_px: float = EDGE_PX,
) -> torch.Tensor:
    """Which boxes are cut by a border of their window that lies inside the raster.

    ``boxes``: N×4 float raster-pixel x0, y0, x1, y1; ``origins``: N×2 int64 (y0, x0) of each
    box's window, ``tile`` px square, on a ``height``×``width`` raster. Returns N bool.
    """
    y0, x0 = origins[:, 0].to(boxes.dtype), origins[:, 1].to(boxes.dtype)
    y1, x1 = y0 + tile, x0 + tile
    return (
        ((x0 > 0) & (boxes[:, 0] <= x0 + edge_px))
        | ((y0 > 0) & (boxes[:, 1] <= y0 + edge_px))
        | ((x1 < width) & (boxes[:, 2] >= x1 - edge_px))
        | ((y1 < height) & (boxes[:, 3] >= y1 - edge_px))
    )


def merge_window_boxes(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    origins: torch.Tensor,
    *,
    tile: int,
    height: int,
    width: int,
    iou: float,
    edge_px: float = EDGE_PX,
    contained: float = CONTAINED,
) -> torch.Tensor:
    """Indices of the boxes to keep, highest score first (see the module docstring).

    ``boxes``: N×4 float raster-pixel x0, y0, x1, y1; ``labels``: N int64 class ids;
    ``scores``: N float in [0, 1]; ``origins``: N×2 int64 (y0, x0) of the ``tile`` px window
    each box came from, on a ``height``×``width`` raster. Returns K int64, K ≤ N.
    """
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.int64)
    cut = cut_boxes(boxes, origins, tile=tile, height=height, width=width, edge_px=edge_px)
    window = origins[:, 0] * (width + tile) + origins[:, 1]  # one id per window
    whole = _indices(~cut)
    dropped = torch.zeros(len(boxes), dtype=torch.bool)
    cut_index = _indices(cut)
    for start in range(0, len(cut_index), CHUNK):
        part = cut_index[start : start + CHUNK]
        cover = _covered_share(boxes[part], boxes[whole])  # P×W
        same = (labels[part, None] == labels[None, whole]) & (
            window[part, None] != window[None, whole]
        )
        dropped[part] = ((cover >= contained) & same).any(1)
    kept = _indices(~dropped)
    order = batched_nms(boxes[kept].float(), scores[kept].float(), labels[kept], iou)
    return kept[order]


def _indices(mask: torch.Tensor) -> torch.Tensor:
    """N bool -> the int64 indices where it is true."""
    return mask.nonzero().flatten()


def _covered_share(inner: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """P×W: the share of each ``inner`` box's area (P×4 xyxy) inside each ``outer`` box (W×4)."""
    top_left = torch.maximum(inner[:, None, :2], outer[None, :, :2])  # P×W×2
    bottom_right = torch.minimum(inner[:, None, 2:], outer[None, :, 2:])
    overlap = (bottom_right - top_left).clamp(min=0).prod(-1)  # P×W
    area = ((inner[:, 2] - inner[:, 0]) * (inner[:, 3] - inner[:, 1])).clamp(min=1e-6)
    return overlap / area[:, None]

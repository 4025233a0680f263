"""A source's boxes in the store, and the part of them inside one tile (Ray- and torch-free).

Shared by the SAM teacher (boxes as prompts) and the detection student (boxes as targets).
The store keeps each source's boxes in raster pixels (``store.BOXES``, x0, y0, x1, y1) with an
index into the source's ``box_label_names`` (``store.BOX_LABEL``); a tile sees them shifted into
its own frame and clipped to its square.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from semisup import store as tile_store


@dataclass(frozen=True)
class SourceBoxes:
    """``boxes``: N×4 float32 raster-pixel xyxy; ``labels``: N int32 indices into ``names``."""

    boxes: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]


def source_boxes(root: Any, source_id: str) -> SourceBoxes:
    """The boxes of a source group of an open store (none when it has no boxes)."""
    group = root[source_id]
    names = tile_store.read_source_meta(root, source_id).box_label_names
    if tile_store.BOXES not in group:
        return SourceBoxes(np.zeros((0, 4), np.float32), np.zeros(0, np.int32), names)
    boxes = np.asarray(group[tile_store.BOXES][...], dtype=np.float32).reshape(-1, 4)
    labels = (
        np.asarray(group[tile_store.BOX_LABEL][...], dtype=np.int32)
        if tile_store.BOX_LABEL in group
        else np.zeros(len(boxes), np.int32)
    )
    return SourceBoxes(boxes, labels, names)


def boxes_in_tile(
    boxes_xyxy: np.ndarray,
    y0: int,
    x0: int,
    size: int,
    min_side_px: float = 1.0,
    min_visible: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of a source shifted into a tile's frame, clipped, and those overlapping it.

    ``boxes_xyxy``: N×4 float pixel x0, y0, x1, y1 in the source raster; (``y0``, ``x0``): the
    raster pixel at the tile's top-left corner (negative with a halo at the border); ``size``:
    the tile side in pixels. A box is kept when its clipped part is at least ``min_side_px`` wide
    and high and holds at least ``min_visible`` of the box's area (detection targets: a crown
    cut to a sliver by the tile edge is not a crown to find). Returns (M×4 float32 tile-frame
    boxes clipped to [0, size], M int64 indices into ``boxes_xyxy``), in the order of
    ``boxes_xyxy``.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    shifted = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
    clipped, kept = visible_part(shifted, size, min_side_px, min_visible)
    keep = np.flatnonzero(kept)
    return clipped[keep], keep.astype(np.int64)


def visible_part(
    boxes: Any, size: float, min_side_px: float, min_visible: float = 0.0
) -> tuple[Any, Any]:
    """N×4 xyxy boxes in a tile's frame -> (clipped to [0, size], bool N: kept).

    A box is kept when its clipped part is at least ``min_side_px`` wide and high and holds at
    least ``min_visible`` of its area. ``boxes``: a NumPy array or a torch tensor (the same
    rule serves store tiles and augmented views); the results are of its kind.
    """
    clipped = boxes.clip(0, size)
    width, height = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = (width >= min_side_px) & (height >= min_side_px) & (width * height >= min_visible * area)
    return clipped, kept

"""Detection targets of tiles: the store's boxes clipped to each tile, with class ids.

Classes are the box label names of all the store's sources, sorted (``semisup prep
--box-classes`` merges the names box files use for one class); a tile's target keeps the boxes
whose visible part holds at least ``min_visible`` of their area.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from semisup import store as tile_store
from semisup.tile_boxes import SourceBoxes, boxes_in_tile, source_boxes

DEFAULT_MIN_VISIBLE = 0.5  # a box cut to less than half its area by the tile edge is dropped


class NoBoxesError(ValueError):
    """A detection stage was given a store without boxes."""


@dataclass(frozen=True)
class TileBoxes:
    """One tile's targets: ``boxes`` M×4 float32 tile-frame xyxy, ``labels`` M int64 class ids."""

    boxes: np.ndarray
    labels: np.ndarray


class BoxTargets:
    """The box targets of an open store's tiles; each source's boxes are read once."""

    def __init__(self, root: Any, store: str, min_visible: float = DEFAULT_MIN_VISIBLE) -> None:
        meta = tile_store.read_store_meta(root)
        self.tile_size, self.min_visible = meta.tile_size, min_visible
        self._sources: dict[str, SourceBoxes] = {
            source_id: source_boxes(root, source_id) for source_id in meta.sources
        }
        with_boxes = [s for s in self._sources.values() if len(s.boxes)]
        if not with_boxes:
            raise NoBoxesError(
                f"store {store} holds no boxes: detection needs box labels "
                "(semisup prep --boxes CSV_OR_XML)"
            )
        self.class_names: tuple[str, ...] = tuple(
            sorted({name for s in with_boxes for name in s.names})
        )
        self._class_of = {  # a source's box label index -> class id
            source_id: np.array([self.class_names.index(n) for n in s.names], np.int64)
            for source_id, s in self._sources.items()
            if len(s.boxes)
        }

    @property
    def sources_with_boxes(self) -> set[str]:
        """The ids of the store's sources that hold at least one box."""
        return set(self._class_of)

    def tile(self, source_id: str, y0: int, x0: int) -> TileBoxes:
        """Targets of the tile whose top-left raster pixel is (``y0``, ``x0``)."""
        source = self._sources[source_id]
        boxes, index = boxes_in_tile(
            source.boxes, y0, x0, self.tile_size, min_visible=self.min_visible
        )
        labels = (
            self._class_of[source_id][source.labels[index]] if len(index) else np.zeros(0, np.int64)
        )
        return TileBoxes(boxes, labels)

"""Detection targets of tiles: the store's boxes clipped to each tile, with class ids, and the
SAM pseudo-boxes of unlabeled tiles.

Classes are the box label names of all the store's sources, sorted (``semisup prep
--box-classes`` merges the names box files use for one class); a tile's target keeps the boxes
whose visible part holds at least ``min_visible`` of their area.

SAM pseudo-boxes are the rows of the store's instance table (``pseudo_instances.parquet``,
``semisup.pseudo_label``) written by the ``automatic`` teacher, kept above a predicted IoU and a
stability score, and clipped to the tile like the real boxes. SAM instances have no class: they
stand for the store's one box class. Instances of the ``prompted`` teacher are refused: its
prompts are the ground-truth boxes, so its boxes would hand the truth to unlabeled tiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from semisup import columns as C
from semisup import store as tile_store
from semisup.config import ConfigError
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


# ---------------------------------------------------------------------------------------------
# SAM pseudo-boxes


def sam_tile_boxes(
    rows: pd.DataFrame,
    y0: int,
    x0: int,
    tile_size: int,
    *,
    min_predicted_iou: float,
    min_stability: float,
    min_visible: float = DEFAULT_MIN_VISIBLE,
) -> tuple[np.ndarray, np.ndarray]:
    """One tile's SAM pseudo-boxes from its instance rows (``pseudo_label.INSTANCE_SCHEMA``).

    Rows below ``min_predicted_iou`` or ``min_stability`` are dropped; the rest are shifted into
    the tile whose top-left raster pixel is (``y0``, ``x0``) and clipped as the store's boxes
    are (``boxes_in_tile``). Returns (M×4 float32 tile-frame xyxy, M float32 predicted IoU).
    """
    kept = rows[(rows["predicted_iou"] >= min_predicted_iou) & (rows["stability"] >= min_stability)]
    raster = kept[["x0", "y0", "x1", "y1"]].to_numpy(np.float32).reshape(-1, 4)
    boxes, index = boxes_in_tile(raster, y0, x0, tile_size, min_visible=min_visible)
    return boxes, kept["predicted_iou"].to_numpy(np.float32)[index]


def check_sam_pseudo_boxes(
    store: str, class_names: Sequence[str], unlabeled: Sequence[int], key: str
) -> None:
    """The store can give SAM pseudo-boxes to ``unlabeled`` tiles, or a ConfigError naming
    ``key`` (the config key that asked for them) and what to do: the instance table exists, was
    written by the automatic teacher, covers every unlabeled tile, and the store has one box
    class."""
    from semisup.pseudo_label import RUN_ATTR, has_instance_table, read_manifest

    if not has_instance_table(store):
        raise ConfigError(
            f"{key} asks for SAM pseudo-boxes, but store {store} has no finished instance table "
            "(pseudo_instances.parquet); run `semisup pseudo-label --mode automatic --split all` "
            f"first, or set {key}=ema"
        )
    run = tile_store.open_store(store).attrs.get(RUN_ATTR) or {}
    mode = run.get("mode") if isinstance(run, dict) else None
    if mode != "automatic":
        raise ConfigError(
            f"{key}: the instances in {store} were made by the {mode!r} teacher (store attrs "
            f"{RUN_ATTR!r}); only 'automatic' instances may be targets: the prompted teacher is "
            "prompted by the ground-truth boxes. Relabel with `semisup pseudo-label --mode "
            f"automatic --overwrite`, or set {key}=ema"
        )
    if len(class_names) != 1:
        raise ConfigError(
            f"{key}: SAM instances have no class, but store {store} has {len(class_names)} box "
            f"classes ({', '.join(class_names)}); merge them into one with `semisup prep "
            f"--box-classes 'NAME,NAME=CLASS'`, or set {key}=ema"
        )
    recorded = set(read_manifest(store).column(C.TILE_ID).to_pylist())
    missing = sorted(set(int(i) for i in unlabeled) - recorded)
    if missing:
        raise ConfigError(
            f"{key}: {len(missing)} of the {len(unlabeled)} unlabeled tiles of {store} have no "
            f"SAM pseudo-labels (tile ids {missing[:5]}...); run `semisup pseudo-label --mode "
            "automatic --split all` to label them"
        )


class SamPseudoBoxes:
    """SAM pseudo-boxes of an automatic-teacher store's tiles, read once from its instance
    table (``check_sam_pseudo_boxes`` has passed); every box gets class id 0."""

    def __init__(
        self,
        store: str,
        tile_size: int,
        *,
        min_predicted_iou: float,
        min_stability: float,
        min_visible: float = DEFAULT_MIN_VISIBLE,
    ) -> None:
        from semisup.pseudo_label import read_instances

        table = read_instances(store).to_pandas()
        self._rows = dict(tuple(table.groupby(C.TILE_ID)))  # tile id -> its rows
        self._empty = table.iloc[:0]
        self.tile_size, self.min_visible = tile_size, min_visible
        self.min_predicted_iou, self.min_stability = min_predicted_iou, min_stability

    def tile(self, tile_id: int, y0: int, x0: int) -> tuple[TileBoxes, np.ndarray]:
        """(targets, M float32 predicted IoU) of the tile ``tile_id`` at (``y0``, ``x0``)."""
        boxes, scores = sam_tile_boxes(
            self._rows.get(int(tile_id), self._empty),
            y0,
            x0,
            self.tile_size,
            min_predicted_iou=self.min_predicted_iou,
            min_stability=self.min_stability,
            min_visible=self.min_visible,
        )
        return TileBoxes(boxes, np.zeros(len(boxes), np.int64)), scores

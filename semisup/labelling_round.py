"""One active-learning round of a ``semisup run`` folder: the select stage's proposals get
labels, the labels come into the store as a new label version, and the pipeline runs again.

A person labels the proposals in an annotation tool (``semisup select --format labelstudio``)
and brings them back with ``semisup label import``. The store's label version is part of the
keys of the stages that train on labels, so the rerun rebuilds teacher, pseudo-labels,
student, evaluation, report, selection and prediction, and skips prep and zero-shot.

Where no person is at hand (the demo), ``ground_truth_masks`` stands in for one: it writes the
ground truth the store already holds for the proposed tiles, hidden from training by the split,
as the masks an annotator would hand back. Nothing else of the round differs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

import numpy as np
import pandas as pd
from PIL import Image

from semisup import columns as C
from semisup import store as tile_store

if TYPE_CHECKING:
    import zarr

SELECTION_FILE = "selection.csv"  # written by ``semisup select`` (and the select stage)


def ground_truth_masks(store: str, tile_ids: Sequence[int], folder: Path) -> list[Path]:
    """Write each tile's ground truth as ``<source_id>__r<row>_c<col>.png`` in ``folder``.

    The PNGs are S×S uint8 class ids (``IGNORE_INDEX`` unlabelled or padding), the per-tile
    masks ``semisup label import`` reads. Tiles whose source has no labels, or whose labels
    are all ``IGNORE_INDEX``, are skipped: no annotator could be stood in for there.
    """
    index = tile_store.read_tile_index(store).to_pandas().set_index(C.TILE_ID)
    missing = sorted(set(tile_ids) - set(index.index))
    if missing:
        raise ValueError(f"{store}: no tile {missing[0]} in its tile index")
    root = tile_store.open_store(store)
    labels = tile_store.current_labels(root)
    size = tile_store.read_store_meta(root).tile_size
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for tile_id in tile_ids:
        tile = index.loc[tile_id]
        source = str(tile[C.SOURCE])
        y0, x0 = int(tile[C.Y0]), int(tile[C.X0])
        group = cast("zarr.Group", root[source])
        arrays = tile_store.read_tile(group, y0, x0, size, labels=labels)
        label = arrays.get(C.LABEL)
        if label is None or bool(np.all(label == C.IGNORE_INDEX)):
            continue
        path = folder / f"{source}__r{int(tile['row'])}_c{int(tile['col'])}.png"
        Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(path)
        written.append(path)
    return written


def proposed_tiles(select_dir: Path) -> list[int]:
    """Tile ids of a selection, in rank order (``selection.csv`` of ``semisup select``)."""
    path = select_dir / SELECTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no selection; run the select stage first")
    return [int(tile_id) for tile_id in pd.read_csv(path)[C.TILE_ID]]


def labelling_round(
    store: str, select_dir: Path, annotations: Path, log: TextIO | None = sys.stderr
) -> dict[str, Any]:
    """Stand-in annotation of ``select_dir``'s proposals into ``annotations``, imported into
    ``store``; returns the import's summary with the tiles proposed and annotated."""
    from semisup.label_import import import_labels

    proposed = proposed_tiles(select_dir)
    masks = ground_truth_masks(store, proposed, annotations)
    if not masks:
        raise ValueError(f"{select_dir}: none of the {len(proposed)} proposed tiles has labels")
    result = import_labels(store, masks, log=log)
    return {
        "proposed": len(proposed),
        "annotated": len(masks),
        "annotations": str(annotations),
        "label_version": result.version,
        "moved_to_labeled": len(result.moved),
        "already_imported": result.already_imported,
    }

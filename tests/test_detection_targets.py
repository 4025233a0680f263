"""Detection targets: the store's boxes, clipped to each tile, against the box files themselves."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from data_prep.ingest import build_store
from semisup import columns as C
from semisup.config import PrepConfig
from semisup.detection.targets import BoxTargets, NoBoxesError
from semisup.store import open_store, read_tile_index


def test_tile_targets_equal_the_clipped_csv_boxes(shared_data: Path, tmp_path: Path) -> None:
    neon = shared_data / "neon_trees"
    made = build_store(
        [neon / "OSBS_029.tif", neon / "SOAP_061.png"], tmp_path / "crowns.zarr",
        boxes=[neon / "OSBS_029.csv", neon / "SOAP_061.xml"],
        box_classes=["Tree,Alive=tree", "Dead=dead"], config=PrepConfig(tile_size=128),
        quiet=True,
    )  # fmt: skip
    targets = BoxTargets(open_store(str(made.path)), str(made.path))
    assert targets.class_names == ("dead", "tree")
    truth = np.array(
        [[float(r[c]) for c in ("xmin", "ymin", "xmax", "ymax")]
         for r in csv.DictReader((neon / "OSBS_029.csv").open())]
    )  # fmt: skip
    index = read_tile_index(str(made.path)).to_pandas()
    tiles = index[index[C.SOURCE].str.contains("OSBS")]
    counted = 0
    for row in tiles.itertuples():
        got = targets.tile(getattr(row, C.SOURCE), getattr(row, C.Y0), getattr(row, C.X0))
        # by hand: shift into the tile, clip to its 128 px, keep at least half of each box
        moved = truth - [row.x0, row.y0, row.x0, row.y0]
        clipped = moved.clip(0, 128)
        area = lambda b: (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)  # noqa: E731
        keep = (area(clipped) >= 0.5 * area(moved)) & (area(clipped) > 0)
        np.testing.assert_allclose(got.boxes, clipped[keep])
        assert (got.labels == 1).all()  # every OSBS box is a "tree"
        counted += len(got.boxes)
    assert counted >= 0.9 * len(truth)  # most crowns lie mostly inside one tile
    soap = index[index[C.SOURCE].str.contains("SOAP")].iloc[0]
    labels = targets.tile(soap[C.SOURCE], soap[C.Y0], soap[C.X0]).labels
    assert set(labels.tolist()) <= {0, 1} and 0 in labels  # SOAP's "Dead" crowns


def test_a_store_without_boxes_is_refused_by_name(shared_data: Path, tmp_path: Path) -> None:
    made = build_store(
        [shared_data / "neon_trees" / "SOAP_061.png"], tmp_path / "plain.zarr",
        config=PrepConfig(tile_size=128), quiet=True,
    )  # fmt: skip
    with pytest.raises(NoBoxesError, match=f"store {made.path} holds no boxes"):
        BoxTargets(open_store(str(made.path)), str(made.path))

"""Detection targets: the store's boxes, clipped to each tile, against the box files themselves."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.ingest import build_store
from semisup import columns as C
from semisup.config import ConfigError, PrepConfig
from semisup.detection.targets import (
    BoxTargets,
    NoBoxesError,
    SamPseudoBoxes,
    check_sam_pseudo_boxes,
)
from semisup.masks import MaskFilter
from semisup.pseudo_label import (
    INSTANCES_FILE,
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    RUN_ATTR,
    instance_table,
)
from semisup.store import open_store, read_tile, read_tile_index
from semisup.teacher import INSTANCES, TeacherConfig, build_teacher
from semisup.tile_boxes import boxes_in_tile


def test_tile_targets_equal_the_clipped_csv_boxes(shared_data: Path, tmp_path: Path) -> None:
    neon = shared_data / "neon_trees"
    made = build_store(
        [neon / "OSBS_029.tif", neon / "SOAP_061.png"],
        tmp_path / "crowns.zarr",
        boxes=[neon / "OSBS_029.csv", neon / "SOAP_061.xml"],
        box_classes=["Tree,Alive=tree", "Dead=dead"],
        config=PrepConfig(tile_size=128),
        quiet=True,
    )
    targets = BoxTargets(open_store(str(made.path)), str(made.path))
    assert targets.class_names == ("dead", "tree")
    truth = np.array(
        [
            [float(r[c]) for c in ("xmin", "ymin", "xmax", "ymax")]
            for r in csv.DictReader((neon / "OSBS_029.csv").open())
        ]
    )
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
        [shared_data / "neon_trees" / "SOAP_061.png"],
        tmp_path / "plain.zarr",
        config=PrepConfig(tile_size=128),
        quiet=True,
    )
    with pytest.raises(NoBoxesError, match=f"store {made.path} holds no boxes"):
        BoxTargets(open_store(str(made.path)), str(made.path))


# ---------------------------------------------------------------------------------------------
# SAM pseudo-boxes from the instance table

LENIENT = MaskFilter(min_predicted_iou=-1e9, min_stability=0.0)  # random tiny SAM: keep all


def _label_in_process(store: str, mode: str, tile_ids: list[int]) -> pd.DataFrame:
    """Label ``tile_ids`` with the tiny teacher in this process and record them as a finished
    ``semisup pseudo-label`` run of ``mode`` does (instance table, manifest, run attrs); returns
    the teacher's instance rows."""
    root = open_store(store, "r+")
    index = read_tile_index(store).to_pandas().set_index(C.TILE_ID).loc[tile_ids]
    tiles = [
        read_tile(root[s], y0, x0, 128)
        for s, y0, x0 in zip(index[C.SOURCE], index[C.Y0], index[C.X0], strict=True)
    ]
    batch = {
        C.IMAGE: np.stack([t[C.IMAGE] for t in tiles]),
        C.VALID: np.stack([t[C.VALID] for t in tiles]),
        C.TILE_ID: np.array(tile_ids, np.int64),
        C.SOURCE: index[C.SOURCE].to_numpy(object),
        C.Y0: index[C.Y0].to_numpy(),
        C.X0: index[C.X0].to_numpy(),
    }
    config = TeacherConfig(mode=mode, model_type="tiny", points_per_side=4, mask_filter=LENIENT)
    teacher = build_teacher(store, config, device="cpu", torch_threads=1)
    out = teacher(batch)
    table = instance_table(out[C.TILE_ID], out[C.SOURCE], out[INSTANCES])
    pq.write_table(table, Path(store) / INSTANCES_FILE)
    manifest = {name: np.zeros(len(tile_ids)) for name in MANIFEST_SCHEMA.names}
    manifest |= {
        C.TILE_ID: tile_ids,
        C.SOURCE: batch[C.SOURCE],
        "mode": [mode] * len(tile_ids),
        "model_type": ["tiny"] * len(tile_ids),
        "checkpoint_hash": [""] * len(tile_ids),
    }
    pq.write_table(pa.table(manifest).cast(MANIFEST_SCHEMA), Path(store) / MANIFEST_FILE)
    root.attrs[RUN_ATTR] = {"mode": mode}
    return table.to_pandas()


@pytest.fixture(scope="module")
def crown_store(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    neon = shared_data / "neon_trees"
    made = build_store(
        [neon / "OSBS_029.tif"],
        tmp_path_factory.mktemp("sam") / "crowns.zarr",
        boxes=[neon / "OSBS_029.csv"],
        box_classes=["Tree=tree"],
        config=PrepConfig(tile_size=128),
        quiet=True,
    )
    return str(made.path)


def test_sam_pseudo_boxes_are_the_teacher_instances_clipped_to_the_tile(crown_store: str) -> None:
    rows = _label_in_process(crown_store, "automatic", [0, 5])
    assert len(rows) > 0
    index = read_tile_index(crown_store).to_pandas().set_index(C.TILE_ID)
    iou_cut = float(rows["predicted_iou"].median())  # half the rows fall below
    sam = SamPseudoBoxes(crown_store, 128, min_predicted_iou=iou_cut, min_stability=0.0)
    everything = SamPseudoBoxes(crown_store, 128, min_predicted_iou=-1e9, min_stability=0.0)
    for tile_id in (0, 5):
        y0, x0 = int(index.loc[tile_id, C.Y0]), int(index.loc[tile_id, C.X0])
        mine = rows[rows[C.TILE_ID] == tile_id]
        # by hand: the rows' boxes moved into the tile; tiles hold their whole input, so
        # nothing is clipped and every row is a pseudo-box
        by_hand = mine[["x0", "y0", "x1", "y1"]].to_numpy() - [x0, y0, x0, y0]
        got, scores = everything.tile(tile_id, y0, x0)
        np.testing.assert_array_equal(got.boxes, by_hand)
        assert (got.labels == 0).all() and len(scores) == len(mine)
        kept, kept_scores = sam.tile(tile_id, y0, x0)
        confident = mine["predicted_iou"].to_numpy() >= iou_cut
        np.testing.assert_array_equal(kept.boxes, by_hand[confident])
        np.testing.assert_allclose(kept_scores, mine["predicted_iou"].to_numpy()[confident])
    assert len(everything.tile(7, 0, 0)[0].boxes) == 0  # a tile without rows has no boxes
    # a box reaching past the tile is clipped like the real boxes (boxes_in_tile)
    raster = rows[rows[C.TILE_ID] == 0][["x0", "y0", "x1", "y1"]].to_numpy()
    shifted, _ = everything.tile(0, 24, 24)
    expected, _ = boxes_in_tile(raster, 24, 24, 128, min_visible=0.5)
    np.testing.assert_array_equal(shifted.boxes, expected)
    assert len(expected) > 0 and (expected != raster[: len(expected)] - 24).any()  # some cut


def test_sam_pseudo_boxes_are_refused_by_name(
    shared_data: Path, crown_store: str, tmp_path: Path
) -> None:
    key = "detector.target='pseudo'"
    unlabeled = [0, 5]
    plain = str(tmp_path / "plain.zarr")
    shutil.copytree(crown_store, plain)
    for name in (INSTANCES_FILE, MANIFEST_FILE):
        (Path(plain) / name).unlink(missing_ok=True)
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} .* no finished instance table"):
        check_sam_pseudo_boxes(plain, ["tree"], unlabeled, key)
    _label_in_process(plain, "prompted", unlabeled)
    with pytest.raises(
        ConfigError, match="made by the 'prompted' teacher .*'semisup_pseudo_label'"
    ):
        check_sam_pseudo_boxes(plain, ["tree"], unlabeled, key)
    _label_in_process(plain, "automatic", unlabeled)
    check_sam_pseudo_boxes(plain, ["tree"], unlabeled, key)  # passes
    with pytest.raises(ConfigError, match=r"2 box classes \(dead, tree\); merge them"):
        check_sam_pseudo_boxes(plain, ["dead", "tree"], unlabeled, key)
    with pytest.raises(ConfigError, match=r"1 of the 3 unlabeled tiles .* no SAM pseudo-labels"):
        check_sam_pseudo_boxes(plain, ["tree"], [*unlabeled, 7], key)

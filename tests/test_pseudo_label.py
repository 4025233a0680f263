"""Pseudo-labelling a real store (Dubai and NEON tiles, built with `semisup prep`) through the
Ray actor pool: every tile exactly once, resume, a killed actor, prompted boxes, run identity."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from semisup import columns as C
from semisup import store as tile_store
from semisup.actor_pool import ActorPoolConfig
from semisup.cli import main as semisup_main
from semisup.known_imagery import DUBAI_COLOURS
from semisup.masks import MaskFilter
from semisup.pseudo_label import (
    INSTANCE_PARTS_DIR,
    INSTANCE_SCHEMA,
    INSTANCES_FILE,
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    PARTS_DIR,
    PseudoLabelMismatch,
    add_arguments,
    instance_table,
    owned_window,
    part_name,
    pseudo_label_chunks,
    read_instances,
    read_manifest,
    run_pseudo_label,
    teacher_identity,
    tile_stats,
)
from semisup.teacher import INSTANCE_IGNORE, MaskTeacher, TeacherConfig

NEON = ("OSBS_029", "2018_SJER_3_252000_4107000_image_477", "SOAP_061")
# Random tiny SAM weights predict low IoU and unstable masks: keep them all so there is content.
LENIENT = MaskFilter(min_predicted_iou=-1e9, min_stability=0.0)
# Fast settings shared by every run, so that their results can be compared.
TEACHER = TeacherConfig(mode="automatic", model_type="tiny", points_per_side=4, mask_filter=LENIENT)
RUN = {"split": None, "batch_size": 4, "log": None}


def pool(actors: int) -> ActorPoolConfig:
    return ActorPoolConfig(actors=actors)


# ---------------------------------------------------------------------------------------------
# Pure helpers


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"),
    [(100, 130, 32, 0), (100, 130, 32, 8), (64, 64, 64, 0), (70, 33, 32, 16)],
)
def test_owned_windows_partition_the_raster(
    height: int, width: int, tile: int, overlap: int
) -> None:
    owners = np.zeros((height, width), np.int32)
    chunk_h, chunk_w = pseudo_label_chunks(height, width, tile, overlap)
    for _, _, y0, x0, h, w in tile_store.tile_windows(height, width, tile, overlap):
        ys, ye, xs, xe = owned_window(y0, x0, height, width, tile, overlap)
        assert y0 <= ys < ye <= y0 + h and x0 <= xs < xe <= x0 + w  # inside its own tile
        owners[ys:ye, xs:xe] += 1
        # an owned window is a union of whole chunks: writers never share a chunk
        assert ys % chunk_h == 0 and xs % chunk_w == 0
        assert ye % chunk_h == 0 or ye == height
        assert xe % chunk_w == 0 or xe == width
    assert np.all(owners == 1)


def test_tile_stats_count_background_and_ignore() -> None:
    label = np.array([[0, 1, 2], [INSTANCE_IGNORE, 0, 3]], np.uint16)
    confidence = np.array([[0.2, 0.8, 0.6], [0.0, 0.4, 1.0]], np.float32)
    mean, coverage = tile_stats(label, confidence, INSTANCE_IGNORE, 0)
    assert mean == pytest.approx(0.6) and coverage == pytest.approx(3 / 6)
    semantic = np.array([[0, 1], [255, 1]], np.uint8)
    assert tile_stats(semantic, np.ones((2, 2), np.float32), 255, None) == (1.0, 0.75)
    assert tile_stats(np.full((2, 2), 255, np.uint8), np.zeros((2, 2)), 255, None) == (0.0, 0.0)


def test_part_names_depend_on_the_tiles_only() -> None:
    assert part_name(np.array([5, 3, 9])) == part_name(np.array([9, 5, 3]))
    assert part_name(np.array([5, 3, 9])) != part_name(np.array([5, 3]))


def test_instance_rows_count_once_and_only_when_their_batch_is_recorded(tmp_path: Path) -> None:
    def rows(tile_ids: list[int], instance_id: int) -> pa.Table:
        fields = [[instance_id, 0, 0, 4, 4, 0.9, 0.95, 16]] * len(tile_ids)
        return instance_table(
            np.array(tile_ids), ["s"] * len(tile_ids), [np.array([f]) for f in fields]
        )

    store = tmp_path / "s.zarr"
    (store / PARTS_DIR).mkdir(parents=True)
    (store / INSTANCE_PARTS_DIR).mkdir()
    pq.write_table(rows([1], 1), store / INSTANCES_FILE)  # compacted by an earlier run
    recorded, unrecorded = part_name(np.array([1, 2])), part_name(np.array([3]))
    pq.write_table(rows([1, 2], 2), store / INSTANCE_PARTS_DIR / recorded)  # tile 1 again
    manifest_rows = MANIFEST_SCHEMA.empty_table()  # its presence records the batch
    pq.write_table(manifest_rows, store / PARTS_DIR / recorded)
    pq.write_table(rows([3], 3), store / INSTANCE_PARTS_DIR / unrecorded)  # writer died here
    table = read_instances(str(store)).to_pandas()
    assert table[[C.TILE_ID, "instance_id"]].values.tolist() == [[1, 1], [2, 2]]
    assert table["x1"].tolist() == [4.0, 4.0] and table[C.SOURCE].tolist() == ["s", "s"]


def test_teacher_identity_is_json_plain_and_mode_specific() -> None:
    teacher = TeacherConfig(
        model_type="tiny", points_per_side=8, mask_filter=LENIENT, prompt="box", bands=(0, 1, 2)
    )
    automatic = teacher_identity(teacher, bf16_on_gpu=False)
    assert automatic == json.loads(json.dumps(automatic))
    assert automatic["teacher"]["points_per_side"] == 8 and "prompt" not in automatic["teacher"]
    assert automatic["checkpoint_hash"] == "random-init-seed0"
    prompted = teacher_identity(replace(teacher, mode="prompted"), bf16_on_gpu=True)
    assert "points_per_side" not in prompted["teacher"] and prompted["precision"] == "bf16"


# ---------------------------------------------------------------------------------------------
# A real store and one clean run


@pytest.fixture(scope="module")
def real_store(
    shared_data: Path, dubai_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Two Dubai images with labels and three NEON crops with boxes: 36 tiles of 256 px."""
    tmp = tmp_path_factory.mktemp("prep")
    colours = tmp / "colours.json"
    colours.write_text(json.dumps(DUBAI_COLOURS))
    neon = shared_data / "neon_trees"
    images = [dubai_dir / "tile_1" / "images" / f"image_part_00{i}.jpg" for i in (1, 2)]
    masks = [dubai_dir / "tile_1" / "masks" / f"image_part_00{i}.png" for i in (1, 2)]
    crops = [neon / "OSBS_029.tif", neon / f"{NEON[1]}.tif", neon / "SOAP_061.png"]
    boxes = [neon / "OSBS_029.csv", neon / f"{NEON[1]}_truth.csv", neon / "SOAP_061.xml"]
    out = tmp / "real.zarr"
    status = semisup_main(
        ["prep", *map(str, images + crops), "--labels", *map(str, masks), "-", "-", "-"]
        + ["--label-colors", str(colours), "--boxes", *map(str, boxes)]
        + ["--tile-size", "256", "--out", str(out)]
    )
    assert status == 0
    return out


def _copy(store: Path, tmp_path: Path, name: str = "copy.zarr") -> str:
    target = tmp_path / name
    shutil.copytree(store, target)
    return str(target)


@pytest.fixture(scope="module")
def clean_run(
    ray_session: None, real_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict]:
    """Automatic mode on every tile in one uninterrupted run of a pool of two actors."""
    url = _copy(real_store, tmp_path_factory.mktemp("clean"))
    calls: list[tuple[int, int]] = []
    summary = run_pseudo_label(
        url, TEACHER, pool=pool(2), on_progress=lambda *call: calls.append(call), **RUN
    )
    return url, {**summary, "progress_calls": calls}


def _tile_count(url: str) -> int:
    return tile_store.read_tile_index(url).num_rows


def _arrays(url: str) -> dict[str, np.ndarray]:
    root = zarr.open_group(url, mode="r")
    meta = tile_store.read_store_meta(root)
    return {
        f"{source}/{name}": root[source][name][...]
        for source in meta.sources
        for name in (C.PSEUDO_LABEL, C.CONFIDENCE)
    }


def _assert_same_content(url: str, reference: str) -> None:
    """Same manifest and arrays as ``reference``, up to float rounding of the batched encoder."""
    ours, theirs = read_manifest(url).to_pandas(), read_manifest(reference).to_pandas()
    pd.testing.assert_frame_equal(ours, theirs, check_exact=False, atol=1e-5)
    reference_arrays = _arrays(reference)
    for key, array in _arrays(url).items():
        if key.endswith(C.CONFIDENCE):
            np.testing.assert_allclose(array, reference_arrays[key], atol=1e-5, err_msg=key)
        else:
            assert np.mean(array != reference_arrays[key]) < 1e-4, key


# ---------------------------------------------------------------------------------------------
# Runs through the actor pool


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_actor_pool_labels_every_tile_exactly_once(clean_run: tuple[str, dict]) -> None:
    url, summary = clean_run
    index = tile_store.read_tile_index(url).to_pandas()
    assert summary["tiles_processed"] == summary["tiles_total"] == len(index) == 36
    done = [done for done, _ in summary["progress_calls"]]
    assert done == sorted(done) and done[-1] == 36 and len(done) > 1  # one call per batch
    manifest = pd.read_parquet(Path(url) / MANIFEST_FILE)
    assert not (Path(url) / PARTS_DIR).exists()  # compacted
    assert len(manifest) == len(index) and manifest[C.TILE_ID].is_unique
    assert set(manifest[C.TILE_ID]) == set(index[C.TILE_ID])
    assert set(manifest["mode"]) == {"automatic"} and set(manifest["model_type"]) == {"tiny"}
    assert manifest["mean_confidence"].between(0, 1).all() and manifest["coverage"].max() > 0
    root = zarr.open_group(url, mode="r")
    for source in tile_store.read_store_meta(root).sources:
        label, confidence = root[source][C.PSEUDO_LABEL], root[source][C.CONFIDENCE]
        valid = root[source][C.VALID][...]
        assert label.dtype == np.uint16 and confidence.dtype == np.float32
        assert label.chunks == root[source][C.IMAGE].chunks[:2]  # tile×tile like the image
        label, confidence = label[...], confidence[...]
        # every valid pixel of every tile window was written; nodata stays not valid
        assert np.all(label[valid] != INSTANCE_IGNORE) and np.all(label[~valid] == INSTANCE_IGNORE)
        assert confidence.min() >= 0 and confidence.max() <= 1 and np.all(confidence[~valid] == 0)
    instances = _check_instance_table(url, manifest)
    # rerunning finds nothing to do; another teacher needs overwrite
    again = run_pseudo_label(url, TEACHER, pool=pool(2), **RUN)
    assert again["tiles_processed"] == 0 and again["tiles_already_done"] == 36
    assert read_instances(url).equals(instances)  # the rerun added no row
    with pytest.raises(PseudoLabelMismatch, match="mode: store 'automatic' vs 'prompted'"):
        run_pseudo_label(url, replace(TEACHER, mode="prompted"), **RUN)
    with pytest.raises(PseudoLabelMismatch, match="points_per_side"):
        run_pseudo_label(url, replace(TEACHER, points_per_side=8), **RUN)


def _check_instance_table(url: str, manifest: pd.DataFrame) -> pa.Table:
    """The compacted instance table: one row per (tile, instance), every painted id has one,
    and each tile has at least as many rows as instances painted; returns the table."""
    assert (Path(url) / INSTANCES_FILE).exists() and not (Path(url) / INSTANCE_PARTS_DIR).exists()
    table = read_instances(url)
    assert table.schema.equals(INSTANCE_SCHEMA) and table.num_rows > 0
    frame = table.to_pandas()
    assert not frame.duplicated([C.TILE_ID, "instance_id"]).any()
    assert (frame["x1"] > frame["x0"]).all() and (frame["y1"] > frame["y0"]).all()
    rows_per_tile = frame.groupby(C.TILE_ID).size()
    painted = manifest.set_index(C.TILE_ID)["num_masks"]
    assert (rows_per_tile.reindex(painted.index, fill_value=0) >= painted).all()
    root = zarr.open_group(url, mode="r")
    index = tile_store.read_tile_index(url).to_pandas()
    for row in index.itertuples():  # tiles do not overlap: a tile's window is its own
        label = root[row.source][C.PSEUDO_LABEL][row.y0 : row.y0 + 256, row.x0 : row.x0 + 256]
        ids = set(np.unique(label).tolist()) - {0, INSTANCE_IGNORE}
        mine = frame[frame[C.TILE_ID] == row.tile_id]
        assert ids <= set(mine["instance_id"]), row.tile_id
        assert (mine["x0"] >= row.x0).all() and (mine["x1"] <= row.x0 + 256).all()
    return table


def _crash_once_teacher(marker: Path) -> type[MaskTeacher]:
    """A teacher whose first call anywhere kills its actor process (defined locally, so Ray
    pickles it by value)."""

    class CrashOnceTeacher(MaskTeacher):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if not marker.exists():
                marker.touch()
                os._exit(1)  # the actor dies mid-batch, as on a segfault or an OOM kill
            return super().__call__(batch)

    return CrashOnceTeacher


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_interrupted_run_resumes_and_a_killed_actor_is_retried(
    clean_run: tuple[str, dict], real_store: Path, tmp_path: Path
) -> None:
    url = _copy(real_store, tmp_path)
    first = run_pseudo_label(
        url, TEACHER, pool=pool(1), max_tiles=10, **RUN
    )  # stops after 10 tiles
    assert first["tiles_processed"] == 10 and first["tiles_remaining"] == 26
    assert read_manifest(url).num_rows == 10 and read_instances(url).num_rows > 0
    # A batch whose instance part was written but not its manifest part (a writer that died
    # between the two): its rows must not count, and its tiles are labelled again.
    todo = np.setdiff1d(
        tile_store.read_tile_index(url).column(C.TILE_ID).to_numpy(),
        read_manifest(url).column(C.TILE_ID).to_numpy(),
    )[:2]
    orphan = read_instances(url).slice(0, 3).to_pandas().assign(tile_id=todo[0], instance_id=999)
    (Path(url) / INSTANCE_PARTS_DIR).mkdir()
    pq.write_table(
        pa.Table.from_pandas(orphan, schema=INSTANCE_SCHEMA, preserve_index=False),
        Path(url) / INSTANCE_PARTS_DIR / part_name(todo),
    )
    # The rerun skips the 10 recorded tiles; its only actor dies on its first batch, is
    # restarted by Ray, and the batch is retried.
    marker = tmp_path / "crashed"
    crashing = _crash_once_teacher(marker)
    second = run_pseudo_label(url, TEACHER, pool=pool(1), teacher_cls=crashing, **RUN)
    assert marker.exists()
    assert second["tiles_already_done"] == 10 and second["tiles_processed"] == 26
    assert second["tiles_remaining"] == 0
    manifest = read_manifest(url).to_pandas()
    assert len(manifest) == _tile_count(url) and manifest[C.TILE_ID].is_unique
    # same content as one uninterrupted run: no tile was written with other content
    _assert_same_content(url, clean_run[0])
    # and the same instance table: no row twice, none of the unrecorded part
    ours, theirs = read_instances(url).to_pandas(), read_instances(clean_run[0]).to_pandas()
    assert 999 not in set(ours["instance_id"])
    pd.testing.assert_frame_equal(ours, theirs, check_exact=False, atol=1e-4)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_prompted_mode_keeps_each_crown_inside_its_box(
    clean_run: tuple[str, dict], tmp_path: Path
) -> None:
    url = _copy(Path(clean_run[0]), tmp_path)  # labelled by the automatic teacher
    margin = 0.1
    prompted = replace(TEACHER, mode="prompted", box_margin=margin)
    summary = run_pseudo_label(url, prompted, pool=pool(2), overwrite=True, **RUN)
    assert summary["tiles_processed"] == 36 and summary["mode"] == "prompted"
    root = zarr.open_group(url, mode="r")
    painted_boxes = total_boxes = 0
    for source in tile_store.read_store_meta(root).sources:
        label = root[source][C.PSEUDO_LABEL][...]
        valid = root[source][C.VALID][...]
        if tile_store.BOXES not in root[source]:
            assert np.all(label[valid] == 0)  # Dubai: no prompts, all background
            continue
        boxes = root[source][tile_store.BOXES][...]
        total_boxes += len(boxes)
        for box_id, (x0, y0, x1, y1) in enumerate(boxes, start=1):
            ys, xs = np.nonzero(label == box_id)
            if len(ys) == 0:
                continue  # random weights: some masks are empty or painted over
            painted_boxes += 1
            pad_x, pad_y = margin * (x1 - x0), margin * (y1 - y0)
            assert xs.min() >= np.floor(x0 - pad_x) and xs.max() < np.ceil(x1 + pad_x)
            assert ys.min() >= np.floor(y0 - pad_y) and ys.max() < np.ceil(y1 + pad_y)
            # what lies outside the box is at most the margin ring around it
            outside = ~((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1))
            ring = (x1 - x0 + 2 * pad_x + 1) * (y1 - y0 + 2 * pad_y + 1) - (x1 - x0) * (y1 - y0)
            assert outside.sum() <= ring
        assert int(label[valid].max()) <= len(boxes)
    assert total_boxes == 61 + 7 + 37 and painted_boxes >= total_boxes // 2
    manifest = read_manifest(url).to_pandas()
    assert set(manifest["mode"]) == {"prompted"} and len(manifest) == 36


def test_cli_flags_are_kebab_case_with_help() -> None:
    parser = argparse.ArgumentParser(prog="semisup pseudo-label")
    add_arguments(parser)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, action.option_strings
        assert all(flag.startswith("--") and "_" not in flag for flag in action.option_strings)
    args = parser.parse_args(
        ["--store", "s.zarr", "--mode", "prompted", "--model", "tiny", "--checkpoint", "x.pth"]
        + ["--actors", "3", "--gpus-per-actor", "0.5", "--batch-size", "4", "--overwrite"]
    )
    assert (args.store, args.mode, args.model, args.checkpoint) == (
        "s.zarr",
        "prompted",
        "tiny",
        "x.pth",
    )
    assert (args.actors, args.gpus_per_actor, args.batch_size, args.overwrite) == (3, 0.5, 4, True)
    assert "semisup pseudo-label --store" in parser.format_help()  # the example
    with pytest.raises(SystemExit):
        parser.parse_args(["--store", "s.zarr", "--mode", "panoptic"])


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_overlapping_tiles_with_halo_write_only_their_own_pixels(
    ray_session: None, tmp_path: Path
) -> None:
    from store_factory import SourceSpec, build_store

    url = str(tmp_path / "overlap.zarr")
    build_store(url, [SourceSpec("a", 150, 170, texture="smooth")], tile_size=64, overlap=16)
    summary = run_pseudo_label(url, replace(TEACHER, halo=8), pool=pool(1), **RUN)
    assert summary["tiles_processed"] == _tile_count(url) == 12
    group = zarr.open_group(url, mode="r")["a"]
    assert group[C.PSEUDO_LABEL].chunks == (48, 48)  # the stride: one owner per chunk
    label = group[C.PSEUDO_LABEL][...]
    assert np.all(label != INSTANCE_IGNORE)  # every pixel owned by exactly one written tile
    # the owned window of a tile holds what the teacher gives that tile (with its halo)
    teacher = MaskTeacher(url, replace(TEACHER, halo=8), device="cpu")
    row = tile_store.read_tile_index(url).to_pandas().iloc[5]
    tile = tile_store.read_tile(group, row.y0, row.x0, 64, halo=8)
    out = teacher(
        {
            C.IMAGE: tile[C.IMAGE][None],
            C.VALID: tile[C.VALID][None],
            C.SOURCE: np.array(["a"], dtype=object),
            C.Y0: np.array([row.y0]),
            C.X0: np.array([row.x0]),
        }
    )
    ys, ye, xs, xe = owned_window(row.y0, row.x0, 150, 170, 64, 16)
    window = (slice(ys - row.y0 + 8, ye - row.y0 + 8), slice(xs - row.x0 + 8, xe - row.x0 + 8))
    assert np.mean(label[ys:ye, xs:xe] != out[C.PSEUDO_LABEL][0][window]) < 1e-3
    np.testing.assert_allclose(
        group[C.CONFIDENCE][ys:ye, xs:xe], out[C.CONFIDENCE][0][window], atol=1e-5
    )

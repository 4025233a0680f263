"""Streaming tiles from Zarr stores with Ray Data: every tile, exactly once, equal to read_tile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import zarr
from store_factory import SourceSpec, SyntheticStore, build_store

from semisup import _zarr_datasource as zarr_datasource
from semisup import columns as C
from semisup import store as tile_store
from semisup._zarr_datasource import ZarrTileDatasource
from semisup.config import StreamConfig
from semisup.data import read_tiles, read_tiles_from_config
from semisup.tile_read import (
    DEFAULT_COLUMNS,
    SourceLayout,
    covering_windows,
    group_tiles,
    read_tile_group,
)

TILE = 32
PIXEL_COLUMNS = (C.IMAGE, C.VALID, C.LABEL)
# Every column but the teacher's (tested on their own below): 5 bytes per pixel with 3 bands.
STORE_COLUMNS = DEFAULT_COLUMNS

# Sizes are not multiples of TILE, so right and bottom edge tiles are short. Source "a" has a
# nodata box covering tile (0, 0) entirely and tile (0, 1) partly.
SOURCES = (
    SourceSpec("a", 100, 140, nodata_box=(0, 0, 40, 40), split=C.LABELED),
    SourceSpec("b", 70, 50, labeled=False, split=C.UNLABELED, texture="smooth"),
    SourceSpec("c", 45, 75, split=C.VAL),
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    path = tmp_path_factory.mktemp("stream") / "tiles.zarr"
    return build_store(str(path), SOURCES, tile_size=TILE)


def rows_by_id(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    by_id = {int(row[C.TILE_ID]): row for row in rows}
    assert len(by_id) == len(rows), "a tile was streamed more than once"
    return by_id


def nodata_ids(synthetic: SyntheticStore) -> set[int]:
    fraction = synthetic.index.column("valid_fraction").to_numpy()
    ids = synthetic.index.column(C.TILE_ID).to_numpy()
    return set(ids[fraction == 0].tolist())


def assert_equals_read_tile(row: dict[str, Any], root: zarr.Group, halo: int) -> None:
    expected = tile_store.read_tile(root[row[C.SOURCE]], int(row[C.Y0]), int(row[C.X0]), TILE, halo)
    span = TILE + 2 * halo
    expected.setdefault(C.LABEL, np.full((span, span), C.IGNORE_INDEX, dtype=np.uint8))
    for name in PIXEL_COLUMNS:
        got = row[name]
        assert got.dtype == expected[name].dtype, (name, row[C.TILE_ID])
        assert got.shape == expected[name].shape, (name, row[C.TILE_ID])
        np.testing.assert_array_equal(got, expected[name], err_msg=f"{name} of {row[C.TILE_ID]}")


# ---------------------------------------------------------------------------------------------
# Planning and reading without Ray


def test_groups_are_row_major_runs_of_one_source(synthetic: SyntheticStore) -> None:
    groups = group_tiles(synthetic.index, tiles_per_task=5)
    assert sum(len(g) for g in groups) == synthetic.index.num_rows
    for group in groups:
        assert 1 <= len(group) <= 5
        keys = list(zip(group.row.tolist(), group.col.tolist(), strict=True))
        assert keys == sorted(keys)
    ids = np.concatenate([g.tile_id for g in groups])
    assert sorted(ids.tolist()) == sorted(synthetic.tile_ids())


def test_covering_windows_partition_the_group(synthetic: SyntheticStore) -> None:
    for group in group_tiles(synthetic.index, tiles_per_task=7):
        rectangles = covering_windows(group)
        assert sorted(np.concatenate(rectangles).tolist()) == list(range(len(group)))
        for tiles in rectangles:  # a full rectangle of grid cells, nothing outside the group
            rows, cols = group.row[tiles], group.col[tiles]
            cells = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert cells == len(tiles)


class CountingArray:
    """A zarr array stand-in that counts reads."""

    def __init__(self, array: Any) -> None:
        self.array, self.reads = array, 0
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        self.reads += 1
        return self.array[key]


def test_a_group_reads_whole_rectangles_not_tiles(synthetic: SyntheticStore) -> None:
    source = {name: CountingArray(synthetic_array(synthetic, "a", name)) for name in PIXEL_COLUMNS}
    index = synthetic.index.filter(pa.compute.equal(synthetic.index.column(C.SOURCE), "a"))
    (group,) = group_tiles(index, tiles_per_task=64)  # 4 rows × 5 columns: one rectangle
    layout = SourceLayout(bands=3, dtype="uint8", labeled=True)
    batch = read_tile_group(
        source, group, tile_size=TILE, halo=4, columns=STORE_COLUMNS, layout=layout
    )
    assert len(group) == 20 and batch[C.IMAGE].shape == (20, TILE + 8, TILE + 8, 3)
    assert [source[name].reads for name in PIXEL_COLUMNS] == [1, 1, 1]


def synthetic_array(synthetic: SyntheticStore, source_id: str, name: str) -> np.ndarray:
    arrays = {C.IMAGE: synthetic.images, C.VALID: synthetic.valid, C.LABEL: synthetic.labels}
    array = arrays[name][source_id]
    assert array is not None
    return array


@pytest.mark.parametrize("target_block_bytes", [None, 3 * 38 * 38 * 5])  # None: one block
def test_block_metadata_matches_the_blocks(
    synthetic: SyntheticStore, target_block_bytes: int | None
) -> None:
    layouts = {s.source_id: SourceLayout(s.bands, s.dtype, s.labeled) for s in SOURCES}
    datasource = ZarrTileDatasource(
        synthetic.url,
        group_tiles(synthetic.index, tiles_per_task=7),
        layouts,
        tile_size=TILE,
        halo=3,
        columns=STORE_COLUMNS,
        target_block_bytes=target_block_bytes,
    )
    tasks = datasource.get_read_tasks(parallelism=1)
    assert len(tasks) == datasource.num_tasks
    root = tile_store.open_store(synthetic.url)
    for task in tasks:
        blocks = list(task())
        assert len(blocks) == (1 if target_block_bytes is None else -(-task.metadata.num_rows // 3))
        assert sum(block.num_rows for block in blocks) == task.metadata.num_rows
        assert all(block.schema == task.schema for block in blocks)
        size = sum(block.nbytes for block in blocks)
        assert task.metadata.size_bytes == pytest.approx(size, rel=0.05)
        for block in blocks:
            for row in block.to_pylist():
                row.update({name: np.asarray(row[name]) for name in PIXEL_COLUMNS})
                assert_equals_read_tile(row, root, halo=3)
    total = sum(task.metadata.size_bytes for task in tasks)
    assert datasource.estimate_inmemory_data_size() == total


def test_overlapping_grid_reads_like_read_tile(tmp_path: Path) -> None:
    spec = SourceSpec("o", 90, 75)
    synthetic = build_store(str(tmp_path / "o.zarr"), [spec], tile_size=TILE, overlap=10)
    datasource = ZarrTileDatasource(
        synthetic.url,
        group_tiles(synthetic.index, tiles_per_task=5),
        {"o": SourceLayout(3, "uint8", True)},
        tile_size=TILE,
        halo=4,
        columns=STORE_COLUMNS,
    )
    root = tile_store.open_store(synthetic.url)
    rows = [row for task in datasource.get_read_tasks(1) for b in task() for row in b.to_pylist()]
    assert sorted(row[C.TILE_ID] for row in rows) == sorted(synthetic.tile_ids())
    for row in rows:
        row.update({name: np.asarray(row[name]) for name in PIXEL_COLUMNS})
        assert_equals_read_tile(row, root, halo=4)


# ---------------------------------------------------------------------------------------------
# Streaming with Ray


@pytest.mark.parametrize(
    ("halo", "tiles_per_task", "block_rows"), [(0, 64, None), (5, 1, None), (9, 4, None), (2, 9, 2)]
)
@pytest.mark.ray
@pytest.mark.timeout(120)
def test_every_tile_once_and_equal_to_read_tile(
    synthetic: SyntheticStore,
    halo: int,
    tiles_per_task: int,
    block_rows: int | None,
    monkeypatch: pytest.MonkeyPatch,
    ray_session: None,
) -> None:
    if block_rows is not None:  # several blocks per read task
        span = TILE + 2 * halo
        monkeypatch.setattr(zarr_datasource, "TARGET_BLOCK_BYTES", block_rows * span * span * 5)
    ds = read_tiles(synthetic.url, halo=halo, tiles_per_task=tiles_per_task)
    rows = rows_by_id(ds.take_all())
    assert set(rows) == synthetic.tile_ids() - nodata_ids(synthetic)
    root = tile_store.open_store(synthetic.url)
    for row in rows.values():
        assert_equals_read_tile(row, root, halo)
        assert row[C.SPLIT] == {s.source_id: s.split for s in SOURCES}[row[C.SOURCE]]
    unlabeled = [r for r in rows.values() if r[C.SOURCE] == "b"]
    assert unlabeled and all((r[C.LABEL] == C.IGNORE_INDEX).all() for r in unlabeled)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_halo_pads_outside_and_shows_neighbours_inside(
    synthetic: SyntheticStore, ray_session: None
) -> None:
    halo = 6
    rows = rows_by_id(read_tiles(synthetic.url, split=C.VAL, halo=halo).take_all())
    image, valid, label = (synthetic_array(synthetic, "c", n) for n in PIXEL_COLUMNS)
    corner = next(r for r in rows.values() if (r[C.ROW], r[C.COL]) == (0, 0))
    # above and left of the raster: padding
    assert (corner[C.IMAGE][:halo] == 0).all() and (corner[C.IMAGE][:, :halo] == 0).all()
    assert not corner[C.VALID][:halo].any() and not corner[C.VALID][:, :halo].any()
    assert (corner[C.LABEL][:halo] == C.IGNORE_INDEX).all()
    # right and below the tile: the neighbours' pixels
    np.testing.assert_array_equal(
        corner[C.IMAGE][halo:, halo:], image[: TILE + halo, : TILE + halo]
    )
    np.testing.assert_array_equal(
        corner[C.LABEL][halo:, halo:], label[: TILE + halo, : TILE + halo]
    )
    # the bottom-right tile is 13×11 px of raster (45×75 px source), padded to the full span
    edge = next(r for r in rows.values() if (r[C.ROW], r[C.COL]) == (1, 2))
    h, w = 45 - 32, 75 - 64
    np.testing.assert_array_equal(
        edge[C.IMAGE][: halo + h, : halo + w], image[32 - halo :, 64 - halo :]
    )
    np.testing.assert_array_equal(
        edge[C.VALID][: halo + h, : halo + w], valid[32 - halo :, 64 - halo :]
    )
    assert (edge[C.IMAGE][halo + h :] == 0).all() and (edge[C.IMAGE][:, halo + w :] == 0).all()
    assert not edge[C.VALID][halo + h :].any() and not edge[C.VALID][:, halo + w :].any()
    assert (edge[C.LABEL][halo + h :] == C.IGNORE_INDEX).all()
    assert (edge[C.LABEL][:, halo + w :] == C.IGNORE_INDEX).all()


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_split_filter_returns_exactly_that_split(
    synthetic: SyntheticStore, ray_session: None
) -> None:
    for split in C.SPLITS:
        rows = rows_by_id(read_tiles(synthetic.url, split=split, columns=[C.TILE_ID]).take_all())
        assert set(rows) == synthetic.tile_ids(split) - nodata_ids(synthetic)
    both = read_tiles(synthetic.url, split=[C.VAL, C.UNLABELED], columns=[C.TILE_ID]).take_all()
    assert set(rows_by_id(both)) == synthetic.tile_ids(C.VAL) | synthetic.tile_ids(C.UNLABELED)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_shuffle_seed_reorders_the_read_tasks_not_the_tiles(
    synthetic: SyntheticStore, ray_session: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    # outputs in task order (concurrent reads otherwise interleave by completion time)
    options = ray.data.DataContext.get_current().execution_options
    monkeypatch.setattr(options, "preserve_order", True)

    def order(**kwargs: Any) -> list[int]:
        dataset = read_tiles(synthetic.url, columns=[C.TILE_ID], tiles_per_task=4, **kwargs)
        return [int(i) for b in dataset.iter_batches(batch_size=None) for i in b[C.TILE_ID]]

    stored, first, again, other = (
        order(),
        order(shuffle_seed=1),
        order(shuffle_seed=1),
        order(shuffle_seed=2),
    )
    assert sorted(first) == sorted(stored) and first != stored  # the same tiles, mixed sources
    assert first == again and first != other  # the seed decides the order
    # the tiles of one read task stay together (chunk-aligned reads): one run per group
    read = synthetic.index.filter(pc.is_in(synthetic.index[C.TILE_ID], pa.array(stored)))
    group_of = {
        int(tile): g
        for g, group in enumerate(group_tiles(read, tiles_per_task=4))
        for tile in group.tile_id
    }
    sequence = [group_of[tile] for tile in first]
    runs = 1 + sum(a != b for a, b in zip(sequence, sequence[1:], strict=False))
    assert runs == len(set(sequence))


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_nodata_tiles_are_skipped_unless_asked_for(
    synthetic: SyntheticStore, ray_session: None
) -> None:
    empty = nodata_ids(synthetic)
    assert empty, "the synthetic store should hold an all-nodata tile"
    kept = rows_by_id(read_tiles(synthetic.url, split=C.LABELED).take_all())
    assert not empty & set(kept)
    everything = rows_by_id(
        read_tiles(synthetic.url, split=C.LABELED, skip_nodata=False).take_all()
    )
    assert set(everything) == synthetic.tile_ids(C.LABELED)
    for tile_id in empty:
        row = everything[tile_id]
        assert not row[C.VALID].any() and (row[C.IMAGE] == 0).all()
        assert (row[C.LABEL] == C.IGNORE_INDEX).all()


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_batches_are_uniform_and_columns_selectable(
    synthetic: SyntheticStore, ray_session: None
) -> None:
    ds = read_tiles(synthetic.url, halo=2, tiles_per_task=3)
    batches = list(ds.iter_batches(batch_size=8, batch_format="numpy"))
    labels = np.concatenate([b[C.LABEL] for b in batches])  # labelled and unlabelled sources
    assert labels.shape == (ds.count(), TILE + 4, TILE + 4) and labels.dtype == np.uint8
    subset = read_tiles(synthetic.url, columns=[C.LABEL, C.TILE_ID]).take(2)
    assert all(set(row) == {C.LABEL, C.TILE_ID} for row in subset)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_other_dtypes_and_the_config_entry_point(tmp_path: Path, ray_session: None) -> None:
    spec = SourceSpec("u16", 40, 70, bands=4, dtype="uint16", texture="smooth")
    synthetic = build_store(str(tmp_path / "u16.zarr"), [spec], tile_size=TILE)
    config = StreamConfig(halo=3, tiles_per_task=2)
    rows = rows_by_id(read_tiles_from_config(synthetic.url, config).take_all())
    assert set(rows) == synthetic.tile_ids()
    root = tile_store.open_store(synthetic.url)
    for row in rows.values():
        assert row[C.IMAGE].dtype == np.uint16 and row[C.IMAGE].shape == (38, 38, 4)
        assert_equals_read_tile(row, root, halo=3)
    assert read_tiles(synthetic.url, split=C.VAL).count() == 0  # a known split with no tiles


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_memory_store_is_read_in_the_driver(ray_session: None) -> None:
    url = "memory://stream-test/tiles.zarr"
    synthetic = build_store(url, SOURCES[1:], tile_size=TILE)
    rows = rows_by_id(read_tiles(url, halo=1).take_all())
    assert set(rows) == synthetic.tile_ids()
    root = tile_store.open_store(url)
    for row in rows.values():
        assert_equals_read_tile(row, root, halo=1)


# ---------------------------------------------------------------------------------------------
# Object storage: a real S3 endpoint on 127.0.0.1 that Ray's worker processes reach (conftest)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_s3_store_streams_like_the_local_one(
    synthetic: SyntheticStore, s3_options: dict[str, str], ray_session: None
) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    fs.mkdir("tiles-bucket")
    fs.put(synthetic.url, "tiles-bucket/x.zarr", recursive=True)
    remote = read_tiles("s3://tiles-bucket/x.zarr", halo=4, storage_options=s3_options)
    local = rows_by_id(read_tiles(synthetic.url, halo=4).take_all())
    streamed = rows_by_id(remote.take_all())
    assert set(streamed) == set(local)
    for tile_id, row in streamed.items():
        for name in DEFAULT_COLUMNS:
            np.testing.assert_array_equal(row[name], local[tile_id][name], err_msg=name)
    with pytest.raises(FileNotFoundError, match="s3://tiles-bucket/missing.zarr"):
        read_tiles("s3://tiles-bucket/missing.zarr", storage_options=s3_options)


# ---------------------------------------------------------------------------------------------
# Errors name the store, the value and what is expected


def test_missing_store(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.zarr")
    with pytest.raises(FileNotFoundError, match="nowhere.zarr"):
        read_tiles(missing)


def test_not_a_semisup_store(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="plain.*not a semisup tile store"):
        read_tiles(str(tmp_path / "plain"))
    zarr.open_group(str(tmp_path / "bare.zarr"), mode="w")  # a Zarr group without semisup attrs
    with pytest.raises(ValueError, match="bare.zarr.*not a semisup tile store"):
        read_tiles(str(tmp_path / "bare.zarr"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "train"}, r"unknown split 'train'; expected one of labeled, unlabeled, val"),
        ({"split": [C.VAL, "tset"]}, r"unknown split 'tset'"),
        ({"columns": [C.IMAGE, "mask"]}, r"unknown column 'mask'; expected .*image, valid, label"),
        ({"columns": []}, r"unknown column '\(none given\)'"),
        ({"halo": -1}, r"halo must be >= 0, got -1"),
        ({"tiles_per_task": 0}, r"tiles_per_task must be >= 1, got 0"),
        ({"read_cpus": 0}, r"read_cpus must be > 0, got 0"),
    ],
)
def test_bad_arguments(synthetic: SyntheticStore, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        read_tiles(synthetic.url, **kwargs)
    assert synthetic.url in str(raised.value)


@pytest.mark.timeout(120)
def test_pseudo_label_columns_stream_where_written_and_fill_elsewhere(
    tmp_path: Path, ray_session: None
) -> None:
    sources = (
        SourceSpec("p", 70, 50, split=C.UNLABELED),
        SourceSpec("q", 40, 40, split=C.UNLABELED),
    )
    synthetic = build_store(str(tmp_path / "s.zarr"), sources, tile_size=TILE)
    root = zarr.open_group(synthetic.url, mode="r+")
    rng = np.random.default_rng(0)
    pseudo = rng.integers(0, 5, (70, 50)).astype(np.uint8)
    confidence = rng.random((70, 50)).astype(np.float32)
    root["p"].create_array(C.PSEUDO_LABEL, data=pseudo, chunks=(TILE, TILE))
    root["p"].create_array(C.CONFIDENCE, data=confidence, chunks=(TILE, TILE))
    columns = [C.SOURCE, C.Y0, C.X0, C.PSEUDO_LABEL, C.CONFIDENCE]
    rows = read_tiles(synthetic.url, columns=columns, skip_nodata=False).take_all()
    assert len(rows) == len(synthetic.tile_ids())
    for row in rows:
        y0, x0 = int(row[C.Y0]), int(row[C.X0])
        assert row[C.PSEUDO_LABEL].dtype == np.uint8 and row[C.CONFIDENCE].dtype == np.float32
        if row[C.SOURCE] == "p":
            expected_label = tile_store.read_window(pseudo, y0, x0, TILE, TILE, C.IGNORE_INDEX)
            expected_conf = tile_store.read_window(confidence, y0, x0, TILE, TILE, 0.0)
        else:  # no teacher output in this source: ignore everywhere, confidence 0
            expected_label = np.full((TILE, TILE), C.IGNORE_INDEX, np.uint8)
            expected_conf = np.zeros((TILE, TILE), np.float32)
        np.testing.assert_array_equal(row[C.PSEUDO_LABEL], expected_label)
        np.testing.assert_array_equal(row[C.CONFIDENCE], expected_conf)

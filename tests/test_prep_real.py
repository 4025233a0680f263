"""``build_store`` on the real imagery: Dubai masks, NEON boxes, SpaceNet 16-bit GeoTIFF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import rasterio.crs
import rasterio.windows
from PIL import Image

from data_prep.ingest import PrepResult, build_store
from semisup import columns as C
from semisup.config import PrepConfig
from semisup.store import (
    BOX_LABEL,
    BOXES,
    TILE_INDEX_SCHEMA,
    open_store,
    read_source_meta,
    read_tile_index,
    scale_to_uint8,
)

# The colour table of ../shared/data/README.md; classes in its order, unlabeled/void ignored.
DUBAI_COLOURS = {
    "#3C1098": 0,  # building
    "#8429F6": 1,  # land
    "#6EC1E4": 2,  # road
    "#FEDD3A": 3,  # vegetation
    "#E2A929": 4,  # water
    "#9B9B9B": 255,  # unlabeled
    "#000000": 255,  # void
}
DUBAI_CLASSES = ("building", "land", "road", "vegetation", "water")


@pytest.fixture(scope="module")
def dubai_store(dubai_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PrepResult:
    tmp = tmp_path_factory.mktemp("dubai")
    colours = tmp / "dubai_colors.json"
    colours.write_text(json.dumps(DUBAI_COLOURS))
    tiles = [dubai_dir / f"tile_{t}" for t in range(1, 7)]
    return build_store(
        [t / "images" for t in tiles],
        tmp / "dubai.zarr",
        labels=[t / "masks" for t in tiles],
        label_colors=colours,
        class_names=DUBAI_CLASSES,
        config=PrepConfig(split_by="folder", val_sources=("tile_6*",), labeled_fraction=0.5),
        quiet=True,
    )


def _expected_ids(mask_path: Path) -> np.ndarray:
    """Class ids by one boolean comparison per colour, independent of data_prep."""
    rgb = np.asarray(Image.open(mask_path).convert("RGB"))
    ids = np.full(rgb.shape[:2], -1, dtype=np.int32)
    for hex_colour, class_id in DUBAI_COLOURS.items():
        colour = [int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]
        ids[(rgb == colour).all(axis=-1)] = class_id
    assert (ids >= 0).all(), f"{mask_path} has colours outside the README table"
    return ids


def test_dubai_pixels_and_class_ids_read_back_exactly(
    dubai_store: PrepResult, dubai_dir: Path
) -> None:
    root = open_store(str(dubai_store.path))
    meta = dubai_store.meta
    assert len(meta.sources) == 54 and meta.num_classes == 5 and meta.class_names == DUBAI_CLASSES
    index = read_tile_index(str(dubai_store.path)).to_pandas()
    for source_id in meta.sources:
        tile, _, stem = source_id.split("__")
        image_path = dubai_dir / tile / "images" / f"{stem}.jpg"
        group = root[source_id]
        expected_image = np.asarray(Image.open(image_path))
        np.testing.assert_array_equal(group[C.IMAGE][:], expected_image)
        expected_ids = _expected_ids(dubai_dir / tile / "masks" / f"{stem}.png")
        stored_ids = group[C.LABEL][:]
        np.testing.assert_array_equal(stored_ids, expected_ids)
        assert group[C.VALID][:].all()
        source_meta = read_source_meta(root, source_id)
        assert source_meta.image_path == str(image_path)
        assert source_meta.band_low == (0.0,) * 3 and source_meta.band_high == (255.0,) * 3
        # label_coverage is the labelled share of each tile's pixels.
        for row in index[index[C.SOURCE] == source_id].itertuples():
            window = stored_ids[row.y0 : row.y0 + row.height, row.x0 : row.x0 + row.width]
            assert row.label_coverage == pytest.approx((window != 255).mean(), abs=1e-6)


def test_dubai_split_by_folder_with_val_glob(dubai_store: PrepResult) -> None:
    index = read_tile_index(str(dubai_store.path)).to_pandas()
    folder = index[C.SOURCE].str.split("__").str[0]
    val_folders = set(folder[index[C.SPLIT] == C.VAL])
    assert val_folders == {"tile_6"}
    assert (index.loc[folder == "tile_6", C.SPLIT] == C.VAL).all()
    # Whole folders per split, half of the other five labelled (round(2.5) == 2).
    assert (index.groupby(folder)[C.SPLIT].nunique() == 1).all()
    assert index.loc[index[C.SPLIT] == C.LABELED].pipe(lambda t: folder[t.index].nunique()) == 2
    assert index[C.TILE_ID].tolist() == list(range(len(index)))
    assert list(index[C.SOURCE]) == sorted(index[C.SOURCE])  # row-major over sorted sources


NEON_BOX_COUNTS = {
    "neon_trees__OSBS_029": 61,
    "neon_trees__2018_SJER_3_252000_4107000_image_477": 7,
    "neon_trees__SOAP_061": 37,
}
VEGAS = "spacenet_vegas__sample_geotiff"


@pytest.fixture(scope="module")
def geo_store(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> PrepResult:
    tmp = tmp_path_factory.mktemp("geo")
    neon, vegas = shared_data / "neon_trees", shared_data / "spacenet_vegas"
    colours = tmp / "footprints.json"
    colours.write_text('{"#000000": 0, "#FFFFFF": 1}')
    return build_store(
        [neon, vegas / "sample_geotiff.tif"],
        tmp / "geo.zarr",
        labels=["-", vegas / "sample_fp_mask.tif"],
        label_colors=colours,
        boxes=[
            neon / "OSBS_029.csv",
            neon / "2018_SJER_3_252000_4107000_image_477_truth.csv",
            neon / "SOAP_061.xml",
        ],
        config=PrepConfig(tile_size=128, overlap=32),
        quiet=True,
    )


def _source_path(shared_data: Path, source_id: str) -> Path:
    folder, stem = source_id.split("__")
    return next((shared_data / folder).glob(f"{stem}.*"))


# rasterio.windows.bounds uses the affine `*` operator, which affine now marks as deprecated.
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_geotiff_pixels_crs_transform_and_tile_bounds(
    geo_store: PrepResult, shared_data: Path
) -> None:
    root = open_store(str(geo_store.path))
    index = read_tile_index(str(geo_store.path)).to_pandas()
    geotiffs = [s for s in geo_store.meta.sources if not s.endswith("SOAP_061")]
    assert len(geotiffs) == 3
    for source_id in geotiffs:
        meta = read_source_meta(root, source_id)
        with rasterio.open(_source_path(shared_data, source_id)) as ds:
            assert rasterio.crs.CRS.from_wkt(meta.crs) == ds.crs
            assert meta.transform == tuple(ds.transform)[:6]
            assert meta.nodata == ds.nodata
            np.testing.assert_array_equal(
                root[source_id][C.IMAGE][:], np.moveaxis(ds.read(), 0, -1)
            )
            np.testing.assert_array_equal(root[source_id][C.VALID][:], ds.dataset_mask() > 0)
            tiles = index[index[C.SOURCE] == source_id]
            assert len(tiles) > 1
            for t in tiles.itertuples():
                window = rasterio.windows.Window(t.x0, t.y0, t.width, t.height)
                expected = rasterio.windows.bounds(window, ds.transform)  # left, bottom, right, top
                assert (t.minx, t.miny, t.maxx, t.maxy) == pytest.approx(expected, rel=1e-12)


def test_plain_png_has_no_georeferencing(geo_store: PrepResult) -> None:
    root = open_store(str(geo_store.path))
    meta = read_source_meta(root, "neon_trees__SOAP_061")
    assert meta.crs is None and meta.transform is None
    index = read_tile_index(str(geo_store.path)).to_pandas()
    first = index[index[C.SOURCE] == "neon_trees__SOAP_061"].iloc[0]
    assert (first.minx, first.miny, first.maxx, first.maxy) == (0, 0, 128, 128)  # pixels


def test_uint16_scaling_uses_valid_pixel_percentiles(
    geo_store: PrepResult, shared_data: Path
) -> None:
    root = open_store(str(geo_store.path))
    meta = read_source_meta(root, VEGAS)
    with rasterio.open(shared_data / "spacenet_vegas" / "sample_geotiff.tif") as ds:
        data = ds.read(1)
        valid = data != ds.nodata
    low, high = np.percentile(data[valid], [2, 98])
    assert meta.dtype == "uint16" and meta.band_low == (low,) and meta.band_high == (high,)
    stored = root[VEGAS][C.IMAGE][:]
    np.testing.assert_array_equal(stored[..., 0], data)
    expected = np.clip(np.round((data.astype(np.float64) - low) / (high - low) * 255), 0, 255)
    scaled = scale_to_uint8(stored, meta.band_low, meta.band_high)[..., 0]
    # float32 inside scale_to_uint8 vs float64 here: at most a rounding step apart.
    assert np.abs(scaled.astype(int) - expected).max() <= 1
    assert (scaled == expected).mean() > 0.999


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_footprint_mask_becomes_class_ids(geo_store: PrepResult, shared_data: Path) -> None:
    root = open_store(str(geo_store.path))
    with rasterio.open(shared_data / "spacenet_vegas" / "sample_fp_mask.tif") as ds:
        mask = ds.read(1)
    np.testing.assert_array_equal(root[VEGAS][C.LABEL][:], (mask == 255).astype(np.uint8))
    assert geo_store.meta.num_classes == 2
    index = read_tile_index(str(geo_store.path)).to_pandas()
    assert (index.loc[index[C.SOURCE] == VEGAS, "label_coverage"] == 1.0).all()
    neon_rows = index[index[C.SOURCE] != VEGAS]
    assert (neon_rows[C.SPLIT] == C.UNLABELED).all() and (neon_rows.label_coverage == 0).all()


def test_boxes_are_stored_with_counts_and_inside_the_image(geo_store: PrepResult) -> None:
    root = open_store(str(geo_store.path))
    for source_id, count in NEON_BOX_COUNTS.items():
        group = root[source_id]
        meta = read_source_meta(root, source_id)
        boxes, box_label = group[BOXES][:], group[BOX_LABEL][:]
        assert boxes.shape == (count, 4) and boxes.dtype == np.float32
        assert box_label.shape == (count,) and box_label.dtype == np.int32
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= meta.width).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= meta.height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert set(box_label) <= set(range(len(meta.box_label_names)))
    sjer = root["neon_trees__2018_SJER_3_252000_4107000_image_477"][BOXES][:]
    assert sjer[0].tolist() == [1, 103, 82, 235]  # CSV columns read by name, not position
    soap = read_source_meta(root, "neon_trees__SOAP_061")
    assert soap.box_label_names == ("Alive", "Dead")
    assert BOXES not in root[VEGAS]


def test_tile_index_schema_and_overlap_grid(geo_store: PrepResult) -> None:
    index = read_tile_index(str(geo_store.path))
    assert index.schema.equals(TILE_INDEX_SCHEMA)
    frame: pd.DataFrame = index.to_pandas()
    vegas = frame[frame[C.SOURCE] == VEGAS]
    assert sorted(set(vegas[C.Y0])) == list(range(0, 900 - 128 + 96, 96))  # stride 128 - 32


def test_box_classes_merge_the_names_box_files_use(shared_data: Path, tmp_path: Path) -> None:
    neon = shared_data / "neon_trees"
    result = build_store(
        [neon / "SOAP_061.png"],
        tmp_path / "soap.zarr",
        boxes=[neon / "SOAP_061.xml"],
        box_classes=["Alive,Dead=tree"],
        config=PrepConfig(tile_size=128),
        quiet=True,
    )
    root = open_store(str(result.path))
    (source_id,) = [name for name, _ in root.groups()]
    assert read_source_meta(root, source_id).box_label_names == ("tree",)
    assert (root[source_id][BOX_LABEL][:] == 0).all() and root[source_id][BOXES].shape[0] == 37

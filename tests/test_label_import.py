"""``semisup label import`` on a tiny prepped store: masks, polygons, Label Studio, versions.

The store (``template``) holds two georeferenced sources in EPSG:32640 with 16 px tiles:
``x__img__a`` (32×48, labelled: its tiles are labeled, unlabeled with hidden ground truth, and
val) and ``y__img__b`` (40×40, no labels; 3×3 tiles, the last row and column 8 px).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely.geometry
from PIL import Image
from rasterio.transform import Affine, from_origin

from data_prep.errors import PrepError
from data_prep.ingest import build_store
from semisup import columns as C
from semisup import store as tile_store
from semisup.cli import main as semisup_main
from semisup.label_import import import_labels

CRS = "EPSG:32640"
TILE = 16
A, B = "x__img__a", "y__img__b"
ORIGIN = {A: (500000.0, 2780000.0), B: (501000.0, 2780000.0)}
PIXEL_M = 0.5
COLOURS = {"#000000": 0, "#FF0000": 1, "#00FF00": 2, "#0000FF": 3, "#FFFFFF": 255}


def _tif(path: Path, array: np.ndarray, origin: tuple[float, float], crs: str = CRS) -> Path:
    """Write H×W or H×W×C uint8 as a GeoTIFF at ``origin`` (top-left, metres)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bands = array[..., None] if array.ndim == 2 else array
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=bands.shape[0],
        width=bands.shape[1],
        count=bands.shape[2],
        dtype="uint8",
        crs=crs,
        transform=from_origin(*origin, PIXEL_M, PIXEL_M),
    ) as ds:
        ds.write(np.moveaxis(bands, -1, 0))
    return path


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template")
    rng = np.random.default_rng(0)
    _tif(root / "x/img/a.tif", rng.integers(0, 256, (32, 48, 3), np.uint8), ORIGIN[A])
    _tif(root / "x/lab/a.tif", rng.integers(0, 4, (32, 48), np.uint8), ORIGIN[A])
    _tif(root / "y/img/b.tif", rng.integers(0, 256, (40, 40, 3), np.uint8), ORIGIN[B])
    config = {
        "tile_size": TILE,
        "split_by": "block",
        "block_size": TILE,
        "val_fraction": 0.34,
        "labeled_fraction": 0.5,
        "seed": 3,
    }
    build_store(
        [root / "x/img", root / "y/img"],
        root / "store.zarr",
        labels=[root / "x/lab", "-"],
        num_classes=4,
        class_names=["ground", "roof", "tree", "water"],
        config=config,
        quiet=True,
    )
    return root / "store.zarr"


@pytest.fixture
def store(template: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store.zarr"
    shutil.copytree(template, copy)
    return copy


def _index(store: Path) -> Any:
    return tile_store.read_tile_index(str(store)).to_pandas().set_index(C.TILE_ID)


def _tile(store: Path, source: str, row: int, col: int) -> Any:
    index = _index(store)
    return index[(index[C.SOURCE] == source) & (index[C.ROW] == row) & (index[C.COL] == col)].iloc[
        0
    ]


def _labels(store: Path, source: str) -> np.ndarray | None:
    """The source's current labels, H×W uint8 (None without labels), through store.label_array."""
    root = tile_store.open_store(str(store))
    array = tile_store.label_array(root[source])  # type: ignore[arg-type]
    return None if array is None else np.asarray(array[...])


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _split_counts(store: Path) -> dict[str, int]:
    return dict(_index(store)[C.SPLIT].value_counts())


def _quiet() -> io.StringIO:
    return io.StringIO()


# ---------------------------------------------------------------------------------------------
# Masks


def test_tile_pngs_move_exactly_those_tiles_with_their_labels(store: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    corner = rng.integers(0, 4, (16, 16), np.uint8)
    edge = rng.integers(0, 4, (8, 8), np.uint8)  # the bottom-right tile is clipped to 8×8
    edge[0, :3] = 255
    files = [
        _png(tmp_path / f"in/{B}__r0_c0.png", corner),
        _png(tmp_path / f"in/{B}__r2_c2.png", edge),
    ]
    before = _split_counts(store)
    log = io.StringIO()

    result = import_labels(store, [tmp_path / "in"], log=log)

    after = _split_counts(store)
    assert after[C.LABELED] == before[C.LABELED] + 2
    assert after[C.UNLABELED] == before[C.UNLABELED] - 2
    assert tile_store.label_version(str(store)) == result.version == 1
    labels = _labels(store, B)
    assert labels is not None
    np.testing.assert_array_equal(labels[:16, :16], corner)
    np.testing.assert_array_equal(labels[32:40, 32:40], edge)
    untouched = np.ones(labels.shape, bool)
    untouched[:16, :16] = untouched[32:, 32:] = False
    assert (labels[untouched] == C.IGNORE_INDEX).all()
    first, last = _tile(store, B, 0, 0), _tile(store, B, 2, 2)
    assert (first[C.SPLIT], last[C.SPLIT]) == (C.LABELED, C.LABELED)
    assert last["label_coverage"] == pytest.approx(61 / 64)
    record = tile_store.read_store_meta(tile_store.open_store(str(store))).label_versions[-1]
    assert sorted(item["sha256"] for item in record["inputs"]) == sorted(
        hashlib.sha256(f.read_bytes()).hexdigest() for f in files
    )
    assert record["tiles"] == sorted([int(first.name), int(last.name)])
    assert record["created"].endswith("+00:00")
    assert log.getvalue().count("[") >= 2  # one progress line per input file


def test_whole_source_colour_mask_by_image_stem(store: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 4, (40, 40), np.uint8)
    ids[:4] = 255
    palette = {v: k for k, v in COLOURS.items()}
    rgb = np.array(
        [[int(palette[i][j : j + 2], 16) for j in (1, 3, 5)] for i in range(256) if i in palette],
        np.uint8,
    )
    lookup = np.zeros((256, 3), np.uint8)
    lookup[[0, 1, 2, 3, 255]] = rgb
    _png(tmp_path / "b.png", lookup[ids])  # named like the source's image file b.tif

    result = import_labels(store, [tmp_path / "b.png"], label_colors=COLOURS, log=_quiet())

    np.testing.assert_array_equal(_labels(store, B), ids)
    index = _index(store)
    assert (index[index[C.SOURCE] == B][C.SPLIT] == C.LABELED).all()
    assert len(result.moved) == 9


# ---------------------------------------------------------------------------------------------
# Polygons


def _polygons() -> list[tuple[dict[str, Any], int]]:
    x0, y0 = ORIGIN[B]
    roof = shapely.geometry.box(x0 + 1.3, y0 - 7.1, x0 + 9.6, y0 - 0.4)
    tree = shapely.geometry.Polygon(
        [(x0 + 12, y0 - 12), (x0 + 19.7, y0 - 13), (x0 + 15, y0 - 19.2)]
    )
    return [(shapely.geometry.mapping(roof), 1), (shapely.geometry.mapping(tree), 2)]


def _expected_polygon_labels() -> np.ndarray:
    transform = Affine(PIXEL_M, 0, ORIGIN[B][0], 0, -PIXEL_M, ORIGIN[B][1])
    return rasterio.features.rasterize(
        _polygons(), out_shape=(40, 40), transform=transform, fill=255, dtype="uint8"
    )


def test_geojson_polygons_match_rasterio(store: Path, tmp_path: Path) -> None:
    names = ["ground", "roof", "tree", "water"]
    features = [
        {"type": "Feature", "geometry": geometry, "properties": {"class": names[class_id]}}
        for geometry, class_id in _polygons()
    ]
    path = tmp_path / "polygons.geojson"
    path.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": features,
                "crs": {"type": "name", "properties": {"name": CRS}},
            }
        )
    )

    result = import_labels(store, [path], log=_quiet())

    expected = _expected_polygon_labels()
    assert (expected != 255).sum() > 100
    np.testing.assert_array_equal(_labels(store, B), expected)
    index = _index(store)
    has_labels = {
        int(tile_id)
        for tile_id, row in index[index[C.SOURCE] == B].iterrows()
        if (expected[row.y0 : row.y0 + row.height, row.x0 : row.x0 + row.width] != 255).any()
    }
    assert set(result.moved) == has_labels and len(has_labels) >= 2


def _gpkg_blob(geometry: dict[str, Any]) -> bytes:
    # GeoPackage header: magic, version 0, flags 0b1 (little endian, no envelope), srs id
    return b"GP\x00\x01" + (32640).to_bytes(4, "little") + shapely.geometry.shape(geometry).wkb


def test_geopackage_polygons_match_rasterio(store: Path, tmp_path: Path) -> None:
    path = tmp_path / "polygons.gpkg"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE gpkg_spatial_ref_sys (srs_name TEXT, srs_id INTEGER, organization TEXT,"
            " organization_coordsys_id INTEGER, definition TEXT);"
            "CREATE TABLE gpkg_geometry_columns (table_name TEXT, column_name TEXT,"
            " geometry_type_name TEXT, srs_id INTEGER, z INTEGER, m INTEGER);"
            "CREATE TABLE areas (fid INTEGER PRIMARY KEY, geom BLOB, class INTEGER);"
        )
        wkt = rasterio.crs.CRS.from_string(CRS).to_wkt()
        db.execute(
            "INSERT INTO gpkg_spatial_ref_sys VALUES ('utm', 32640, 'EPSG', 32640, ?)", (wkt,)
        )
        db.execute(
            "INSERT INTO gpkg_geometry_columns VALUES ('areas', 'geom', 'POLYGON', 32640, 0, 0)"
        )
        for geometry, class_id in _polygons():
            db.execute(
                "INSERT INTO areas (geom, class) VALUES (?, ?)", (_gpkg_blob(geometry), class_id)
            )

    import_labels(store, [path], log=_quiet())

    np.testing.assert_array_equal(_labels(store, B), _expected_polygon_labels())


# ---------------------------------------------------------------------------------------------
# Label Studio


def test_label_studio_export(store: Path, tmp_path: Path) -> None:
    """A Label Studio export goes through semisup.labelstudio.export_masks (brush regions)."""
    from semisup.labelstudio import mask_results

    names = ["ground", "roof", "tree", "water"]
    mask = np.full((16, 16), 255, np.uint8)
    mask[2:9, 3:12] = 3
    mask[10:, :5] = 1
    data = {C.SOURCE: B, C.ROW: 1, C.COL: 0, C.HEIGHT: 16, C.WIDTH: 16, "image": "x.png"}
    annotation: dict[str, Any] = {
        "id": 1,
        "updated_at": "2026-12-01T10:00:00Z",
        "result": mask_results(mask, names),
    }
    export = tmp_path / "project.json"
    export.write_text(json.dumps([{"id": 7, "data": data, "annotations": [annotation]}]))

    result = import_labels(store, [export], log=_quiet())

    labels = _labels(store, B)
    assert labels is not None
    np.testing.assert_array_equal(labels[16:32, :16], mask)
    assert result.moved == (int(_tile(store, B, 1, 0).name),)
    annotation["result"][0]["value"]["brushlabels"] = ["lava"]
    export.write_text(json.dumps([{"id": 7, "data": data, "annotations": [annotation]}]))
    with pytest.raises(PrepError, match=r"task 7 .*\['lava'\] is not one of the classes"):
        import_labels(store, [export], log=_quiet())


# ---------------------------------------------------------------------------------------------
# Versions: atomic switch, no-op rerun, old versions kept


def _state(store: Path) -> tuple[Any, ...]:
    root = tile_store.open_store(str(store))
    groups: Any = {s: root[s] for s in (A, B)}
    tiles = [tile_store.read_tile(groups[s], y, x, TILE) for s, y, x in ((A, 0, 16), (B, 0, 0))]
    return (
        _index(store).to_dict(),
        root.attrs.asdict(),
        [tile.get(C.LABEL, np.empty(0)).tolist() for tile in tiles],
        tile_store.label_version(str(store)),
    )


def test_crash_before_switch_leaves_store_as_it_was(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mask = np.full((16, 16), 1, np.uint8)
    path = _png(tmp_path / f"{B}__r0_c0.png", mask)
    before = _state(store)

    def crash(*args: Any) -> None:
        raise RuntimeError("power cut")

    monkeypatch.setattr(tile_store, "replace_store_meta", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        import_labels(store, [path], log=_quiet())

    assert (store / B / "label_v1" / "zarr.json").is_file()  # the chunks were written
    assert (store / "tiles.v1.parquet").is_file()
    assert _state(store) == before
    monkeypatch.undo()
    assert import_labels(store, [path], log=_quiet()).version == 1  # the next try completes
    np.testing.assert_array_equal(_labels(store, B)[:16, :16], mask)  # type: ignore[index]


def test_rerun_is_a_no_op_and_old_versions_stay(store: Path, tmp_path: Path) -> None:
    first = _png(tmp_path / "one" / f"{B}__r0_c0.png", np.full((16, 16), 1, np.uint8))
    second = _png(tmp_path / "two" / f"{B}__r0_c1.png", np.full((16, 16), 2, np.uint8))
    import_labels(store, [first], log=_quiet())
    files = _snapshot(store)
    log = io.StringIO()

    again = import_labels(store, [first], log=log)

    assert again.already_imported and again.version == 1
    assert "already imported as label version 1" in log.getvalue()
    assert _snapshot(store) == files
    import_labels(store, [second], log=_quiet())
    assert tile_store.label_version(str(store)) == 2
    root = tile_store.open_store(str(store))
    group: Any = root[B]
    v1 = np.asarray(group["label_v1"][...])
    v2 = _labels(store, B)
    assert v2 is not None
    assert (v1[:16, 16:32] == 255).all() and (v2[:16, 16:32] == 2).all()
    assert (v2[:16, :16] == 1).all()
    assert (store / "tiles.v1.parquet").is_file() and (store / "tiles.parquet").is_file()


# ---------------------------------------------------------------------------------------------
# Hidden ground truth, val, overwrite


def _hidden_tile(store: Path, split: str) -> Any:
    index = _index(store)
    rows = index[(index[C.SOURCE] == A) & (index[C.SPLIT] == split)]
    assert len(rows), f"the template store has no {split} tile of {A}"
    return rows.iloc[0]


def _tile_file(folder: Path, tile: Any, mask: np.ndarray) -> Path:
    return _png(folder / f"{A}__r{tile[C.ROW]}_c{tile[C.COL]}.png", mask)


def test_equal_hidden_labels_move_different_ones_need_overwrite(
    store: Path, tmp_path: Path
) -> None:
    tile = _hidden_tile(store, C.UNLABELED)
    window = np.s_[tile.y0 : tile.y0 + TILE, tile.x0 : tile.x0 + TILE]
    truth = _labels(store, A)[window]  # type: ignore[index]
    different = truth.copy()
    different[0, 0] = (truth[0, 0] + 1) % 4
    files = _snapshot(store)

    with pytest.raises(
        PrepError, match=r"r\d_c\d \(id \d+, split unlabeled\) already has different"
    ):
        import_labels(store, [_tile_file(tmp_path / "diff", tile, different)], log=_quiet())
    assert _snapshot(store) == files

    same = import_labels(store, [_tile_file(tmp_path / "same", tile, truth)], log=_quiet())
    assert same.moved == (int(tile.name),)
    assert _index(store).loc[tile.name, C.SPLIT] == C.LABELED
    np.testing.assert_array_equal(_labels(store, A)[window], truth)  # type: ignore[index]
    assert not (store / A / "label_v1").exists()  # equal labels: only the index moved

    import_labels(
        store, [_tile_file(tmp_path / "diff", tile, different)], overwrite=True, log=_quiet()
    )
    np.testing.assert_array_equal(_labels(store, A)[window], different)  # type: ignore[index]


def test_val_tiles_untouched_without_include_val(store: Path, tmp_path: Path) -> None:
    val = _hidden_tile(store, C.VAL)
    window = np.s_[val.y0 : val.y0 + TILE, val.x0 : val.x0 + TILE]
    original = _labels(store, A)
    assert original is not None
    whole = original.copy()
    whole[window] = (whole[window] + 1) % 4  # new labels for the val tile only
    path = _tif(tmp_path / "a.tif", whole, ORIGIN[A])  # whole source, named like its image

    skipped = import_labels(store, [path], log=_quiet())

    index = _index(store)
    val_of_a = index[(index[C.SOURCE] == A) & (index[C.SPLIT] == C.VAL)].index
    assert skipped.skipped_val == tuple(int(i) for i in val_of_a)
    np.testing.assert_array_equal(_labels(store, A), original)
    assert _index(store).loc[val.name, C.SPLIT] == C.VAL
    included = import_labels(store, [path], include_val=True, overwrite=True, log=_quiet())
    assert int(val.name) in included.changed_tiles
    np.testing.assert_array_equal(_labels(store, A), whole)
    assert _index(store).loc[val.name, C.SPLIT] == C.VAL  # val stays val


# ---------------------------------------------------------------------------------------------
# Refusals: nothing changes


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, dict[str, Any], str]]:
    mask = np.zeros((40, 40), np.uint8)
    unknown = np.zeros((16, 16, 3), np.uint8)
    unknown[3, 4] = (1, 2, 3)
    geometry, _ = _polygons()[0]
    unknown_class = tmp_path / "class.geojson"
    unknown_class.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {"type": "Feature", "geometry": geometry, "properties": {"class": "lava"}}
                ],
                "crs": {"type": "name", "properties": {"name": CRS}},
            }
        )
    )
    return {
        "size": (
            _png(tmp_path / f"{B}__r0_c0.png", np.zeros((10, 12), np.uint8)),
            {},
            r"size 12x10 \(WxH\) does not match tile y__img__b__r0_c0 \(16x16",
        ),
        "crs": (
            _tif(tmp_path / "crs/b.tif", mask, ORIGIN[B], crs="EPSG:32639"),
            {},
            "CRS EPSG:32639 does not match source y__img__b",
        ),
        "extent": (
            _tif(tmp_path / "extent/b.tif", mask, (ORIGIN[B][0] + 3, ORIGIN[B][1])),
            {},
            "extent does not match source y__img__b",
        ),
        "colour": (
            _png(tmp_path / f"colour/{B}__r0_c0.png", unknown),
            {"label_colors": COLOURS},
            r"colours not in the colour map: #010203 \(1 px\)",
        ),
        "class id": (
            _png(tmp_path / f"id/{B}__r0_c0.png", np.full((16, 16), 7, np.uint8)),
            {},
            "label id out of range: 7",
        ),
        "class name": (unknown_class, {}, "feature 0 has class='lava'"),
        "url": (tmp_path / "size", {"store_url": "s3://bucket/store.zarr"}, "local stores only"),
    }


@pytest.mark.parametrize(
    "case", ["size", "crs", "extent", "colour", "class id", "class name", "url"]
)
def test_refusals_name_the_problem_and_change_nothing(
    case: str, store: Path, tmp_path: Path
) -> None:
    path, options, message = _bad_inputs(tmp_path)[case]
    target = options.pop("store_url", store)
    files = _snapshot(store)

    with pytest.raises(PrepError, match=message) as caught:
        import_labels(target, [path], log=_quiet(), **options)

    if case != "url":
        assert str(path) in str(caught.value)
    assert _snapshot(store) == files


def test_cli_reports_refusal_and_imports(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _png(tmp_path / f"{B}__r1_c1.png", np.full((16, 16), 3, np.uint8))
    assert semisup_main(["label", "import", "--store", "s3://b/s.zarr", str(path)]) == 1
    assert "local stores only" in capsys.readouterr().err
    assert semisup_main(["label", "import", "--store", str(store), str(path)]) == 0
    assert tile_store.label_version(str(store)) == 1


# ---------------------------------------------------------------------------------------------
# Readers honour the current version


def test_tile_reader_and_unversioned_store(store: Path, tmp_path: Path) -> None:
    from semisup.tile_reader import TileReader

    assert tile_store.label_version(str(store)) == 0
    assert "label_versions" not in tile_store.open_store(str(store)).attrs[tile_store.META_KEY]  # type: ignore[operator]
    mask = np.full((16, 16), 2, np.uint8)
    import_labels(store, [_png(tmp_path / f"{B}__r0_c2.png", mask)], log=_quiet())
    tile_id = int(_tile(store, B, 0, 2).name)

    batch = TileReader(str(store), [tile_id], columns=(C.LABEL, C.SPLIT, C.TILE_ID)).read([tile_id])

    expected = mask.copy()
    expected[:, 8:] = C.IGNORE_INDEX  # an edge tile: the padded mask is cropped to 16×8
    np.testing.assert_array_equal(batch[C.LABEL][0], expected)
    assert batch[C.SPLIT][0] == C.LABELED


@pytest.mark.timeout(120)
def test_ray_tile_stream_label_column_after_import(
    store: Path, tmp_path: Path, ray_session: None
) -> None:
    from semisup.data import read_tiles

    mask = np.full((16, 16), 3, np.uint8)
    import_labels(store, [_png(tmp_path / f"{B}__r1_c1.png", mask)], log=_quiet())

    rows = read_tiles(
        str(store), split=C.LABELED, columns=(C.LABEL, C.SOURCE, C.ROW, C.COL)
    ).take_all()

    mine = [r for r in rows if (r[C.SOURCE], r[C.ROW], r[C.COL]) == (B, 1, 1)]
    assert len(mine) == 1
    np.testing.assert_array_equal(mine[0][C.LABEL], mask)

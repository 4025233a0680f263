"""Label Studio tasks and exports: the brush RLE, polygons, task folders and reading exports."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from store_factory import SourceSpec, build_store

from semisup import columns as C
from semisup.labelstudio import (
    BRUSH,
    DEFAULT_IMAGE_ROOT,
    IMAGE,
    POLYGON,
    decode_rle,
    encode_rle,
    export_masks,
    mask_results,
    mask_to_rle,
    polygon_to_mask,
    rle_to_mask,
    tile_name,
    write_tasks,
)
from semisup.store import scale_to_uint8

CLASSES = ("water", "road", "building")
STORE_CLASSES = tuple(f"class_{k}" for k in range(3))  # what tests.store_factory names them


def test_rle_round_trip_is_identity_on_random_masks() -> None:
    rng = np.random.default_rng(3)
    cases = [rng.random((h, w)) < p for h, w, p in [(17, 23, 0.5), (64, 48, 0.05), (5, 9, 0.95)]]
    cases += [np.zeros((40, 30), bool), np.ones((200, 400), bool)]  # one run; one over 2^16
    for region in cases:
        assert np.array_equal(rle_to_mask(mask_to_rle(region), *region.shape), region)
    values = rng.integers(0, 256, size=5000).astype(np.uint8)  # any bytes, not only 0/255
    values[1000:1300] = 9  # runs of every length class among single values
    values[2000:2012] = 4
    assert np.array_equal(decode_rle(encode_rle(values)), values)


def test_rle_matches_label_studios_reference_bytes() -> None:
    # from label-studio-converter, tests/test_brush.py::test_rle_encoding (the encoder that
    # label_studio_sdk.converter.brush ships): these values and their RLE bytes
    values = [1, 1, 1, 1, 2, 3, 5, 6, 7, 8, 4, 4, 4, 4, 4, 4, 4, 4]
    rle = [0, 0, 0, 18, 57, 27, 252, 96, 32, 1, 0, 6, 0, 40, 0, 192, 3, 128, 17, 56, 32]
    assert decode_rle(rle).tolist() == values
    assert encode_rle(np.array(values, np.uint8)) == rle
    with pytest.raises(ValueError, match="expected 3×3×4 = 36"):
        rle_to_mask(rle, 3, 3)


def test_polygons_rasterise_by_pixel_centres() -> None:
    # a rectangle x 2..7, y 2..6 px on a 10×8 image: centres 2.5..6.5 and 2.5..5.5 are inside
    rectangle = polygon_to_mask([[20, 25], [70, 25], [70, 75], [20, 75]], height=8, width=10)
    expected = np.zeros((8, 10), bool)
    expected[2:6, 2:7] = True
    assert np.array_equal(rectangle, expected)
    # a right triangle with legs of 4.4 px: a centre is inside when col + row + 1 < 4.4
    triangle = polygon_to_mask([[0, 0], [44, 0], [0, 44]], height=10, width=10)
    rows, cols = np.indices((10, 10))
    assert np.array_equal(triangle, rows + cols <= 3)
    # percent scales with each axis: the same points on a 20-wide image are twice as wide
    wide = polygon_to_mask([[20, 25], [70, 25], [70, 75], [20, 75]], height=8, width=20)
    assert wide.sum() == 4 * 10 and wide[2:6, 4:14].all()


@pytest.fixture
def tiny_store(tmp_path: Path) -> tuple[Any, pd.DataFrame]:
    """Two 16-bit sources, 32 px tiles; the second is 40×50, so its edge tiles are clipped."""
    written = build_store(
        str(tmp_path / "store.zarr"),
        [
            SourceSpec("a", 64, 64, dtype="uint16", nodata_box=(0, 0, 10, 64)),
            SourceSpec("b", 40, 50, bands=4, dtype="uint16", labeled=False, split=C.UNLABELED),
        ],
        tile_size=32,
        num_classes=len(CLASSES),
    )
    index = written.index.to_pandas()
    chosen = index[index[C.TILE_ID].isin([0, 4, 5, 7])].reset_index(drop=True)
    assert set(zip(chosen[C.HEIGHT], chosen[C.WIDTH], strict=True)) > {(32, 32), (8, 18)}
    return written, chosen


def _predictions(chosen: pd.DataFrame, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    predictions = {}
    for row in chosen.itertuples():
        mask = rng.integers(0, len(CLASSES), size=(row.height, row.width)).astype(np.uint8)
        mask[: row.height // 3] = 1  # a solid band: long runs beside single pixels
        mask[-1, :] = C.IGNORE_INDEX  # nodata: drawn as nothing
        predictions[int(row.tile_id)] = mask
    return predictions


def _accept_predictions(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What Label Studio exports once an annotator accepts each task's pre-annotation."""
    return [
        {**task, "id": i, "annotations": [{"id": i, "result": task["predictions"][0]["result"]}]}
        for i, task in enumerate(tasks)
    ]


def test_tasks_hold_the_scaled_tiles_and_their_predictions(
    tiny_store: tuple[Any, pd.DataFrame], tmp_path: Path
) -> None:
    written, chosen = tiny_store
    predictions = _predictions(chosen)
    out = tmp_path / "ls"
    paths = write_tasks(written.url, chosen, out, predictions=predictions, model_version="m1")
    tasks = json.loads(paths["tasks"].read_text())
    assert len(tasks) == len(chosen)
    for task, row in zip(tasks, chosen.itertuples(), strict=True):
        name = tile_name(row.source, row.row, row.col)
        assert task["data"][IMAGE] == f"{DEFAULT_IMAGE_ROOT}{name}.png"
        assert (task["data"][C.SOURCE], task["data"][C.ROW], task["data"][C.COL]) == (
            row.source,
            row.row,
            row.col,
        )
        assert task["data"][C.TILE_ID] == row.tile_id
        window = written.images[row.source][
            row.y0 : row.y0 + row.height, row.x0 : row.x0 + row.width, :3
        ]
        expected = scale_to_uint8(window, (0.0,) * 3, (65535.0,) * 3)
        png = np.asarray(Image.open(out / "images" / f"{name}.png"))
        assert png.dtype == np.uint8 and png.shape == (row.height, row.width, 3)
        assert np.array_equal(png, expected)
        assert task["predictions"][0]["model_version"] == "m1"
    masks = export_masks(
        _write(tmp_path / "export.json", _accept_predictions(tasks)), STORE_CLASSES
    )
    for row in chosen.itertuples():
        assert np.array_equal(
            masks[tile_name(row.source, row.row, row.col)], predictions[row.tile_id]
        )


def test_label_config_names_the_classes_the_results_use(
    tiny_store: tuple[Any, pd.DataFrame], tmp_path: Path
) -> None:
    written, chosen = tiny_store
    paths = write_tasks(written.url, chosen, tmp_path / "ls", predictions=_predictions(chosen))
    config = ET.fromstring(paths["label_config"].read_text())
    image = config.find("Image")
    assert image is not None and image.get("name") == IMAGE and image.get("value") == f"${IMAGE}"
    for tag, name in (("BrushLabels", BRUSH), ("PolygonLabels", POLYGON)):
        tool = config.find(tag)
        assert tool is not None and tool.get("name") == name and tool.get("toName") == IMAGE
        assert [label.get("value") for label in tool.findall("Label")] == list(STORE_CLASSES)
    for task in json.loads(paths["tasks"].read_text()):
        for result in task["predictions"][0]["result"]:
            assert (result["from_name"], result["to_name"]) == (BRUSH, IMAGE)


def test_bad_predictions_are_refused_before_anything_is_written(
    tiny_store: tuple[Any, pd.DataFrame], tmp_path: Path
) -> None:
    written, chosen = tiny_store
    predictions = _predictions(chosen)
    predictions[5] = predictions[5][:-1]
    with pytest.raises(ValueError, match=r"predictions\[5\]: expected a 32×18 uint8"):
        write_tasks(written.url, chosen, tmp_path / "ls", predictions=predictions)
    predictions = _predictions(chosen)
    predictions[7][0, 0] = 3
    with pytest.raises(ValueError, match=r"predictions\[7\]: class ids \[3\] outside 0..2"):
        write_tasks(written.url, chosen, tmp_path / "ls", predictions=predictions)
    assert not (tmp_path / "ls").exists()


def _write(path: Path, export: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(export))
    return path


def _brush(region: np.ndarray, label: str) -> dict[str, Any]:
    height, width = region.shape
    return {
        "type": "brushlabels",
        "from_name": BRUSH,
        "to_name": IMAGE,
        "original_width": width,
        "original_height": height,
        "value": {"format": "rle", "rle": mask_to_rle(region), "brushlabels": [label]},
    }


def _polygon(points: list[list[float]], label: str, height: int, width: int) -> dict[str, Any]:
    return {
        "type": "polygonlabels",
        "from_name": POLYGON,
        "to_name": IMAGE,
        "original_width": width,
        "original_height": height,
        "value": {"points": points, "polygonlabels": [label]},
    }


def test_export_masks_reads_the_latest_annotation(tmp_path: Path) -> None:
    top = np.zeros((8, 10), bool)
    top[:3] = True
    everything = np.ones((8, 10), bool)
    older = {
        "id": 1,
        "updated_at": "2026-01-02T10:00:00.000000Z",
        "result": [_brush(everything, "road")],
    }
    latest = {
        "id": 2,
        "updated_at": "2026-01-03T09:00:00.000000Z",
        "result": [
            _brush(top, "water"),
            _polygon([[20, 25], [70, 25], [70, 75], [20, 75]], "building", 8, 10),
            {"type": "choices", "value": {"choices": ["checked"]}},
        ],
    }
    cancelled = {"id": 3, "updated_at": "2026-01-04T00:00:00Z", "was_cancelled": True, "result": []}
    export = [
        {
            "id": 11,
            "data": {
                IMAGE: "/data/local-files/?d=images/x.png",
                C.SOURCE: "src_1",
                C.ROW: 0,
                C.COL: 2,
            },
            "annotations": [older, cancelled, latest],
        },
        {
            "id": 12,
            "data": {IMAGE: "/data/local-files/?d=images/src_1__r3_c4.png"},
            "annotations": [{**older, "id": 7}],
        },
        {"id": 13, "data": {C.SOURCE: "src_1", C.ROW: 9, C.COL: 9}, "annotations": [cancelled]},
    ]
    masks = export_masks(_write(tmp_path / "export.json", export), CLASSES)
    assert set(masks) == {"src_1__r0_c2", "src_1__r3_c4"}  # the cancelled-only task is left out
    expected = np.full((8, 10), C.IGNORE_INDEX, np.uint8)
    expected[:3] = 0  # water brush
    expected[2:6, 2:7] = 2  # the building polygon, drawn after the brush, wins where they meet
    assert masks["src_1__r0_c2"].dtype == np.uint8
    assert np.array_equal(masks["src_1__r0_c2"], expected)
    assert (masks["src_1__r3_c4"] == 1).all()  # tile named by its image file


def test_export_masks_names_the_task_and_label_it_cannot_read(tmp_path: Path) -> None:
    region = np.ones((4, 4), bool)
    export = [
        {
            "id": 42,
            "data": {C.SOURCE: "s", C.ROW: 1, C.COL: 2},
            "annotations": [{"id": 1, "result": [_brush(region, "forest")]}],
        }
    ]
    with pytest.raises(ValueError, match=r"task 42 \(s__r1_c2\): brushlabels label \['forest'\]"):
        export_masks(_write(tmp_path / "unknown.json", export), CLASSES)
    export[0]["annotations"][0]["result"] = [{"type": "rectanglelabels", "value": {}}]
    with pytest.raises(
        ValueError, match="task 42.*rectanglelabels result cannot become a class mask"
    ):
        export_masks(_write(tmp_path / "rect.json", export), CLASSES)
    with pytest.raises(ValueError, match=r"not_a_list.json: expected a Label Studio JSON export"):
        export_masks(_write(tmp_path / "not_a_list.json", {"tasks": []}), CLASSES)  # type: ignore[arg-type]


def test_mask_results_holds_one_region_per_present_class() -> None:
    mask = np.array([[0, 0, 2], [2, 2, C.IGNORE_INDEX]], np.uint8)
    results = mask_results(mask, CLASSES)
    assert [r["value"]["brushlabels"] for r in results] == [["water"], ["building"]]
    assert [(r["original_height"], r["original_width"]) for r in results] == [(2, 3)] * 2
    assert np.array_equal(rle_to_mask(results[1]["value"]["rle"], 2, 3), mask == 2)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_select_annotate_import_round_trip_on_dubai(
    dubai_dir: Path, tmp_path: Path, ray_session: None
) -> None:
    """select -> Label Studio export (the Dubai ground truth of the chosen tiles standing in for
    an annotator, through our brush encoder) -> label import: exactly those tiles become
    labelled, with those labels."""
    from data_prep.ingest import build_store as prep
    from semisup.config import PrepConfig, load_config
    from semisup.known_imagery import CLASS_NAMES, DUBAI_COLOURS
    from semisup.label_import import import_labels
    from semisup.selection import run_select
    from semisup.store import label_array, open_store, read_store_meta, read_tile_index
    from semisup.train import run_training

    store = str(
        prep(
            [dubai_dir / "tile_1" / "images"],
            tmp_path / "dubai.zarr",
            labels=[dubai_dir / "tile_1" / "masks"],
            label_colors=DUBAI_COLOURS,
            class_names=CLASS_NAMES,
            config=PrepConfig(tile_size=128, labeled_fraction=0.25),
            quiet=True,
        ).path
    )
    config = load_config(
        overrides=[
            "student.model_type=tiny",
            "ssl.enabled=false",
            "train.batch_size=4",
            "train.epochs=1",
            "train.steps_per_epoch=4",
            "ray.dashboard=false",
        ]
    )
    run_training(store, config, tmp_path / "run", debug=True)
    out = tmp_path / "select"
    run_select(store, tmp_path / "run", 5, out, output_format="labelstudio", sheet=False, log=None)

    root = open_store(store)
    meta = read_store_meta(root)
    truth = {}
    export = []
    for number, task in enumerate(json.loads((out / "labelstudio" / "tasks.json").read_text())):
        data = task["data"]
        group = root[data[C.SOURCE]]
        labels = label_array(group)  # type: ignore[arg-type]
        assert labels is not None
        window = np.asarray(
            labels[
                data[C.Y0] : data[C.Y0] + data[C.HEIGHT], data[C.X0] : data[C.X0] + data[C.WIDTH]
            ]
        )
        truth[data[C.TILE_ID]] = window
        result = mask_results(window, meta.class_names or ())
        export.append({**task, "id": number, "annotations": [{"id": number, "result": result}]})
    before = read_tile_index(store).to_pandas()
    assert (before.set_index(C.TILE_ID).loc[list(truth), C.SPLIT] == C.UNLABELED).all()

    imported = import_labels(store, [_write(tmp_path / "export.json", export)], log=None)
    after = read_tile_index(store).to_pandas()
    assert sorted(imported.moved) == sorted(truth)
    counts = {
        name: index[C.SPLIT].value_counts().get(C.LABELED, 0)
        for name, index in (("before", before), ("after", after))
    }
    assert counts["after"] == counts["before"] + len(truth)
    moved = set(after.loc[after[C.SPLIT] == C.LABELED, C.TILE_ID]) - set(
        before.loc[before[C.SPLIT] == C.LABELED, C.TILE_ID]
    )
    assert moved == set(truth)
    root = open_store(store)
    for row in after[after[C.TILE_ID].isin(list(truth))].itertuples():
        labels = label_array(root[row.source])  # type: ignore[arg-type]
        assert labels is not None
        stored = np.asarray(labels[row.y0 : row.y0 + row.height, row.x0 : row.x0 + row.width])
        assert np.array_equal(stored, truth[row.tile_id])

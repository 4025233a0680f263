"""`semisup predict` with a detection run: boxes of overlapping windows merged without
duplicates at seams (a pure function), windowed boxes equal to whole-image boxes, a CSV that
`semisup evaluate-boxes` scores against NEON truth, GeoJSON boxes in the raster's CRS, and bad
input refused in one line before any actor starts; `semisup run`/`tune` refuse a detection
config."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window
from torchvision.ops import box_iou

from data_prep.boxes import read_box_file
from semisup.actor_pool import ActorPoolConfig
from semisup.cli import main as semisup_main
from semisup.config import ConfigError, load_config, save_config
from semisup.detection import predict as boxes_predict
from semisup.detection.merge import cut_boxes, merge_window_boxes
from semisup.detection.model import build_detector
from semisup.detection.predict import (
    BoxPredictor,
    load_run_detector,
    merge_raster,
    resolve_detection_run,
    run_detection_predict,
)
from semisup.raster_windows import open_sources

NEON = "neon_trees/OSBS_029.tif"  # 400×400 RGB uint8, EPSG:32617
TRUTH = "neon_trees/OSBS_029.csv"
SIZE = 128
FAST = {"pool": ActorPoolConfig(actors=1, torch_threads=1), "batch_size": 4, "log": None}


def _make_run(folder: Path, tile: int = SIZE) -> Path:
    """A detection run folder as `semisup train` leaves it: config.yaml, report.json (classes,
    tile size) and best/detector.pt, here a seeded random-weight MobileNet detector."""
    config = load_config(
        overrides=[
            "task=detection",
            "detector.arch=fasterrcnn_mobilenet_v3_large_fpn",
            "detector.finetune=full",
            "detector.nms_iou=0.5",
        ]
    )
    (folder / "best").mkdir(parents=True)
    save_config(config, folder / "config.yaml")
    report = {"task": "detection", "class_names": ["tree"], "tile_size": tile}
    (folder / "report.json").write_text(json.dumps(report))
    torch.manual_seed(0)
    detector = build_detector(1, arch="fasterrcnn_mobilenet_v3_large_fpn", tile_size=tile)
    torch.save(detector.state_dict(), folder / "best" / "detector.pt")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_run(tmp_path_factory.mktemp("det") / "run")


def _crop(source: Path, out: Path, window: Window) -> Path:
    """``window`` of ``source`` as its own GeoTIFF, georeferenced where it lies."""
    with rasterio.open(source) as ds:
        profile = {
            **ds.profile,
            "height": window.height,
            "width": window.width,
            "transform": ds.window_transform(window),
            "tiled": False,
        }
        for key in ("blockxsize", "blockysize"):
            profile.pop(key, None)
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(ds.read(window=window))
    return out


# ---------------------------------------------------------------------------------------------
# The merge (pure)


def test_seam_boxes_merge_into_one_box_per_object() -> None:
    """Two 100 px windows of a 160 px wide raster (x0 0 and 60). Each object as the windows
    see it: whole where it fits, cut at the other window's border (the cut box often scores
    higher and overlaps the whole one by IoU ≤ 0.5, so NMS alone would keep both)."""
    a, b = (0, 0), (0, 60)  # window origins (y0, x0)
    found = [  # box (x0, y0, x1, y1), class, score, window
        ((40, 10, 80, 50), 0, 0.6, a),  # object 1, whole in a ...
        ((60, 10, 80, 50), 0, 0.9, b),  # ... cut by b's left border: dropped
        ((85, 60, 100, 90), 0, 0.8, a),  # object 2, cut by a's right border: dropped ...
        ((85, 60, 120, 90), 0, 0.5, b),  # ... whole in b
        ((70, 20, 90, 40), 1, 0.7, a),  # object 3 (class 1) whole in both: NMS keeps one
        ((71, 21, 91, 41), 1, 0.6, b),
        ((72, 20, 90, 40), 0, 0.4, b),  # class 0 at object 3: another class, kept
        ((10, 60, 30, 80), 0, 0.3, a),  # in window a only
        ((140, 60, 160, 99), 0, 0.3, b),  # at the raster's right edge: not cut
        ((0, 60, 20, 99), 0, 0.3, a),  # at the raster's left edge: not cut
        ((86, 5, 100, 9), 0, 0.2, a),  # cut, and no whole box in b: kept
    ]
    boxes = torch.tensor([f[0] for f in found], dtype=torch.float32)
    labels = torch.tensor([f[1] for f in found])
    scores = torch.tensor([f[2] for f in found])
    origins = torch.tensor([f[3] for f in found])
    geometry = {"tile": 100, "height": 100, "width": 160}
    cut = cut_boxes(boxes, origins, **geometry).tolist()
    assert [i for i, c in enumerate(cut) if c] == [1, 2, 10]
    keep = merge_window_boxes(boxes, labels, scores, origins, iou=0.5, **geometry)
    assert sorted(keep.tolist()) == [0, 3, 4, 6, 7, 8, 9, 10]
    assert scores[keep].tolist() == sorted(scores[keep].tolist(), reverse=True)
    kept_boxes, kept_labels = boxes[keep], labels[keep]
    for label in (0, 1):  # no two boxes of one class cover one object
        mine = kept_boxes[kept_labels == label]
        overlap = box_iou(mine, mine).fill_diagonal_(0)
        assert float(overlap.max()) <= 0.5
    assert (
        merge_window_boxes(
            boxes[:0], labels[:0], scores[:0], origins[:0], iou=0.5, **geometry
        ).numel()
        == 0
    )


def test_a_box_predicted_twice_across_stripes_comes_out_once() -> None:
    """The driver keeps a window once; should two copies reach the merge, NMS keeps one."""
    boxes = torch.tensor([[10.0, 10, 30, 30], [10.0, 10, 30, 30]])
    keep = merge_window_boxes(
        boxes,
        torch.tensor([0, 0]),
        torch.tensor([0.5, 0.5]),
        torch.tensor([[0, 0], [0, 0]]),
        tile=64,
        height=64,
        width=64,
        iou=0.5,
    )
    assert len(keep) == 1


# ---------------------------------------------------------------------------------------------
# Refusals (no Ray)


def test_bad_input_is_refused_in_one_line_before_any_actor(
    run: Path,
    shared_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import semisup.predict
    import semisup.runtime

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray or an actor pool was started")

    monkeypatch.setattr(semisup.runtime, "ray_runtime", no_ray)
    monkeypatch.setattr(semisup.predict, "stream_jobs", no_ray)
    raster = str(shared_data / NEON)
    out = tmp_path / "boxes.csv"
    cases = {
        "--min-area applies to class maps; --model .* is a detection run": [
            "--run",
            str(run),
            "--out",
            str(out),
            "--min-area",
            "5",
        ],
        "--cog applies to class maps": ["--run", str(run), "--out", str(out), "--cog"],
        "--num-classes applies to class maps": [
            "--run",
            str(run),
            "--out",
            str(out),
            "--num-classes",
            "2",
        ],
        "--min-score applies to detection runs .*predicts class maps": [
            "--model",
            "tiny",
            "--out",
            str(tmp_path / "map.tif"),
            "--min-score",
            "0.5",
        ],
        "a detection run writes its boxes to one CSV": [
            "--run",
            str(run),
            "--out",
            str(tmp_path / "boxes.tif"),
        ],
        "not a run directory, an adapter file": [
            "--run",
            str(tmp_path / "missing"),
            "--out",
            str(out),
        ],
    }
    no_weights = _make_run(tmp_path / "no_weights")
    (no_weights / "best" / "detector.pt").unlink()
    cases["has no best weights yet"] = ["--run", str(no_weights), "--out", str(out)]
    out_exists = tmp_path / "exists.csv"
    out_exists.write_text("x\n")
    cases["exists.csv exists; pass --overwrite"] = ["--run", str(run), "--out", str(out_exists)]
    for message, flags in cases.items():
        assert semisup_main(["predict", raster, *flags]) == 2, message
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and re.search(message, error), (message, error)
    assert not out.exists() and out_exists.read_text() == "x\n"
    assert not (tmp_path / "map.tif").exists()
    with pytest.raises(ValueError, match="is a detection run .* not class maps"):
        semisup.predict.run_predict([raster], str(run), tmp_path / "map.tif")
    assert not (tmp_path / "map.tif").exists()


def test_run_and_tune_refuse_a_detection_config_before_any_work(tmp_path: Path) -> None:
    from semisup.pipeline import run_pipeline
    from semisup.tune import run_tune

    config = load_config(overrides=["task=detection", f"pipeline.out={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^task: detection: semisup run .*`semisup train`"):
        run_pipeline(config, log=None)
    with pytest.raises(ConfigError, match=r"^task: detection: semisup tune .*`semisup train`"):
        run_tune("crowns.zarr", config, "lora_rank", tmp_path / "tune", samples=1)
    assert not (tmp_path / "run").exists() and not (tmp_path / "tune").exists()
    argv = ["run", "--set", "task=detection", "--out", str(tmp_path / "cli")]
    assert semisup_main(argv) == 2 and not (tmp_path / "cli").exists()


# ---------------------------------------------------------------------------------------------
# With Ray


def _csv_boxes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    (found,) = read_box_file(path)
    assert found.scores is not None
    return found.boxes, found.scores


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_one_window_gives_the_whole_image_boxes(
    ray_session: None, run: Path, shared_data: Path, tmp_path: Path
) -> None:
    raster = _crop(shared_data / NEON, tmp_path / "crop.tif", Window(100, 150, SIZE, SIZE))
    summary = run_detection_predict([raster], run, tmp_path / "boxes.csv", **FAST)
    assert summary["windows"] == 1
    with rasterio.open(raster) as ds:
        image = torch.from_numpy(ds.read().astype(np.float32) / 255)
    with torch.inference_mode():
        (whole,) = load_run_detector(resolve_detection_run(run))([image])
    got_boxes, got_scores = _csv_boxes(tmp_path / "boxes.csv")
    print(f"{len(got_boxes)} boxes from the window, {len(whole['boxes'])} from the whole image")
    assert len(got_boxes) == len(whole["boxes"]) > 0
    order = np.lexsort(np.c_[got_boxes, got_scores].T)  # the same boxes, in any order
    want = np.c_[whole["boxes"].numpy(), whole["scores"].numpy()]
    np.testing.assert_allclose(
        np.c_[got_boxes, got_scores][order], want[np.lexsort(want.T)], atol=0.01
    )


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_overlapping_windows_leave_no_duplicate_at_the_seam(
    ray_session: None, run: Path, shared_data: Path, tmp_path: Path
) -> None:
    """Two windows sharing half their width (x0 0 and 64 on a 128×192 crop): each detects the
    shared half, and the raster's boxes are the merge of the windows' boxes, with no two boxes
    of one class above the NMS IoU."""
    raster = _crop(shared_data / NEON, tmp_path / "strip.tif", Window(100, 150, 192, SIZE))
    run_detection_predict([raster], run, tmp_path / "boxes.csv", overlap=64, **FAST)
    got_boxes, _ = _csv_boxes(tmp_path / "boxes.csv")
    overlap = box_iou(torch.from_numpy(got_boxes), torch.from_numpy(got_boxes)).fill_diagonal_(0)
    assert float(overlap.max()) <= 0.5
    # the same windows in this process, merged by the pure function
    sources = open_sources([raster])
    predictor = BoxPredictor(dataclasses.asdict(resolve_detection_run(run)), sources, SIZE, 64)
    rows = predictor(
        {
            "seq": np.array([0]),
            "output": np.array([0]),
            "y0": np.array([0]),
            "first_col": np.array([0]),
            "last_col": np.array([2]),
        }
    )
    found = boxes_predict.RasterBoxes(sources[0])
    boxes_predict.collect_windows(rows, [found], {0: 0})
    raw = [torch.from_numpy(b) for b, _, _ in found.windows.values()]
    shared = box_iou(raw[0], raw[1])
    print(
        f"windows: {[len(r) for r in raw]} boxes, {int((shared > 0.5).sum())} pairs across "
        f"the seam above IoU 0.5; merged: {len(got_boxes)}"
    )
    assert float(shared.max()) > 0.5  # the windows did see the same objects twice
    merged, _, _ = merge_raster(found, tile=SIZE, iou=0.5)
    np.testing.assert_allclose(np.sort(got_boxes, 0), np.sort(merged, 0), atol=0.01)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_csv_scores_against_neon_truth_and_geojson_is_in_the_raster_crs(
    ray_session: None,
    run: Path,
    shared_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    raster = shared_data / NEON
    out, vector = tmp_path / "crowns.csv", tmp_path / "crowns.geojson"
    argv = [
        "predict",
        str(raster),
        "--run",
        str(run),
        "--out",
        str(out),
        "--vector",
        str(vector),
        "--torch-threads",
        "1",
        "--min-score",
        "0.1",
        "--stripe-width",
        "256",
    ]
    assert semisup_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    # 4×4 windows (x0 0, 96, 192, 272); those at x0 192 reach into the second stripe and are
    # predicted in both, and kept once
    assert summary["windows"] == 20 and summary["outputs"][0]["windows"] == 16
    assert summary["model"]["min_score"] == 0.1
    score = [
        "evaluate-boxes",
        "--pred",
        str(out),
        "--truth",
        str(shared_data / TRUTH),
        "--box-classes",
        "Tree=tree",
    ]
    assert semisup_main(score) == 0
    printed = capsys.readouterr().out
    ap = float(re.search(r"^AP ([0-9.]+)$", printed, re.M).group(1))  # type: ignore[union-attr]
    print(f"random-weight detector on OSBS_029: AP {ap}")
    assert 0.0 <= ap <= 1.0
    boxes, scores = _csv_boxes(out)
    assert len(boxes) == summary["outputs"][0]["boxes"] > 0 and scores.min() >= 0.1
    assert boxes.min() >= 0 and boxes[:, 2:].max() <= 400
    collection = json.loads(vector.read_text())
    with rasterio.open(raster) as ds:
        transform, epsg = ds.transform, ds.crs.to_epsg()
    assert collection["crs"]["properties"]["name"] == f"urn:ogc:def:crs:EPSG::{epsg}"
    assert len(collection["features"]) == len(boxes)
    for feature, box, box_score in zip(collection["features"], boxes, scores, strict=True):
        assert feature["properties"]["class"] == "tree"
        assert feature["properties"]["score"] == pytest.approx(box_score, abs=1e-4)
        ring = np.array(feature["geometry"]["coordinates"][0])
        x0, y0, x1, y1 = box.tolist()
        xs, ys = rasterio.transform.xy(transform, [y0, y0, y1, y1], [x0, x1, x1, x0], offset="ul")
        np.testing.assert_allclose(ring[:4], np.c_[xs, ys], atol=0.01 * abs(transform.a))
    with pytest.raises(FileExistsError, match="crowns.csv exists"):
        run_detection_predict([raster], run, out, **FAST)

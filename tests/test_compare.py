"""``semisup compare``: a class map's components as boxes, and the SAM student against the
Faster R-CNN student on two tiny runs trained here on generated scenes with building boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from data_prep.ingest import build_store
from semisup.cli import main
from semisup.config import load_config
from semisup.detection.compare import CompareError, check_runs, class_pairs, component_boxes
from semisup.known_imagery import CLASS_NAMES
from semisup.synthetic import BOXES_FILE, write_scenes
from semisup.train import run_training


def test_components_become_boxes_scored_by_their_mean_probability() -> None:
    class_map = np.array(
        [
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 0],
            [2, 0, 0, 0, 1],  # (2, 4) touches (1, 3) only diagonally: its own component
            [2, 2, 0, 1, 0],
        ]
    )
    probabilities = np.zeros((3, 4, 5), np.float32)
    probabilities[1] = np.arange(20, dtype=np.float32).reshape(4, 5) / 20
    probabilities[2] = 0.5
    probabilities[2, 3, 1] = 0.8
    boxes, labels, scores = component_boxes(class_map, probabilities, [1, 2])
    assert boxes.dtype == np.float32 and labels.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(
        boxes, [[2, 0, 4, 2], [4, 2, 5, 3], [3, 3, 4, 4], [0, 2, 2, 4]]
    )  # pixel edges: a one-pixel component is 1 px wide
    np.testing.assert_array_equal(labels, [0, 0, 0, 1])  # positions in [1, 2]
    np.testing.assert_allclose(scores, [(2 + 3 + 7 + 8) / 80, 14 / 20, 18 / 20, 1.8 / 3], 1e-6)
    # small components dropped; no probabilities: scores of 1; a class with no pixel: no box
    boxes, labels, scores = component_boxes(class_map, None, [1, 4], min_pixels=2)
    np.testing.assert_array_equal(boxes, [[2, 0, 4, 2]])
    assert labels.tolist() == [0] and scores.tolist() == [1.0]
    empty = component_boxes(np.zeros((3, 3), int), None, [1])
    assert [a.shape for a in empty] == [(0, 4), (0,), (0,)]


def test_box_classes_pair_with_segmentation_classes_by_name_or_as_told() -> None:
    assert class_pairs(["building"], CLASS_NAMES) == {"building": 0}
    assert class_pairs(["tree"], CLASS_NAMES, ["tree=vegetation"]) == {"tree": 3}
    with pytest.raises(CompareError, match="no box class \\(tree\\) is a segmentation class"):
        class_pairs(["tree"], CLASS_NAMES)
    with pytest.raises(CompareError, match="segmentation run has no class 'forest'"):
        class_pairs(["tree"], CLASS_NAMES, ["tree=forest"])
    with pytest.raises(CompareError, match="expected BOX_CLASS=SEGMENTATION_CLASS"):
        class_pairs(["tree"], CLASS_NAMES, ["tree"])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> dict[str, Path]:
    """Four 256 px generated scenes (masks and building boxes) as 64 px tiles, scene_3
    validating; a tiny SAM student and a tiny Faster R-CNN, two steps each, in-process."""
    root = tmp_path_factory.mktemp("compare")
    images, masks = write_scenes(root / "scenes", count=4, size=256, seed=10)
    store = build_store(
        [images],
        root / "store.zarr",
        labels=[masks],
        boxes=[root / "scenes" / BOXES_FILE],
        class_names=CLASS_NAMES,
        quiet=True,
        config={"tile_size": 64, "val_sources": ["scene_3"], "labeled_fraction": 0.34, "seed": 1},
    ).path
    short = [
        "train.epochs=1",
        "train.steps_per_epoch=2",
        "train.warmup_steps=1",
        "ssl.enabled=false",
        "train.torch_threads=1",
    ]
    seg = load_config(overrides=["student.model_type=tiny", "train.batch_size=4", *short])
    det = load_config(
        overrides=[
            "task=detection",
            "detector.arch=fasterrcnn_mobilenet_v3_large_fpn",
            "detector.finetune=full",
            "train.batch_size=2",
            *short,
        ]
    )
    run_training(str(store), seg, root / "seg", debug=True)
    run_training(str(store), det, root / "det", debug=True)
    return {"store": Path(store), "seg": root / "seg", "det": root / "det", "root": root}


@pytest.mark.timeout(300)
def test_compare_scores_both_students_on_the_same_tiles(
    two_runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "compare"
    argv = [
        "compare",
        "--runs",
        str(two_runs["seg"]),
        str(two_runs["det"]),
        "--store",
        str(two_runs["store"]),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads((out / "compare.json").read_text())
    sam, rcnn = result["rows"]
    assert result["classes"] == {"building": "building"} and result["val_tiles"] == 16
    for row, weights in (
        (sam, two_runs["seg"] / "best" / "adapter.safetensors"),
        (rcnn, two_runs["det"] / "best" / "detector.pt"),
    ):
        assert 0 <= row["ap"] <= 1 and 0 <= row["ap50"] <= 1 and 0 <= row["ap75"] <= 1
        assert row["images_per_s"] > 0 and row["cpu_s"] > 0 and row["timed_images"] == 12
        assert row["weights_bytes"] == weights.stat().st_size > 0
        assert 0 < row["trainable_parameters"] <= row["parameters"]
        assert row["train_seconds"] > 0 and row["steps"] == 2
        assert row["truth_boxes"] == rcnn["truth_boxes"] > 0
    adapter = load_file(two_runs["seg"] / "best" / "adapter.safetensors")
    assert sam["trainable_parameters"] == sum(t.numel() for t in adapter.values())
    assert sam["trainable_parameters"] < sam["parameters"]  # the adapter, not its frozen base
    assert rcnn["trainable_parameters"] == rcnn["parameters"]  # finetune=full
    # the detector finds and scores what its own validation found on these tiles
    report = json.loads((two_runs["det"] / "report.json").read_text())
    best = next(e for e in report["epochs"] if e["epoch"] == report["best_epoch"])
    assert rcnn["predicted_boxes"] == best["predicted_boxes"] > 0
    assert rcnn["ap"] == pytest.approx(report["best_ap"], abs=1e-9)
    table = (out / "compare.md").read_text()
    assert "| SAM student (segmentation) |" in table and "| Faster R-CNN student |" in table


def test_compare_refuses_runs_of_the_wrong_kind(two_runs: dict[str, Path]) -> None:
    seg, det, store = two_runs["seg"], two_runs["det"], two_runs["store"]
    with pytest.raises(CompareError, match=f"SEG_RUN {det}: a detection run"):
        check_runs(det, seg, store)
    with pytest.raises(CompareError, match=f"DET_RUN {seg}: a segmentation run"):
        check_runs(seg, seg, store)
    with pytest.raises(FileNotFoundError, match="expected a `semisup train` run folder"):
        check_runs(seg, two_runs["root"] / "nothing", store)
    with pytest.raises(FileNotFoundError, match="name the detection run's tile store"):
        check_runs(seg, det, two_runs["root"] / "none.zarr")
    assert check_runs(seg, det, None).store == str(store)  # default: beside the detection run

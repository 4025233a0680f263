"""Zero-shot SAM measurement: prompts from ground-truth components (pure), and the report files
on a real Dubai store with tiny SAM."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semisup.cli import main as semisup_main
from semisup.known_imagery import DUBAI_COLOURS
from semisup.masks import MaskFilter
from semisup.sam_prompts import best_mask, decode_masks, point_grid
from semisup.teacher import TeacherConfig
from semisup.zero_shot import (
    AGNOSTIC,
    EXAMPLES_FILE,
    JSON_FILE,
    MARKDOWN_FILE,
    ZeroShotConfig,
    _bfs_components,
    add_arguments,
    component_point,
    component_prompts,
    connected_components,
    interior_point,
    mask_iou,
    run_cli,
    run_zero_shot,
    score_box_tile,
    summary_line,
)

# ---------------------------------------------------------------------------------------------
# Prompts from ground-truth components


def _label_map() -> np.ndarray:
    """12×12: class 1 in two separate squares, class 2 as a U shape, a corner of ignore."""
    label = np.zeros((12, 12), np.uint8)
    label[1:4, 1:4] = 1
    label[6:11, 7:10] = 1
    label[5:11, 1:6] = 2
    label[5:9, 2:5] = 0  # hollow the U: its centroid falls outside it
    label[0, 10:] = 255
    return label


def test_components_match_between_bfs_and_the_default() -> None:
    mask = _label_map() == 1
    labels, count = _bfs_components(mask)
    assert count == 2 and set(np.unique(labels)) == {0, 1, 2}
    assert np.array_equal(labels > 0, mask)
    default, default_count = connected_components(mask)
    assert default_count == 2 and np.array_equal(default > 0, mask)
    diagonal = np.eye(3, dtype=bool)  # 4-connectivity: diagonal pixels are separate
    assert connected_components(diagonal)[1] == 3


def test_component_prompts_boxes_and_points_lie_on_their_component() -> None:
    prompts = component_prompts(_label_map(), min_area_px=4)
    by_class = {}
    for prompt in prompts:
        by_class.setdefault(prompt.class_id, []).append(prompt)
        x, y = prompt.point_xy
        assert prompt.mask[y, x], "the point prompt must be inside its component"
        ys, xs = np.nonzero(prompt.mask)
        assert prompt.box_xyxy == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert prompt.area_px == prompt.mask.sum()
    assert sorted(by_class) == [0, 1, 2]  # ignore (255) is no class
    assert [p.box_xyxy for p in by_class[1]] == [(1, 1, 4, 4), (7, 6, 10, 11)]
    assert by_class[1][0].point_xy == (2, 2)  # the centre of a 3×3 square
    assert len(component_prompts(_label_map(), min_area_px=10)) < len(prompts)


def test_points_fall_back_to_the_interior_when_the_centroid_is_outside() -> None:
    u_shape = _label_map() == 2
    ys, xs = np.nonzero(u_shape)
    cy, cx = round(ys.mean()), round(xs.mean())
    assert not u_shape[cy, cx]  # the centroid is in the hollow
    x, y = component_point(u_shape, "centroid")
    assert u_shape[y, x] and (x, y) == interior_point(u_shape)
    square = np.zeros((9, 9), bool)
    square[2:7, 2:7] = True
    assert component_point(square, "centroid") == (4, 4) == interior_point(square)
    with pytest.raises(ValueError, match="point mode"):
        component_point(square, "random")


def test_mask_iou() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2], b[1:3] = True, True
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(a, a) == 1.0 and np.isnan(mask_iou(b & False, a & False))
    valid = np.zeros((4, 4), bool)
    valid[:2] = True
    assert mask_iou(a, b, valid) == pytest.approx(4 / 8)


# ---------------------------------------------------------------------------------------------
# The report on real tiles


@pytest.fixture(scope="module")
def dubai_store(dubai_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("zero_shot")
    colours = tmp / "colours.json"
    colours.write_text(json.dumps(DUBAI_COLOURS))
    out = tmp / "dubai.zarr"
    image = dubai_dir / "tile_2" / "images" / "image_part_003.jpg"
    mask = dubai_dir / "tile_2" / "masks" / "image_part_003.png"
    args = ["prep", str(image), "--labels", str(mask), "--label-colors", str(colours)]
    args += ["--class-names", "building,land,road,vegetation,water", "--tile-size", "128"]
    assert semisup_main([*args, "--out", str(out)]) == 0
    return out


def test_zero_shot_writes_json_markdown_and_examples(dubai_store: Path, tmp_path: Path) -> None:
    config = ZeroShotConfig(sam=TeacherConfig(model_type="tiny", points_per_side=4), max_tiles=3)
    summary = run_zero_shot(str(dubai_store), config, tmp_path)
    written = json.loads((tmp_path / JSON_FILE).read_text())
    assert written == json.loads(json.dumps(summary))
    expected_keys = {"tiles", "components", "box_iou", "point_iou", "automatic_coverage"}
    assert expected_keys | {"per_class", "model_type", "checkpoint_hash"} <= set(written)
    assert written["tiles"] == 3 and written["components"] > 0
    for metric in ("box_iou", "point_iou"):
        assert 0 <= written[metric]["mean"] <= 1 and 0 <= written[metric]["median"] <= 1
    assert 0 <= written["automatic_coverage"] <= 1
    names = {"building", "land", "road", "vegetation", "water"}
    assert written["per_class"] and {row["name"] for row in written["per_class"]} <= names
    for row in written["per_class"]:
        assert row["components"] > 0 and 0 <= row["box_iou"] <= 1 and 0 <= row["point_iou"] <= 1
    markdown = (tmp_path / MARKDOWN_FILE).read_text()
    assert "| box-prompt IoU |" in markdown and "| class | components |" in markdown
    with Image.open(tmp_path / EXAMPLES_FILE) as png:
        assert png.format == "PNG" and png.width > 100


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_zero_shot_over_ray_data_matches_the_local_read(
    ray_session: None, dubai_store: Path, tmp_path: Path
) -> None:
    sam = TeacherConfig(model_type="tiny", points_per_side=4)
    config = ZeroShotConfig(sam=sam, max_tiles=2, examples=0)
    local = run_zero_shot(str(dubai_store), config, tmp_path / "local")
    streamed = run_zero_shot(str(dubai_store), config, tmp_path / "ray", use_ray=True)
    for key in ("tiles", "components", "box_iou", "point_iou", "automatic_coverage"):
        assert streamed[key] == pytest.approx(local[key]), key


def test_cli_runs_and_reports(
    dubai_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    parser = argparse.ArgumentParser(prog="semisup zero-shot")
    add_arguments(parser)
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help and all("_" not in flag for flag in action.option_strings)
    args = parser.parse_args(
        ["--store", str(dubai_store), "--model", "tiny", "--out", str(tmp_path), "--max-tiles", "1"]
        + ["--points-per-side", "2"]
    )
    assert run_cli(args) == 0
    assert "box IoU" in capsys.readouterr().out
    assert json.loads((tmp_path / JSON_FILE).read_text())["tiles"] == 1


# ---------------------------------------------------------------------------------------------
# SAM as a detector on a store with boxes


def _mask_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]


def test_box_predictions_are_the_bounding_boxes_of_sams_masks() -> None:
    from test_teacher import OBJECTS, TILE, ScriptedSam  # its masks: each box grown by 8 px

    sam = ScriptedSam()
    truth = np.array([[12, 12, 28, 32], [40, 0, 64, 20], [0, 60, 4, 64]], np.float32)
    result = score_box_tile(
        sam,
        np.zeros((TILE, TILE, 3), np.uint8),
        truth,
        ["tree", "dead", "tree"],
        tile_id=7,
        grid_xy=point_grid(8, TILE),
        mask_filter=MaskFilter(min_area_px=16),
    )
    with torch.inference_mode():
        logits, iou = best_mask(
            *decode_masks(sam, torch.zeros(1, 256, 4, 4), boxes=torch.from_numpy(truth))
        )
    expected = [_mask_box(mask > 0) for mask in logits]
    assert result.prompted.boxes.tolist() == expected  # the masks' boxes, not the prompts
    assert expected[0] == [4, 4, 36, 40] and expected[2] == [0, 52, 12, 64]  # grown and clipped
    assert result.prompted.labels == ("tree", "dead", "tree")
    np.testing.assert_allclose(result.prompted.scores, iou.numpy())
    assert sorted(map(tuple, result.automatic.boxes.tolist())) == sorted(OBJECTS)
    assert set(result.automatic.labels) == {AGNOSTIC}
    assert result.truth.image_ref == result.prompted.image_ref == "tile_7"


def test_zero_shot_on_a_store_with_boxes_only(shared_data: Path, tmp_path: Path) -> None:
    from data_prep.ingest import build_store
    from semisup.config import PrepConfig
    from semisup.detection.targets import BoxTargets
    from semisup.store import open_store, read_tile_index

    neon = shared_data / "neon_trees"
    made = build_store(
        [neon / "OSBS_029.tif"],
        tmp_path / "crowns.zarr",
        boxes=[neon / "OSBS_029.csv"],
        config=PrepConfig(tile_size=128),
        quiet=True,
    )
    store = str(made.path)
    config = ZeroShotConfig(sam=TeacherConfig(model_type="tiny", points_per_side=4), max_tiles=2)
    summary = run_zero_shot(store, config, tmp_path / "out", log=None)
    written = json.loads((tmp_path / "out" / JSON_FILE).read_text())
    assert written == json.loads(json.dumps(summary)) and written["tiles"] == 0  # no masks
    box_ap = written["box_ap"]
    targets = BoxTargets(open_store(store), store)
    index = read_tile_index(store).to_pandas()
    counts = [len(targets.tile(r.source, r.y0, r.x0).boxes) for r in index.itertuples()]
    assert box_ap["tiles"] == 2 and 0 < box_ap["truth_boxes"] <= 2 * max(counts)
    for key in ("prompted", "automatic"):
        assert 0 <= box_ap[key]["ap"] <= box_ap[key]["ap50"] <= 1
        assert box_ap[key]["truth_boxes"] == box_ap["truth_boxes"]
    assert box_ap["prompted"]["predicted_boxes"] <= box_ap["truth_boxes"]  # one per prompt
    assert "| prompted by the truth boxes |" in (tmp_path / "out" / MARKDOWN_FILE).read_text()
    assert "box AP" in summary_line(written) and "automatic (class-agnostic)" in summary_line(
        written
    )


def test_zero_shot_config_measures_automatic_sam_with_known_prompts() -> None:
    with pytest.raises(ValueError, match="SAM's automatic masks, not 'prompted'"):
        ZeroShotConfig(sam=TeacherConfig(mode="prompted"))
    with pytest.raises(ValueError, match="unknown point_mode 'corner'; known: interior, centroid"):
        ZeroShotConfig(point_mode="corner")  # type: ignore[arg-type]
    assert ZeroShotConfig().sam == TeacherConfig(mode="automatic")

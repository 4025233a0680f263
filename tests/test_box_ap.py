"""COCO box AP (``semisup evaluate-boxes``): exact values on hand-made cases and the NEON crowns."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.boxes import BoxSet, parse_box_classes, read_box_file, rename_box_labels
from data_prep.errors import PrepError
from semisup.cli import main
from semisup.detection.box_ap import BoxEvaluationError, box_average_precision


def _boxes(
    image: str, boxes: list[list[float]], labels: list[str], scores: list[float] | None = None
) -> BoxSet:
    return BoxSet(
        image,
        np.asarray(boxes, np.float32).reshape(-1, 4),
        tuple(labels),
        Path(f"{image}.csv"),
        None if scores is None else np.asarray(scores, np.float32),
    )


TRUTH = [_boxes("a.tif", [[0, 0, 10, 10], [20, 20, 30, 30]], ["tree", "tree"])]


def test_predictions_equal_to_the_truth_score_one_and_disjoint_ones_zero() -> None:
    exact = [_boxes("dir/a.tif", [[0, 0, 10, 10], [20, 20, 30, 30]], ["tree"] * 2, [0.9, 0.8])]
    scores = box_average_precision(exact, TRUTH)  # matched by file name, not path
    assert (scores.ap, scores.ap50, scores.ap75) == (1.0, 1.0, 1.0)
    assert scores.per_class["tree"].ap == 1.0 and scores.truth_boxes == 2
    disjoint = [_boxes("a.tif", [[50, 50, 60, 60], [70, 0, 80, 10]], ["tree"] * 2, [0.9, 0.8])]
    assert box_average_precision(disjoint, TRUTH).ap == 0.0
    assert box_average_precision([], TRUTH).ap50 == 0.0  # no predictions: every tree missed


def test_a_hand_computed_case() -> None:
    """Ranked by score: a hit, a miss, then a box at IoU 0.62.

    Precision/recall: (1, 0.5), (0.5, 0.5), (2/3, 1) at IoU thresholds up to 0.60, so the
    101-point interpolated precision is 1 for recall ≤ 0.5 and 2/3 above: (51 + 50·2/3)/101.
    Above 0.60 the third box misses too: 51/101. AP averages 3 thresholds of the first and 7
    of the second.
    """
    predictions = [
        _boxes(
            "a.tif",
            [[0, 0, 10, 10], [40, 40, 50, 50], [20, 20, 30, 26.2]],
            ["tree"] * 3,
            [0.9, 0.8, 0.7],
        )
    ]
    scores = box_average_precision(predictions, TRUTH)
    low, high = (51 + 50 * 2 / 3) / 101, 51 / 101
    assert scores.ap50 == pytest.approx(low) and scores.ap75 == pytest.approx(high)
    assert scores.ap == pytest.approx((3 * low + 7 * high) / 10)


def test_per_class_scores_and_aerial_counts_above_coco_limit() -> None:
    """Two classes scored apart; 150 crowns in one image all count (COCO's limit is 100)."""
    grid = [[x * 12, y * 12, x * 12 + 10, y * 12 + 10] for x in range(15) for y in range(10)]
    truth = [_boxes("b.tif", grid + [[500, 500, 520, 520]], ["tree"] * 150 + ["car"])]
    predictions = [_boxes("b.tif", grid, ["tree"] * 150, list(np.linspace(0.99, 0.5, 150)))]
    scores = box_average_precision(predictions, truth)
    assert scores.per_class["tree"].ap == 1.0 and scores.per_class["car"].ap == 0.0
    assert scores.ap == pytest.approx(0.5)
    assert "AP50[tree] 1.000" in scores.lines() and scores.lines()[0] == "AP 0.500"


def test_what_cannot_be_scored_is_refused_by_name() -> None:
    with pytest.raises(BoxEvaluationError, match="'c.tif'"):
        box_average_precision([_boxes("c.tif", [[0, 0, 1, 1]], ["tree"], [0.5])], TRUTH)
    with pytest.raises(BoxEvaluationError, match="class 'car' is not in the truth"):
        box_average_precision([_boxes("a.tif", [[0, 0, 1, 1]], ["car"], [0.5])], TRUTH)
    with pytest.raises(BoxEvaluationError, match="no score column"):
        box_average_precision([_boxes("a.tif", [[0, 0, 1, 1]], ["tree"])], TRUTH)


def test_box_class_map() -> None:
    mapping = parse_box_classes(["Tree,0, Alive,Dead=tree", "Car=vehicle"])
    assert mapping == {
        "Tree": "tree",
        "0": "tree",
        "Alive": "tree",
        "Dead": "tree",
        "Car": "vehicle",
    }
    renamed = rename_box_labels(_boxes("a.tif", [[0, 0, 1, 1]] * 3, ["Dead", "Car", "x"]), mapping)
    assert renamed.labels == ("tree", "vehicle", "x")
    with pytest.raises(PrepError, match="expected NAME"):
        parse_box_classes(["tree"])
    with pytest.raises(PrepError, match="'Tree' is mapped to both"):
        parse_box_classes(["Tree=tree", "Tree=shrub"])


def test_the_command_scores_neon_crowns(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The NEON truth against itself as a prediction (with scores): every AP is 1; against
    boxes shifted by half their width, AP50 falls."""
    truth = shared_data / "neon_trees" / "OSBS_029.csv"
    rows = list(csv.DictReader(truth.open()))
    for name, shift in (("same.csv", 0.0), ("shifted.csv", 0.5)):
        with (tmp_path / name).open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image_path", "xmin", "ymin", "xmax", "ymax", "label", "score"])
            for n, row in enumerate(rows):
                width = float(row["xmax"]) - float(row["xmin"])
                x0 = float(row["xmin"]) + shift * width
                writer.writerow(
                    [
                        f"/data/{row['image_path']}",
                        x0,
                        row["ymin"],
                        x0 + width,
                        row["ymax"],
                        "0",
                        1 - n / 100,
                    ]
                )
    args = ["evaluate-boxes", "--truth", str(truth), "--box-classes", "Tree,0=tree"]
    assert (
        main([*args, "--pred", str(tmp_path / "same.csv"), "--json", str(tmp_path / "s.json")]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["AP 1.000", "AP50 1.000", "AP75 1.000"] and "AP50[tree] 1.000" in lines
    assert json.loads((tmp_path / "s.json").read_text())["truth_boxes"] == len(rows)
    assert main([*args, "--pred", str(tmp_path / "shifted.csv")]) == 0
    shifted = dict(line.split(" ") for line in capsys.readouterr().out.splitlines())
    assert float(shifted["AP50"]) < 0.1  # IoU of a box shifted by half its width: 1/3
    assert (
        main(["evaluate-boxes", "--truth", str(truth), "--pred", str(tmp_path / "same.csv")]) == 2
    )
    assert "class '0' is not in the truth" in capsys.readouterr().err
    assert len(read_box_file(shared_data / "neon_trees" / "SOAP_061.xml")[0].labels) == 37

"""COCO-style box average precision (AP, AP50, AP75, per class) with pycocotools.

Ray-free and torch-free: predictions and truths are ``data_prep.boxes.BoxSet`` records (pixel
x0, y0, x1, y1 per image), the same ones ``semisup prep`` reads. Images are matched by file name,
so a prediction file may name images by path and the truth by bare name.

COCO's conventions hold (101-point interpolated precision, IoU thresholds 0.50:0.05:0.95, area
range "all") with one change for aerial tiles: COCO counts at most 100 detections per image,
fewer than the crowns of one orthophoto, so the limit here is the most predictions any image
has (at least 100).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.boxes import BoxSet, parse_box_classes, read_box_file, rename_box_labels

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's
COCO_MAX_DETECTIONS = 100


class BoxEvaluationError(ValueError):
    """Predictions and truths that cannot be scored together; the message names what differs."""


@dataclass(frozen=True)
class ClassAP:
    """AP over IoU 0.50:0.95, at 0.50 and at 0.75; None where the class has no truth box."""

    ap: float | None
    ap50: float | None
    ap75: float | None


@dataclass(frozen=True)
class BoxScores:
    """Box AP of one prediction set against its truth, overall and per class."""

    ap: float
    ap50: float
    ap75: float
    per_class: dict[str, ClassAP]
    images: int
    truth_boxes: int
    predicted_boxes: int

    def lines(self) -> list[str]:
        """``AP 0.512``, ``AP50 0.734``, ``AP75 0.498``, then ``AP50[tree] 0.734``, ..."""
        out = [f"AP {self.ap:.3f}", f"AP50 {self.ap50:.3f}", f"AP75 {self.ap75:.3f}"]
        for metric in ("ap", "ap50", "ap75"):
            for name, scores in self.per_class.items():
                value = getattr(scores, metric)
                shown = "–" if value is None else f"{value:.3f}"
                out.append(f"{metric.upper()}[{name}] {shown}")
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def box_average_precision(predictions: Sequence[BoxSet], truths: Sequence[BoxSet]) -> BoxScores:
    """AP of ``predictions`` (each with ``scores``) against ``truths``, matched by image name.

    Classes are the truth's labels. A prediction for an image or class the truth does not have
    is refused: it would silently count for nothing.
    """
    truth_by_image, pred_by_image = _by_image(truths), _by_image(predictions)
    unknown = sorted(set(pred_by_image) - set(truth_by_image))
    if unknown:
        raise BoxEvaluationError(
            f"predictions for {len(unknown)} image(s) the truth does not have, e.g. "
            f"{unknown[0]!r} (from {pred_by_image[unknown[0]][0].path}); truth images: "
            f"{', '.join(sorted(truth_by_image)[:5])}"
        )
    classes = sorted({label for s in truths for label in s.labels})
    if not classes:
        raise BoxEvaluationError("the truth holds no boxes: nothing to score against")
    for box_set in predictions:
        if box_set.scores is None:
            raise BoxEvaluationError(
                f"prediction file {box_set.path}: no score column (image_path,xmin,ymin,xmax,"
                "ymax,label,score expected)"
            )
        extra = sorted(set(box_set.labels) - set(classes))
        if extra:
            raise BoxEvaluationError(
                f"prediction file {box_set.path}: class {extra[0]!r} is not in the truth "
                f"({', '.join(classes)}); map names with --box-classes"
            )
    images = sorted(truth_by_image)
    truth_json = _coco_dataset(images, classes, truth_by_image, with_scores=False)
    pred_json = _coco_dataset(images, classes, pred_by_image, with_scores=True)
    per_image = np.bincount([a["image_id"] for a in pred_json["annotations"]] or [0])
    most = max(COCO_MAX_DETECTIONS, int(per_image.max()))
    evaluation = _evaluate(truth_json, pred_json, most)
    precision = evaluation.eval["precision"][:, :, :, 0, -1]  # T×R×K, area all, most dets
    per_class = {
        name: ClassAP(
            ap=_mean_precision(precision[:, :, k]),
            ap50=_mean_precision(precision[0, :, k]),
            ap75=_mean_precision(precision[5, :, k]),
        )
        for k, name in enumerate(classes)
    }
    return BoxScores(
        ap=_mean_precision(precision) or 0.0,
        ap50=_mean_precision(precision[0]) or 0.0,
        ap75=_mean_precision(precision[5]) or 0.0,
        per_class=per_class,
        images=len(images),
        truth_boxes=len(truth_json["annotations"]),
        predicted_boxes=len(pred_json["annotations"]),
    )


def _by_image(box_sets: Sequence[BoxSet]) -> dict[str, list[BoxSet]]:
    out: dict[str, list[BoxSet]] = {}
    for box_set in box_sets:
        out.setdefault(box_set.image_name, []).append(box_set)
    return out


def _coco_dataset(
    images: Sequence[str],
    classes: Sequence[str],
    by_image: dict[str, list[BoxSet]],
    *,
    with_scores: bool,
) -> dict[str, Any]:
    """A COCO dataset dict (boxes as x, y, w, h); ids start at 1 as COCO's do."""
    class_id = {name: k + 1 for k, name in enumerate(classes)}
    annotations: list[dict[str, Any]] = []
    for image_id, name in enumerate(images, start=1):
        for box_set in by_image.get(name, []):
            for n, (box, label) in enumerate(zip(box_set.boxes, box_set.labels, strict=True)):
                x0, y0, x1, y1 = (float(v) for v in box)
                annotation = {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": class_id[label],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
                if with_scores:
                    assert box_set.scores is not None
                    annotation["score"] = float(box_set.scores[n])
                annotations.append(annotation)
    return {
        "images": [{"id": i, "file_name": name} for i, name in enumerate(images, start=1)],
        "categories": [{"id": i, "name": name} for name, i in class_id.items()],
        "annotations": annotations,
    }


def _evaluate(truth: dict[str, Any], predictions: dict[str, Any], max_detections: int) -> Any:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth_api = COCO()
        truth_api.dataset = truth
        truth_api.createIndex()
        pred_api = COCO()
        pred_api.dataset = {**predictions, "info": {}}
        pred_api.createIndex()
        evaluation = COCOeval(truth_api, pred_api, iouType="bbox")
        evaluation.params.iouThrs = IOU_THRESHOLDS
        evaluation.params.maxDets = [1, 10, max_detections]
        evaluation.evaluate()
        evaluation.accumulate()
    return evaluation


def _mean_precision(precision: np.ndarray) -> float | None:
    """COCO's mean over interpolated precision, ignoring -1 (no truth); None when all are -1."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else None


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``semisup evaluate-boxes`` flags."""
    parser.add_argument(
        "--pred",
        required=True,
        nargs="+",
        action="extend",
        metavar="CSV",
        help="predicted boxes: CSV with image_path,xmin,ymin,xmax,ymax,label,score in pixels",
    )
    parser.add_argument(
        "--truth",
        required=True,
        nargs="+",
        action="extend",
        metavar="CSV_OR_XML",
        help="true boxes: CSV in the same layout without score, or Pascal-VOC XML files",
    )
    parser.add_argument(
        "--box-classes",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAMES=CLASS",
        help="rename labels in both, as `semisup prep --box-classes`: 'Tree,0,Alive,Dead=tree'",
    )
    parser.add_argument("--json", type=Path, help="also write the scores to this JSON file")


def run_cli(args: argparse.Namespace) -> int:
    """Score the prediction files against the truth and print AP per metric and class."""
    mapping = parse_box_classes(args.box_classes)
    predictions, truths = (
        [rename_box_labels(s, mapping) for path in paths for s in read_box_file(path)]
        for paths in (args.pred, args.truth)
    )
    scores = box_average_precision(predictions, truths)
    for line in scores.lines():
        print(line)
    print(
        f"({scores.images} images, {scores.truth_boxes} true and {scores.predicted_boxes} "
        "predicted boxes)",
        file=sys.stderr,
    )
    if args.json is not None:
        args.json.write_text(json.dumps(scores.to_json(), indent=2) + "\n")
    return 0

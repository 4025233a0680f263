"""``semisup compare``: the SAM-based segmentation student against the Faster R-CNN student.

Both runs see the same tiles: the validation tiles of the detection store's box split (the
tiles ``semisup train`` with ``task: detection`` validates on, ``detection_facts``). For each::

    box AP / AP50 / AP75   ``box_ap.box_average_precision`` (the evaluate-boxes code); the
                           segmentation student's boxes are the connected components of its
                           class map for the box class(es), scored by their mean probability
    images/s               both models timed in this one process on the same tiles, the first
                           batch (warm-up) left out, with the load average and CPU seconds
    parameters             total, and trainable (detector) or held in the adapter (SAM student)
    weights on disk        best/detector.pt, best/adapter.safetensors
    training time          the last epoch's ``seconds`` of each run's report.json (wall time
                           since the training loop started, validation included)

Box classes are matched to segmentation classes by name, or by ``--classes BOX=SEG`` pairs
(``tree=vegetation``). Writes OUT/compare.json and OUT/compare.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semisup import columns as C

SEG_ADAPTER = Path("best") / "adapter.safetensors"
BATCH = 4  # tiles per forward pass of either model
WARMUP_BATCHES = 1  # left out of images/s: first-call allocations and lazy initialisation
COLUMNS = (C.IMAGE, C.VALID, C.SOURCE, C.TILE_ID)
Tiles = list[dict[str, Any]]  # batches: TILE_ID B int64, IMAGE B×3×S×S float32 in [0, 1], VALID
Detections = list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]  # as train_task.score_boxes


class CompareError(ValueError):
    """Runs that cannot be compared; the message names the run and what was expected."""


# ---------------------------------------------------------------------------------------------
# A class map's components as boxes (pure)


def component_boxes(
    class_map: np.ndarray,
    probabilities: np.ndarray | None,
    classes: Sequence[int],
    min_pixels: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One box per 4-connected component of each of ``classes`` in ``class_map``.

    ``class_map``: H×W int class ids (pixels to leave out may hold any id not in ``classes``);
    ``probabilities``: K×H×W float class probabilities, or None for scores of 1. Components of
    fewer than ``min_pixels`` pixels are dropped. Returns ``boxes`` N×4 float32 pixel-edge xyxy
    (a one-pixel component at (y, x) is ``[x, y, x + 1, y + 1]``), ``labels`` N int64 (the
    position in ``classes`` of the component's class) and ``scores`` N float32 (the mean of its
    class's probability over the component's pixels), ordered by class, then component.
    """
    from semisup.zero_shot import connected_components

    boxes, labels, scores = [], [], []
    for position, class_id in enumerate(classes):
        components, count = connected_components(class_map == class_id)
        if count == 0:
            continue
        ys, xs = np.nonzero(components)
        ids = components[ys, xs] - 1  # component index of each pixel, 0-based
        x0, y0 = np.full(count, class_map.shape[1]), np.full(count, class_map.shape[0])
        x1, y1 = np.zeros(count, np.int64), np.zeros(count, np.int64)
        np.minimum.at(x0, ids, xs)
        np.minimum.at(y0, ids, ys)
        np.maximum.at(x1, ids, xs + 1)
        np.maximum.at(y1, ids, ys + 1)
        pixels = np.bincount(ids, minlength=count)
        weights = None if probabilities is None else probabilities[class_id][ys, xs]
        sums = np.bincount(ids, weights=weights, minlength=count)
        keep = pixels >= min_pixels
        boxes.append(np.stack([x0, y0, x1, y1], 1)[keep].astype(np.float32))
        labels.append(np.full(int(keep.sum()), position, np.int64))
        scores.append((sums / np.maximum(pixels, 1))[keep].astype(np.float32))
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(boxes), np.concatenate(labels), np.concatenate(scores)


def class_pairs(
    box_classes: Sequence[str], seg_classes: Sequence[str], pairs: Sequence[str] = ()
) -> dict[str, int]:
    """Box class name -> segmentation class id: by ``BOX=SEG`` ``pairs``, else by equal names.

    Raises ``CompareError`` for a malformed pair, a name neither run has, or no box class that
    a segmentation class stands for.
    """
    wanted: dict[str, str] = {}
    for pair in pairs:
        box, sep, seg = pair.partition("=")
        if not sep or not box.strip() or not seg.strip():
            raise CompareError(f"--classes {pair!r}: expected BOX_CLASS=SEGMENTATION_CLASS")
        wanted[box.strip()] = seg.strip()
    for box, seg in wanted.items():
        if box not in box_classes:
            raise CompareError(
                f"--classes {box}={seg}: the detection store has no box class {box!r} "
                f"(it has {', '.join(box_classes)})"
            )
        if seg not in seg_classes:
            raise CompareError(
                f"--classes {box}={seg}: the segmentation run has no class {seg!r} "
                f"(it has {', '.join(seg_classes)})"
            )
    if not wanted:
        wanted = {name: name for name in box_classes if name in seg_classes}
    if not wanted:
        raise CompareError(
            f"no box class ({', '.join(box_classes)}) is a segmentation class "
            f"({', '.join(seg_classes)}); pair them with --classes BOX=SEG"
        )
    return {box: list(seg_classes).index(seg) for box, seg in wanted.items()}


# ---------------------------------------------------------------------------------------------
# The runs


@dataclass(frozen=True)
class Runs:
    """The two runs, checked: folders, the detection store and its validation tiles."""

    seg: Path
    det: Path
    store: str
    val_tiles: list[int]
    band_scale: dict[str, tuple[tuple[float, ...], tuple[float, ...]]]
    box_classes: list[str]
    seg_classes: list[str]
    tile_size: int  # px, the detection store's tiles


def check_runs(seg_run: str | Path, det_run: str | Path, store: str | Path | None) -> Runs:
    """Both runs and the store, or a ``CompareError`` (``FileNotFoundError`` for a missing
    folder) naming the run and what was expected, before any model is loaded.

    ``store``: the detection store; default DET_RUN/../store.zarr (the demo's layout).
    """
    from semisup.config import load_config
    from semisup.detection.predict import is_detection_run
    from semisup.detection.train_task import detection_facts

    seg, det = Path(seg_run).expanduser().absolute(), Path(det_run).expanduser().absolute()
    for role, path in (("SEG_RUN", seg), ("DET_RUN", det)):
        if not (path / "config.yaml").is_file() or not (path / "report.json").is_file():
            raise FileNotFoundError(
                f"--runs {role} {path}: expected a `semisup train` run folder with config.yaml "
                "and report.json"
            )
    if is_detection_run(seg):
        raise CompareError(
            f"--runs SEG_RUN {seg}: a detection run (task: detection); expected a segmentation "
            "run first, then the detection run"
        )
    if not is_detection_run(det):
        raise CompareError(
            f"--runs DET_RUN {det}: a segmentation run; expected a detection run (task: detection)"
        )
    if not (seg / SEG_ADAPTER).is_file():
        raise FileNotFoundError(f"--runs SEG_RUN {seg}: no best adapter yet ({seg / SEG_ADAPTER})")
    chosen = Path(store) if store is not None else det.parent / "store.zarr"
    if not chosen.exists():
        raise FileNotFoundError(
            f"--store {chosen}: not found; name the detection run's tile store with --store"
        )
    facts, tile_ids = detection_facts(str(chosen), load_config(det / "config.yaml"), None)
    seg_report = json.loads((seg / "report.json").read_text())
    return Runs(
        seg,
        det,
        str(chosen),
        list(tile_ids[C.VAL]),
        {k: (tuple(v[0]), tuple(v[1])) for k, v in facts["band_scale"].items()},
        list(facts["class_names"]),
        list(seg_report["class_names"]),
        int(facts["tile_size"]),
    )


def read_val_tiles(runs: Runs, batch_size: int = BATCH) -> Tiles:
    """The validation tiles in batches, read once so both models see the same arrays."""
    from semisup.model_input import prepare_batch
    from semisup.tile_reader import TileReader

    reader = TileReader(runs.store, runs.val_tiles, columns=COLUMNS)
    batches = []
    for lo in range(0, len(runs.val_tiles), batch_size):
        raw = reader.read(runs.val_tiles[lo : lo + batch_size])
        tensors = prepare_batch(raw, runs.band_scale)
        batches.append(
            {
                C.TILE_ID: np.asarray(raw[C.TILE_ID], np.int64),
                C.IMAGE: tensors[C.IMAGE],
                C.VALID: tensors[C.VALID],
            }
        )
    return batches


# ---------------------------------------------------------------------------------------------
# Timing


def timed(
    predict: Callable[[dict[str, Any]], Detections], batches: Tiles
) -> tuple[Detections, dict[str, Any]]:
    """Every batch's detections, and ``images_per_s`` over the batches after the first
    ``WARMUP_BATCHES`` (all of them when there are no more), with the wall and CPU seconds
    (this process, all threads) and the 1-minute load average before and after."""
    found: Detections = []
    load_before = os.getloadavg()[0]
    timed_images, wall, cpu = 0, 0.0, 0.0
    skip = WARMUP_BATCHES if len(batches) > WARMUP_BATCHES else 0
    for i, batch in enumerate(batches):
        wall_start, cpu_start = time.perf_counter(), _cpu_seconds()
        found += predict(batch)
        if i >= skip:
            wall += time.perf_counter() - wall_start
            cpu += _cpu_seconds() - cpu_start
            timed_images += len(batch[C.TILE_ID])
    return found, {
        "images_per_s": round(timed_images / wall, 3) if wall > 0 else None,
        "timed_images": timed_images,
        "warmup_batches": skip,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------
# The two students


def detector_predict(model: torch.nn.Module) -> Callable[[dict[str, Any]], Detections]:
    """Faster R-CNN on a batch: (tile id, boxes N×4 px, labels N class + 1, scores N) per tile."""

    def predict(batch: dict[str, Any]) -> Detections:
        with torch.inference_mode():
            found = model(list(batch[C.IMAGE]))
        return [
            (int(t), d["boxes"].numpy(), d["labels"].numpy(), d["scores"].numpy())
            for t, d in zip(batch[C.TILE_ID], found, strict=True)
        ]

    return predict


def segmenter_predict(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    image_size: int,
    classes: Sequence[int],
    most: int,
) -> Callable[[dict[str, Any]], Detections]:
    """The SAM student on a batch, its class maps turned into boxes (``component_boxes``) with
    labels as the detector's (position in ``classes`` + 1), the ``most`` best-scoring per tile
    (the detector's cap). Tiles of another size than the student's are resized to it and its
    probabilities back (bilinear); invalid pixels count for no class."""
    import torch.nn.functional as F

    def predict(batch: dict[str, Any]) -> Detections:
        images = batch[C.IMAGE]  # B×3×T×T
        tile = images.shape[-1]
        with torch.inference_mode():
            if tile != image_size:
                images = F.interpolate(images, size=image_size, mode="bilinear")
            probabilities = logits_of(images).float().softmax(1)  # B×K×S×S
            if tile != image_size:
                probabilities = F.interpolate(probabilities, size=tile, mode="bilinear")
        class_maps = probabilities.argmax(1).masked_fill(~batch[C.VALID], -1)  # B×T×T
        out: Detections = []
        for t, class_map, p in zip(
            batch[C.TILE_ID], class_maps.numpy(), probabilities.numpy(), strict=True
        ):
            boxes, labels, scores = component_boxes(class_map, p, classes)
            best = np.argsort(-scores, kind="stable")[:most]
            out.append((int(t), boxes[best], labels[best] + 1, scores[best]))
        return out

    return predict


def detector_facts(run: Path, num_classes: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The run's best detector (eval) and its parameters: total and trainable by its config's
    ``detector.finetune``; the weights file and its size."""
    from semisup.config import load_config
    from semisup.detection.model import build_detector
    from semisup.detection.predict import load_run_detector, resolve_detection_run

    model = load_run_detector(resolve_detection_run(run))
    detector = load_config(run / "config.yaml").detector
    as_trained = build_detector(
        num_classes,
        arch=detector.arch,
        finetune=detector.finetune,
        trainable_backbone_layers=detector.trainable_backbone_layers,
        tile_size=64,
    )
    weights = Path(resolve_detection_run(run).weights)
    return model, {
        "arch": detector.arch,
        "finetune": detector.finetune,
        "detections_per_tile": detector.detections_per_tile,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in as_trained.parameters() if p.requires_grad),
        "weights_file": str(weights),
        "weights_bytes": weights.stat().st_size,
    }


def segmenter_facts(run: Path) -> tuple[torch.nn.Module, int, dict[str, Any]]:
    """The run's best student (eval, takes [0, 1] images), its tile size, and its parameters:
    total (base and adapter) and the adapter's own; the adapter file and its size."""
    from safetensors.torch import load_file

    from semisup.window_predictor import load_model, resolve_model

    resolved = resolve_model(str(run), workdir=run)
    model = load_model(resolved)
    adapter_parameters = sum(t.numel() for t in load_file(resolved.file).values())
    return (
        model,
        resolved.image_size,
        {
            "model_type": resolved.model_type,
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": adapter_parameters,
            "weights_file": resolved.file,
            "weights_bytes": Path(resolved.file).stat().st_size,
        },
    )


def training_time(run: Path) -> dict[str, Any]:
    """Training wall time from RUN/report.json: the last epoch's ``seconds`` (the training loop
    records the time since it started at each epoch's end), steps and median step seconds."""
    report = json.loads((run / "report.json").read_text())
    epochs = report.get("epochs") or []
    last = epochs[-1] if epochs else {}
    return {
        "train_seconds": last.get("seconds"),
        "steps": report.get("steps"),
        "step_seconds_median": (last.get("train") or {}).get("step_seconds_median"),
    }


# ---------------------------------------------------------------------------------------------
# The comparison


def compare_runs(
    seg_run: str | Path,
    det_run: str | Path,
    *,
    store: str | Path | None = None,
    out: str | Path | None = None,
    classes: Sequence[str] = (),
    batch_size: int = BATCH,
    note: str | None = None,
) -> dict[str, Any]:
    """Compare the two runs on the detection store's validation tiles (module docstring);
    returns the JSON-safe result, also written with its table to OUT/compare.{json,md}.
    ``note``: a line shown under the table (how to read the figures)."""
    from semisup.detection.targets import BoxTargets
    from semisup.detection.train_task import score_boxes, val_truths
    from semisup.store import open_store

    runs = check_runs(seg_run, det_run, store)
    seg_of_box = class_pairs(runs.box_classes, runs.seg_classes, classes)
    box_names = list(seg_of_box)  # the segmentation student's box classes, in this order
    truths = val_truths(runs.store, BoxTargets(open_store(runs.store), runs.store), runs.val_tiles)
    batches = read_val_tiles(runs, batch_size)
    detector, det_facts = detector_facts(runs.det, len(runs.box_classes))
    segmenter, image_size, seg_facts = segmenter_facts(runs.seg)
    det_found, det_speed = timed(detector_predict(detector), batches)
    seg_found, seg_speed = timed(
        segmenter_predict(
            segmenter,
            image_size,
            list(seg_of_box.values()),
            most=int(det_facts["detections_per_tile"]),
        ),
        batches,
    )
    rows = []
    for name, run, found, names, facts, speed in (
        ("SAM student (segmentation)", runs.seg, seg_found, box_names, seg_facts, seg_speed),
        ("Faster R-CNN student", runs.det, det_found, runs.box_classes, det_facts, det_speed),
    ):
        scores = score_boxes(found, truths, names)
        rows.append(
            {
                "model": name,
                "run": str(run),
                **{k: scores[k] for k in ("ap", "ap50", "ap75", "predicted_boxes", "truth_boxes")},
                **speed,
                **facts,
                **training_time(run),
            }
        )
    result = {
        "store": runs.store,
        "val_tiles": len(runs.val_tiles),
        "tile_size": runs.tile_size,
        "classes": {box: runs.seg_classes[k] for box, k in seg_of_box.items()},
        "threads": torch.get_num_threads(),
        "rows": rows,
        "note": note,
    }
    if out is not None:
        write_comparison(Path(out), result)
    return result


def comparison_table(result: Mapping[str, Any]) -> list[str]:
    """The comparison as Markdown table lines, one row per student."""

    def number(value: float | None, digits: int = 3) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [
        "| model | AP | AP50 | AP75 | images/s | CPU s | load | parameters | trained | "
        "weights | training |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['model']} | {number(row['ap'])} | {number(row['ap50'])} | "
            f"{number(row['ap75'])} | {number(row['images_per_s'], 2)} | {number(row['cpu_s'], 1)} "
            f"| {number(row['load_before'], 1)} | {_millions(row['parameters'])} | "
            f"{_millions(row['trainable_parameters'])} | {row['weights_bytes'] / 2**20:.2f} MiB | "
            f"{number(row['train_seconds'], 1)} s, {row['steps']} steps |"
        )
    return lines


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f} M" if count >= 10_000 else str(count)


def write_comparison(out: Path, result: Mapping[str, Any]) -> tuple[Path, Path]:
    """OUT/compare.json and OUT/compare.md (the table, what was compared, and how)."""
    out.mkdir(parents=True, exist_ok=True)
    classes = ", ".join(f"{box} = {seg}" for box, seg in result["classes"].items())
    text = [
        f"# SAM student against Faster R-CNN student ({result['val_tiles']} validation tiles of "
        f"{result['tile_size']} px, {result['store']})",
        "",
        *comparison_table(result),
        "",
        f"Box classes and the segmentation classes that stand for them: {classes}. The SAM "
        "student's boxes are the connected components of its class map, scored by their mean "
        "probability. images/s: both models in one process on the same tiles, "
        f"{WARMUP_BATCHES} warm-up batch left out, {result['threads']} torch threads; load: the "
        "1-minute load average before timing. parameters: total; trained: the detector's "
        "trainable parameters, the SAM student's adapter. training: the run's wall time to its "
        "last epoch, validation included.",
        *(["", result["note"]] if result.get("note") else []),
    ]
    json_path, md_path = out / "compare.json", out / "compare.md"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md_path.write_text("\n".join(text) + "\n")
    return json_path, md_path


# ---------------------------------------------------------------------------------------------
# Command line: `semisup compare`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``semisup compare`` flags."""
    parser.add_argument(
        "--runs",
        nargs=2,
        required=True,
        metavar=("SEG_RUN", "DET_RUN"),
        type=Path,
        help="a segmentation run folder, then a detection run folder (task: detection)",
    )
    parser.add_argument(
        "--store",
        type=Path,
        default=None,
        help="the detection run's tile store (default: DET_RUN/../store.zarr)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("compare"), help="folder for compare.json and compare.md"
    )
    parser.add_argument(
        "--classes",
        nargs="*",
        default=[],
        metavar="BOX=SEG",
        help="box class = the segmentation class that stands for it (default: equal names)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=BATCH, help="tiles per forward pass of either model"
    )


def run_cli(args: argparse.Namespace) -> int:
    """Compare the two runs into ``--out``; returns the exit status."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: got {args.batch_size}, expected >= 1")
    result = compare_runs(
        args.runs[0],
        args.runs[1],
        store=args.store,
        out=args.out,
        classes=args.classes,
        batch_size=args.batch_size,
    )
    print("\n".join(comparison_table(result)))
    print(f"written: {args.out / 'compare.json'}, {args.out / 'compare.md'}")
    return 0

"""``semisup predict`` with a detection run: boxes of large rasters, window by window.

The class-map path's windows and actor pool, with a box detector in the actors::

    jobs: one per window row of a vertical stripe of each raster (``stitch.plan_jobs``)
      -> a pool of ``BoxPredictor`` actors (``predict.stream_jobs``), each holding the run's
         detector once, reading its jobs' windows (``raster_windows``) and detecting on them
      -> the driver: each raster's boxes in raster pixels, merged across overlapping windows
         (``detection.merge``: cut boxes dropped where a neighbour saw the object whole, then
         class-wise NMS at the run's ``detector.nms_iou``)
      -> OUT.csv: ``image_path,xmin,ymin,xmax,ymax,label,score`` (pixels; the layout
         ``semisup evaluate-boxes`` reads), and optionally GeoJSON box polygons in the source CRS

Boxes are small: the driver holds them all and writes once every window is done. A rerun
starts over (an existing output needs ``--overwrite``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import numpy as np
import torch

from semisup import blend
from semisup import columns as C
from semisup.actor_pool import ONE_ACTOR, ActorPoolConfig
from semisup.config import DetectorArch, RayConfig
from semisup.detection.merge import merge_window_boxes
from semisup.detection.model import build_detector, load_detector_checkpoint
from semisup.detection.train_task import DETECTOR_FILE
from semisup.raster_windows import RasterSource, open_sources
from semisup.window_predictor import JOB

BOXES: Final = "boxes"  # per window D×4 float32 raster-pixel xyxy, D = detections_per_tile
LABELS: Final = "labels"  # per window D int64 class index (0-based), -1 past COUNT
SCORES: Final = "scores"  # per window D float32
COUNT: Final = "count"  # per window int64: how many of the D rows are boxes
CSV_HEADER: Final = ("image_path", "xmin", "ymin", "xmax", "ymax", "label", "score")
GDAL_CACHE_MB: Final = 64  # per actor, as the class-map predictor
DEFAULT_STRIPE: Final = 4096  # px; as predict.DEFAULT_STRIPE: bounds the rows an actor reads


@dataclass(frozen=True)
class DetectionRun:
    """What the actors load: a ``semisup train`` run of ``task: detection``, its best weights."""

    weights: str  # RUN_DIR/best/detector.pt
    arch: DetectorArch
    class_names: tuple[str, ...]
    tile_size: int  # px, the window side
    score_threshold: float
    nms_iou: float
    detections_per_tile: int
    name: str  # what --model said


def is_detection_run(model: str | Path) -> bool:
    """Whether ``model`` is a run folder whose config says ``task: detection``."""
    from semisup.config import load_config

    config = Path(model).expanduser() / "config.yaml"
    return config.is_file() and load_config(config).task == "detection"


def resolve_detection_run(
    model: str | Path, *, tile_size: int | None = None, min_score: float | None = None
) -> DetectionRun:
    """The detection run at ``model``, checked before anything is written.

    ``tile_size``: the window side (default: the run's training tile); ``min_score``: boxes
    below it are dropped (default: the run's ``detector.score_threshold``). Raises
    ``FileNotFoundError`` without best weights or a report (the class names), ``ValueError``
    for a ``min_score`` outside [0, 1) or a ``tile_size`` below 32 px.
    """
    from semisup.config import load_config

    path = Path(model).expanduser()
    config = load_config(path / "config.yaml")
    weights, report_file = path / "best" / DETECTOR_FILE, path / "report.json"
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: the detection run has no best weights yet ({weights})")
    if not report_file.is_file():
        raise FileNotFoundError(f"{path}: the detection run has no {report_file.name} (classes)")
    report = json.loads(report_file.read_text())
    detector = config.detector
    if min_score is not None and not 0 <= min_score < 1:
        raise ValueError(f"--min-score: got {min_score}, expected in [0, 1)")
    tile = tile_size or int(report.get("tile_size") or config.prep.tile_size)
    if tile < 32:  # the FPN's coarsest level is 1/32 of the window
        raise ValueError(f"--tile-size: got {tile}, expected >= 32 px for a detector")
    return DetectionRun(
        str(weights),
        detector.arch,
        tuple(report["class_names"]),
        tile,
        detector.score_threshold if min_score is None else min_score,
        detector.nms_iou,
        detector.detections_per_tile,
        str(model),
    )


def load_run_detector(run: DetectionRun) -> torch.nn.Module:
    """The run's detector with its best weights, in eval mode on the CPU. Takes B×3×T×T images
    in [0, 1] (a list); gives per image ``boxes`` N×4 xyxy px, ``labels`` N (class + 1),
    ``scores`` N."""
    model = build_detector(
        len(run.class_names),
        arch=run.arch,
        finetune="full",
        tile_size=run.tile_size,
        score_threshold=run.score_threshold,
        nms_iou=run.nms_iou,
        detections_per_tile=run.detections_per_tile,
    )
    load_detector_checkpoint(model, run.weights)
    return model.eval()


class BoxPredictor:
    """Ray Data callable class: reads the windows of jobs and detects boxes in them.

    Input rows: jobs (``seq``, ``output``, ``y0``, ``first_col``, ``last_col``, see
    ``stitch.Job``). Output: one row per window: ``JOB``, ``Y0``, ``X0`` (int64), ``COUNT``
    and the first ``COUNT`` rows of ``BOXES`` (raster pixels), ``LABELS`` and ``SCORES``.
    Windows without a valid pixel are not run (``COUNT`` 0).
    """

    def __init__(
        self,
        run: Mapping[str, Any],
        sources: Sequence[RasterSource],
        tile: int,
        overlap: int,
        batch_size: int = 4,
        device: str = "cpu",
        torch_threads: int | None = None,
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        os.environ.setdefault(
            "GDAL_CACHEMAX", str(GDAL_CACHE_MB)
        )  # see window_predictor.WindowPredictor
        self.run = DetectionRun(**run)
        self.sources, self.tile, self.overlap = list(sources), tile, overlap
        self.batch_size = batch_size
        self._opened: dict[int, tuple[Any, Any]] = {}
        cuda = device == "auto" and torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        self.model = load_run_detector(self.run).to(self.device)

    def __call__(self, jobs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from semisup.window_predictor import read_job_windows

        windows = read_job_windows(
            jobs, sources=self.sources, tile=self.tile, overlap=self.overlap, opened=self._opened
        )
        images, valid = windows.pop(C.IMAGE), windows.pop(C.VALID)
        count, most = len(images), self.run.detections_per_tile
        out: dict[str, np.ndarray] = {
            BOXES: np.zeros((count, most, 4), np.float32),
            LABELS: np.full((count, most), -1, np.int64),
            SCORES: np.zeros((count, most), np.float32),
            COUNT: np.zeros(count, np.int64),
        }
        todo = np.flatnonzero(valid.reshape(count, -1).any(1))
        for start in range(0, len(todo), self.batch_size):
            chosen = todo[start : start + self.batch_size]
            for index, found in zip(chosen, self.detect(images[chosen]), strict=True):
                n = len(found[SCORES])
                shift = np.array([windows[C.X0][index], windows[C.Y0][index]] * 2, np.float32)
                out[BOXES][index, :n] = found[BOXES] + shift  # window -> raster pixels
                out[LABELS][index, :n] = found[LABELS] - 1  # torchvision's 0 is background
                out[SCORES][index, :n] = found[SCORES]
                out[COUNT][index] = n
        return {**windows, **out}

    def detect(self, images: np.ndarray) -> list[dict[str, np.ndarray]]:
        """B×3×T×T float32 in [0, 1] -> per window ``boxes`` N×4 window px, ``labels`` N
        (class + 1), ``scores`` N."""
        pixels = torch.from_numpy(images).to(self.device)
        with torch.inference_mode():
            found = self.model(list(pixels))
        return [{key: d[key].cpu().numpy() for key in (BOXES, LABELS, SCORES)} for d in found]


@dataclass
class RasterBoxes:
    """One raster's windows as they arrive: window origin (y0, x0) -> (boxes N×4 raster px,
    class indices N, scores N)."""

    source: RasterSource
    stripe_width: int = DEFAULT_STRIPE
    windows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict
    )

    @property
    def stripes(self) -> list[tuple[int, int]]:  # for stitch.plan_jobs: bounds an actor's reads
        return blend.stripe_bounds(self.source.width, self.stripe_width)

    @property
    def rows_done(self) -> list[int]:  # nothing is written before the end
        return [0] * len(self.stripes)


def merge_raster(
    found: RasterBoxes, *, tile: int, iou: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A raster's boxes (K×4 px, clipped to it), class indices (K) and scores (K), merged across
    windows (``detection.merge``), highest score first."""
    parts = [(b, lab, s, origin) for origin, (b, lab, s) in found.windows.items()]
    if not parts or not sum(len(p[2]) for p in parts):
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)
    boxes = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    scores = torch.from_numpy(np.concatenate([p[2] for p in parts]))
    origins = torch.from_numpy(
        np.concatenate([np.tile(np.array(p[3], np.int64), (len(p[2]), 1)) for p in parts])
    )  # N×2 (y0, x0)
    height, width = found.source.height, found.source.width
    keep = merge_window_boxes(
        boxes, labels, scores, origins, tile=tile, height=height, width=width, iou=iou
    )
    boxes = boxes[keep].clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)  # windows at the edge reach past the raster
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[inside].numpy(), labels[keep][inside].numpy(), scores[keep][inside].numpy()


# ---------------------------------------------------------------------------------------------
# The run


def run_detection_predict(
    rasters: Sequence[str | Path],
    model: str | Path,
    out: str | Path,
    *,
    vector: str | Path | None = None,
    tile_size: int | None = None,
    overlap: int | None = None,
    min_score: float | None = None,
    batch_size: int = 4,
    pool: ActorPoolConfig = ONE_ACTOR,
    stripe_width: int = DEFAULT_STRIPE,
    overwrite: bool = False,
    ray_config: RayConfig | None = None,
    log: TextIO | None = sys.stderr,
) -> dict[str, Any]:
    """Detect boxes in ``rasters`` with the detection run ``model``; returns a JSON-safe summary.

    Args:
        rasters: GeoTIFF/COG files, folders of them, or Zarr tile stores (every source).
        model: a ``semisup train`` run folder of ``task: detection`` (``best/detector.pt``).
        out: the CSV of every raster's boxes (``image_path`` the raster's path, or a store
            source's id).
        vector: optional GeoJSON of box polygons in the source CRS per raster; a file for one
            raster, a folder or a path with ``{name}`` for several (as class-map vectors).
        tile_size, overlap: window side (default the run's training tile) and px shared by
            neighbouring windows (default tile/4; make it at least the largest object, see
            ``detection.merge``).
        min_score: drop boxes below this score (default ``detector.score_threshold``).
        batch_size, pool: windows per detector call and the actors (``ActorPoolConfig``), as
            for class maps.
        stripe_width: px per vertical stripe: bounds the rows an actor reads at a time.
        overwrite: replace existing outputs; without it an existing one is refused.
        ray_config: how to reach Ray (see ``predict.run_predict``).
        log: progress lines; None for silence.

    Bad input (a missing run or weights, an output that exists, a raster without CRS when
    ``vector`` is asked for) raises before any actor starts or anything is written.
    """
    from semisup.predict import _check_numbers, stream_jobs
    from semisup.progress import Progress
    from semisup.runtime import ray_runtime
    from semisup.stitch import plan_jobs

    started = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise ValueError(f"--out {out}: a detection run writes its boxes to one CSV (OUT.csv)")
    run = resolve_detection_run(model, tile_size=tile_size, min_score=min_score)
    sources = open_sources(rasters)
    tile = run.tile_size
    overlap = tile // 4 if overlap is None else overlap
    _check_numbers(tile, overlap, batch_size, DEFAULT_STRIPE)
    if stripe_width < tile:  # no GeoTIFF blocks to align with: any width that holds a window
        raise ValueError(
            f"predict stripe_width: got {stripe_width}, expected >= the window ({tile} px)"
        )
    vectors = _vector_paths(sources, vector)
    for path in [out, *(v for v in vectors if v is not None)]:
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    found = [RasterBoxes(source, stripe_width) for source in sources]
    jobs = plan_jobs([(b.source, b) for b in found], tile, overlap)
    windows = sum(job.last_col - job.first_col for job in jobs)
    progress = Progress(log, windows, label="predict", unit="windows", pixels_per_item=tile**2)
    # a local Ray unless one is up or an address is given; shut down after if started here
    with ray_runtime(ray_config or RayConfig()):
        constructor = {
            "run": asdict(run),
            "sources": sources,
            "tile": tile,
            "overlap": overlap,
            "batch_size": batch_size,
            "device": pool.device(),
            "torch_threads": pool.threads(),
        }
        output_of = {job.seq: job.output for job in jobs}
        for batch in stream_jobs(jobs, BoxPredictor, constructor, pool):
            collect_windows(batch, found, output_of)
            progress.advance(len(batch[COUNT]))
    progress.say()
    merged = [merge_raster(b, tile=tile, iou=run.nms_iou) for b in found]
    write_box_csv(out, sources, merged, run.class_names)
    for source, vector_path, boxes in zip(sources, vectors, merged, strict=True):
        if vector_path is not None:
            write_box_geojson(vector_path, source, *boxes, run.class_names)
    return {
        "outputs": [
            {
                "raster": s.describe(),
                "boxes": len(m[0]),
                "windows": len(b.windows),
                "vector": None if v is None else str(v),
            }
            for s, m, b, v in zip(sources, merged, found, vectors, strict=True)
        ],
        "csv": str(out),
        "model": {
            "name": run.name,
            "arch": run.arch,
            "class_names": list(run.class_names),
            "tile_size": tile,
            "overlap": overlap,
            "nms_iou": run.nms_iou,
            "min_score": run.score_threshold,
        },
        "windows": progress.done,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _vector_paths(sources: Sequence[RasterSource], vector: str | Path | None) -> list[Path | None]:
    """Each raster's GeoJSON (named as class-map vectors are); ``ValueError`` for a raster
    without CRS or two rasters that would share a file."""
    from semisup.predict import output_path

    if vector is None:
        return [None] * len(sources)
    paths: list[Path | None] = [
        output_path(Path(vector), s, len(sources), ".geojson") for s in sources
    ]
    for source in sources:
        if source.crs is None:
            raise ValueError(
                f"{source.describe()} has no CRS: vector output needs georeferenced input"
            )
    if len(set(paths)) < len(paths):
        raise ValueError(f"--vector {vector}: two rasters would write one file; use {{name}}")
    return paths


def collect_windows(
    batch: Mapping[str, np.ndarray], found: list[RasterBoxes], output_of: dict[int, int]
) -> None:
    """Keep each window's boxes once (a window reaching into two stripes comes twice)."""
    for i, seq in enumerate(batch[JOB]):
        n = int(batch[COUNT][i])
        origin = (int(batch[C.Y0][i]), int(batch[C.X0][i]))
        found[output_of[int(seq)]].windows.setdefault(
            origin, (batch[BOXES][i, :n], batch[LABELS][i, :n], batch[SCORES][i, :n])
        )


def image_path(source: RasterSource) -> str:
    """A raster's ``image_path`` in the CSV: the GeoTIFF's path, or a store source's id."""
    return source.path if source.source_id is None else source.source_id


def write_box_csv(
    out: Path,
    sources: Sequence[RasterSource],
    merged: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    class_names: Sequence[str],
) -> None:
    """Every raster's boxes as ``image_path,xmin,ymin,xmax,ymax,label,score`` rows (pixels),
    written to ``out``.partial and renamed when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + ".partial")
    with staging.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_HEADER)
        for source, (boxes, labels, scores) in zip(sources, merged, strict=True):
            for box, label, score in zip(
                boxes.tolist(), labels.tolist(), scores.tolist(), strict=True
            ):
                writer.writerow(
                    [
                        image_path(source),
                        *(f"{v:.2f}" for v in box),
                        class_names[label],
                        f"{score:.5f}",
                    ]
                )
    os.replace(staging, out)


def write_box_geojson(
    out: Path,
    source: RasterSource,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str],
) -> None:
    """Box polygons in ``source``'s CRS (its affine transform applied to the pixel corners),
    with ``class`` (name) and ``score`` properties, and the ``crs`` member ``semisup.vectorize``
    writes. Written to ``out``.partial and renamed when complete."""
    import rasterio.crs

    from semisup.vectorize import crs_member

    assert source.crs is not None and source.transform is not None
    a, b, c, d, e, f = source.transform[:6]
    features = []
    for (x0, y0, x1, y1), label, score in zip(
        boxes.tolist(), labels.tolist(), scores.tolist(), strict=True
    ):
        ring = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]  # pixel corners
        coordinates = [[a * x + b * y + c, d * x + e * y + f] for x, y in ring]
        features.append(
            {
                "type": "Feature",
                "properties": {"class": class_names[label], "score": score},
                "geometry": {"type": "Polygon", "coordinates": [coordinates]},
            }
        )
    collection = {
        "type": "FeatureCollection",
        "crs": crs_member(rasterio.crs.CRS.from_wkt(source.crs)),
        "features": features,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + ".partial")
    staging.write_text(json.dumps(collection) + "\n")
    os.replace(staging, out)


# ---------------------------------------------------------------------------------------------
# Command line: `semisup predict --model DETECTION_RUN`

SEGMENTATION_ONLY: Final = {  # flag -> (argparse dest, its default): class maps only
    "--min-area": ("min_area", 0.0),
    "--base-checkpoint": ("base_checkpoint", None),
    "--seed": ("seed", None),
    "--num-classes": ("num_classes", None),
    "--cog": ("cog", False),
}
DETECTION_ONLY: Final = {"--min-score": ("min_score", None)}


def given_flags(args: argparse.Namespace, flags: Mapping[str, tuple[str, Any]]) -> list[str]:
    """The ``flags`` whose value in ``args`` is not their default."""
    return [flag for flag, (dest, default) in flags.items() if getattr(args, dest) != default]


def run_cli(args: argparse.Namespace) -> int:
    """``semisup predict`` when ``--model`` names a detection run: refuses class-map flags and
    several models in one line, then prints the summary as JSON."""
    if len(args.model) > 1:
        raise ValueError(
            f"--model {args.model[0]} is a detection run; it is predicted alone (one --model)"
        )
    wrong = given_flags(args, SEGMENTATION_ONLY)
    if wrong:
        raise ValueError(
            f"{wrong[0]} applies to class maps; --model {args.model[0]} is a detection run "
            "(task: detection), which takes --out OUT.csv, --vector, --tile-size, --overlap "
            "and --min-score"
        )
    summary = run_detection_predict(
        args.rasters,
        args.model[0],
        args.out,
        vector=args.vector,
        tile_size=args.tile_size,
        overlap=args.overlap,
        min_score=args.min_score,
        batch_size=args.batch_size,
        pool=ActorPoolConfig.from_args(args),
        stripe_width=args.stripe_width,
        overwrite=args.overwrite,
        ray_config=RayConfig(address=args.address),
    )
    print(json.dumps(summary, indent=2))
    return 0


def refuse_detection_flags(args: argparse.Namespace) -> None:
    """``ValueError`` when a class-map prediction was given a detection-only flag."""
    wrong = given_flags(args, DETECTION_ONLY)
    if wrong:
        raise ValueError(
            f"{wrong[0]} applies to detection runs (task: detection); --model "
            f"{args.model[0]} predicts class maps"
        )

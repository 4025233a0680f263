"""Windowed, memory-bounded prediction on large rasters: ``semisup predict``.

``run_predict`` predicts every raster given (GeoTIFF/COG files or the sources of a tile store)
with a student, in one Ray Data job::

    jobs: one per window row of a vertical stripe of each raster
      -> a pool of predictor actors, each holding the student once (CPU or GPU), reading its
         jobs' windows (rasterio or zarr) and predicting them in batches
      -> the driver: blends overlapping windows (semisup.blend) and writes the class map and a
         confidence band, band of rows by band of rows (semisup.map_writer)
      -> optionally, polygons per class as GeoJSON (semisup.vectorize)

Memory is bounded by the window and stripe sizes, not by the raster: a raster is processed in
vertical stripes (``stripe_width`` px; one stripe for most rasters) top to bottom, the driver
holds two window heights of probability sums of the current stripe, each actor one window row
of one stripe at a time, and the driver consumes results as they come. Windows that reach into the
next stripe are predicted again there (about tile / stripe_width more windows).

Resumable: rows are written in whole GeoTIFF blocks, and a progress record beside the output
says which rows of each stripe are on disk; a rerun with the same settings skips them (see
``semisup.map_writer``). Windows arrive at the driver in any order; a reorder buffer hands them
to the blender window row by window row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, TextIO

import numpy as np

from semisup import blend
from semisup import columns as C
from semisup.actor_pool import ONE_ACTOR, ActorPoolConfig, add_actor_pool_arguments
from semisup.config import RayConfig
from semisup.map_writer import MapWriter
from semisup.model_input import INFERENCE_BATCH
from semisup.progress import Progress
from semisup.raster_windows import RasterSource, open_sources
from semisup.stitch import Job, Stitcher, plan_jobs
from semisup.window_predictor import (
    ONNX,
    PredictModel,
    WindowPredictor,
    check_swappable,
    resolve_model,
)

DEFAULT_STRIPE: Final = 4096  # px; a multiple of the GeoTIFF block (map_writer.BLOCK)
IDENTITY_VERSION: Final = 1
BUILT_IN_CLASSES: Final = 2  # classes of a random-init built-in model (``--model tiny``)


def output_path(out: Path, source: RasterSource, count: int, suffix: str) -> Path:
    """Where one raster's output goes: ``out`` itself when it names a ``suffix`` file (one
    raster only), ``out/<name><suffix>`` when it names a folder, or ``out`` with ``{name}``
    replaced by the raster's name. ``suffix``: ``.tif`` (also ``.tiff``) or ``.geojson``
    (also ``.json``)."""
    text = str(out)
    if "{name}" in text:
        return Path(text.replace("{name}", source.name))
    names_file = out.suffix.lower() in _SUFFIXES[suffix] and not out.is_dir()
    if names_file and count > 1:
        raise ValueError(
            f"{out}: several rasters need a folder or a pattern with {{name}}, not a file"
        )
    return out if names_file else out / f"{source.name}{suffix}"


_SUFFIXES: Final = {".tif": (".tif", ".tiff"), ".geojson": (".geojson", ".json")}


# ---------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class PredictConfig:
    """How ``semisup predict`` cuts a raster into windows, predicts and blends them, and with
    which actors (``run_predict``). The defaults are the CLI's."""

    tile_size: int | None = None  # window side in px; None: the adapter's own (256 built-ins)
    overlap: int | None = None  # px shared by neighbouring windows, in [0, tile/2]; None: 1/4
    weight_floor: float = blend.DEFAULT_FLOOR  # blending weight at a window's outermost pixel
    batch_size: int = INFERENCE_BATCH  # windows per model call
    stripe_width: int = DEFAULT_STRIPE  # px per vertical stripe: bounds the driver's memory
    min_area: float = 0.0  # polygons smaller than this (CRS units², m² if metric) are dropped
    cog: bool = False  # copy each finished map into a COG with overviews (costs time)
    base_checkpoint: str | None = None  # see ``resolve_model``: a run folder knows its own
    seed: int | None = None  # of a random-init base; see ``resolve_model``
    num_classes: int = BUILT_IN_CLASSES  # built-in models only
    pool: ActorPoolConfig = ONE_ACTOR  # the predictor actors: by default one, leaving
    # a CPU to reads and the driver, threads = CPUs // actors on CPU (``semisup pseudo-label``'s)


def run_predict(
    rasters: Sequence[str | Path],
    model: str | Sequence[str],
    out: str | Path,
    config: PredictConfig | None = None,
    *,
    vector: str | Path | None = None,
    overwrite: bool = False,
    measure_memory: bool = False,
    ray_config: RayConfig | None = None,
    log: TextIO | None = sys.stderr,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Predict class maps for ``rasters`` with a student; returns a JSON-safe summary.

    Args:
        rasters: GeoTIFF/COG files, folders of them, or Zarr tile stores (every source).
        model: a ``semisup train`` run directory, an adapter file, an ONNX model written by
            ``semisup export``, or a built-in model name (``tiny``, ``vit_b``, ...:
            random-init, for tests); see ``resolve_model``. Several adapters of one base
            (``check_swappable``) are predicted in one job: each actor loads the base once
            and swaps the adapters' weights in.
        out: the output GeoTIFF for one raster; for several, a folder (``<name>.tif`` inside)
            or a path with ``{name}`` (the raster's file stem or the store's source id). With
            several models ``out`` holds ``{adapter}``, replaced by each model's file stem.
        config: windows, blending, outputs and actors (``PredictConfig``; None: its defaults).
        vector: optional GeoJSON polygons per class, named like ``out`` (``.geojson``).
        overwrite: replace outputs of other runs and discard their interrupted partial files.
        measure_memory: sample memory (PSS) every 0.1 s: the summary gets the peak and the level
            before of this process with every Ray process on this machine
            (``peak_memory_mb``, ``baseline_memory_mb``), and the unique memory (USS: without
            shared pages such as the object store's) of this process with the predictor
            actors (``peak_predict_memory_mb``, ``baseline_predict_memory_mb``).
        ray_config: how to reach Ray when there is work: a running Ray is used as it is;
            otherwise a local one (``RayConfig()``, shut down at the end) or the cluster at
            ``ray_config.address``. Nothing starts Ray when every output is already complete or
            the input is refused.
        log: progress lines; None for silence.
        on_progress: called with (windows done, windows total) after each batch is blended.

    An output that exists with the same settings is left as it is; an interrupted one resumes.
    Bad input (a missing file, a raster without CRS when ``vector`` is asked for, an adapter of
    another base, a band count the band rule cannot feed) raises before anything is written.
    """
    started = time.perf_counter()
    config = config or PredictConfig()
    refuse_detection_runs([model] if isinstance(model, str) else model)
    out = Path(out)
    sources = open_sources([rasters] if isinstance(rasters, str | Path) else rasters)
    workdir = Path(tempfile.mkdtemp(prefix=".semisup-predict-", dir=_existing_parent(out)))
    try:
        models = _resolve_models(model, workdir, config)
        resolved = models[0]
        tile = resolved.image_size
        overlap = tile // 4 if config.overlap is None else config.overlap
        _check_numbers(tile, overlap, config.batch_size, config.stripe_width)
        if resolved.kind == ONNX and config.pool.gpus_per_actor > 0:
            raise ValueError(
                f"--model {resolved.name}: exported models run on onnxruntime's CPU provider; "
                "--gpus-per-actor must be 0"
            )
        outputs, vectors, output_models = [], [], []
        for index, (model_out, model_vector) in enumerate(_model_paths(models, out, vector)):
            model_outputs, model_vectors = _prepare_outputs(
                sources,
                model_out,
                model_vector,
                models[index],
                tile,
                overlap,
                config,
                overwrite,
            )
            outputs += model_outputs
            vectors += model_vectors
            output_models += [index] * len(model_outputs)
        jobs = plan_jobs(outputs, tile, overlap)
        pixels = _pixels_left(outputs)
        windows = sum(job.last_col - job.first_col for job in jobs)
        progress = Progress(
            log,
            windows,
            label="predict",
            unit="windows",
            pixels_per_item=tile**2,
            on_advance=on_progress,
        )
        peak = None
        if jobs:
            from semisup.runtime import ray_runtime

            # a local Ray unless one is up or an address is given; shut down after if started here
            with ray_runtime(ray_config or RayConfig()):
                peak = _predict_jobs(
                    jobs,
                    outputs,
                    models,
                    output_models,
                    progress,
                    _Windows(tile, overlap, config.weight_floor, config.batch_size, config.pool),
                    measure_memory,
                )
            progress.say()
        for _, writer in outputs:  # complete but not yet moved into place (an interrupted finish)
            if writer.state != "done" and writer.complete and writer.partial.exists():
                writer.finish()
        polygons = _write_vectors(outputs, vectors, config.min_area, overwrite)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    labels = [models[index].label for index in output_models] if len(models) > 1 else None
    return _summary(outputs, vectors, polygons, pixels, windows, started, peak, resolved, labels)


def _pixels_left(outputs: Sequence[tuple[RasterSource, MapWriter]]) -> int:
    """Pixels of ``outputs`` not yet written (every row of a stripe below its rows done)."""
    return sum(
        (source.height - done) * (x1 - x0)
        for source, writer in outputs
        for (x0, x1), done in zip(writer.stripes, writer.rows_done, strict=True)
    )


@dataclass(frozen=True)
class _Windows:
    """The resolved windows of one run (the model's tile size, the default overlap applied)."""

    tile: int
    overlap: int
    weight_floor: float
    batch_size: int
    pool: ActorPoolConfig


def _predict_jobs(
    jobs: Sequence[Job],
    outputs: Sequence[tuple[RasterSource, MapWriter]],
    models: Sequence[PredictModel],
    output_models: Sequence[int],
    progress: Progress,
    windows: _Windows,
    measure_memory: bool,
) -> Any:
    """Run the pipeline over ``jobs``, stitching and writing as windows arrive; finish each
    output when complete. Returns the ``PeakMemory`` record (None unless measured)."""
    from semisup.memory import PeakMemory

    with (
        PeakMemory(WindowPredictor.__name__) if measure_memory else contextlib.nullcontext() as peak
    ):
        for _, writer in outputs:
            writer.start()
        weights = blend.window_weights(windows.tile, windows.overlap, windows.weight_floor)
        stitcher = Stitcher(jobs, outputs, models[0].num_classes, weights)
        for batch in _pipeline(jobs, outputs, models, output_models, windows):
            progress.advance(stitcher.add(batch))
            for index in stitcher.finished:
                outputs[index][1].finish()
            stitcher.finished.clear()
    return peak


def _model_paths(
    models: Sequence[PredictModel], out: Path, vector: str | Path | None
) -> list[tuple[Path, Path | None]]:
    """Each model's ``out`` and ``vector``, ``{adapter}`` replaced by its label; ``ValueError``
    when several models would share them (no ``{adapter}``, or two models of one label)."""
    labels = [model.label for model in models]
    paths = {"--out": str(out)} | ({} if vector is None else {"--vector": str(vector)})
    if len(models) > 1:
        for flag, text in paths.items():
            if "{adapter}" not in text:
                raise ValueError(
                    f"{flag} {text}: several --model need {{adapter}} in it (one output each)"
                )
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"two --model share the name {repeated[0]!r}; rename one file")
    return [
        (
            Path(str(out).replace("{adapter}", label)),
            None if vector is None else Path(str(vector).replace("{adapter}", label)),
        )
        for label in labels
    ]


def _existing_parent(out: Path) -> Path:
    """The nearest existing folder at or above where the outputs go (for the work folder)."""
    folder = out if out.is_dir() else out.parent
    while not folder.exists():
        folder = folder.parent
    return folder


def _check_numbers(tile: int, overlap: int, batch_size: int, stripe_width: int) -> None:
    """``ValueError`` naming the window setting that cannot run (the pool checks its own)."""
    from semisup.map_writer import BLOCK

    checks = (
        ("overlap", overlap, 0 <= 2 * overlap <= tile, f"in [0, tile/2 = {tile // 2}] px"),
        ("batch_size", batch_size, batch_size >= 1, ">= 1"),
        (
            "stripe_width",
            stripe_width,
            stripe_width % BLOCK == 0 and stripe_width >= tile,
            f"a multiple of {BLOCK} px and >= the window ({tile} px)",
        ),
    )
    for name, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"predict {name}: got {value!r}, expected {expected}")


def _prepare_outputs(
    sources: Sequence[RasterSource],
    out: Path,
    vector: str | Path | None,
    model: PredictModel,
    tile: int,
    overlap: int,
    config: PredictConfig,
    overwrite: bool,
) -> tuple[list[tuple[RasterSource, MapWriter]], list[Path | None]]:
    """A ``MapWriter`` per source (deciding new / resume / done) and its GeoJSON path; ``tile``
    and ``overlap`` as resolved for the model."""
    settings = {
        "version": IDENTITY_VERSION,
        "model": model.identity(),
        "tile_size": tile,
        "overlap": overlap,
        "weight_floor": config.weight_floor,
        "stripe_width": config.stripe_width,
    }
    outputs, vectors, seen = [], [], set()
    for source in sources:
        path = output_path(out, source, len(sources), ".tif")
        vector_path = (
            None if vector is None else output_path(Path(vector), source, len(sources), ".geojson")
        )
        if path in seen:
            raise ValueError(f"two rasters would write {path}; give them distinct names")
        seen.add(path)
        if vector_path is not None and source.crs is None:
            raise ValueError(
                f"{source.describe()} has no CRS: vector output needs georeferenced input"
            )
        identity = {**settings, "input": _input_identity(source)}
        writer = MapWriter(
            path,
            height=source.height,
            width=source.width,
            crs=source.crs,
            transform=source.transform,
            stripes=blend.stripe_bounds(source.width, config.stripe_width),
            identity=identity,
            overwrite=overwrite,
            cog=config.cog,
        )
        if (
            vector_path is not None
            and vector_path.exists()
            and not overwrite
            and writer.state != "done"
        ):
            raise FileExistsError(f"{vector_path} exists; pass --overwrite to replace it")
        outputs.append((source, writer))
        vectors.append(vector_path)
    return outputs, vectors


def _input_identity(source: RasterSource) -> dict[str, Any]:
    return {
        "path": source.path,
        "source_id": source.source_id,
        "fingerprint": source.fingerprint,
        "band_low": list(source.band_low),
        "band_high": list(source.band_high),
    }


def _pipeline(
    jobs: Sequence[Job],
    outputs: Sequence[tuple[RasterSource, MapWriter]],
    models: Sequence[PredictModel],
    output_models: Sequence[int],
    windows: _Windows,
) -> Iterator[dict[str, np.ndarray]]:
    """Predicted windows (``JOB``, ``Y0``, ``X0``, ``VALID``, ``PROBABILITIES``) as they finish."""
    constructor = {
        "models": [asdict(model) for model in models],
        "sources": [source for source, _ in outputs],
        "output_models": list(output_models),
        "tile": windows.tile,
        "overlap": windows.overlap,
        "batch_size": windows.batch_size,
        "device": windows.pool.device(),
        "torch_threads": windows.pool.threads(),
    }
    yield from stream_jobs(jobs, WindowPredictor, constructor, windows.pool)


def stream_jobs(
    jobs: Sequence[Job], predictor: type, constructor: dict[str, Any], pool: ActorPoolConfig
) -> Iterator[dict[str, np.ndarray]]:
    """``jobs`` through a fixed pool of ``predictor`` actors (a Ray Data callable class built
    with ``constructor`` that reads its jobs' windows); the rows it returns, as they finish.
    Shared by the class maps (``WindowPredictor``) and the boxes (``detection.predict``)."""
    import ray

    from semisup.actor_pool import map_with_pool

    items = [
        {
            C.JOB_SEQ: j.seq,
            C.JOB_OUTPUT: j.output,
            C.Y0: j.y0,
            C.FIRST_COL: j.first_col,
            C.LAST_COL: j.last_col,
        }
        for j in jobs
    ]
    # one block per job: a job is the unit handed to an actor
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    # a fixed pool of predictor actors, each loading its model once and reading its jobs'
    # windows; an actor that dies fails the run, which a rerun resumes (map_with_pool)
    predicted = map_with_pool(
        dataset, predictor, pool, fn_constructor_kwargs=constructor, batch_size=1
    )
    # streams the predicted windows to the driver as batches finish
    yield from predicted.iter_batches(batch_size=None, batch_format="numpy")


def _write_vectors(
    outputs: Sequence[tuple[RasterSource, MapWriter]],
    vectors: Sequence[Path | None],
    min_area: float,
    overwrite: bool,
) -> list[int | None]:
    from semisup.vectorize import write_geojson

    counts: list[int | None] = []
    for (_, writer), vector_path in zip(outputs, vectors, strict=True):
        if vector_path is None or (writer.state == "done" and vector_path.exists()):
            counts.append(None)  # not asked for, or left from the run that made the raster
            continue
        counts.append(write_geojson(writer.path, vector_path, min_area=min_area))
    return counts


def _summary(
    outputs: Sequence[tuple[RasterSource, MapWriter]],
    vectors: Sequence[Path | None],
    polygons: Sequence[int | None],
    pixels: int,
    windows: int,
    started: float,
    peak: Any,
    model: PredictModel,
    labels: Sequence[str] | None,
) -> dict[str, Any]:
    seconds = time.perf_counter() - started
    status = {"new": "written", "resume": "resumed", "done": "already complete"}
    summary: dict[str, Any] = {
        "outputs": [
            {
                "raster": source.describe(),
                "output": str(writer.path),
                "status": status[writer.state],
                "height": source.height,
                "width": source.width,
                "vector": None if vector is None else str(vector),
                "polygons": count,
            }
            for (source, writer), vector, count in zip(outputs, vectors, polygons, strict=True)
        ],
        "model": {
            "name": model.name,
            "model_type": model.model_type,
            "num_classes": model.num_classes,
            "tile_size": model.image_size,
            "kind": model.kind,
        },
        "pixels": pixels,
        "windows": windows,
        "seconds": round(seconds, 3),
        "pixels_per_s": round(pixels / max(seconds, 1e-9), 1),
        "windows_per_s": round(windows / max(seconds, 1e-9), 3),
    }
    if labels is not None:  # several adapters swapped on one base: which made each output
        for entry, label in zip(summary["outputs"], labels, strict=True):
            entry["adapter"] = label
    if peak is not None:  # MiB; PSS of the driver and every Ray process on this machine, and
        # USS of the driver and the predictor actors
        summary["peak_memory_mb"] = round(peak.peak_bytes / 2**20, 1)
        summary["baseline_memory_mb"] = round(peak.baseline_bytes / 2**20, 1)
        summary["peak_predict_memory_mb"] = round(peak.focus_peak_bytes / 2**20, 1)
        summary["baseline_predict_memory_mb"] = round(peak.focus_baseline_bytes / 2**20, 1)
    return summary


# ---------------------------------------------------------------------------------------------
# Command line: `semisup predict`

CLI_DESCRIPTION = (
    "Predict class maps for large rasters with a student, window by window in a Ray actor "
    "pool, blending overlapping windows. Writes a tiled GeoTIFF (or COG) per raster (band 1 "
    "class ids, band 2 confidence in percent, 255 = nodata; the input's CRS and transform) "
    "and optionally GeoJSON polygons per class. An interrupted run resumes when rerun."
)
CLI_EPILOG = """\
examples:
  semisup predict ortho.tif --model runs/student --out ortho_classes.tif \\
      --vector ortho_classes.geojson --min-area 20
  semisup predict tiles/*.tif --model runs/student/best/adapter.safetensors \\
      --base-checkpoint sam_vit_b_01ec64.pth --out maps/ --actors 2 --batch-size 4
  semisup predict ../shared/data/spacenet_vegas/sample_geotiff.tif --model tiny \\
      --num-classes 2 --out /tmp/vegas_classes.tif
  semisup predict ortho.tif --model student.onnx --out ortho_classes.tif
  semisup predict ortho.tif --model region_a.safetensors --model region_b.safetensors \\
      --base-checkpoint sam_vit_b_01ec64.pth --out maps/ortho_{adapter}.tif
  semisup predict ortho.tif --run runs/crowns --out crowns.csv --vector crowns.geojson
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``semisup predict`` flags (and its description and examples) to ``parser``."""
    parser.description = CLI_DESCRIPTION
    parser.epilog = CLI_EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "rasters",
        nargs="+",
        metavar="RASTER",
        help="GeoTIFF/COG files, folders of them, or Zarr tile stores (every source)",
    )
    parser.add_argument(
        "--model",
        "--run",
        dest="model",
        required=True,
        action="append",
        metavar="RUN_OR_ADAPTER_OR_NAME",
        help="a `semisup train` run folder, an adapter (.safetensors or its folder), an ONNX "
        "model from `semisup export` (.onnx), or a built-in random-init model (tiny, vit_b, "
        "...) for tests; repeat it for adapters of one base, with {adapter} in --out. A run "
        "of task: detection writes boxes: --out OUT.csv (see semisup.detection.predict)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output GeoTIFF; with several rasters a folder (NAME.tif inside) or a path "
        "with {name}; with several --model a path with {adapter} (the adapter's file stem)",
    )
    parser.add_argument(
        "--vector",
        type=Path,
        metavar="OUT.geojson",
        help="also write polygons per class as GeoJSON in the source CRS (named like --out)",
    )
    _add_window_arguments(parser)
    _add_model_arguments(parser)


def _add_window_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the output polygons, the windows and the actors that predict them."""
    parser.add_argument(
        "--min-area",
        type=float,
        default=0.0,
        metavar="A",
        help="drop polygons smaller than A CRS units² (m² in a metric CRS; default 0)",
    )
    parser.add_argument(
        "--tile-size",
        type=int,
        metavar="PX",
        help="window side (default: the adapter's training size; 256 for built-ins)",
    )
    parser.add_argument(
        "--overlap",
        type=int,
        metavar="PX",
        help="pixels shared by neighbouring windows, at most half a window (default: a quarter)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, metavar="B", help="windows per model call (default 8)"
    )
    add_actor_pool_arguments(
        parser, role="predictor", default_actors=1, frees="reads and the driver"
    )


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the model's base, its outputs and the Ray cluster."""
    parser.add_argument(
        "--base-checkpoint",
        metavar="PATH_OR_URL",
        help="the SAM checkpoint the adapter was trained on (a run folder knows its own)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="seed of a random-init base (a run folder knows its own; default 0)",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        metavar="K",
        help=f"built-in models only: number of classes (default {BUILT_IN_CLASSES})",
    )
    parser.add_argument(
        "--stripe-width",
        type=int,
        default=DEFAULT_STRIPE,
        metavar="PX",
        help=f"wide rasters are processed in vertical stripes this wide (default {DEFAULT_STRIPE})",
    )
    parser.add_argument(
        "--cog",
        action="store_true",
        help="convert each finished map into a Cloud Optimized GeoTIFF with overviews "
        "(default: a tiled, compressed GeoTIFF without overviews)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace outputs of other runs and discard their interrupted partial files",
    )
    parser.add_argument(
        "--min-score",
        type=float,
        metavar="S",
        help="detection runs only: drop boxes scoring below S (default: the run's "
        "detector.score_threshold)",
    )
    parser.add_argument(
        "--address", help="Ray cluster address (default: start a local Ray on this machine)"
    )


def _resolve_models(
    model: str | Sequence[str], workdir: Path, config: PredictConfig
) -> list[PredictModel]:
    """Every ``--model`` resolved (``resolve_model``), checked to share one loaded base."""
    models = [
        resolve_model(
            name,
            workdir=workdir,
            base_checkpoint=config.base_checkpoint,
            seed=config.seed,
            num_classes=config.num_classes,
            tile_size=config.tile_size,
        )
        for name in ([model] if isinstance(model, str) else model)
    ]
    check_swappable(models)
    return models


def refuse_detection_runs(models: Sequence[str | Path]) -> None:
    """``ValueError`` naming a detection run among ``models``: its boxes come from
    ``semisup.detection.predict.run_detection_predict`` (``semisup predict`` picks it)."""
    from semisup.detection.predict import is_detection_run

    for model in models:
        if is_detection_run(model):
            raise ValueError(
                f"{model} is a detection run (task: detection); it predicts boxes with "
                "semisup.detection.predict.run_detection_predict, not class maps"
            )


def run_cli(args: argparse.Namespace) -> int:
    """Run ``semisup predict``; prints the summary as JSON; returns the exit status. A
    detection run (``task: detection``) writes boxes instead (``detection.predict.run_cli``)."""
    from semisup.detection import predict as boxes

    if any(boxes.is_detection_run(model) for model in args.model):
        return boxes.run_cli(args)
    boxes.refuse_detection_flags(args)
    config = PredictConfig(
        tile_size=args.tile_size,
        overlap=args.overlap,
        batch_size=args.batch_size,
        stripe_width=args.stripe_width,
        min_area=args.min_area,
        cog=args.cog,
        base_checkpoint=args.base_checkpoint,
        seed=args.seed,
        num_classes=BUILT_IN_CLASSES if args.num_classes is None else args.num_classes,
        pool=ActorPoolConfig.from_args(args),
    )
    summary = run_predict(
        args.rasters,
        args.model,
        args.out,
        config,
        vector=args.vector,
        overwrite=args.overwrite,
        ray_config=RayConfig(address=args.address),
    )
    print(json.dumps(summary, indent=2))
    return 0

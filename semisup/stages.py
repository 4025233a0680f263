"""The stages of ``semisup run``: each is one function ``(RunContext) -> dict``.

A stage reads the experiment config and the results of the stages before it from its context,
writes its outputs under the run folder, and returns a JSON-safe result. The result's
``outputs`` (paths) are what the runner checks before it skips the stage on a later run. With
``context.resume`` the stage continues an interrupted attempt made with the same config;
without it, it replaces whatever an earlier attempt left. Which stages run, in which order, and
which config sections decide each one's outputs is the table in ``semisup.pipeline``.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from semisup import columns as C
from semisup.actor_pool import ActorPoolConfig
from semisup.config import ConfigError, ExperimentConfig
from semisup.known_imagery import CLASS_NAMES, colour_map


@dataclass(frozen=True)
class RunContext:
    """What a stage gets: the config, the run folder, and the results of the stages before it.

    ``key`` is the stage's config hash (see ``semisup.pipeline.stage_keys``); ``resume`` says
    that an attempt with the same key was interrupted and its partial outputs may be continued;
    ``debug`` runs training in this process.
    """

    config: ExperimentConfig
    out: Path
    results: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    key: str = ""
    resume: bool = False
    debug: bool = False
    log: TextIO | None = sys.stderr

    @property
    def store(self) -> Path:
        """The run's tile store (pseudo-labels are written into it)."""
        return self.out / "store.zarr"

    def say(self, message: str) -> None:
        if self.log is not None:
            print(message, file=self.log, flush=True)


STREAM_BATCH: Final = 32  # tiles per batch when the stream stage measures reading


def teacher_config(config: ExperimentConfig) -> ExperimentConfig:
    """The semantic teacher: the same model fine-tuned decoder-only on the labeled tiles alone."""
    return dataclasses.replace(
        config,
        student=dataclasses.replace(config.student, mode="decoder"),
        ssl=dataclasses.replace(config.ssl, enabled=False),
    )


# ---------------------------------------------------------------------------------------------
# prep and stream


def prep(context: RunContext) -> dict[str, Any]:
    """Ingest ``pipeline.images``/``labels`` (or generated scenes) into the run's tile store."""
    from data_prep.ingest import build_store
    from semisup.store import read_tile_index

    pipeline = context.config.pipeline
    images, labels = list(pipeline.images), list(pipeline.labels)
    class_names: list[str] | None = list(pipeline.class_names) or None
    if pipeline.generated_scenes:
        from semisup.synthetic import write_scenes

        images_dir, masks_dir = write_scenes(
            context.out / "generated",
            count=pipeline.generated_scenes,
            size=pipeline.scene_size,
            seed=context.config.prep.seed,
        )
        images, labels, class_names = [str(images_dir)], [str(masks_dir)], list(CLASS_NAMES)
    elif not images:
        raise ConfigError(
            "pipeline.images: no rasters to ingest; list image files or folders, or set "
            "pipeline.generated_scenes"
        )
    colours = pipeline.label_colors
    build_store(
        images,
        context.store,
        labels=labels,
        label_colors=colour_map(colours) if colours else None,
        config=context.config.prep,
        class_names=class_names,
        overwrite=True,  # the run owns its store; an unchanged one is left as it is
        quiet=context.log is None,
        log=context.log,
    )
    index = read_tile_index(str(context.store)).to_pandas()
    return {
        "store": str(context.store),
        "sources": int(index[C.SOURCE].nunique()),
        "tiles": len(index),
        "tiles_per_split": {k: int(v) for k, v in index[C.SPLIT].value_counts().items()},
        "outputs": [str(context.store)],
    }


def stream(context: RunContext) -> dict[str, Any]:
    """Stream every split of the store through Ray Data and measure tiles/s."""
    from semisup.data import read_tiles_from_config

    result: dict[str, Any] = {}
    for split in C.SPLITS:
        dataset = read_tiles_from_config(str(context.store), context.config.stream, split=split)
        start, count, shapes = time.perf_counter(), 0, {}
        for batch in dataset.iter_batches(batch_size=STREAM_BATCH, batch_format="numpy"):
            count += len(batch[C.TILE_ID])
            shapes = {name: f"{tuple(value.shape)} {value.dtype}" for name, value in batch.items()}
        seconds = time.perf_counter() - start
        result[split] = {
            "tiles": count,
            "tiles_per_s": round(count / seconds, 1) if seconds > 0 else None,
            "last_batch": shapes,
        }
    return result


# ---------------------------------------------------------------------------------------------
# SAM before training, the teacher, its pseudo-labels, the student


def zero_shot(context: RunContext) -> dict[str, Any]:
    """SAM before any training: box/point-prompted IoU on ground-truth components."""
    from semisup.teacher import TeacherConfig
    from semisup.zero_shot import ZeroShotConfig, run_zero_shot

    out = context.out / "zero_shot"
    student = context.config.student
    sam = TeacherConfig(model_type=student.model_type, checkpoint=student.checkpoint)
    config = ZeroShotConfig(sam=sam, max_tiles=context.config.pipeline.zero_shot_tiles)
    summary = run_zero_shot(str(context.store), config, out, log=None)
    return {
        "out": str(out),
        "box_miou": summary.get("box_miou"),
        "point_miou": summary.get("point_miou"),
        "automatic_coverage": summary.get("automatic_coverage"),
        "outputs": [str(out / "zero_shot.json")],
    }


def teacher(context: RunContext) -> dict[str, Any]:
    """The labels-only teacher: decoder-only fine-tuning on the labeled tiles."""
    return _train(context, teacher_config(context.config), context.out / "teacher")


def pseudo_label(context: RunContext) -> dict[str, Any]:
    """Label the unlabeled tiles with the fine-tuned teacher, in a pool of Ray actors."""
    from semisup.model_input import INFERENCE_BATCH  # here: torch only when labelling
    from semisup.pseudo_label import run_pseudo_label
    from semisup.teacher import TeacherConfig

    config = context.config
    teacher = TeacherConfig(
        mode="semantic",
        model_type=config.student.model_type,
        checkpoint=str(Path(context.results["teacher"]["best_checkpoint"]).parent),
        base_checkpoint=config.student.checkpoint,
        halo=config.stream.halo,
        seed=config.train.seed,
    )
    summary = run_pseudo_label(
        str(context.store),
        teacher,
        pool=pseudo_label_pool(config),
        batch_size=INFERENCE_BATCH,
        overwrite=not context.resume,  # a new teacher's labels replace the old ones
        log=context.log,
    )
    result = {key: value for key, value in summary.items() if isinstance(value, int | float | str)}
    return {**result, "outputs": [summary["manifest"]]}


def pseudo_label_pool(config: ExperimentConfig) -> ActorPoolConfig:
    """The teacher actors of the pipeline's labelling passes (``pipeline.pseudo_label_actors``,
    ``pipeline.pseudo_label_gpus``, placed as ``ray.placement`` says)."""
    return ActorPoolConfig(
        actors=config.pipeline.pseudo_label_actors,
        gpus_per_actor=config.pipeline.pseudo_label_gpus,
        placement=config.ray.placement,
    )


def student(context: RunContext) -> dict[str, Any]:
    """The semi-supervised student: consistency training on labeled and unlabeled tiles.

    With ``ssl.threshold_mode=calibrated`` and no ``ssl.calibration_run``, the cut is the one the
    teacher stage measured on the validation tiles.
    """
    config = context.config
    if config.ssl.threshold_mode == "calibrated" and config.ssl.calibration_run is None:
        teacher_run = str(context.out / "teacher")
        ssl = dataclasses.replace(config.ssl, calibration_run=teacher_run)
        config = dataclasses.replace(config, ssl=ssl)
    return _train(context, config, context.out / "student")


def _train(context: RunContext, config: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """The student (or teacher) trained into ``run_dir`` on the run's store, and its figures."""
    report = _fit(context, config, run_dir, context.store)
    best = next(e for e in report["epochs"] if e["epoch"] == report["best_epoch"])
    last = report["epochs"][-1]["train"]  # the consistency term after its ramp-up
    return {
        "run_dir": str(run_dir),
        "mode": config.student.mode,
        "consistency": config.ssl.enabled,
        "mask_ratio": last.get("mask_ratio"),
        "pseudo_accuracy": last.get("pseudo_accuracy"),
        "best_miou": report["best_miou"],
        "best_epoch": report["best_epoch"],
        "iou_per_class": best["iou_per_class"],
        "steps": report["steps"],
        "best_checkpoint": report["best_checkpoint"],
        "outputs": [str(run_dir / "report.json"), report["best_checkpoint"]],
    }


def _fit(
    context: RunContext, config: ExperimentConfig, run_dir: Path, store: Path
) -> dict[str, Any]:
    """One Ray Train run into ``run_dir``, resumed from its checkpoints after an interruption;
    its report."""
    from semisup.train import run_training

    if config.train.storage:
        # teacher and student must not share Ray Train's (fixed) run name in one storage folder;
        # the key keeps a rerun with another config away from old checkpoints
        storage = f"{config.train.storage.rstrip('/')}/{run_dir.name}-{context.key[:12]}"
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, storage=storage)
        )
    resume = context.resume and (run_dir / "config.yaml").exists()
    if not resume and run_dir.exists():
        context.say(f"[run] replacing the earlier run in {run_dir}")
        shutil.rmtree(run_dir)
    return run_training(str(store), config, run_dir, resume=resume, debug=context.debug)


# ---------------------------------------------------------------------------------------------
# evaluate


def evaluate(context: RunContext) -> dict[str, Any]:
    """Compare zero-shot SAM, the labels-only teacher and the student on the val tiles.

    Writes ``evaluation.json`` and ``evaluation.md`` (the comparison table) into the run folder.
    """
    import json

    rows = comparison_rows(context.results)
    if not rows:
        raise ConfigError(
            "pipeline.stages: evaluate needs at least one of zero-shot, teacher, student"
        )
    teacher_miou = context.results.get("teacher", {}).get("best_miou")
    student_miou = context.results.get("student", {}).get("best_miou")
    gain = None
    if teacher_miou is not None and student_miou is not None:
        gain = student_miou - teacher_miou
    result = {"rows": rows, "student_gain_over_labels_only": gain}
    json_path, md_path = context.out / "evaluation.json", context.out / "evaluation.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text("\n".join(comparison_table(rows)) + "\n")
    return {**result, "outputs": [str(json_path), str(md_path)]}


def comparison_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per model that ran: name, fine-tuning, data, validation score and its kind."""
    rows = []
    if "zero-shot" in results:
        rows.append(
            {
                "model": "zero-shot SAM",
                "fine_tuning": "none",
                "data": "-",
                "metric": "box-prompt mIoU",
                "value": results["zero-shot"]["box_miou"],
            }
        )
    if "teacher" in results:
        rows.append(
            {
                "model": "labels-only (teacher)",
                "fine_tuning": results["teacher"]["mode"],
                "data": "labeled",
                "metric": "val mIoU",
                "value": results["teacher"]["best_miou"],
            }
        )
    if "student" in results:
        student = results["student"]
        rows.append(
            {
                "model": "semi-supervised (student)",
                "fine_tuning": student["mode"],
                "data": "labeled + unlabeled",
                "metric": "val mIoU",
                "value": student["best_miou"],
                "mask_ratio": student.get("mask_ratio"),
                "pseudo_accuracy": student.get("pseudo_accuracy"),
            }
        )
    return rows


def comparison_table(rows: list[dict[str, Any]]) -> list[str]:
    """The rows of ``comparison_rows`` as Markdown table lines.

    For the student: the share of valid unlabeled pixels its consistency term counted in its
    last epoch (``mask_ratio``, the mean weight), and how often those pixels' targets were right
    where the unlabeled tiles have ground truth.
    """

    def number(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = [
        "| model | fine-tuning | data | val score | unlabeled pixels used | their target accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        value = number(row["value"])
        score = value if row["metric"] == "val mIoU" else f"{row['metric']} {value}"
        used, right = number(row.get("mask_ratio")), number(row.get("pseudo_accuracy"))
        lines.append(
            f"| {row['model']} | {row['fine_tuning']} | {row['data']} | {score} | {used} | {right} |"
        )
    return lines


# ---------------------------------------------------------------------------------------------
# after training: report, select, predict


def report(context: RunContext) -> dict[str, Any]:
    """Per-class comparison, pseudo-label calibration and overlays (``semisup report``)."""
    from semisup.report import RunLayout, run_report

    out = context.out / "report"
    if out.exists():
        shutil.rmtree(out)  # a stale report of another config must not survive beside the new one
    layout = RunLayout(
        context.store,
        context.out / "zero_shot",
        Path(context.results["teacher"]["run_dir"]),
        Path(context.results["student"]["run_dir"]),
    )
    result = run_report(context.out, layout, out)
    quality = result["pseudo_labels"] or {}
    return {
        "pseudo_label_accuracy": quality.get("overall_accuracy"),
        "calibration_error": quality.get("expected_calibration_error"),
        "suggested_threshold": quality.get("suggested_threshold"),
        "outputs": [str(out / "report.md"), str(out / "report.json")],
    }


def select(context: RunContext) -> dict[str, Any]:
    """Propose the unlabeled tiles to label next, by the student's uncertainty."""
    from semisup.selection import run_select

    pipeline = context.config.pipeline
    out = context.out / "select"
    if out.exists():
        shutil.rmtree(out)
    summary = run_select(
        str(context.store),
        Path(context.results["student"]["run_dir"]),
        pipeline.select_budget,
        out,
        measure=pipeline.select_measure,
        log=context.log,
    )
    return {
        **{k: v for k, v in summary.items() if k != "outputs"},
        "outputs": list(summary["outputs"].values()),
    }


def predict_inputs(context: RunContext) -> list[str]:
    """The rasters the predict stage maps: ``pipeline.predict_rasters`` or a validation image."""
    if context.config.pipeline.predict_rasters:
        return list(context.config.pipeline.predict_rasters)
    image = first_source_image(context.store, split=C.VAL)
    if image is None:
        raise ConfigError("pipeline.predict_rasters: not set, and the store has no val source")
    return [image]


def first_source_image(
    store: Path, *, split: str | None = None, tile_ids: list[int] | None = None
) -> str | None:
    """The image of the store's first source (by id) holding a tile of ``split``, or one of
    ``tile_ids``; None when no source does."""
    from semisup.store import open_store, read_source_meta, read_tile_index

    index = read_tile_index(str(store)).to_pandas()
    rows = index[C.SPLIT] == split if split is not None else index[C.TILE_ID].isin(tile_ids or [])
    sources = sorted(index.loc[rows, C.SOURCE].unique())
    return read_source_meta(open_store(str(store)), sources[0]).image_path if sources else None


def predict(context: RunContext) -> dict[str, Any]:
    """Map whole rasters with the student: blended class map + confidence (COG), and polygons."""
    import rasterio

    from semisup.predict import PredictConfig, run_predict

    rasters = predict_inputs(context)
    out = context.out / "predict"
    out.mkdir(parents=True, exist_ok=True)
    with rasterio.open(rasters[0]) as first:
        georeferenced = first.crs is not None
    vectors = context.config.pipeline.predict_vectors and georeferenced
    summary = run_predict(
        rasters,
        str(Path(context.results["student"]["run_dir"])),
        out / "{name}.tif",
        PredictConfig(cog=True),
        vector=out / "{name}.geojson" if vectors else None,
        overwrite=not context.resume,
        log=context.log,
    )
    outputs = sorted(str(p) for p in out.iterdir() if p.suffix in (".tif", ".geojson"))
    return {
        "rasters": rasters,
        "vectors": vectors,
        **{k: v for k, v in summary.items() if isinstance(v, int | float | str)},
        "outputs": outputs,
    }


def tune(context: RunContext) -> dict[str, Any]:
    """Search ``pipeline.tune_space`` around the student's config with Ray Tune and ASHA."""
    from semisup.tune import run_tune

    pipeline = context.config.pipeline
    out = context.out / "tune"
    if out.exists() and not context.resume:
        shutil.rmtree(out)
    summary = run_tune(
        str(context.store),
        context.config,
        pipeline.tune_space,
        out,
        samples=pipeline.tune_samples,
        resume=context.resume and out.exists(),
    )
    keys = ("trials", "outcomes", "stopped_early", "best_trial", "best_miou", "best_params")
    result = {key: summary[key] for key in keys}
    paths = ("best_config", "summary_md", "plot", "trials_csv")
    return {**result, "outputs": [str(summary[p]) for p in paths if summary[p]]}


# ---------------------------------------------------------------------------------------------
# detect and compare: the Faster R-CNN student beside the SAM student

DETECTOR_RANDOM_NOTE = (
    "the detector starts from random weights and trains a few steps: its box AP (near 0) "
    "shows the stage working, not what Faster R-CNN reaches; set detector.checkpoint and "
    "more pipeline.detect_epochs for that"
)


def detect_config(config: ExperimentConfig) -> ExperimentConfig:
    """The detect stage's run: ``task: detection`` with the ``pipeline.detect_*`` schedule and
    pseudo-boxes on its unlabeled tiles (``ssl.enabled``, from ``detector.target``)."""
    pipeline = config.pipeline
    train = dataclasses.replace(
        config.train,
        epochs=pipeline.detect_epochs,
        batch_size=pipeline.detect_batch_size,
        steps_per_epoch=pipeline.detect_steps_per_epoch,
        init_from=None,
        warmup_steps=min(config.train.warmup_steps, pipeline.detect_steps_per_epoch),
    )
    ssl = dataclasses.replace(config.ssl, enabled=True)
    return dataclasses.replace(config, task="detection", train=train, ssl=ssl)


def detect_inputs(context: RunContext) -> tuple[list[str], list[str], list[str], tuple[str, ...]]:
    """(rasters, box files, box class renames, val source patterns) of the detect stage's store:
    ``pipeline.detect_*``, or the generated scenes with their building boxes, validated on the
    SAM student's validation scene (``prep.val_sources``) so both are compared on tiles
    neither trained on."""
    from semisup.synthetic import BOXES_FILE, write_scene_boxes

    pipeline = context.config.pipeline
    if pipeline.detect_rasters:
        if not pipeline.detect_boxes:
            raise ConfigError(
                f"pipeline.detect_boxes: empty; the detect stage needs box files (CSV or "
                f"Pascal-VOC XML) for pipeline.detect_rasters {list(pipeline.detect_rasters)}"
            )
        return (
            list(pipeline.detect_rasters),
            list(pipeline.detect_boxes),
            list(pipeline.detect_box_classes),
            (),
        )
    if not pipeline.generated_scenes:
        raise ConfigError(
            "pipeline.detect_rasters: not set, and there are no generated scenes; the detect "
            "stage needs rasters with boxes (pipeline.detect_rasters and pipeline.detect_boxes)"
        )
    generated = context.out / "generated"
    boxes = generated / BOXES_FILE
    if not boxes.is_file():  # scenes generated before they carried boxes
        write_scene_boxes(generated / "masks", boxes)
    return [str(generated / "images")], [str(boxes)], [], context.config.prep.val_sources


def detect(context: RunContext) -> dict[str, Any]:
    """The box student: its own tile store of ``detect_inputs``, Faster R-CNN trained on the
    labeled tiles' boxes and the pseudo-boxes of the unlabeled ones (``detector.target``: the
    EMA teacher's, the automatic SAM teacher's instances, or both), box AP on the held-out
    tiles, and the boxes of a validation raster as CSV and GeoJSON.

    The split is by tile-sized blocks: a quarter of the tiles with boxes validate (or the
    ``val_sources`` scenes'), a quarter of the rest are labeled.
    """
    from data_prep.ingest import build_store
    from semisup.detection.predict import run_detection_predict
    from semisup.detection.train_task import detection_facts

    config, folder = context.config, context.out / "detect"
    rasters, boxes, box_classes, val_sources = detect_inputs(context)
    tile = config.pipeline.detect_tile_size
    store = folder / "store.zarr"
    prep_config = dataclasses.replace(
        config.prep,
        tile_size=tile,
        overlap=0,
        split_by="block",
        block_size=tile,
        val_fraction=0.25,
        labeled_fraction=0.25,
        val_sources=val_sources,
    )
    build_store(
        rasters,
        store,
        boxes=boxes,
        box_classes=box_classes,
        config=prep_config,
        overwrite=True,
        quiet=True,
    )
    sam = _sam_instances(context, store) if config.detector.target != "ema" else None
    run_config = detect_config(config)
    report = _fit(context, run_config, folder / "run", store)
    best = next(e for e in report["epochs"] if e["epoch"] == report["best_epoch"])
    facts, tile_ids = detection_facts(str(store), run_config, None)
    # the box split's validation tiles: the store's own split column counts mask labels only
    raster = first_source_image(store, tile_ids=tile_ids[C.VAL])
    if raster is None:
        raise ValueError(f"{store}: the detection split has no validation tile")
    predicted = run_detection_predict(
        [raster],
        folder / "run",
        folder / "boxes.csv",
        vector=folder / "boxes.geojson",
        overwrite=True,
        log=context.log,
    )
    return {
        "store": str(store),
        "run_dir": str(folder / "run"),
        "tile_size": tile,
        "class_names": report["class_names"],
        "tiles_per_split": facts["tiles_per_split"],
        "val_truth_boxes": best["truth_boxes"],
        "best_ap": report["best_ap"],
        "ap50": best["ap50"],
        "ap75": best["ap75"],
        "best_epoch": report["best_epoch"],
        "steps": report["steps"],
        "pseudo_boxes": report["epochs"][-1]["train"].get("pseudo_boxes"),
        "target": config.detector.target,
        "sam_instances": sam,
        "train_seconds": report["epochs"][-1]["seconds"],
        "raster": raster,
        "boxes": predicted["outputs"][0]["boxes"],
        "csv": predicted["csv"],
        "geojson": predicted["outputs"][0]["vector"],
        "note": DETECTOR_RANDOM_NOTE if config.detector.checkpoint is None else None,
        "outputs": [
            str(folder / "run" / "report.json"),
            report["best_checkpoint"],
            predicted["csv"],
            predicted["outputs"][0]["vector"],
        ],
    }


def _sam_instances(context: RunContext, store: Path) -> int:
    """The automatic SAM teacher over every tile of the detect store (``semisup pseudo-label
    --mode automatic --split all``): its instance table gives the SAM pseudo-boxes of
    ``detector.target`` pseudo or both. Its own masks are filtered at the detector's SAM
    thresholds. Returns the instances it found."""
    from semisup.masks import MaskFilter
    from semisup.pseudo_label import read_instances, run_pseudo_label
    from semisup.teacher import TeacherConfig

    config = context.config
    detector = config.detector
    teacher = TeacherConfig(
        mode="automatic",
        model_type=config.student.model_type,
        checkpoint=config.student.checkpoint,
        points_per_side=config.pipeline.detect_sam_points_per_side,
        mask_filter=MaskFilter(
            min_predicted_iou=detector.sam_min_predicted_iou,
            min_stability=detector.sam_min_stability,
        ),
        seed=config.train.seed,
    )
    run_pseudo_label(
        str(store),
        teacher,
        pool=pseudo_label_pool(config),
        split=None,
        overwrite=True,
        log=context.log,
    )
    return read_instances(str(store)).num_rows


def compare(context: RunContext) -> dict[str, Any]:
    """The SAM student against the Faster R-CNN student on the detect store's validation tiles
    (``semisup compare``): OUT/compare/compare.json and compare.md."""
    from semisup.detection.compare import compare_runs

    detected = context.results["detect"]
    out = context.out / "compare"
    result = compare_runs(
        context.results["student"]["run_dir"],
        detected["run_dir"],
        store=detected["store"],
        out=out,
        classes=context.config.pipeline.compare_classes,
        note=detected.get("note"),
    )
    return {**result, "outputs": [str(out / "compare.json"), str(out / "compare.md")]}

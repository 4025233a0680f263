"""``semisup demo``: the ``semisup run`` pipeline on a built-in config, on one machine, in minutes.

Real Dubai imagery from ``../shared/data`` is used when present; otherwise generated scenes.
Every output lands under one folder, whose layout is printed at the end; a rerun into the same
folder skips the stages already done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semisup import columns as C
from semisup.config import (
    ConfigError,
    DetectorConfig,
    ExperimentConfig,
    PipelineConfig,
    PrepConfig,
    RayConfig,
    SslConfig,
    StreamConfig,
    StudentConfig,
    TrainConfig,
)
from semisup.known_imagery import CLASS_NAMES, dubai_folders, shared_data_dir
from semisup.pipeline import run_pipeline
from semisup.sam import SAM_SPECS
from semisup.stages import comparison_table

# A random-weights SAM never predicts an IoU of 0.88 nor a stability of 0.95: the demo keeps its
# instances so the detect stage has SAM pseudo-boxes; an official checkpoint restores SAM's own
RANDOM_SAM_INSTANCES: dict[str, float] = {"sam_min_predicted_iou": 0.0, "sam_min_stability": 0.0}


def demo_config() -> ExperimentConfig:
    """The built-in demo recipe: 256 px tiles, 1/8 labelled, the tiny SAM, a local 2-CPU Ray.

    The student is a LoRA adapter trained with consistency against both the offline semantic
    pseudo-labels and an EMA teacher. The schedule is short so the whole chain runs in minutes
    on 2 CPUs; it shows the pipeline working, not the accuracy a real checkpoint reaches.
    """
    return ExperimentConfig(
        name="demo",
        prep=PrepConfig(tile_size=256, labeled_fraction=0.125, seed=0),
        stream=StreamConfig(halo=0, tiles_per_task=32),
        student=StudentConfig(model_type="tiny", mode="lora", lora_rank=8),
        # FreeMatch's self-adaptive thresholds: the demo's short-trained teacher is right on most
        # pixels but rarely above a fixed 0.9 (a fixed cut kept about 1 % of them)
        ssl=SslConfig(target="both", threshold_mode="freematch", ramp_up_steps=20),
        train=TrainConfig(
            num_workers=1,
            torch_threads=2,  # the worker reserves 1 CPU for scheduling but may compute on 2
            batch_size=8,
            lr=1e-3,
            epochs=4,
            steps_per_epoch=15,
            warmup_steps=5,
            early_stop_patience=3,
        ),
        # the detect stage: the edge-sized Faster R-CNN, all layers trained from random weights,
        # on the automatic SAM teacher's instances and the EMA teacher's boxes
        detector=DetectorConfig(
            arch="fasterrcnn_mobilenet_v3_large_fpn",
            finetune="full",
            pseudo_score=0.05,  # a random teacher is never 0.7 confident: let its boxes through
            target="both",
            sam_min_predicted_iou=RANDOM_SAM_INSTANCES["sam_min_predicted_iou"],
            sam_min_stability=RANDOM_SAM_INSTANCES["sam_min_stability"],
        ),
        # detect: one epoch of four steps, with validation before and after, and SAM prompted
        # on an 8×8 grid (a quarter of the default's cost) fit the demo's minute for the stage
        pipeline=PipelineConfig(detect_epochs=1, detect_sam_points_per_side=8),
        ray=RayConfig(num_cpus=2, object_store_mb=512),
    )


@dataclass(frozen=True)
class DemoInputs:
    """What the demo ingests: a description, and the pipeline and prep settings that name it."""

    description: str
    pipeline: PipelineConfig
    prep: PrepConfig


def demo_inputs(config: ExperimentConfig, data_dir: Path | None, synthetic: bool) -> DemoInputs:
    """Dubai tiles 1–6 when the real imagery is found (tile 6 validates), else generated scenes."""
    root = None if synthetic else (data_dir or shared_data_dir())
    if root is not None and (root / "dubai").is_dir():
        images, masks = dubai_folders(root / "dubai")
        return DemoInputs(
            description=f"real Dubai aerial imagery, tiles 1-6 ({root / 'dubai'})",
            pipeline=dataclasses.replace(
                config.pipeline,
                images=tuple(map(str, images)),
                labels=tuple(map(str, masks)),
                label_colors="dubai",
                class_names=CLASS_NAMES,
                # the Dubai JPEGs carry no CRS: the student maps a real georeferenced
                # orthophoto instead, so the demo ends in a GeoTIFF and a GeoJSON
                predict_rasters=_georeferenced_orthophoto(root),
                **_neon_crowns(root),
            ),
            # by tile folder, so that neighbouring images never straddle splits
            prep=dataclasses.replace(config.prep, split_by="folder", val_sources=("tile_6*",)),
        )
    return DemoInputs(
        description="generated aerial-like scenes",
        # 18 unlabeled tiles: the round labels 4, leaving the student more than a batch of 8
        pipeline=dataclasses.replace(
            config.pipeline, generated_scenes=4, scene_size=768, select_budget=4
        ),
        prep=dataclasses.replace(config.prep, split_by="source", val_sources=("*scene_3",)),
    )


def _neon_crowns(root: Path) -> dict[str, Any]:
    """The detect stage's inputs: NEON's OSBS_029 crowns (61 boxes on 400 px), as 128 px tiles;
    the SAM student's vegetation class stands for the crowns in the comparison."""
    folder = root / "neon_trees"
    if not (folder / "OSBS_029.tif").is_file() or not (folder / "OSBS_029.csv").is_file():
        return {}
    return {
        "detect_rasters": (str(folder / "OSBS_029.tif"),),
        "detect_boxes": (str(folder / "OSBS_029.csv"),),
        "detect_box_classes": ("Tree=tree",),
        "detect_tile_size": 128,  # 16 tiles of the 400 px crop: enough to split
        "compare_classes": ("tree=vegetation",),
    }


def demo_stages(pipeline: PipelineConfig, tune: bool) -> tuple[str, ...]:
    """The default stages, detect and compare when there are boxes (NEON crowns or generated
    scenes), and tune when asked."""
    from semisup.pipeline import STAGES

    boxes = bool(pipeline.detect_rasters or pipeline.generated_scenes)
    extra = {"detect": boxes, "compare": boxes, "tune": tune}
    return tuple(name for name, stage in STAGES.items() if stage.default or extra.get(name))


def _georeferenced_orthophoto(root: Path) -> tuple[str, ...]:
    """NEON's 10 cm RGB orthophoto (EPSG:32617) from the real imagery folder, when present."""
    path = root / "neon_trees" / "OSBS_029.tif"
    return (str(path),) if path.is_file() else ()


def with_checkpoint(config: ExperimentConfig, checkpoint: str) -> ExperimentConfig:
    """The demo on an official SAM checkpoint (path or URL): its model type is read from the
    weights, so ``sam_vit_b_01ec64.pth`` runs the chain on vit_b."""
    from semisup.sam import guess_model_type, read_state_dict, resolve_checkpoint

    if "://" not in checkpoint:  # Ray's workers run in another folder: an absolute path
        checkpoint = str(Path(checkpoint).expanduser().absolute())
    model_type = guess_model_type(read_state_dict(resolve_checkpoint(checkpoint)))
    if model_type not in SAM_SPECS:
        raise ConfigError(
            f"--checkpoint {checkpoint}: holds {model_type} weights; expected an official SAM "
            f"checkpoint of one of {', '.join(SAM_SPECS)}"
        )
    student = dataclasses.replace(config.student, model_type=model_type, checkpoint=checkpoint)
    sam_cuts = {name: getattr(DetectorConfig(), name) for name in RANDOM_SAM_INSTANCES}
    detector = dataclasses.replace(config.detector, **sam_cuts)
    return dataclasses.replace(config, student=student, detector=detector)


def run_demo(
    out: Path,
    data_dir: Path | None = None,
    synthetic: bool = False,
    tune: bool = False,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Run the pipeline on the demo config into ``out``; returns (and writes) the summary.

    ``tune`` adds the optional Ray Tune sweep (LoRA ranks 4-32, ASHA) after the other stages.
    ``checkpoint``: an official SAM checkpoint (path or URL) instead of random weights.
    A rerun into the same folder skips the stages that are already done.
    """
    started = time.perf_counter()
    base = demo_config() if checkpoint is None else with_checkpoint(demo_config(), checkpoint)
    inputs = demo_inputs(base, data_dir, synthetic)
    stages = demo_stages(inputs.pipeline, tune)
    config = dataclasses.replace(
        base,
        prep=inputs.prep,
        pipeline=dataclasses.replace(inputs.pipeline, out=str(out), stages=stages),
    )
    print(f"[demo] inputs: {inputs.description}", file=sys.stderr)
    run = run_pipeline(config)
    round_1 = labelling_round_once(out, run)
    if not round_1["earlier"]:
        print(
            f"[demo] active-learning round: {round_1['moved_to_labeled']} proposed tiles "
            f"labelled and imported as label version {round_1['label_version']}; the stages "
            "that train on labels run again",
            file=sys.stderr,
        )
    rerun = run_pipeline(config)
    round_1.update(ran=rerun["ran"], skipped=rerun["skipped"], after=round_figures(rerun))
    summary = {
        "out": run["out"],
        "inputs": inputs.description,
        "config": run["config"],
        "stages": rerun["stages"],
        "first_pass": run["stages"],
        "ran": run["ran"],
        "skipped": run["skipped"],
        "round": round_1,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(format_summary(summary))
    return summary


ROUND_DIR = Path("rounds") / "round_1"  # in the demo folder: the proposals, their labels
ROUND_FILE = "round.json"  # the round's record: written once its labels are imported


def round_figures(run: dict[str, Any]) -> dict[str, Any]:
    """What the round changes: the store's labeled tiles and label version, the student's
    validation mIoU, of one pass of the pipeline."""
    from semisup.store import current_labels, open_store, read_tile_index

    store = run["stages"]["prep"]["store"]
    labels = current_labels(open_store(store))
    index = read_tile_index(store, labels=labels).to_pandas()
    return {
        "label_version": labels.version,
        "labeled_tiles": int((index[C.SPLIT] == C.LABELED).sum()),
        "student_miou": run["stages"]["student"]["best_miou"],
    }


def labelling_round_once(out: Path, run: dict[str, Any]) -> dict[str, Any]:
    """One select -> label -> import round after the first pass, done once per demo folder.

    The select stage's proposals and the figures before the round are kept in
    ``out/rounds/round_1`` first; the stand-in annotator (the ground truth the split hides,
    ``labelling_round``) labels them, and ``semisup label import`` brings the labels in as a
    new label version. An interrupted round resumes from the kept proposals (the import of
    the same labels is a no-op); a finished one (``round.json``) is read back, so a rerun of
    the demo changes nothing.
    """
    from semisup.labelling_round import SELECTION_FILE, labelling_round

    folder = out / ROUND_DIR
    record = folder / ROUND_FILE
    if record.is_file():
        return {**json.loads(record.read_text()), "earlier": True}
    before = folder / "before.json"
    if not before.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "select" / SELECTION_FILE, folder / SELECTION_FILE)
        before.write_text(json.dumps(round_figures(run), indent=2) + "\n")
    store = run["stages"]["prep"]["store"]
    done = labelling_round(store, folder, folder / "annotations", log=None)
    done["before"] = json.loads(before.read_text())
    record.write_text(json.dumps(done, indent=2) + "\n")
    return {**done, "earlier": False}


RANDOM_WEIGHTS_NOTE = (
    "SAM has random weights here (no checkpoint): these numbers show the pipeline working, "
    "not SAM; `semisup demo --checkpoint PATH_OR_URL` runs it on official weights"
)


def timing_table(summary: dict[str, Any]) -> list[str]:
    """Markdown lines: each stage's wall time in the first pass and in the round's rerun (–:
    up to date, not rerun), their totals, and this run's wall time."""
    first, again = summary["first_pass"], summary["round"]["ran"]
    lines = ["| stage | first pass | round 1 |", "|---|---|---|"]
    totals = [0.0, 0.0]
    for name, result in first.items():
        seconds = [float(result.get("seconds") or 0.0)]
        seconds.append(
            float(summary["stages"][name].get("seconds") or 0.0) if name in again else 0.0
        )
        totals = [t + s for t, s in zip(totals, seconds, strict=True)]
        earlier = " (earlier run)" if name in summary["skipped"] else ""
        rerun = _duration(seconds[1]) if name in again else "–"
        lines.append(f"| {name} | {_duration(seconds[0])}{earlier} | {rerun} |")
    lines.append(f"| total of the stages | {_duration(totals[0])} | {_duration(totals[1])} |")
    if "wall_seconds" in summary:
        lines.append(f"| this run, with Ray's start | {_duration(summary['wall_seconds'])} | |")
    return lines


def round_line(round_1: dict[str, Any]) -> str:
    """The active-learning round in one line: proposals labelled and imported, labeled tiles
    and the student's validation mIoU before and after, the stages rerun."""
    before, after = round_1["before"], round_1["after"]
    rerun = ", ".join(round_1["ran"]) or "none (done earlier)"
    return (
        f"  round 1       {round_1['annotated']} of the {round_1['proposed']} proposed tiles "
        f"labelled (stand-in annotator: the ground truth the split hides) and imported as label "
        f"version {round_1['label_version']}: labeled tiles {before['labeled_tiles']} -> "
        f"{after['labeled_tiles']}, student val mIoU {_fmt(before['student_miou'])} -> "
        f"{_fmt(after['student_miou'])}; rerun: {rerun}"
    )


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{seconds:.1f} s"


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def detection_lines(detect: dict[str, Any], compared: dict[str, Any] | None) -> list[str]:
    """The detect stage's summary line, its random-weights note, and the comparison table."""
    from semisup.detection.compare import comparison_table as box_table

    splits = detect["tiles_per_split"]
    sources = {
        "ema": "the EMA teacher's",
        "pseudo": f"the automatic SAM teacher's ({detect.get('sam_instances')} instances)",
        "both": f"the automatic SAM teacher's ({detect.get('sam_instances')} instances) and the "
        "EMA teacher's",
    }
    lines = [
        f"  detect        {Path(detect['raster']).name}: Faster R-CNN on "
        f"{splits.get(C.LABELED, 0)} labeled tiles and {splits.get(C.UNLABELED, 0)} unlabeled "
        f"with {sources[detect.get('target', 'ema')]} pseudo-boxes "
        f"({detect['pseudo_boxes'] or 0:.1f} per tile); box AP "
        f"{_fmt(detect['best_ap'])}, AP50 {_fmt(detect['ap50'])} on {splits.get(C.VAL, 0)} "
        f"held-out tiles ({detect['val_truth_boxes']} boxes) -> {detect['boxes']} boxes, CSV + "
        "GeoJSON",
    ]
    if detect.get("note"):
        lines.append(f"                {detect['note']}")
    if compared is not None:
        lines += [
            "",
            "SAM student against Faster R-CNN student (the detect stage's held-out tiles):",
            "",
            *box_table(compared),
        ]
    return lines


def format_summary(summary: dict[str, Any]) -> str:
    """A short account of what the demo did, the comparison table, and where the outputs are."""
    stages = summary["stages"]
    prep = stages["prep"]
    splits = ", ".join(f"{k} {v}" for k, v in sorted(prep["tiles_per_split"].items()))
    lines = [
        "",
        f"semisup demo: {summary['inputs']}",
        f"  prep          {prep['sources']} sources -> {prep['tiles']} tiles of "
        f"{summary['config']['prep']['tile_size']} px ({splits}) in {prep['seconds']} s",
    ]
    for split in C.SPLITS:
        info = stages["stream"][split]
        lines.append(
            f"  stream        {split:<9} {info['tiles']:>4} tiles, {info['tiles_per_s']} tiles/s"
        )
    zero = stages["zero-shot"]
    lines.append(
        f"  zero-shot     box-prompt mIoU {_fmt(zero['box_miou'])}, point-prompt mIoU "
        f"{_fmt(zero['point_miou'])} (class-agnostic, per ground-truth component)"
    )
    if summary["config"]["student"]["checkpoint"] is None:
        lines.append(f"                {RANDOM_WEIGHTS_NOTE}")
    pseudo = stages["pseudo-label"]
    lines.append(
        f"  pseudo-label  {pseudo['tiles_processed']} unlabeled tiles labelled by the fine-tuned "
        f"teacher (mean confidence {_fmt(pseudo['mean_confidence'])}) in {pseudo['seconds']} s"
    )
    lines += ["", "Validation (tiles never trained on):", ""]
    lines += comparison_table(stages["evaluate"]["rows"])
    report, select, predict = stages["report"], stages["select"], stages["predict"]
    lines += [
        "",
        f"  report        pseudo-label accuracy {_fmt(report['pseudo_label_accuracy'])}, "
        f"calibration error {_fmt(report['calibration_error'])}, threshold for 90 % accuracy "
        f"{_fmt(report['suggested_threshold'])}",
        f"  select        {select['selected']} of {select['candidates']} unlabeled tiles proposed "
        f"for labelling ({select['measure']}, {select['sources']} sources)",
        f"  predict       {', '.join(Path(r).name for r in predict['rasters'])} -> class map + "
        f"confidence GeoTIFF{' + GeoJSON polygons' if predict['vectors'] else ''}",
    ]
    lines += ["", round_line(summary["round"])]
    if "detect" in stages:
        lines += ["", *detection_lines(stages["detect"], stages.get("compare"))]
    if "tune" in stages:
        tune = stages["tune"]
        lines.append(
            f"  tune          {tune['trials']} trials ({tune['outcomes']}); best "
            f"{tune['best_params']} at val mIoU {_fmt(tune['best_miou'])}"
        )
    lines += ["", *timing_table(summary)]
    if summary["skipped"]:
        lines += ["", f"up to date from an earlier run, skipped: {', '.join(summary['skipped'])}"]
    lines += [
        "",
        f"outputs in {summary['out']}:",
        "  store.zarr/          tile store, with the teacher's pseudo_label/confidence arrays",
        "  zero_shot/           zero_shot.json, zero_shot.md, example overlays",
        "  teacher/, student/   report.json/.md, tensorboard/, best/adapter.safetensors",
        "  evaluation.md/.json  the comparison above",
        "  report/              per-class comparison, pseudo-label calibration, overlays",
        "  select/              selection.csv/.geojson, contact_sheet.png: tiles to label next",
        "  rounds/round_1/      the first pass's proposals, their labels (annotations/), round.json",
        "  predict/             class map + confidence GeoTIFF (COG) and GeoJSON polygons",
        *(
            [
                "  detect/              store.zarr, run/ (Faster R-CNN), boxes.csv/.geojson",
                "  compare/             compare.json/.md: SAM student against Faster R-CNN",
            ]
            if "detect" in stages
            else []
        ),
        *(
            ["  tune/                trials.csv, summary.md, tune_plot.png, best_config.yaml"]
            if "tune" in stages
            else []
        ),
        "  run.json, run.log    per-stage status, config hash, outputs and timings; what each run did",
        "  demo_summary.json    this summary",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``semisup demo`` flags."""
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo_out"),
        help="folder for every output (default: demo_out)",
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="real imagery folder (default: ../shared/data)"
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="use generated scenes even if real data exists"
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="also run the Ray Tune sweep over LoRA ranks (ASHA): summary, plot, best config",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="PATH_OR_URL",
        default=None,
        help="an official SAM checkpoint (vit_b, vit_l or vit_h; its type is read from the "
        "weights) instead of random weights, e.g. "
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    )


def run_cli(args: argparse.Namespace) -> int:
    """Run the demo into ``--out``; returns the exit status."""
    run_demo(
        args.out,
        data_dir=args.data,
        synthetic=args.synthetic,
        tune=args.tune,
        checkpoint=args.checkpoint,
    )
    return 0

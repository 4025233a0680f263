"""``semisup demo``: the ``semisup run`` pipeline on a built-in config, on one machine, in minutes.

Real Dubai imagery from ``../shared/data`` is used when present; otherwise generated scenes.
Every output lands under one folder, whose layout is printed at the end; a rerun into the same
folder skips the stages already done.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semisup import columns as C
from semisup.config import (
    ConfigError,
    ExperimentConfig,
    PipelineConfig,
    PrepConfig,
    RayConfig,
    SslConfig,
    StreamConfig,
    StudentConfig,
    TrainConfig,
)
from semisup.datasets import CLASS_NAMES, dubai_folders, shared_data_dir
from semisup.pipeline import run_pipeline
from semisup.sam import SAM_SPECS
from semisup.stages import comparison_table


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
        ),  # fmt: skip
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
            ),
            # by tile folder, so that neighbouring images never straddle splits
            prep=dataclasses.replace(config.prep, split_by="folder", val_sources=("tile_6*",)),
        )
    return DemoInputs(
        description="generated aerial-like scenes",
        pipeline=dataclasses.replace(config.pipeline, generated_scenes=4, scene_size=768),
        prep=dataclasses.replace(config.prep, split_by="source", val_sources=("*scene_3",)),
    )


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
    return dataclasses.replace(config, student=student)


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
    from semisup.pipeline import STAGES

    started = time.perf_counter()
    base = demo_config() if checkpoint is None else with_checkpoint(demo_config(), checkpoint)
    inputs = demo_inputs(base, data_dir, synthetic)
    stages = tuple(name for name, stage in STAGES.items() if stage.default or tune)
    config = dataclasses.replace(
        base,
        prep=inputs.prep,
        pipeline=dataclasses.replace(inputs.pipeline, out=str(out), stages=stages),
    )
    print(f"[demo] inputs: {inputs.description}", file=sys.stderr)
    run = run_pipeline(config)
    summary = {"out": run["out"], "inputs": inputs.description, "config": run["config"],
               "stages": run["stages"], "ran": run["ran"], "skipped": run["skipped"],
               "wall_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(format_summary(summary))
    return summary


RANDOM_WEIGHTS_NOTE = (
    "SAM has random weights here (no checkpoint): these numbers show the pipeline working, "
    "not SAM; `semisup demo --checkpoint PATH_OR_URL` runs it on official weights"
)


def timing_table(summary: dict[str, Any]) -> list[str]:
    """Markdown lines: each stage's wall time, their total, and this run's wall time."""
    lines = ["| stage | wall time |", "|---|---|"]
    total = 0.0
    for name, result in summary["stages"].items():
        seconds = float(result.get("seconds") or 0.0)
        total += seconds
        earlier = " (earlier run)" if name in summary["skipped"] else ""
        lines.append(f"| {name} | {_duration(seconds)}{earlier} |")
    lines.append(f"| total of the stages | {_duration(total)} |")
    if "wall_seconds" in summary:
        lines.append(f"| this run, with Ray's start | {_duration(summary['wall_seconds'])} |")
    return lines


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{seconds:.1f} s"


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


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
        "  predict/             class map + confidence GeoTIFF (COG) and GeoJSON polygons",
        *(
            ["  tune/                trials.csv, summary.md, tune_plot.png, best_config.yaml"]
            if "tune" in stages
            else []
        ),
        "  run.json, run.log    per-stage status, config hash, outputs and timings; what each run did",
        "  demo_summary.json    this summary",
    ]
    return "\n".join(lines)

"""``semisup demo``: the whole pipeline on a built-in config, on one machine, in minutes.

Real Dubai imagery from ``../shared/data`` is used when present; otherwise generated scenes.
Every output lands under one folder, whose layout is printed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semisup import columns as C
from semisup.config import (
    ExperimentConfig,
    PrepConfig,
    RayConfig,
    SplitBy,
    SslConfig,
    StreamConfig,
    StudentConfig,
    TrainConfig,
)
from semisup.datasets import CLASS_NAMES, dubai_folders, shared_data_dir, write_colour_map
from semisup.synthetic import write_scenes


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
        ssl=SslConfig(target="both", confidence_threshold=0.9, ramp_up_steps=20),
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


def teacher_config(config: ExperimentConfig) -> ExperimentConfig:
    """The semantic teacher: the same model fine-tuned decoder-only on the labeled tiles alone."""
    return dataclasses.replace(
        config,
        student=dataclasses.replace(config.student, mode="decoder"),
        ssl=dataclasses.replace(config.ssl, enabled=False),
    )


@dataclass(frozen=True)
class DemoInputs:
    """Rasters and labels the demo ingests, and where they came from."""

    description: str
    images: tuple[Path, ...]
    labels: tuple[Path, ...]
    colour_map: Path | None
    val_sources: tuple[str, ...]
    split_by: SplitBy  # Dubai: by tile folder, so neighbouring images never straddle splits


def demo_inputs(out: Path, data_dir: Path | None, synthetic: bool = False) -> DemoInputs:
    """Dubai tiles 1–6 when the real imagery is found (tile 6 validates), else generated scenes."""
    root = None if synthetic else (data_dir or shared_data_dir())
    if root is not None and (root / "dubai").is_dir():
        images, masks = dubai_folders(root / "dubai")
        return DemoInputs(
            description=f"real Dubai aerial imagery, tiles 1-6 ({root / 'dubai'})",
            images=tuple(images),
            labels=tuple(masks),
            colour_map=write_colour_map(out / "dubai_colours.json"),
            val_sources=("tile_6*",),
            split_by="folder",
        )
    images_dir, masks_dir = write_scenes(out / "generated", count=4, size=768)
    return DemoInputs(
        description=f"generated aerial-like scenes ({images_dir.parent})",
        images=(images_dir,),
        labels=(masks_dir,),
        colour_map=None,
        val_sources=("*scene_3",),
        split_by="source",
    )


def _prep_argv(inputs: DemoInputs, store: Path, prep: PrepConfig) -> list[str]:
    argv = [*map(str, inputs.images), "--out", str(store), "--labels", *map(str, inputs.labels)]
    if inputs.colour_map is not None:
        argv += ["--label-colors", str(inputs.colour_map)]
    argv += [
        "--tile-size", str(prep.tile_size), "--overlap", str(prep.overlap),
        "--split-by", prep.split_by, "--labeled-fraction", str(prep.labeled_fraction),
        "--seed", str(prep.seed), "--class-names", ",".join(CLASS_NAMES),
        "--val-sources", *inputs.val_sources,
    ]  # fmt: skip
    return argv


def stage_prep(inputs: DemoInputs, store: Path, config: ExperimentConfig) -> dict[str, Any]:
    """Ingest the demo rasters into a Zarr tile store through the ``semisup prep`` CLI path."""
    from data_prep import cli as prep_cli

    parser = argparse.ArgumentParser(prog="semisup prep")
    prep_cli.add_arguments(parser)
    status = prep_cli.run(parser.parse_args(_prep_argv(inputs, store, config.prep)))
    if status != 0:
        raise RuntimeError(f"prep failed with status {status}")
    from semisup.store import read_tile_index

    index = read_tile_index(str(store)).to_pandas()
    return {
        "store": str(store),
        "sources": int(index[C.SOURCE].nunique()),
        "tiles": len(index),
        "tiles_per_split": {k: int(v) for k, v in index[C.SPLIT].value_counts().items()},
    }


def stage_stream(store: Path, config: ExperimentConfig) -> dict[str, Any]:
    """Stream every split of the store through Ray Data and measure tiles/s."""
    from semisup.data import read_tiles

    result: dict[str, Any] = {}
    for split in C.SPLITS:
        dataset = read_tiles(
            str(store),
            split=split,
            halo=config.stream.halo,
            skip_nodata=config.stream.skip_nodata,
            tiles_per_task=config.stream.tiles_per_task,
            read_cpus=config.stream.read_cpus,
        )
        start, count, shapes = time.perf_counter(), 0, {}
        for batch in dataset.iter_batches(batch_size=32, batch_format="numpy"):
            count += len(batch[C.TILE_ID])
            shapes = {name: f"{tuple(value.shape)} {value.dtype}" for name, value in batch.items()}
        seconds = time.perf_counter() - start
        result[split] = {
            "tiles": count,
            "tiles_per_s": round(count / seconds, 1) if seconds > 0 else None,
            "last_batch": shapes,
        }
    return result


def stage_zero_shot(store: Path, config: ExperimentConfig, out: Path) -> dict[str, Any]:
    """SAM before any training: box/point-prompted IoU on ground-truth components."""
    from semisup.zero_shot import run_zero_shot

    summary = run_zero_shot(
        str(store), model_type=config.student.model_type, checkpoint=config.student.checkpoint,
        out_dir=out, max_tiles=12, examples=4, log=None,
    )  # fmt: skip
    return {
        "out": str(out),
        "box_miou": summary.get("box_miou"),
        "point_miou": summary.get("point_miou"),
        "automatic_coverage": summary.get("automatic_coverage"),
    }


def stage_train(store: Path, config: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """One Ray Train run; returns its best validation scores."""
    from semisup.train import run_training

    report = run_training(str(store), config, run_dir)
    best = next(e for e in report["epochs"] if e["epoch"] == report["best_epoch"])
    return {
        "run_dir": str(run_dir),
        "mode": config.student.mode,
        "consistency": config.ssl.enabled,
        "best_miou": report["best_miou"],
        "best_epoch": report["best_epoch"],
        "iou_per_class": best["iou_per_class"],
        "steps": report["steps"],
        "best_checkpoint": report["best_checkpoint"],
    }


def stage_pseudo_label(store: Path, config: ExperimentConfig, teacher_run: Path) -> dict[str, Any]:
    """Label the unlabeled tiles with the fine-tuned semantic teacher, in 2 Ray actors."""
    from semisup.pseudo_label import run_pseudo_label

    summary = run_pseudo_label(
        str(store), mode="semantic", model_type=config.student.model_type,
        checkpoint=str(teacher_run / "best"), base_checkpoint=config.student.checkpoint,
        actors=2, batch_size=8, seed=config.train.seed, log=None,
    )  # fmt: skip
    return {key: summary[key] for key in summary if isinstance(summary[key], int | float | str)}


def run_demo(out: Path, data_dir: Path | None = None, synthetic: bool = False) -> dict[str, Any]:
    """Run every stage of the demo into ``out``; returns (and writes) the summary."""
    from semisup.runtime import ray_runtime

    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"demo folder {out} is not empty; remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    inputs = demo_inputs(out, data_dir, synthetic)
    config = demo_config()
    config = dataclasses.replace(
        config, prep=dataclasses.replace(config.prep, split_by=inputs.split_by)
    )
    summary: dict[str, Any] = {"out": str(out), "config": dataclasses.asdict(config), "stages": {}}

    def run_stage(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        print(f"[demo] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        result = fn()
        result["seconds"] = round(time.perf_counter() - start, 2)
        summary["stages"][name] = result
        print(f"[demo] {name} done in {result['seconds']} s", file=sys.stderr, flush=True)
        return result

    summary["inputs"] = inputs.description
    print(f"[demo] inputs: {inputs.description}", file=sys.stderr)
    store = out / "store.zarr"
    run_stage("prep", lambda: stage_prep(inputs, store, config))
    with ray_runtime(config.ray):
        run_stage("stream", lambda: stage_stream(store, config))
        run_stage("zero-shot", lambda: stage_zero_shot(store, config, out / "zero_shot"))
        teacher = teacher_config(config)
        run_stage("teacher", lambda: stage_train(store, teacher, out / "teacher"))
        run_stage("pseudo-label", lambda: stage_pseudo_label(store, config, out / "teacher"))
        run_stage("student", lambda: stage_train(store, config, out / "student"))
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(format_summary(summary))
    return summary


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
    pseudo = stages["pseudo-label"]
    lines.append(
        f"  pseudo-label  {pseudo['tiles_processed']} unlabeled tiles labelled by the fine-tuned "
        f"teacher (mean confidence {_fmt(pseudo['mean_confidence'])}) in {pseudo['seconds']} s"
    )
    teacher, student = stages["teacher"], stages["student"]
    header = "| model | fine-tuning | data | val mIoU |"
    lines += ["", "Validation (tiles never trained on):", "", header, "|---|---|---|---|"]
    lines.append(f"| zero-shot SAM | none | - | box prompts {_fmt(zero['box_miou'])} |")
    lines.append(
        f"| labels-only (teacher) | {teacher['mode']} | labeled | {_fmt(teacher['best_miou'])} |"
    )
    lines.append(f"| semi-supervised (student) | {student['mode']} | labeled + unlabeled "
                 f"| {_fmt(student['best_miou'])} |")  # fmt: skip
    lines += [
        "",
        f"outputs in {summary['out']}:",
        "  store.zarr/          tile store, with the teacher's pseudo_label/confidence arrays",
        "  zero_shot/           zero_shot.json, zero_shot.md, example overlays",
        "  teacher/, student/   report.json/.md, tensorboard/, best/adapter.safetensors",
        "  demo_summary.json    what ran, with timings",
    ]
    return "\n".join(lines)

"""The ``semisup`` console script: one subcommand per pipeline stage.

Each stage's flags and handler live in the module that owns the stage; this table names them.
Only the chosen stage's module is imported, so ``semisup --help`` and each stage start quickly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from semisup.config import ConfigError
from semisup.runtime import VERBOSE_VARIABLE


@dataclass(frozen=True)
class Stage:
    """A subcommand: its one-line help, a working example, and the module of its flags and handler."""

    help: str
    example: str
    module: str  # defines add_arguments(parser) and run_cli(args) -> exit status
    description: str = ""


STAGES: dict[str, Stage] = {
    "prep": Stage(
        "rasters and labels -> a chunked Zarr tile store",
        "semisup prep ../shared/data/dubai/tile_1/images --labels ../shared/data/dubai/tile_1/masks "
        "--label-colors dubai_colours.json --out dubai.zarr",
        "data_prep.cli",
        "Build a Zarr v3 tile store from GeoTIFF/COG, PNG/JPEG or NumPy rasters.",
    ),
    "info": Stage(
        "summarise a tile store: sources, tiles per split, geo metadata",
        "semisup info dubai.zarr",
        "semisup.store_info",
    ),
    "zero-shot": Stage(
        "measure SAM on the labelled tiles before any training (box/point IoU, coverage)",
        "semisup zero-shot --store dubai.zarr --model vit_b --checkpoint sam_vit_b_01ec64.pth "
        "--out runs/zero_shot",
        "semisup.zero_shot",
        "Box- and point-prompted mask IoU against ground-truth instances, automatic-mode "
        "coverage and a per-class table: zero_shot.json, zero_shot.md and example overlays.",
    ),
    "pseudo-label": Stage(
        "label tiles with the SAM teacher in a pool of Ray actors, resumably",
        "semisup pseudo-label --store dubai.zarr --mode semantic --model tiny "
        "--checkpoint runs/teacher/best",
        "semisup.pseudo_label",
        "Writes pseudo_label and confidence arrays beside each source's image and "
        "pseudo_labels.parquet at the store root; a rerun skips tiles already written.",
    ),
    "train": Stage(
        "train the student on Ray Train (consistency regularisation, full/decoder/LoRA)",
        "semisup train --store dubai.zarr --out runs/decoder --set student.mode=decoder",
        "semisup.train",
        "Trains the student on the store's labeled (and unlabeled) tiles, validates every epoch "
        "on the val tiles, stops early, checkpoints, and writes RUN_DIR/report.json.",
    ),
    "select": Stage(
        "propose the unlabeled tiles to label next, by the student's uncertainty (active learning)",
        "semisup select --run demo_out/student --store demo_out/store.zarr --budget 16 "
        "--out demo_out/select",
        "semisup.selection",
        "Scores every unlabeled tile with a trained run's student (entropy, margin, teacher "
        "disagreement or test-time-augmentation disagreement), picks a spatially diverse budget "
        "and writes selection.csv, selection.geojson (source CRS) and contact_sheet.png; "
        "--format labelstudio adds Label Studio tasks with the student's prediction.",
    ),
    "label": Stage(
        "import new ground truth into a store as a new label version (label import)",
        "semisup label import --store dubai.zarr new_masks/ --label-colors dubai",
        "semisup.label_import",
        "semisup label import adds masks, polygons or a Label Studio export to an existing "
        "local store: imported tiles move from unlabeled to labeled, atomically, as a new "
        "label version; the same inputs imported again change nothing.",
    ),
    "experiment": Stage(
        "measure label efficiency: learning curves and active vs random selection, over seeds",
        "semisup experiment label-efficiency --store dubai.zarr --out runs/label_efficiency",
        "semisup.experiment",
        "Labels-only, semi-supervised and full-label students at several label fractions, and "
        "rounds of active against random selection, on held-out test tiles over several seeds: "
        "OUT/report.json, report.md and PNG plots. Reruns reuse finished runs.",
    ),
    "evaluate-boxes": Stage(
        "score predicted boxes against true boxes: COCO AP, AP50, AP75, per class",
        "semisup evaluate-boxes --pred crowns_pred.csv --truth OSBS_029.csv "
        "--box-classes 'Tree,0,Alive,Dead=tree'",
        "semisup.detection.box_ap",
        "COCO-style box average precision (pycocotools) of a prediction CSV "
        "(image_path,xmin,ymin,xmax,ymax,label,score, pixels) against CSV or Pascal-VOC truth; "
        "images are matched by file name. Prints one line per metric and class.",
    ),
    "compare": Stage(
        "the SAM segmentation student against the Faster R-CNN student on the same box tiles",
        "semisup compare --runs demo_out/student demo_out/detect/run "
        "--store demo_out/detect/store.zarr --out demo_out/compare",
        "semisup.detection.compare",
        "Box AP/AP50/AP75 (the SAM student's class-map components as boxes), images/s of both "
        "in one process with load and CPU seconds, parameters, weights on disk and training "
        "time, on the detection store's validation tiles: OUT/compare.json and compare.md.",
    ),
    "report": Stage(
        "gather a run's evaluation: zero-shot vs labels-only vs semi-supervised, pseudo-label quality",
        "semisup report --run demo_out",
        "semisup.report",
        "Per-class comparison of zero-shot SAM, the labels-only teacher and the semi-supervised "
        "student, pseudo-label accuracy per confidence bin (a calibrated threshold) and "
        "prediction overlays: RUN/report/report.md, report.json and PNGs.",
    ),
    "predict": Stage(
        "predict class maps for large rasters, window by window, to GeoTIFF/COG and GeoJSON",
        "semisup predict ortho.tif --model runs/student --out ortho_classes.tif "
        "--vector ortho_classes.geojson",
        "semisup.predict",
        "Blends overlapping windows into one seamless class map with a confidence band, in "
        "the input's CRS; memory stays bounded however large the raster; reruns resume.",
    ),
    "export": Stage(
        "ship a run's student as one ONNX model (adapter merged into its base), fp32 or int8",
        "semisup export --run runs/student --format onnx --out student.onnx --quantize int8",
        "semisup.export",
        "Folds the run's best adapter into its base and exports the student's class "
        "probabilities through torch's exporter (ONNX opset 18, batch axis dynamic), checked "
        "with onnx.checker; tile size and band scaling are in the model's metadata. "
        "`semisup predict --model student.onnx` runs it without PyTorch's SAM stack.",
    ),
    "run": Stage(
        "run the whole pipeline a config enables as one resumable job (skips what is done)",
        "semisup run --config cluster/smoke.yaml --out runs/smoke --local",
        "semisup.pipeline",
        "Runs prep, stream, zero-shot, teacher, pseudo-label, student and evaluate (or the stages "
        "pipeline.stages names) into pipeline.out. A stage whose outputs exist and whose config "
        "sections are unchanged is skipped; an interrupted one resumes. Inside `ray job submit` "
        "it joins the job's cluster; --local starts a Ray on this machine.",
    ),
    "submit": Stage(
        "submit a command as a Ray job (code shipped without data or outputs), stream its logs",
        "semisup submit --address http://127.0.0.1:8265 -- semisup run --config cluster/smoke.yaml",
        "semisup.submit",
        "A thin wrapper over Ray's job SDK: working_dir is the current folder minus .venv, .git, "
        "data and outputs; exits with the job's status.",
    ),
    "tune": Stage(
        "search LoRA ranks, fine-tuning modes, augmentations... with Ray Tune and ASHA, resumably",
        "semisup tune --store dubai.zarr --space lora_rank --out runs/tune_rank",
        "semisup.tune",
        "Trains one student per trial of a named search space (tune_spaces/), stops trials "
        "that trail on validation mIoU (ASHA), and writes trials.csv/.json, summary.md, "
        "tune_plot.png, best_config.yaml and best_adapter.safetensors to --out.",
    ),
    "demo": Stage(
        "run the whole pipeline on built-in settings and small real or generated data",
        "semisup demo --out demo_out",
        "semisup.demo",
        "Runs every stage on one machine with a local Ray, in a few minutes on 2 CPUs, then one "
        "active-learning round (the proposals labelled from the ground truth the split hides, "
        "imported as a new label version, the stages that train on labels rerun), and a Faster "
        "R-CNN student compared with the SAM student. Uses the Dubai imagery and NEON crowns in "
        "../shared/data when present, generated scenes otherwise.",
    ),
}


def _stage_function(stage: Stage, name: str) -> Callable[..., object]:
    return getattr(importlib.import_module(stage.module), name)  # type: ignore[no-any-return]


def build_parser(full_stages: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only stages in ``full_stages`` (default: all) get their flags."""
    full = set(STAGES if full_stages is None else full_stages)
    parser = argparse.ArgumentParser(
        prog="semisup",
        description="Semi-supervised Segment Anything for aerial imagery, on Ray.",
        epilog="examples:\n  " + "\n  ".join(stage.example for stage in STAGES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(title="stages", dest="command", metavar="COMMAND")
    sub.required = True
    for name, stage in STAGES.items():
        stage_parser = sub.add_parser(
            name,
            help=stage.help,
            description=stage.description or stage.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name not in full:
            continue
        _stage_function(stage, "add_arguments")(stage_parser)
        stage_parser.add_argument(
            "--verbose",
            action="store_true",
            help="show everything Ray logs (its INFO lines, progress bars, worker output); by "
            "default only its warnings and errors about this run",
        )
        if f"semisup {name}" not in (stage_parser.epilog or ""):  # always end with an example
            stage_parser.epilog = (
                f"{stage_parser.epilog or ''}\nexample:\n  {stage.example}".strip()
            )
        stage_parser.formatter_class = argparse.RawDescriptionHelpFormatter
        stage_parser.set_defaults(handler=_stage_function(stage, "run_cli"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``semisup`` command line on ``argv``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser([chosen] if chosen in STAGES else []).parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_VARIABLE] = "1"  # read where Ray starts, in this and child processes
    try:
        return int(args.handler(args))
    except Exception as err:
        reported = input_error(err)
        if reported is None:
            raise
        if os.environ.get("SEMISUP_TRACEBACK"):
            traceback.print_exc()
        message = str(reported)
        if reported is not err:  # Ray may append its retry advice on further lines
            message = message.splitlines()[0] if message else type(reported).__name__
        print(f"semisup {args.command}: error: {message}", file=sys.stderr)
        return 2


_INPUT_ERRORS = (ConfigError, ValueError, FileNotFoundError, FileExistsError, OSError)


def input_error(err: BaseException) -> BaseException | None:
    """The error about the user's input behind ``err``, or None for anything else (a bug).

    An input error raised inside a Ray task, actor or Train worker reaches the driver wrapped
    in Ray's own error, whose text carries the remote traceback; the wrapped error is reported
    instead, in its own one line.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _INPUT_ERRORS) and not _is_ray_error(current):
            return current
        cause = getattr(current, "cause", None)  # RayTaskError keeps the remote error here
        current = cause if isinstance(cause, BaseException) else current.__cause__
    return None


def _is_ray_error(err: BaseException) -> bool:
    ray_exceptions = sys.modules.get("ray.exceptions")  # never imports Ray just to ask
    return ray_exceptions is not None and isinstance(err, ray_exceptions.RayError)


if __name__ == "__main__":
    sys.exit(main())

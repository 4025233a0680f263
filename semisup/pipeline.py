"""``semisup run``: the whole pipeline as one resumable job.

The stages run in the order of the ``STAGES`` table. Each has a key: a hash of the config
sections that decide its outputs and of the keys of the stages it reads from. A stage whose
outputs exist and whose recorded key matches is skipped; one that was interrupted with the same
key is resumed; a changed key reruns the stage and, through the keys, every stage that reads its
outputs. The run folder (``pipeline.out``) holds::

    OUT/run.json        the run manifest: per stage status (running, done, failed, interrupted),
                        key, attempts, outputs, seconds and result
    OUT/run.log         what each invocation did ("[run] zero-shot: up to date, skipped")
    OUT/config.yaml     the config of the latest invocation
    OUT/store.zarr/     the tile store, with the teacher's pseudo-labels
    OUT/zero_shot/, OUT/teacher/, OUT/student/, OUT/evaluation.{json,md}

To add a stage: write ``def my_stage(context: RunContext) -> dict`` (its result is JSON-safe;
its ``outputs`` key lists the paths it wrote) and add one row to ``STAGES``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from semisup import stages
from semisup.atomic import write_json_atomic
from semisup.config import (
    ConfigError,
    ExperimentConfig,
    add_config_arguments,
    config_from_arguments,
    require_segmentation,
    save_config,
    to_dict,
)
from semisup.stages import RunContext

MANIFEST_FILE = "run.json"
LOG_FILE = "run.log"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline: its function and what decides whether its outputs are current.

    ``sections``: config keys (``"train"``, ``"student.model_type"``) whose values decide the
    outputs. ``needs``: earlier stages whose outputs it cannot run without. ``uses``: earlier
    stages whose results it reads when they ran. Both feed the stage's key, so a change upstream
    reruns it. ``uses_ray``: a Ray runtime is started (or joined) before it runs. ``default``:
    runs when ``pipeline.stages`` is empty.
    """

    run: Callable[[RunContext], dict[str, Any]]
    sections: tuple[str, ...]
    needs: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    uses_ray: bool = True
    default: bool = True
    reads_labels: bool = False


_INPUTS = (
    "pipeline.images",
    "pipeline.labels",
    "pipeline.label_colors",
    "pipeline.class_names",
    "pipeline.generated_scenes",
    "pipeline.scene_size",
)
_MODEL = ("student", "train", "augment", "stream")
_DETECT = tuple(
    f"pipeline.detect_{name}"
    for name in (
        "rasters",
        "boxes",
        "box_classes",
        "tile_size",
        "epochs",
        "steps_per_epoch",
        "batch_size",
        "sam_points_per_side",
    )
)

STAGES: dict[str, Stage] = {
    "prep": Stage(stages.prep, ("prep", *_INPUTS), uses_ray=False),
    "stream": Stage(stages.stream, ("stream",), needs=("prep",)),
    "zero-shot": Stage(
        stages.zero_shot,
        ("student.model_type", "student.checkpoint", "pipeline.zero_shot_tiles"),
        needs=("prep",),
    ),
    "teacher": Stage(stages.teacher, _MODEL, needs=("prep",), reads_labels=True),
    "pseudo-label": Stage(
        stages.pseudo_label, ("pipeline.pseudo_label_gpus",), needs=("prep", "teacher")
    ),
    "student": Stage(
        stages.student, (*_MODEL, "ssl"), needs=("prep",), uses=("pseudo-label",), reads_labels=True
    ),
    "evaluate": Stage(
        stages.evaluate, (), uses=("zero-shot", "teacher", "student"), uses_ray=False
    ),
    "report": Stage(
        stages.report,
        (),
        needs=("teacher", "student"),
        uses=("zero-shot", "pseudo-label"),
        uses_ray=False,
    ),
    "select": Stage(
        stages.select, ("pipeline.select_budget", "pipeline.select_measure"), needs=("student",)
    ),
    "predict": Stage(
        stages.predict, ("pipeline.predict_rasters", "pipeline.predict_vectors"), needs=("student",)
    ),
    "detect": Stage(
        stages.detect,
        (
            "detector",
            "prep",
            "train",
            "ssl",
            "augment",
            "pipeline.generated_scenes",
            "pipeline.scene_size",
            "student.model_type",
            "student.checkpoint",
            "pipeline.pseudo_label_gpus",
            *_DETECT,
        ),
        needs=("prep",),
        default=False,
    ),
    "compare": Stage(
        stages.compare,
        ("pipeline.compare_classes",),
        needs=("student", "detect"),
        uses_ray=False,
        default=False,
    ),
    "tune": Stage(
        stages.tune,
        ("pipeline.tune_space", "pipeline.tune_samples", *_MODEL, "ssl"),
        needs=("prep",),
        uses=("pseudo-label",),
        default=False,
        reads_labels=True,
    ),
}


# ---------------------------------------------------------------------------------------------
# Which stages, and their keys


def enabled_stages(config: ExperimentConfig, table: Mapping[str, Stage] = STAGES) -> list[str]:
    """The stages ``pipeline.stages`` names (default: the table's defaults), in table order."""
    wanted = config.pipeline.stages or tuple(n for n, s in table.items() if s.default)
    unknown = [name for name in wanted if name not in table]
    if unknown:
        raise ConfigError(
            f"pipeline.stages: unknown stage {unknown[0]!r}; known stages: {', '.join(table)}"
        )
    return [name for name in table if name in wanted]


def stage_keys(
    config: ExperimentConfig, table: Mapping[str, Stage] = STAGES, label_version: int = 0
) -> dict[str, str]:
    """Every stage's key: sha256 of its config sections and of its upstream stages' keys, and
    for a stage that ``reads_labels``, of the store's ``label_version`` (0: as prep wrote it;
    the version is left out of the key then, so runs from before label versions stay current).
    """
    plain = to_dict(config)
    keys: dict[str, str] = {}
    for name, stage in table.items():
        upstream = [*stage.needs, *stage.uses]
        missing = [n for n in upstream if n not in keys]
        if missing:
            raise ValueError(f"stage {name!r} reads {missing[0]!r}, which is not before it")
        identity: dict[str, Any] = {
            "stage": name,
            "config": {section: _lookup(plain, section) for section in stage.sections},
            "upstream": {n: keys[n] for n in upstream},
        }
        if stage.reads_labels and label_version:
            identity["label_version"] = label_version
        text = json.dumps(identity, sort_keys=True, default=str)
        keys[name] = hashlib.sha256(text.encode()).hexdigest()
    return keys


def _lookup(plain: Mapping[str, Any], dotted: str) -> Any:
    node: Any = plain
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"stage config section {dotted!r} is not a config key")
        node = node[part]
    return node


# ---------------------------------------------------------------------------------------------
# The run manifest and log


def read_manifest(out: Path) -> dict[str, Any]:
    """The run manifest of ``out`` (an empty one when there is none yet)."""
    path = out / MANIFEST_FILE
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "stages": {}}
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a semisup run manifest (format {MANIFEST_FORMAT})")
    return manifest


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write atomically: a job killed mid-write leaves the previous manifest."""
    write_json_atomic(out / MANIFEST_FILE, manifest)


def outputs_exist(paths: Iterable[str]) -> bool:
    """Whether every path exists (local paths, or storage URLs through fsspec)."""
    for path in paths:
        if "://" in path:
            import fsspec

            fs, bare = fsspec.core.url_to_fs(path)
            if not fs.exists(bare):
                return False
        elif not Path(path).exists():
            return False
    return True


class _RunLog:
    """``[run]`` lines to a stream and, timestamped, to OUT/run.log."""

    def __init__(self, out: Path, stream: TextIO | None) -> None:
        self.path, self.stream = out / LOG_FILE, stream

    def __call__(self, message: str) -> None:
        line = f"[run] {message}"
        if self.stream is not None:
            print(line, file=self.stream, flush=True)
        with self.path.open("a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


# ---------------------------------------------------------------------------------------------
# The runner


def run_folder(config: ExperimentConfig) -> Path:
    """``pipeline.out`` as an absolute path: new, empty, or an earlier run's (with run.json)."""
    if "://" in config.pipeline.out:
        raise ConfigError(
            f"pipeline.out: {config.pipeline.out}: a local or mounted folder is needed "
            "(checkpoints may go to object storage with train.storage)"
        )
    out = Path(config.pipeline.out).absolute()
    if out.is_file():
        raise FileExistsError(f"pipeline.out: {out} is a file, not a run folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise FileExistsError(
            f"run folder {out} is not empty and holds no {MANIFEST_FILE}; remove it or choose "
            "another pipeline.out (--out)"
        )
    return out


def run_pipeline(
    config: ExperimentConfig,
    *,
    local: bool = False,
    debug: bool = False,
    log: TextIO | None = sys.stderr,
    table: Mapping[str, Stage] = STAGES,
) -> dict[str, Any]:
    """Run the enabled stages into ``config.pipeline.out``, skipping those already done.

    ``local``: start a fresh single-node Ray even inside a cluster job (see ``ray_runtime``).
    ``debug``: train in this process. Returns ``out``, ``config``, ``stages`` (each stage's
    result, skipped ones from the manifest), ``ran`` and ``skipped``.
    """
    require_segmentation(config, "run")
    out = run_folder(config)
    names = enabled_stages(config, table)
    check_checkpoint(config)
    if "tune" in names:  # Train inside Tune frees stopped trials through the dashboard's API
        config = dataclasses.replace(config, ray=dataclasses.replace(config.ray, dashboard=True))
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    version = current_label_version(config, out, manifest, stage_keys(config, table))
    keys = stage_keys(config, table, version)
    manifest["name"] = config.name
    records: dict[str, dict[str, Any]] = manifest["stages"]
    say = _RunLog(out, log)
    save_config(config, out / "config.yaml")
    say(f"{config.name}: stages {', '.join(names)} into {out}")
    say(f"code: semisup from {Path(stages.__file__).parent}")
    results = _current_results(records, keys, exclude=names)
    ran: list[str] = []
    skipped: list[str] = []
    ray_on = False  # Ray starts with the first stage that needs it: a rerun that skips all
    with contextlib.ExitStack() as ray_scope:  # stages never starts or joins one
        for name in names:
            stage, key = table[name], keys[name]
            record = records.get(name, {})
            rebuilt = [n for n in (*stage.needs, *stage.uses) if n in ran]
            if _is_current(record, key) and not rebuilt:
                say(f"{name}: up to date, skipped")
                results[name] = record["result"]
                skipped.append(name)
                continue
            missing = [n for n in stage.needs if n not in results]
            if missing:
                raise ConfigError(
                    f"pipeline.stages: {name} needs the outputs of {missing[0]}, which has not "
                    f"run with this config; add {missing[0]} to pipeline.stages"
                )
            resume = record.get("key") == key and record.get("status") != "done" and not rebuilt
            earlier = int(record.get("label_version", 0))
            relabelled = (
                stage.reads_labels
                and earlier != version
                and record.get("key") == (stage_keys(config, table, earlier)[name])
            )  # the config is the same: only the store's labels changed
            say(f"{name}: {_reason(record, key, rebuilt, resume, version if relabelled else None)}")
            if stage.uses_ray and not ray_on:
                _enter_ray(ray_scope, config, local, say)
                ray_on = True
            context = RunContext(
                config=config,
                out=out,
                results=dict(results),
                key=key,
                resume=resume,
                debug=debug,
                log=log,
            )
            records[name] = {
                "key": key,
                "attempts": int(record.get("attempts", 0)) + 1,
                **({"label_version": version} if stage.reads_labels else {}),
            }
            results[name] = _execute(name, stage, context, records[name], manifest, say)
            ran.append(name)
    say(f"finished: {len(ran)} stage(s) ran, {len(skipped)} up to date")
    return {
        "out": str(out),
        "config": to_dict(config),
        "stages": {name: results[name] for name in names},
        "ran": ran,
        "skipped": skipped,
    }


def current_label_version(
    config: ExperimentConfig, out: Path, manifest: Mapping[str, Any], keys: Mapping[str, str]
) -> int:
    """The label version of the run's store (``semisup label import`` raises it), read when the
    run starts; 0 when prep has not written the store yet or will write it again."""
    store = RunContext(config=config, out=out).store
    prep = manifest.get("stages", {}).get("prep", {})
    if "prep" not in keys or not _is_current(prep, keys["prep"]) or not store.is_dir():
        return 0
    from semisup.store import label_version

    return label_version(str(store))


def check_checkpoint(config: ExperimentConfig) -> None:
    """Load ``student.checkpoint`` once, here in the driver, before any stage or worker starts:
    a file that cannot be read, or weights of another model type, fail in one line naming the
    file, and the run folder is left as it was."""
    if config.student.checkpoint is None:
        return
    from semisup.sam import build_sam

    # the checkpoint's position tables are resized to the tile size, as every stage does
    build_sam(
        config.student.model_type,
        image_size=config.prep.tile_size,
        checkpoint=config.student.checkpoint,
    )


def _execute(
    name: str,
    stage: Stage,
    context: RunContext,
    record: dict[str, Any],
    manifest: dict[str, Any],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Run one stage, keeping its manifest ``record`` true at every moment: running, then done,
    failed or interrupted. A process killed outright leaves "running". The next run resumes any
    of these (with the same key)."""
    record.update(status="running", started=_now())
    _write_manifest(context.out, manifest)
    start = time.perf_counter()
    try:
        result = stage.run(context)
    except BaseException as err:
        # Ctrl-C, and `ray job stop` (Ray's driver turns SIGTERM into SystemExit), interrupt
        status = "interrupted" if isinstance(err, KeyboardInterrupt | SystemExit) else "failed"
        record.update(status=status, error=f"{type(err).__name__}: {err}")
        _write_manifest(context.out, manifest)
        say(f"{name}: {status} after {time.perf_counter() - start:.1f} s ({record['error']})")
        raise
    seconds = round(time.perf_counter() - start, 2)
    result = {**result, "seconds": seconds}
    record.update(
        status="done",
        finished=_now(),
        seconds=seconds,
        result=result,
        outputs=list(result.get("outputs", [])),
    )
    _write_manifest(context.out, manifest)
    say(f"{name}: done in {seconds} s")
    return result


def _is_current(record: Mapping[str, Any], key: str) -> bool:
    return (
        record.get("status") == "done"
        and record.get("key") == key
        and outputs_exist(record.get("outputs", []))
    )


def _current_results(
    records: Mapping[str, Mapping[str, Any]], keys: Mapping[str, str], exclude: Iterable[str]
) -> dict[str, Any]:
    """Results of stages not run now whose recorded outputs are current for this config."""
    skip = set(exclude)
    return {
        name: record["result"]
        for name, record in records.items()
        if name not in skip and name in keys and _is_current(record, keys[name])
    }


def _reason(
    record: Mapping[str, Any], key: str, rebuilt: list[str], resume: bool, relabelled: int | None
) -> str:
    if not record:
        return "running ..."
    if rebuilt:
        return f"rerunning, its inputs from {', '.join(rebuilt)} were rebuilt"
    if resume:
        how = "failed" if record.get("status") == "failed" else "interrupted"
        return f"resuming the {how} attempt {record.get('attempts', 1)} ..."
    if relabelled is not None:
        return f"the store's labels changed (label version {relabelled}), rerunning ..."
    if record.get("key") != key:
        return "config changed, rerunning (its earlier outputs are replaced) ..."
    return "outputs missing, rerunning ..."


def _enter_ray(
    scope: contextlib.ExitStack, config: ExperimentConfig, local: bool, say: Callable[[str], None]
) -> None:
    """Start or join Ray for the rest of the run, and say what it has."""
    import ray

    from semisup.runtime import cluster_address, ray_runtime

    address = cluster_address(config.ray, local)
    where = f"joined the Ray cluster at {address}" if address else "started a local Ray"
    started_here = not address and not ray.is_initialized()
    if ray.is_initialized():
        where = "uses the Ray already started in this process"
    scope.enter_context(ray_runtime(config.ray, local=local))
    resources = ray.cluster_resources()  # what the stages can be placed on
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    say(f"{where}: {cpus:g} CPUs, {gpus:g} GPUs")
    if started_here and config.train.use_gpu and gpus == 0:
        raise ConfigError(
            "train.use_gpu: true, but this machine's Ray has no GPU; set train.use_gpu=false"
        )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------------------------------------
# Command line: `semisup run`

EXAMPLE = "semisup run --config cluster/smoke.yaml --out runs/smoke --local"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``semisup run`` flags."""
    parser.add_argument(
        "--out", type=Path, default=None, help="run folder (overrides pipeline.out)"
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help="start a fresh single-node Ray on this machine (dashboard on 127.0.0.1) even when "
        "ray.address or RAY_ADDRESS names a cluster",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="run the training loops in this process (no Train worker processes): pdb works",
    )
    add_config_arguments(parser)
    parser.epilog = (
        "Stages run in this order; pipeline.stages picks some: "
        + ", ".join(STAGES)
        + f".\nA rerun skips the stages that are up to date.\n\nexample:\n  {EXAMPLE}"
    )


def run_cli(args: argparse.Namespace) -> int:
    """Run the pipeline the config enables; returns the exit status."""
    config = config_from_arguments(args)
    pipeline = config.pipeline
    if args.out is not None:
        pipeline = dataclasses.replace(pipeline, out=str(args.out))
    ray_config = config.ray
    if args.local:
        ray_config = dataclasses.replace(ray_config, dashboard=True)
    config = dataclasses.replace(config, pipeline=pipeline, ray=ray_config)
    summary = run_pipeline(config, local=args.local, debug=args.debug)
    if "evaluate" in summary["stages"]:
        print("\n".join(stages.comparison_table(summary["stages"]["evaluate"]["rows"])))
    print(f"run folder: {summary['out']} (manifest {MANIFEST_FILE}, log {LOG_FILE})")
    return 0

"""``semisup train``: the student on Ray Train (TorchTrainer, DDP), with reports and resumption.

This is the driver side: it checks the config against the store, fixes each split's tile ids and
starts the workers. The per-worker loop is ``semisup.train_loop``; what a step optimises is
``semisup.steps``; which tiles a step sees is ``semisup.sampling``; what a checkpoint holds is
``semisup.train_state``. ``task: detection`` trains the box student the same way; its checks
and hooks are ``semisup.detection.train_task``.

Three promises, each tested: the same seed gives bit-identical weights (1 worker, N workers or
``--debug``); a run restarted from a checkpoint, by Ray Train after a lost worker or by
``--resume`` after a stopped driver, ends with the weights of an uninterrupted run; and N workers
take the step one worker takes on the same global batch (plain SGD parameters equal to 1e-5).
On GPUs, atomic adds in some backward kernels (scatter, index_add, interpolation backward) are
not deterministic; ``torch.use_deterministic_algorithms(True)`` with
``CUBLAS_WORKSPACE_CONFIG=:4096:8`` removes that at some speed.

Run folder layout (``--out RUN_DIR``)::

    RUN_DIR/config.yaml          the experiment config of the run
    RUN_DIR/report.json          validation metrics per epoch, best epoch, best checkpoint path
    RUN_DIR/report.md            the same as a table
    RUN_DIR/tensorboard/         TensorBoard event files (loss parts, mIoU, per-class IoU)
    RUN_DIR/best/                adapter.safetensors (detection: detector.pt) + metrics.json of
                                 the best validation epoch
    RUN_DIR/ray/train/           Ray Train checkpoints (latest two), used to resume; elsewhere
                                 with train.storage (a path or a storage URL Ray accepts)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from semisup import columns as C
from semisup.config import (
    ConfigError,
    ExperimentConfig,
    add_config_arguments,
    config_from_arguments,
    save_config,
    to_dict,
)
from semisup.store import (
    StoreFacts,
    current_labels,
    open_store,
    read_tile_index,
    store_facts,
)
from semisup.train_loop import (
    ADAPTER_FILE,
    scaled_lr,
    train_loop_per_worker,
    write_report_files,
)

__all__ = [
    "ADAPTER_FILE",
    "NodeLostError",
    "check_store_for",
    "run_training",
    "scaled_lr",
    "write_report_files",
]

RAY_RUN_NAME = "train"  # fixed: Ray resumes a run by its name and storage path
# ray.placement -> the workers' placement group. Spread is strict, one worker per node: Ray's
# soft SPREAD put both workers of a two-worker group on one of two nodes (Ray 2.60, measured)
PLACEMENT_STRATEGY = {"pack": "PACK", "spread": "STRICT_SPREAD"}
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train's wait per group start
DEFAULT_START_TIMEOUT_S = 60.0  # Ray Train 2.60's default for START_TIMEOUT_ENV


class NodeLostError(RuntimeError):
    """Training lost a node and no node took its place in time; the message names the node and
    the checkpoint a rerun resumes from."""


# ---------------------------------------------------------------------------------------------
# Driver side


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """A run folder is reused only with ``resume``; a resume needs an earlier run there."""
    started = (run_dir / "config.yaml").exists()
    if started and not resume:
        raise FileExistsError(
            f"run folder {run_dir} already holds a run; pass --resume to continue it or choose "
            "another --out"
        )
    if resume and not started:
        raise FileNotFoundError(f"--resume: no run to continue in {run_dir} (no config.yaml)")


def check_store_for(config: ExperimentConfig, facts: Mapping[str, Any], store: str) -> None:
    """The store (``facts`` of ``store_facts``) has what ``config`` trains on, or an error."""
    if config.ssl.enabled and config.ssl.uses_pseudo_labels and not facts["has_pseudo_labels"]:
        raise ConfigError(
            f"ssl.target={config.ssl.target!r} needs pseudo-labels in {store}; run "
            "`semisup pseudo-label` first or set ssl.target=ema"
        )
    if (
        config.ssl.enabled
        and config.ssl.uses_pseudo_labels
        and facts["pseudo_label_mode"] != "semantic"
    ):
        raise ConfigError(
            f"ssl.target={config.ssl.target!r} needs class pseudo-labels, but the store's were "
            f"made in {facts['pseudo_label_mode']!r} mode; run `semisup pseudo-label --mode "
            "semantic` with a fine-tuned teacher, or set ssl.target=ema"
        )
    for split in (C.LABELED, C.VAL):
        if facts["tiles_per_split"].get(split, 0) == 0:
            raise ValueError(f"store {store}: the {split!r} split has no tiles")
    if config.ssl.enabled and config.ssl.threshold_mode == "calibrated":
        calibrated_threshold(config.ssl.calibration_run)  # readable, and measured
    if config.train.init_from is not None:
        check_warm_start(config, facts)


def calibrated_threshold(run: str | None) -> float:
    """The confidence above which the teacher run ``run`` was 90 % right on its validation
    tiles, as its best epoch measured it (``best/metrics.json``), or an error naming the key."""
    key = "ssl.calibration_run"
    if run is None:
        raise ConfigError(
            f"ssl.threshold_mode='calibrated' needs {key}: the teacher's run folder, whose "
            "validation measured its calibration"
        )
    path = Path(run) / "best" / "metrics.json"
    if not path.is_file():
        raise ConfigError(f"{key}={run!r}: no {path} (expected a `semisup train` run folder)")
    measured = json.loads(path.read_text()).get("calibration") or {}
    if measured.get("threshold") is None:
        raise ConfigError(
            f"{key}={run!r}: its best epoch never reached {measured.get('target_accuracy', 0.9)} "
            "accuracy at any confidence on the validation tiles; choose freematch, flexmatch, "
            "softmatch or fixed"
        )
    return float(measured["threshold"])


def check_oracle(store: str, unlabeled_ids: Sequence[int]) -> None:
    """``ssl.target=oracle`` needs ground truth on every unlabeled tile's source."""
    index = read_tile_index(store).to_pandas().set_index(C.TILE_ID)
    root = open_store(store)
    sources = sorted(set(index.loc[list(unlabeled_ids), C.SOURCE]))
    labels = current_labels(root)
    bare = [source for source in sources if labels.array_name(root[source]) is None]  # type: ignore[arg-type]
    if bare:
        raise ConfigError(
            f"ssl.target='oracle' trains on the unlabeled tiles' ground truth, but source "
            f"{bare[0]!r} of {store} has no labels; give the run explicit splits of labelled "
            "tiles (as the label-efficiency experiment does)"
        )


def init_adapter(init_from: str) -> Path:
    """The adapter file ``train.init_from`` names: the file itself, or a run folder's best."""
    path = Path(init_from)
    return path / "best" / ADAPTER_FILE if path.is_dir() else path


def check_warm_start(config: ExperimentConfig, facts: Mapping[str, Any]) -> None:
    """``train.init_from`` is an adapter for the student ``config`` builds on the store of
    ``facts``, or an error naming what differs."""
    from semisup.student import AdapterError, read_adapter_spec

    init_from = str(config.train.init_from)
    path = init_adapter(init_from)
    if not path.is_file():
        raise ConfigError(
            f"train.init_from={init_from!r}: no adapter at {path} (expected an "
            f"{ADAPTER_FILE} or a run folder with best/{ADAPTER_FILE})"
        )
    try:
        spec = read_adapter_spec(path)
    except AdapterError as err:
        raise ConfigError(f"train.init_from={init_from!r}: {err}") from err
    student = config.student
    wanted = {
        "model_type": student.model_type,
        "mode": student.mode,
        "hires_path": student.hires_path,
        "num_classes": int(facts["num_classes"]),
        "image_size": int(facts["tile_size"]),
    }
    if student.mode == "lora":
        wanted |= {"lora_rank": student.lora_rank, "lora_targets": student.lora_targets}
    differs = {k: (getattr(spec, k), v) for k, v in wanted.items() if getattr(spec, k) != v}
    if differs:
        what = ", ".join(f"{k} {a!r} (config: {b!r})" for k, (a, b) in differs.items())
        raise ConfigError(f"train.init_from={init_from!r}: the adapter has {what}")


def segmentation_facts(
    store: str, config: ExperimentConfig, splits: Mapping[str, Sequence[int]] | None
) -> tuple[StoreFacts, dict[str, list[int]]]:
    """``store_facts`` and each split's tile ids for the SAM student, checked against
    ``config`` (``check_store_for``, the base checkpoint); or an error naming what is wrong."""
    from semisup.pipeline import check_checkpoint

    facts = store_facts(store)
    tile_ids = split_tile_ids(store, config, splits)
    facts["tiles_per_split"] = {name: len(ids) for name, ids in tile_ids.items()}
    check_store_for(config, facts, store)
    if config.ssl.enabled and config.ssl.threshold_mode == "calibrated":
        facts["calibrated_threshold"] = calibrated_threshold(config.ssl.calibration_run)
    check_checkpoint(config)  # a base checkpoint that cannot be read fails here, not in a worker
    return facts, tile_ids


def split_tile_ids(
    store: str, config: ExperimentConfig, splits: Mapping[str, Sequence[int]] | None
) -> dict[str, list[int]]:
    """The tile ids of every split (the store's, or ``splits``), without all-nodata tiles."""
    index = read_tile_index(store).to_pandas()
    if config.stream.skip_nodata:
        index = index[index[C.VALID_FRACTION] > 0]
    if splits is None:
        return {
            name: sorted(int(i) for i in index.loc[index[C.SPLIT] == name, C.TILE_ID])
            for name in C.SPLITS
        }
    known = {int(i) for i in index[C.TILE_ID]}
    return {
        name: sorted(int(i) for i in splits.get(name, ()) if int(i) in known) for name in C.SPLITS
    }


def check_batches(
    config: ExperimentConfig, counts: Mapping[str, int], workers: int, use_unlabeled: bool
) -> None:
    """Every training split fills a global batch, and CutMix pairs stay on one worker."""
    train, ssl = config.train, config.ssl
    wanted = {C.LABELED: ("train.batch_size", train.batch_size)}
    if use_unlabeled:
        unlabeled_batch = train.batch_size * ssl.unlabeled_batch_ratio
        wanted[C.UNLABELED] = ("ssl.unlabeled_batch_ratio", unlabeled_batch)
    for split, (key, global_batch) in wanted.items():
        if counts.get(split, 0) < global_batch:
            raise ConfigError(
                f"{key}: the {split!r} split has {counts.get(split, 0)} tiles, fewer than one "
                f"global batch of {global_batch}; lower {key}"
            )
    per_worker = train.batch_size * ssl.unlabeled_batch_ratio // workers
    cutmix = config.task == "segmentation" and config.augment.cutmix_prob > 0  # not on boxes
    if use_unlabeled and cutmix and workers > 1 and per_worker % 2:
        raise ConfigError(
            f"augment.cutmix_prob={config.augment.cutmix_prob}: CutMix pairs neighbouring "
            f"samples of the global batch, so each worker needs an even unlabeled batch, got "
            f"{per_worker}; change train.batch_size, ssl.unlabeled_batch_ratio or "
            "train.num_workers, or set augment.cutmix_prob=0"
        )


def run_training(
    store: str,
    config: ExperimentConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    debug: bool = False,
    callbacks: Sequence[Any] = (),
    splits: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Train the student on the store's splits; returns the final report (also in run_dir).

    ``splits`` replaces the store's split of the tiles with explicit tile ids per split name
    (``labeled``, ``unlabeled``, ``val``), as an experiment over label fractions needs; a split
    it leaves out has no tiles.

    ``callbacks``: Ray Train callbacks for the run, e.g. Tune's ``TuneReportCallback`` when the
    run is a Tune trial. Every epoch reports ``miou``, ``epoch``, ``epochs_done`` and
    ``train_loss``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    run_dir = run_dir.resolve()
    check_run_dir(run_dir, resume)
    num_workers = 0 if debug else config.train.num_workers
    facts: Mapping[str, Any]
    if config.task == "detection":
        from semisup.detection.train_task import detection_facts

        facts, tile_ids = detection_facts(store, config, splits)  # refuses a store without boxes
    else:
        facts, tile_ids = segmentation_facts(store, config, splits)
    use_unlabeled = config.ssl.enabled and facts["tiles_per_split"].get(C.UNLABELED, 0) > 0
    check_batches(config, facts["tiles_per_split"], max(num_workers, 1), use_unlabeled)
    if use_unlabeled and config.task == "segmentation" and config.ssl.target == "oracle":
        check_oracle(store, tile_ids[C.UNLABELED])
    if num_workers and str(store).startswith("memory://"):
        raise ValueError(
            f"store {store}: a memory:// store exists only in this process; train on it with "
            "--debug, or write it to disk"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    init = config.train.init_from
    storage = config.train.storage or str(run_dir / "ray")
    trainer = TorchTrainer(
        train_loop_per_worker,  # type: ignore[arg-type]
        train_loop_config={
            "experiment": to_dict(config),
            "facts": facts,
            "run_dir": str(run_dir),
            "store": store,
            "storage_options": None,
            "splits": tile_ids,
            "use_unlabeled": use_unlabeled,
            # Unbiased Teacher's pseudo-boxes come from an EMA teacher: detection always has one
            "use_ema_teacher": use_unlabeled
            and (config.task == "detection" or config.ssl.uses_ema_teacher),
            "read_pseudo_labels": config.task == "segmentation" and config.ssl.uses_pseudo_labels,
            "init_adapter": None if init is None else str(init_adapter(init)),
            # Ray Train's in-process mode keeps no checkpoint: the loop writes them there itself
            "local_checkpoints": None if num_workers else f"{storage.rstrip('/')}/{RAY_RUN_NAME}",
        },
        # one worker process per model replica; each reads its own tiles from the store
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=config.train.use_gpu,
            resources_per_worker=None
            if config.train.use_gpu
            else {"CPU": config.train.cpus_per_worker},
            # the workers' placement group: on as few nodes as fit, or one node each (a group
            # larger than the cluster waits for nodes, then fails after train.node_wait_s)
            placement_strategy=PLACEMENT_STRATEGY[config.ray.placement],
        ),
        # a fixed name under the run folder: rerunning with it resumes from the latest checkpoint
        run_config=ray.train.RunConfig(
            name=RAY_RUN_NAME,
            storage_path=storage,
            failure_config=failure_config(config.train.max_failures, config.train.node_wait_s),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )
    print(
        f"[train] {num_workers or 'in-process'} worker(s), lr {scaled_lr(config):.2e}, "
        f"run folder {run_dir}",
        file=sys.stderr,
    )
    result = fit_or_name_lost_nodes(trainer, storage, config.train.node_wait_s)
    report = getattr(result, "return_value", None)  # rank 0's value (Ray Train V2)
    if not isinstance(report, dict):
        return json.loads((run_dir / "report.json").read_text())
    write_report_files(run_dir, report)
    return report


# ---------------------------------------------------------------------------------------------
# Lost nodes


def failure_config(max_failures: int, node_wait_s: float) -> Any:
    """Ray Train's failure handling: ``max_failures`` restarts of a failed worker group, and
    group starts retried for about ``node_wait_s`` seconds.

    A worker group whose node is lost fails (one of ``max_failures``); its replacement waits for
    resources, and each start that times out (``START_TIMEOUT_ENV`` seconds) is a controller
    failure, which Ray Train retries without end unless limited: the limit makes a cluster that
    never gets a node back fail instead of waiting forever.
    """
    import ray.train

    start_timeout_s = float(os.environ.get(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S))
    # Train V2's FailureConfig at run time; type checkers see the older one without the limit
    return ray.train.FailureConfig(  # type: ignore[call-arg]
        max_failures=max_failures,
        controller_failure_limit=max(1, math.ceil(node_wait_s / start_timeout_s)),
    )


def alive_nodes() -> dict[str, dict[str, Any]]:
    """The cluster's alive nodes by id: address and the resources they offered."""
    import ray

    return {
        node["NodeID"]: {"address": node["NodeManagerAddress"], "resources": node["Resources"]}
        for node in ray.nodes()
        if node["Alive"]
    }


def latest_checkpoint(storage: str) -> str | None:
    """The newest Ray Train checkpoint of the run in ``storage`` (a path or URL), or None."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    selector = pyarrow.fs.FileSelector(f"{root.rstrip('/')}/{RAY_RUN_NAME}", allow_not_found=True)
    names = sorted(
        info.base_name
        for info in fs.get_file_info(selector)
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")
    )  # Ray names them checkpoint_<timestamp>: the last sorts last
    if not names:
        return None
    # shown without the URL's query and credentials (an endpoint, keys)
    url = urllib.parse.urlsplit(storage)
    where = storage if not url.scheme else f"{url.scheme}://{url.hostname or ''}{url.path}"
    return f"{where.rstrip('/')}/{RAY_RUN_NAME}/{names[-1]}"


def describe_node(node_id: str, node: Mapping[str, Any]) -> str:
    """``node ID (ADDRESS, custom resources ...)``: what an operator finds the node by."""
    labels = sorted(
        name
        for name in node["resources"]
        if name not in ("CPU", "GPU", "memory", "object_store_memory")
        and not name.startswith("node:")
    )
    extra = f", resources {', '.join(labels)}" if labels else ""
    return f"node {node_id} ({node['address']}{extra})"


def fit_or_name_lost_nodes(trainer: Any, storage: str, node_wait_s: float) -> Any:
    """``trainer.fit()``; when it fails after a node of the cluster died, a ``NodeLostError``
    naming the node(s) and the latest checkpoint instead of Ray Train's own error."""
    import ray.train

    before = alive_nodes()
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as err:
        lost = {node_id: node for node_id, node in before.items() if node_id not in alive_nodes()}
        if not lost:
            raise
        checkpoint = latest_checkpoint(storage)
        resume = (
            f"the latest checkpoint, {checkpoint}, is kept: rerun the same command (semisup "
            "run, or semisup train --resume) to continue from it"
            if checkpoint
            else f"no checkpoint had been written to {storage}: a rerun starts over"
        )
        raise NodeLostError(
            f"training lost {'; '.join(describe_node(i, n) for i, n in lost.items())} and the "
            f"remaining nodes could not host its workers within train.node_wait_s={node_wait_s:g} "
            f"s; {resume}"
        ) from err


# ---------------------------------------------------------------------------------------------
# Command line


EXAMPLE = "semisup train --store dubai.zarr --out runs/decoder --set student.mode=decoder --set train.epochs=5"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="tile store (path or fsspec URL)")
    parser.add_argument(
        "--out", type=Path, required=True, help="run folder for reports and checkpoints"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="run the per-worker loop in this process (no worker processes): breakpoints and pdb work",
    )
    add_config_arguments(parser)


def run_cli(args: argparse.Namespace) -> int:
    from semisup.runtime import ray_runtime

    config = config_from_arguments(args)
    with ray_runtime(config.ray):
        report = run_training(args.store, config, args.out, resume=args.resume, debug=args.debug)
    score, name = ("best_ap", "box AP") if config.task == "detection" else ("best_miou", "mIoU")
    print(
        f"best validation {name} {report[score]:.4f} at epoch {report['best_epoch']}; "
        f"report in {args.out / 'report.md'}"
    )
    return 0

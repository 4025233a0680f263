"""The per-worker function of ``semisup train``: build, stream, run an epoch, end an epoch.

Ray Train starts ``train_loop_per_worker`` in every worker (or in the driver with
``--debug``). It only wires things together; what the model learns is decided in
``semisup.steps``, which tiles each step sees in ``semisup.sampling``, and what a checkpoint
holds in ``semisup.train_state``.

Both tasks run this loop: run folder, seeded feeds, checkpoints and resumption, early stopping
and report files are shared. What differs is a ``TaskHooks`` object: its model, the columns it
reads, its step, its validation score and its best-epoch weights (``SegmentationTask`` here,
``semisup.detection.train_task.DetectionTask`` for boxes).

Why the loop reads its tiles by id instead of taking Ray Data's streaming split: the split hands
blocks to workers as they ask and drops rows to equalise them, so which tiles a worker sees
depends on task timing and on the worker count. Here every pass is a seeded permutation of the
split's tile ids, every step takes the next global batch of it, and every rank a fixed share of
that batch (``semisup.sampling``). A run is then reproducible bit for bit, N workers take the
step one worker takes, and the data position of a checkpoint is its step. The cost is that a
worker reads from the store itself (``semisup.tile_reader``; one background thread reads the
next batch while the step runs) rather than through Ray Data's read tasks.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from semisup import columns as C
from semisup.atomic import write_json_atomic
from semisup.calibration import CALIBRATION_BINS, TARGET_ACCURACY, calibration
from semisup.collective import Collective, current_collective
from semisup.config import ExperimentConfig, from_dict
from semisup.metrics import scores
from semisup.model_input import prepare_batch
from semisup.sampling import (
    SHARED_RANK,
    DataPosition,
    SeedPurpose,
    SplitOrder,
    sample_keys,
    validation_share,
    worker_seed,
)
from semisup.steps import StepRecipe, train_step, unwrap, validation_counts
from semisup.store import band_scales
from semisup.thresholds import initial_statistics
from semisup.tile_reader import TileReader
from semisup.train_state import (
    STATE_FILE,
    Trainables,
    TrainState,
    load_checkpoint,
    save_checkpoint,
)

ADAPTER_FILE = "adapter.safetensors"
LR_REFERENCE_BATCH = 8  # lr is given for this global batch; scaled linearly (Goyal et al. 2017)
VALIDATION_BATCH = 16  # tiles per validation forward pass
SGD_MOMENTUM = 0.9
LABELED_COLUMNS = (C.IMAGE, C.LABEL, C.VALID, C.SOURCE, C.TILE_ID)
# LABEL of unlabeled tiles: ground truth a split hides (an experiment's pool), IGNORE_INDEX
# elsewhere; it measures the targets (pseudo_accuracy) and is the oracle's target, never trained on
UNLABELED_COLUMNS = (C.IMAGE, C.VALID, C.LABEL, C.SOURCE, C.TILE_ID)
PSEUDO_COLUMNS = (C.PSEUDO_LABEL, C.CONFIDENCE)
BandScale = Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]]


def scaled_lr(config: ExperimentConfig) -> float:
    """The learning rate for the global batch: lr × batch_size / LR_REFERENCE_BATCH."""
    return config.train.lr * config.train.batch_size / LR_REFERENCE_BATCH


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(config: ExperimentConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters, at the linearly scaled learning rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr, decay = scaled_lr(config), config.train.weight_decay
    if config.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=decay)


# ---------------------------------------------------------------------------------------------
# Batches of a training split


@dataclass
class SplitFeed:
    """This rank's batches of one training split: its seeded order, read by tile id."""

    name: str
    reader: TileReader
    order: SplitOrder
    key_seed: int  # the run's seed: sample keys are drawn per step from it
    key_purpose: SeedPurpose
    rank: int
    world: int

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This rank's share of global step ``step``, with each sample's augmentation key."""
        ids, start = self.order.rank_share(step, self.rank, self.world)
        batch = self.reader.read(ids)
        keys = sample_keys(self.key_seed, self.key_purpose, step, len(ids), start)
        batch[C.SAMPLE_KEY] = keys.numpy()
        return batch


def prefetched(
    feeds: list[SplitFeed | None], first: int, last: int
) -> Iterator[list[dict[str, np.ndarray] | None]]:
    """The batches of steps ``first .. last-1``; a thread reads step s+1 while s trains."""

    def read(step: int) -> list[dict[str, np.ndarray] | None]:
        return [None if feed is None else feed.batch(step) for feed in feeds]

    if first >= last:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="semisup-read") as pool:
        pending: Future[list[dict[str, np.ndarray] | None]] = pool.submit(read, first)
        for step in range(first, last):
            batches = pending.result()
            if step + 1 < last:
                pending = pool.submit(read, step + 1)
            yield batches


# ---------------------------------------------------------------------------------------------
# The run of one worker


class LocalCheckpoints:
    """Checkpoints of an in-process (``--debug``) run, which Ray Train's local mode does not keep.

    They go where Ray Train puts a run's checkpoints (``STORAGE/train/checkpoint_<time>``, a path
    or an fsspec URL), the latest ``keep``, so ``--debug --resume`` continues a debug run.
    """

    def __init__(self, location: str, keep: int = 2) -> None:
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(location)
        self.keep = keep

    def _saved(self) -> list[str]:
        found = self.fs.glob(f"{self.root.rstrip('/')}/checkpoint_*/{STATE_FILE}")
        return sorted(str(path).rsplit("/", 1)[0] for path in found)

    def latest(self) -> Path | None:
        """A local folder holding the latest checkpoint, or None."""
        saved = self._saved()
        if not saved:
            return None
        from fsspec.implementations.local import LocalFileSystem

        if isinstance(self.fs, LocalFileSystem):
            return Path(saved[-1])
        local = Path(tempfile.mkdtemp(prefix="semisup-checkpoint-"))
        self.fs.get(f"{saved[-1]}/{STATE_FILE}", str(local / STATE_FILE))
        return local

    def persist(self, folder: Path) -> None:
        """Copy ``folder`` in as the newest checkpoint; drop those past ``keep``.

        Written under a temporary name and renamed once complete, so a driver stopped while it
        writes leaves the previous checkpoints as the latest.
        """
        from datetime import datetime

        name = f"checkpoint_{datetime.now().strftime('%Y-%m-%d_%H-%M-%S.%f')}"  # Ray's naming
        root = self.root.rstrip("/")
        partial = f"{root}/.{name}.partial"
        self.fs.makedirs(partial, exist_ok=True)
        self.fs.put(str(folder / STATE_FILE), f"{partial}/{STATE_FILE}")
        self.fs.mv(partial, f"{root}/{name}", recursive=True)
        for old in self._saved()[: -self.keep]:
            self.fs.rm(old, recursive=True)


@dataclass
class WorkerRun:
    """Everything one worker holds while it trains."""

    config: ExperimentConfig
    facts: dict[str, Any]
    run_dir: Path
    rank: int
    world: int
    device: torch.device
    collective: Collective
    model: torch.nn.Module  # DDP-wrapped when world > 1
    trainables: Trainables
    feeds: dict[str, SplitFeed]
    val_reader: TileReader | None
    val_share: np.ndarray  # this rank's validation tile ids (semisup.sampling)
    band_scale: BandScale
    task: TaskHooks
    state: TrainState = field(default_factory=TrainState)
    writer: Any = None
    local_checkpoints: LocalCheckpoints | None = None  # --debug: Ray keeps none in local mode
    started: float = field(default_factory=time.perf_counter)

    @property
    def total_steps(self) -> int:
        return self.config.train.epochs * self.config.train.steps_per_epoch

    def positions(self, step: int) -> dict[str, DataPosition]:
        return {name: feed.order.position(step) for name, feed in self.feeds.items()}


class TaskHooks(Protocol):
    """What a task adds to the shared loop: its model, columns, step, score and best weights."""

    score: str  # the validation figure the best epoch and early stopping follow ("miou", "ap")
    epoch_keys: tuple[str, ...]  # validation figures an epoch of the report keeps
    best_file: str  # the best epoch's weights, in RUN_DIR/best
    halo: int  # pixels read around each tile

    def build(
        self,
        config: ExperimentConfig,
        facts: Mapping[str, Any],
        loop_config: dict[str, Any],
        device: torch.device,
    ) -> Trainables:
        """The model (on ``device``, same on every worker), its optimiser, teacher, state."""
        ...

    def columns(
        self, loop_config: dict[str, Any]
    ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """The columns read of labeled, unlabeled and validation tiles."""
        ...

    def step(
        self,
        run: WorkerRun,
        labeled: dict[str, np.ndarray],
        unlabeled: dict[str, np.ndarray] | None,
    ) -> dict[str, float]:
        """One optimiser step on this rank's batches; the loss and its parts."""
        ...

    def validate(self, run: WorkerRun) -> dict[str, Any]:
        """Validation figures over every rank's share (equal on every rank)."""
        ...

    def save_weights(self, model: torch.nn.Module, path: Path) -> None: ...

    def log_validation(self, writer: Any, metrics: dict[str, Any], step: int) -> None: ...

    def describe(self, config: ExperimentConfig) -> dict[str, Any]:
        """The model's description in the report."""
        ...


class SegmentationTask:
    """The SAM student: class maps, mIoU, adapters (``semisup.steps``, ``semisup.student``)."""

    score = "miou"
    epoch_keys: tuple[str, ...] = ("miou", "dice", "pixel_accuracy", "iou_per_class", "calibration")
    best_file = ADAPTER_FILE

    def __init__(self, config: ExperimentConfig, loop_config: dict[str, Any]) -> None:
        facts = loop_config["facts"]
        self.halo = config.stream.halo
        self.class_names = list(facts["class_names"])
        self.recipe = StepRecipe(
            config.ssl,
            config.augment,
            int(facts["num_classes"]),
            config.train.dice_weight,
            facts.get("calibrated_threshold"),
        )

    def build(
        self,
        config: ExperimentConfig,
        facts: Mapping[str, Any],
        loop_config: dict[str, Any],
        device: torch.device,
    ) -> Trainables:
        from semisup.ema import make_ema_teacher

        model = build_model(config, facts, loop_config["init_adapter"]).to(device)
        teacher = make_ema_teacher(model) if loop_config["use_ema_teacher"] else None
        trainables = Trainables(model, build_optimizer(config, model), teacher)
        if loop_config["use_unlabeled"]:  # the adaptive thresholds' statistics, checkpointed
            trainables.ssl_state = initial_statistics(int(facts["num_classes"]), device)
        return trainables

    def columns(
        self, loop_config: dict[str, Any]
    ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        pseudo = PSEUDO_COLUMNS if loop_config["read_pseudo_labels"] else ()
        return LABELED_COLUMNS, UNLABELED_COLUMNS + pseudo, LABELED_COLUMNS

    def step(
        self,
        run: WorkerRun,
        labeled: dict[str, np.ndarray],
        unlabeled: dict[str, np.ndarray] | None,
    ) -> dict[str, float]:
        train = run.config.train
        autocast = torch.bfloat16 if (train.bf16 and run.device.type == "cuda") else None
        return train_step(
            run.model,
            run.trainables.optimizer,
            prepare_batch(labeled, run.band_scale, run.device),
            None if unlabeled is None else prepare_batch(unlabeled, run.band_scale, run.device),
            teacher=run.trainables.teacher,
            recipe=self.recipe,
            step=run.state.step,
            autocast_dtype=autocast,
            collective=run.collective,
            ssl_state=run.trainables.ssl_state,
        )

    def validate(self, run: WorkerRun) -> dict[str, Any]:
        return validate(run)

    def save_weights(self, model: torch.nn.Module, path: Path) -> None:
        from semisup.student import save_adapter

        save_adapter(model, path)  # type: ignore[arg-type]

    def log_validation(self, writer: Any, metrics: dict[str, Any], step: int) -> None:
        _log_segmentation(writer, metrics, self.class_names, step)

    def describe(self, config: ExperimentConfig) -> dict[str, Any]:
        return {"mode": config.student.mode, "model_type": config.student.model_type}


def task_hooks(config: ExperimentConfig, loop_config: dict[str, Any]) -> TaskHooks:
    """The hooks of ``config.task``."""
    if config.task == "detection":
        from semisup.detection.train_task import DetectionTask

        return DetectionTask(config, loop_config)
    return SegmentationTask(config, loop_config)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's per-worker function: build, restore, loop, validate, stop early, report."""
    import ray.train

    run = build_worker_run(loop_config)
    restore(run, ray.train.get_checkpoint())
    if run.state.initial is None:  # the baseline early stopping must beat
        run.state.initial = run.task.validate(run)
        run.state.reference_score = run.state.initial[run.task.score]
    epochs = range(run.state.epoch, 0 if run.state.stopped_early else run.config.train.epochs)
    for epoch in epochs:
        run_epoch(run, epoch)
        if end_epoch(run, epoch):
            break
    if run.writer is not None:
        run.writer.close()
    # rank 0's report reaches the driver too, which may be on another node than rank 0
    return build_report(run) if run.rank == 0 else None


def build_model(
    config: ExperimentConfig, facts: Mapping[str, Any], init_adapter: str | None
) -> torch.nn.Module:
    """The student before its first step: the same on every worker (seeded), warm-started from
    ``init_adapter`` where given (a run checks it in the driver: ``train.check_warm_start``)."""
    from semisup.student import build_student, load_adapter

    student = config.student
    # train.seed itself, not a derived seed: without a base checkpoint the frozen base is drawn
    # from it, and every stage that rebuilds the student from an adapter (teacher, evaluate,
    # predict, select) draws the same base the same way
    torch.manual_seed(config.train.seed)
    model = build_student(
        student.model_type,
        int(facts["num_classes"]),
        int(facts["tile_size"]),
        checkpoint=student.checkpoint,
        mode=student.mode,
        lora_rank=student.lora_rank,
        lora_alpha=student.lora_alpha,
        lora_dropout=student.lora_dropout,
        lora_targets=student.lora_targets,
        hires_path=student.hires_path,
        attention=student.attention,
    )
    if init_adapter is not None:
        load_adapter(model, init_adapter)
    return model


def build_worker_run(loop_config: dict[str, Any]) -> WorkerRun:
    """The student, its optimiser and EMA teacher, and this rank's feeds of every split."""
    import ray.train
    import ray.train.torch

    config = from_dict(ExperimentConfig, loop_config["experiment"])
    facts, train = loop_config["facts"], config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if train.torch_threads:
        torch.set_num_threads(train.torch_threads)
    device = ray.train.torch.get_device() if train.use_gpu else torch.device("cpu")
    task = task_hooks(config, loop_config)
    trainables = task.build(config, facts, loop_config, device)
    model = trainables.model
    torch.manual_seed(worker_seed(train.seed, rank, "torch"))  # dropout, if the model has any
    if world > 1:
        # wraps the model in DistributedDataParallel (it is on its device already)
        model = ray.train.torch.prepare_model(model, move_to_device=False)
    val_ids = np.asarray(loop_config["splits"][C.VAL], np.int64)
    run = WorkerRun(
        config=config,
        facts=facts,
        run_dir=Path(loop_config["run_dir"]),
        rank=rank,
        world=world,
        device=device,
        collective=current_collective(),
        model=model,
        trainables=trainables,
        feeds={},
        val_reader=None,
        val_share=validation_share(val_ids, rank, world),
        band_scale=band_scales(facts),
        task=task,
    )
    if loop_config["local_checkpoints"] is not None:
        run.local_checkpoints = LocalCheckpoints(loop_config["local_checkpoints"])
    open_readers(run, loop_config)
    if rank == 0:
        run.writer = _tensorboard(run.run_dir)
    return run


def open_readers(run: WorkerRun, loop_config: dict[str, Any]) -> None:
    """This rank's readers: the training splits in their seeded orders, its validation share."""
    config, splits = run.config, loop_config["splits"]
    budget = config.train.cache_mb * 1024**2
    read = {"storage_options": loop_config["storage_options"], "halo": run.task.halo}
    batch = config.train.batch_size
    labeled, unlabeled, val = run.task.columns(loop_config)
    wanted: list[tuple[str, tuple[str, ...], int, str]] = [(C.LABELED, labeled, batch, "labeled")]
    if loop_config["use_unlabeled"]:
        wanted.append(
            (C.UNLABELED, unlabeled, batch * config.ssl.unlabeled_batch_ratio, "unlabeled")
        )
    for name, columns, global_batch, kind in wanted:
        ids = np.asarray(splits[name], np.int64)
        reader = TileReader(loop_config["store"], ids, columns=columns, cache_bytes=budget, **read)
        budget -= reader.nbytes if reader.cacheable else 0
        order_seed = worker_seed(config.train.seed, SHARED_RANK, f"{kind}_order")  # type: ignore[arg-type]
        run.feeds[name] = SplitFeed(
            name,
            reader,
            SplitOrder(np.sort(ids), global_batch, order_seed),
            config.train.seed,
            f"{kind}_samples",  # type: ignore[arg-type]
            run.rank,
            run.world,
        )
    run.val_reader = TileReader(
        loop_config["store"],
        run.val_share,
        columns=val,
        cache_bytes=max(budget, 0),
        **read,
    )


def restore(run: WorkerRun, checkpoint: Any) -> None:
    """Continue from the latest checkpoint, if there is one."""
    if run.local_checkpoints is not None:
        folder = run.local_checkpoints.latest()
        if folder is None:
            return
        run.state = load_checkpoint(folder, run.trainables, run.positions)
    elif checkpoint is None:
        return
    else:
        with checkpoint.as_directory() as folder:
            run.state = load_checkpoint(Path(folder), run.trainables, run.positions)
    run.state.resumed_at.append(run.state.step)
    print(f"[train] resumed at step {run.state.step} (epoch {run.state.epoch})", file=sys.stderr)


def run_epoch(run: WorkerRun, epoch: int) -> None:
    """Train until the end of ``epoch`` (from wherever the run stands in it)."""
    train, state = run.config.train, run.state
    optimizer = run.trainables.optimizer
    lr = scaled_lr(run.config)
    feeds = [run.feeds[C.LABELED], run.feeds.get(C.UNLABELED)]
    last = (epoch + 1) * train.steps_per_epoch
    step_start = time.perf_counter()
    for labeled, unlabeled in prefetched(feeds, state.step, last):
        assert labeled is not None  # every step has a labelled batch
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(state.step, train.warmup_steps, run.total_steps)
        parts = run.task.step(run, labeled, unlabeled)
        state.step += 1
        now = time.perf_counter()
        parts["step_seconds"] = now - step_start  # data wait included: the cost a user sees
        step_start = now
        state.epoch_steps += 1
        state.step_seconds.append(parts["step_seconds"])
        for name, value in parts.items():
            state.epoch_sums[name] = state.epoch_sums.get(name, 0.0) + value
            if run.writer is not None:
                run.writer.add_scalar(f"train/{name}", value, state.step)
        every = train.checkpoint_every_steps
        if every and state.step % every == 0 and state.step < last:  # (the epoch's end has its own)
            report_checkpoint(run, {"step": state.step})


def end_epoch(run: WorkerRun, epoch: int) -> bool:
    """Validate, track the best epoch and early stopping, write reports, checkpoint.

    Returns whether to stop. An epoch improves when its score (the task's: mIoU, box AP) beats
    every earlier one *and* the validation before training, so a run that never improves stops
    after exactly ``early_stop_patience`` epochs.
    """
    state, train, task = run.state, run.config.train, run.task
    metrics = task.validate(run)
    metrics.update(
        epoch=epoch, step=state.step, seconds=round(time.perf_counter() - run.started, 1)
    )
    metrics["train"] = {k: v / max(state.epoch_steps, 1) for k, v in state.epoch_sums.items()}
    judged = metrics["train"].get("pseudo_judged", 0.0)
    if judged > 0:  # the weight-weighted accuracy of the targets, where ground truth exists
        metrics["train"]["pseudo_accuracy"] = metrics["train"]["pseudo_correct"] / judged
    # the median leaves out the first step's start-up and any stragglers
    median = float(np.median(state.step_seconds)) if state.step_seconds else 0.0
    metrics["train"]["step_seconds_median"] = median
    state.history.append(metrics)
    score = metrics[task.score]
    if score > state.best_score:
        state.best_score, state.best_epoch = score, epoch
        if run.rank == 0:
            _save_best(run.run_dir, task, unwrap(run.model), metrics)
    if score > state.reference_score:
        state.reference_score, state.stale_epochs = score, 0
    else:
        state.stale_epochs += 1
    state.epoch = epoch + 1
    state.epoch_sums, state.epoch_steps, state.step_seconds = {}, 0, []
    state.stopped_early = state.stale_epochs >= train.early_stop_patience
    if run.rank == 0:
        write_report_files(run.run_dir, build_report(run))
        if run.writer is not None:
            task.log_validation(run.writer, metrics, state.step)
    epoch_metrics = {
        task.score: score,
        "epoch": epoch,
        "epochs_done": epoch + 1,
        "train_loss": metrics["train"].get("loss", 0.0),
    }
    report_checkpoint(run, epoch_metrics)
    return state.stopped_early


def validate(run: WorkerRun) -> dict[str, Any]:
    """mIoU, Dice, per-class IoU and calibration over the validation split: each rank its
    share, summed over ranks. ``calibration.threshold``: the lowest confidence above which the
    model's labels were right 90 % of the time (None if none), what a student trained on this
    run's pseudo-labels can cut at (``ssl.threshold_mode=calibrated``)."""
    num_classes = int(run.facts["num_classes"])
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=run.device)
    counts = torch.zeros(3, CALIBRATION_BINS, dtype=torch.float64, device=run.device)
    assert run.val_reader is not None
    share = run.val_share
    for lo in range(0, len(share), VALIDATION_BATCH):
        batch = run.val_reader.read(share[lo : lo + VALIDATION_BATCH])
        tensors = prepare_batch(batch, run.band_scale, run.device)
        batch_confusion, batch_counts = validation_counts(
            run.model, tensors, num_classes, CALIBRATION_BINS
        )
        confusion += batch_confusion
        counts += batch_counts
    confusion = run.collective.sum(confusion)
    bins = run.collective.sum(counts).cpu().numpy()  # 3×CALIBRATION_BINS
    result: dict[str, Any] = dict(scores(confusion.cpu()))
    for key in ("iou_per_class", "dice_per_class"):  # JSON has no NaN: absent classes are None
        result[key] = [None if math.isnan(v) else v for v in result[key]]
    measured = calibration(bins[0], bins[1], bins[2], TARGET_ACCURACY)
    result["calibration"] = {
        "threshold": measured["suggested_threshold"],
        "target_accuracy": TARGET_ACCURACY,
        "kept_fraction": measured["kept_fraction"],
        "expected_calibration_error": measured["expected_calibration_error"],
    }
    return result


def report_checkpoint(run: WorkerRun, metrics: dict[str, Any]) -> None:
    """Report metrics from every worker; rank 0 attaches a checkpoint of the whole state."""
    import ray.train

    trainables = Trainables(
        unwrap(run.model),
        run.trainables.optimizer,
        run.trainables.teacher,
        run.trainables.ssl_state,
        run.trainables.weights_of,
    )
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if run.rank == 0:
            save_checkpoint(Path(folder), run.state, trainables, run.positions(run.state.step))
            if run.local_checkpoints is not None:
                run.local_checkpoints.persist(Path(folder))
            else:
                checkpoint = ray.train.Checkpoint.from_directory(folder)
        # hands the metrics (and rank 0's checkpoint) to Ray Train, which persists the checkpoint
        ray.train.report(metrics, checkpoint=checkpoint)


def build_report(run: WorkerRun) -> dict[str, Any]:
    """The run's report: metrics per epoch, the best epoch and its checkpoint (JSON-safe)."""
    state, task = run.state, run.task
    keys = ("epoch", "step", *task.epoch_keys, "train", "seconds")
    return {
        "task": run.config.task,
        "class_names": run.facts["class_names"],
        "epochs": [{k: h[k] for k in keys} for h in state.history],
        "initial": state.initial,
        "best_epoch": state.best_epoch,
        f"best_{task.score}": state.best_score,
        "best_checkpoint": (
            str(run.run_dir / "best" / task.best_file) if state.best_epoch >= 0 else None
        ),
        "stopped_early": state.stopped_early,
        "resumed_at": state.resumed_at,
        "steps": state.step,
        **task.describe(run.config),
    }


def _save_best(
    run_dir: Path, task: TaskHooks, model: torch.nn.Module, metrics: dict[str, Any]
) -> None:
    """RUN_DIR/best: the weights and metrics of the best epoch, replaced only once complete."""
    best = run_dir / "best"
    staging = run_dir / "best.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    task.save_weights(model, staging / task.best_file)
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    shutil.rmtree(best, ignore_errors=True)
    staging.rename(best)


def _tensorboard(run_dir: Path) -> Any:
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"))


def _log_segmentation(
    writer: Any, metrics: dict[str, Any], class_names: list[str], step: int
) -> None:
    writer.add_scalar("val/miou", metrics["miou"], step)
    writer.add_scalar("val/dice", metrics["dice"], step)
    for name, iou in zip(class_names, metrics["iou_per_class"], strict=False):
        if iou is not None:
            writer.add_scalar(f"val/iou_{name}", iou, step)
    writer.flush()


def write_report_files(run_dir: Path, report: dict[str, Any]) -> None:
    """RUN_DIR/report.json (replaced atomically) and RUN_DIR/report.md."""
    write_json_atomic(run_dir / "report.json", report)
    if report.get("task") == "detection":
        from semisup.detection.train_task import report_markdown

        (run_dir / "report.md").write_text(report_markdown(report))
        return
    names = report["class_names"]
    lines = [
        f"# Training report ({report['model_type']}, {report['mode']})",
        "",
        f"Best validation mIoU {report['best_miou']:.4f} at epoch {report['best_epoch']}"
        f"{' (stopped early)' if report['stopped_early'] else ''}; "
        f"checkpoint `{report['best_checkpoint']}`.",
        "",
        "| epoch | step | mIoU | Dice | " + " | ".join(names) + " |",
        "|" + "---|" * (4 + len(names)),
    ]
    for h in report["epochs"]:
        per_class = " | ".join("–" if v is None else f"{v:.3f}" for v in h["iou_per_class"])
        lines.append(
            f"| {h['epoch']} | {h['step']} | {h['miou']:.4f} | {h['dice']:.4f} | {per_class} |"
        )
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")

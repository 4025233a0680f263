"""``semisup train``: the student on Ray Train (TorchTrainer, DDP), with reports and resumption.

The per-worker function only wires things together: it takes its dataset shards, builds the
student and optimiser, restores the latest checkpoint, loops over ``steps.train_step``, validates
every epoch, stops early, checkpoints, and (rank 0) writes the run's reports. Everything the
model learns from is decided in ``semisup.steps``.

Run folder layout (``--out RUN_DIR``)::

    RUN_DIR/config.yaml          the experiment config of the run
    RUN_DIR/report.json          validation metrics per epoch, best epoch, best checkpoint path
    RUN_DIR/report.md            the same as a table
    RUN_DIR/tensorboard/         TensorBoard event files (loss parts, mIoU, per-class IoU)
    RUN_DIR/best/                adapter.safetensors + metrics.json of the best validation epoch
    RUN_DIR/ray/train/           Ray Train checkpoints (latest two), used to resume; elsewhere
                                 with train.storage (a path or a storage URL Ray accepts)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semisup import columns as C
from semisup.config import (
    ConfigError,
    ExperimentConfig,
    add_config_arguments,
    config_from_arguments,
    from_dict,
    save_config,
    to_dict,
)
from semisup.metrics import scores
from semisup.steps import StepRecipe, prepare_batch, train_step, unwrap, validation_confusion
from semisup.store import open_store, read_source_meta, read_store_meta, read_tile_index

RAY_RUN_NAME = "train"  # fixed: Ray resumes a run by its name and storage path
LR_REFERENCE_BATCH = 8  # lr is given for this global batch; scaled linearly (Goyal et al. 2017)
STATE_FILE = "state.pt"
ADAPTER_FILE = "adapter.safetensors"


# ---------------------------------------------------------------------------------------------
# Driver side


def store_facts(store: str) -> dict[str, Any]:
    """What workers need to know about the store: classes, tile size, per-source band scaling."""
    root = open_store(store)
    meta = read_store_meta(root)
    if not meta.num_classes:
        raise ValueError(f"store {store}: no num_classes; a labelled store is needed to train")
    index = read_tile_index(store).to_pandas()
    band_scale = {}
    for source_id in meta.sources:
        source = read_source_meta(root, source_id)
        band_scale[source_id] = (list(source.band_low), list(source.band_high))
    counts = index[C.SPLIT].value_counts().to_dict()
    has_pseudo = any(C.PSEUDO_LABEL in root[s] for s in meta.sources)  # type: ignore[operator]
    teacher_run = root.attrs.get("semisup_pseudo_label") or {}  # see semisup.pseudo_label
    return {
        "num_classes": meta.num_classes,
        "class_names": list(meta.class_names or [f"class_{k}" for k in range(meta.num_classes)]),
        "tile_size": meta.tile_size,
        "band_scale": band_scale,
        "tiles_per_split": {k: int(v) for k, v in counts.items()},
        "has_pseudo_labels": has_pseudo,
        "pseudo_label_mode": teacher_run.get("mode") if isinstance(teacher_run, dict) else None,
    }


def scaled_lr(config: ExperimentConfig) -> float:
    """The learning rate for the global batch: lr × batch_size / LR_REFERENCE_BATCH."""
    return config.train.lr * config.train.batch_size / LR_REFERENCE_BATCH


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


def band_scales(
    facts: Mapping[str, Any],
) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
    """Per-source (band_low, band_high) of ``store_facts``, as ``prepare_batch`` takes them."""
    return {k: (tuple(v[0]), tuple(v[1])) for k, v in facts["band_scale"].items()}


def check_store_for(config: ExperimentConfig, facts: Mapping[str, Any], store: str) -> None:
    """The store (``facts`` of ``store_facts``) has what ``config`` trains on, or an error."""
    if (
        config.ssl.enabled
        and config.ssl.target in ("pseudo", "both")
        and not facts["has_pseudo_labels"]
    ):
        raise ConfigError(
            f"ssl.target={config.ssl.target!r} needs pseudo-labels in {store}; run "
            "`semisup pseudo-label` first or set ssl.target=ema"
        )
    if (
        config.ssl.enabled
        and config.ssl.target in ("pseudo", "both")
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
    if config.train.init_from is not None:
        check_warm_start(config, facts)


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
    wanted = {"model_type": student.model_type, "mode": student.mode,
              "hires_path": student.hires_path, "num_classes": int(facts["num_classes"]),
              "image_size": int(facts["tile_size"])}  # fmt: skip
    if student.mode == "lora":
        wanted |= {"lora_rank": student.lora_rank, "lora_targets": student.lora_targets}
    differs = {k: (getattr(spec, k), v) for k, v in wanted.items() if getattr(spec, k) != v}
    if differs:
        what = ", ".join(f"{k} {a!r} (config: {b!r})" for k, (a, b) in differs.items())
        raise ConfigError(f"train.init_from={init_from!r}: the adapter has {what}")


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

    from semisup.data import read_tiles_from_config

    run_dir = run_dir.resolve()
    check_run_dir(run_dir, resume)
    facts = store_facts(store)
    if splits is not None:
        facts["tiles_per_split"] = {name: len(splits.get(name, ())) for name in C.SPLITS}
    check_store_for(config, facts, store)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")

    def split_tiles(name: str, columns: list[str]) -> Any:
        # training splits start their read tasks in a seeded random order; val in store order
        seeds = {C.LABELED: config.train.seed, C.UNLABELED: config.train.seed + 1}
        order = seeds.get(name) if config.stream.shuffle_buffer else None
        if splits is None:
            return read_tiles_from_config(
                store, config.stream, split=name, columns=columns, shuffle_seed=order
            )
        return read_tiles_from_config(
            store, config.stream, columns=columns, tile_ids=list(splits.get(name, ())),
            shuffle_seed=order,
        )  # fmt: skip

    labeled_columns = [C.IMAGE, C.LABEL, C.VALID, C.SOURCE]
    datasets = {
        C.LABELED: split_tiles(C.LABELED, labeled_columns),
        C.VAL: split_tiles(C.VAL, labeled_columns),
    }
    use_unlabeled = config.ssl.enabled and facts["tiles_per_split"].get(C.UNLABELED, 0) > 0
    if use_unlabeled:
        columns = [C.IMAGE, C.VALID, C.SOURCE]
        if config.ssl.target in ("pseudo", "both"):
            columns += [C.PSEUDO_LABEL, C.CONFIDENCE]
        datasets[C.UNLABELED] = split_tiles(C.UNLABELED, columns)
    num_workers = 0 if debug else config.train.num_workers
    trainer = TorchTrainer(
        train_loop_per_worker,  # type: ignore[arg-type]
        train_loop_config={
            "experiment": to_dict(config),
            "facts": facts,
            "run_dir": str(run_dir),
            "use_unlabeled": use_unlabeled,
        },
        # one worker process per model replica; fractional CPUs leave room for the reads
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=config.train.use_gpu,
            resources_per_worker=None
            if config.train.use_gpu
            else {"CPU": config.train.cpus_per_worker},
        ),
        # a fixed name under the run folder: rerunning with it resumes from the latest checkpoint
        run_config=ray.train.RunConfig(
            name=RAY_RUN_NAME,
            storage_path=config.train.storage or str(run_dir / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
        datasets=datasets,  # type: ignore[arg-type]
    )
    print(f"[train] {num_workers or 'in-process'} worker(s), lr {scaled_lr(config):.2e}, "
          f"run folder {run_dir}", file=sys.stderr)  # fmt: skip
    result = trainer.fit()
    report = getattr(result, "return_value", None)  # rank 0's value (Ray Train V2)
    if not isinstance(report, dict):  # resumed after the last epoch: nothing new was trained
        return json.loads((run_dir / "report.json").read_text())
    write_report_files(run_dir, report)
    return report


# ---------------------------------------------------------------------------------------------
# Worker side


class ShardCache:
    """A dataset shard read once and then replayed from memory, when it fits ``budget_bytes``.

    Each pass over a Ray Data shard re-executes its read pipeline. The labeled and validation
    splits of a semi-supervised run are small, so after the first pass they are served from
    memory (training passes reshuffled tile by tile); a shard larger than the budget streams
    on every pass. ``shard``: anything with Ray's ``iter_batches``.
    """

    def __init__(
        self, shard: Any, budget_bytes: int, shuffle_buffer: int = 0, seed: int = 0
    ) -> None:
        self.shard = shard
        self.budget_bytes = budget_bytes
        self.shuffle_buffer = shuffle_buffer  # tiles mixed while streaming; 0: shard order
        self.seed = seed
        self.streamed = 0  # passes read from the shard so far
        self.columns: dict[str, np.ndarray] | None = None  # the cached split, once complete

    def stream(self, batch_size: int, drop_last: bool) -> Iterator[dict[str, np.ndarray]]:
        """One pass read from the shard, cached on the way if it fits."""
        cached: list[dict[str, np.ndarray]] | None = [] if self.budget_bytes > 0 else None
        size = 0
        mixing = (
            {
                "local_shuffle_buffer_size": self.shuffle_buffer,
                "local_shuffle_seed": self.seed + self.streamed,
            }
            if self.shuffle_buffer
            else {}
        )
        self.streamed += 1
        for batch in self.shard.iter_batches(
            batch_size=batch_size, batch_format="numpy", drop_last=drop_last, **mixing
        ):
            if cached is not None:
                size += sum(v.nbytes for v in batch.values())
                cached = cached + [batch] if size <= self.budget_bytes else None
            yield batch
        # Every worker must make the same choice: one that streams again while another replays
        # would leave Ray's streaming split waiting for it forever.
        if _all_workers_agree(bool(cached)) and cached:
            self.columns = {k: np.concatenate([b[k] for b in cached]) for k in cached[0]}

    def replay(
        self, batch_size: int, drop_last: bool, order: np.ndarray | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """One pass from memory (``order``: a permutation of the cached rows)."""
        assert self.columns is not None
        rows = len(next(iter(self.columns.values())))
        order = np.arange(rows) if order is None else order
        stop = rows - batch_size + 1 if drop_last else rows
        for lo in range(0, max(stop, 0), batch_size):
            pick = order[lo : lo + batch_size]
            yield {name: column[pick] for name, column in self.columns.items()}

    def passes(self, batch_size: int, drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """One pass: from memory once cached, else from the shard."""
        if self.columns is not None:
            return self.replay(batch_size, drop_last)
        return self.stream(batch_size, drop_last)


def cycle_batches(
    cache: ShardCache, batch_size: int, name: str, seed: int
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches of a shard; cached passes are reshuffled with ``seed``."""
    rng = np.random.default_rng(seed)
    while True:
        count = 0
        if cache.columns is not None:
            rows = len(next(iter(cache.columns.values())))
            batches = cache.replay(batch_size, True, rng.permutation(rows))
        else:
            batches = cache.stream(batch_size, drop_last=True)
        for batch in batches:
            count += 1
            yield batch
        if count == 0:
            raise ValueError(
                f"the {name!r} split gives this worker no full batch of {batch_size} tiles; "
                "lower train.batch_size or use fewer workers"
            )


def _lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _all_workers_agree(flag: bool) -> bool:
    """True only if ``flag`` is True on every worker (the flag itself without DDP)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = torch.tensor([int(flag)])
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return bool(value.item())
    return flag


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over workers when DDP is initialised; the tensor itself otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's per-worker function: shard, build, restore, loop, validate, report."""
    import ray.train
    import ray.train.torch

    from semisup.ema import make_ema_teacher
    from semisup.student import build_student

    config = from_dict(ExperimentConfig, loop_config["experiment"])
    facts, run_dir = loop_config["facts"], Path(loop_config["run_dir"])
    train, ssl = config.train, config.ssl
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if train.torch_threads:
        torch.set_num_threads(train.torch_threads)
    torch.manual_seed(train.seed)  # identical initialisation on every worker
    device = ray.train.torch.get_device() if train.use_gpu else torch.device("cpu")
    num_classes = int(facts["num_classes"])
    model: torch.nn.Module = build_student(
        config.student.model_type, num_classes, int(facts["tile_size"]),
        checkpoint=config.student.checkpoint, mode=config.student.mode,
        lora_rank=config.student.lora_rank, lora_alpha=config.student.lora_alpha,
        lora_dropout=config.student.lora_dropout, lora_targets=config.student.lora_targets,
        hires_path=config.student.hires_path,
    ).to(device)  # fmt: skip
    if train.init_from is not None:  # before the EMA copy: the teacher starts warm too
        from semisup.student import load_adapter

        load_adapter(model, init_adapter(train.init_from))  # type: ignore[arg-type]
    use_ema = ssl.enabled and ssl.target in ("ema", "both") and loop_config["use_unlabeled"]
    teacher = make_ema_teacher(model) if use_ema else None
    params = [p for p in model.parameters() if p.requires_grad]
    lr = scaled_lr(config)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=train.weight_decay)
    total_steps = train.epochs * train.steps_per_epoch
    state = _restore(ray.train.get_checkpoint(), model, teacher, optimizer)
    if world > 1:
        # wraps the model in DistributedDataParallel and moves it to this worker's device
        model = ray.train.torch.prepare_model(model, move_to_device=False)
    per_worker = train.batch_size // max(world, 1)
    # each worker reads its own shard of every split
    budget = train.cache_mb * 1024**2
    mix = config.stream.shuffle_buffer
    labeled = cycle_batches(
        ShardCache(ray.train.get_dataset_shard(C.LABELED), budget, mix, train.seed * 100 + rank),
        per_worker,
        C.LABELED,
        train.seed,
    )
    unlabeled = (
        cycle_batches(ShardCache(ray.train.get_dataset_shard(C.UNLABELED), budget, mix,
                                 train.seed * 100 + 50 + rank),
                      per_worker * ssl.unlabeled_batch_ratio, C.UNLABELED, train.seed + 1)
        if loop_config["use_unlabeled"] else None
    )  # fmt: skip
    writer = _tensorboard(run_dir) if rank == 0 else None
    generator = torch.Generator().manual_seed(train.seed * 1000 + rank + state["step"])
    autocast = torch.bfloat16 if (train.bf16 and device.type == "cuda") else None
    band_scale = band_scales(facts)
    recipe = StepRecipe(ssl, config.augment, num_classes, train.dice_weight)
    val_cache = ShardCache(ray.train.get_dataset_shard(C.VAL), budget)
    start = time.perf_counter()
    stop = False
    for epoch in range(state["epoch"], train.epochs):
        sums: dict[str, float] = {}
        steps_done, step_times = 0, []
        while state["step"] < (epoch + 1) * train.steps_per_epoch:
            step_start = time.perf_counter()  # data wait included: the cost a user sees
            for group in optimizer.param_groups:
                group["lr"] = lr * _lr_factor(state["step"], train.warmup_steps, total_steps)
            labeled_batch = prepare_batch(next(labeled), band_scale, device)
            unlabeled_batch = (
                prepare_batch(next(unlabeled), band_scale, device) if unlabeled else None
            )
            parts = train_step(
                model, optimizer, labeled_batch, unlabeled_batch, teacher=teacher, recipe=recipe,
                step=state["step"], autocast_dtype=autocast, generator=generator,
            )  # fmt: skip
            state["step"] += 1
            steps_done += 1
            parts["step_seconds"] = time.perf_counter() - step_start
            step_times.append(parts["step_seconds"])
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value
            if writer is not None:
                for name, value in parts.items():
                    writer.add_scalar(f"train/{name}", value, state["step"])
            if train.checkpoint_every_steps and state["step"] % train.checkpoint_every_steps == 0:
                _report(state, model, teacher, optimizer, rank, {"step": state["step"]})
        metrics = _validate(model, val_cache, band_scale, device, num_classes)
        metrics.update(
            epoch=epoch, step=state["step"], seconds=round(time.perf_counter() - start, 1)
        )
        metrics["train"] = {k: v / max(steps_done, 1) for k, v in sums.items()}
        # the median leaves out the first pass's pipeline start-up and any stragglers
        metrics["train"]["step_seconds_median"] = (
            float(np.median(step_times)) if step_times else 0.0
        )
        state["history"].append(metrics)
        improved = metrics["miou"] > state["best_miou"]
        if improved:
            state["best_miou"], state["best_epoch"], state["stale_epochs"] = (
                metrics["miou"],
                epoch,
                0,
            )
        else:
            state["stale_epochs"] += 1
        state["epoch"] = epoch + 1
        stop = state["stale_epochs"] >= train.early_stop_patience
        if rank == 0:
            if improved:
                _save_best(run_dir, unwrap(model), metrics)
            report = build_report(run_dir, state, facts, config, stopped_early=stop)
            write_report_files(run_dir, report)
            if writer is not None:
                _log_validation(writer, metrics, facts["class_names"], state["step"])
        epoch_metrics = {"miou": metrics["miou"], "epoch": epoch, "epochs_done": epoch + 1,
                         "train_loss": metrics["train"].get("loss", 0.0)}  # fmt: skip
        _report(state, model, teacher, optimizer, rank, epoch_metrics)
        if stop:
            break
    if writer is not None:
        writer.close()
    if rank != 0:
        return None
    # rank 0's report reaches the driver too, which may be on another node than rank 0
    return build_report(run_dir, state, facts, config, stopped_early=stop)


def _validate(
    model: torch.nn.Module,
    shard: ShardCache,
    band_scale: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]],
    device: torch.device,
    num_classes: int,
) -> dict[str, Any]:
    """mIoU, Dice and per-class IoU over this worker's val shard, summed across workers."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for batch in shard.passes(batch_size=16):
        confusion += validation_confusion(
            model, prepare_batch(batch, band_scale, device), num_classes
        )
    confusion = _all_reduce(confusion)
    result: dict[str, Any] = dict(scores(confusion.cpu()))
    for key in ("iou_per_class", "dice_per_class"):  # JSON has no NaN: absent classes are None
        result[key] = [None if math.isnan(v) else v for v in result[key]]
    return result


def _restore(
    checkpoint: Any,
    model: torch.nn.Module,
    teacher: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    """Training state from the latest Ray checkpoint, or a fresh one."""
    state: dict[str, Any] = {
        "step": 0, "epoch": 0, "best_miou": -1.0, "best_epoch": -1, "stale_epochs": 0, "history": [],
    }  # fmt: skip
    if checkpoint is None:
        return state
    with checkpoint.as_directory() as folder:
        saved = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(saved["model"], strict=False)
    if teacher is not None and "teacher" in saved:
        teacher.load_state_dict(saved["teacher"], strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    state.update(json.loads(saved["progress"]))
    print(f"[train] resumed at step {state['step']} (epoch {state['epoch']})", file=sys.stderr)
    return state


def _report(
    state: dict[str, Any],
    model: torch.nn.Module,
    teacher: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    rank: int,
    metrics: dict[str, Any],
) -> None:
    """Report metrics from every worker; rank 0 attaches a checkpoint of the trainable state."""
    import ray.train

    from semisup.student import adapter_state_dict

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            saved = {
                "model": adapter_state_dict(unwrap(model)),  # type: ignore[arg-type]
                "optimizer": optimizer.state_dict(),
                "progress": json.dumps({k: state[k] for k in state}),
            }
            if teacher is not None:
                saved["teacher"] = {
                    k: v for k, v in teacher.state_dict().items() if k in saved["model"]
                }
            torch.save(saved, Path(folder) / STATE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        # hands the metrics (and rank 0's checkpoint) to Ray Train, which persists the checkpoint
        ray.train.report(metrics, checkpoint=checkpoint)


def _save_best(run_dir: Path, model: torch.nn.Module, metrics: dict[str, Any]) -> None:
    """RUN_DIR/best: the adapter and metrics of the best epoch, replaced only once complete."""
    from semisup.student import save_adapter

    best = run_dir / "best"
    staging = run_dir / "best.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_adapter(model, staging / ADAPTER_FILE)  # type: ignore[arg-type]
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    shutil.rmtree(best, ignore_errors=True)
    staging.rename(best)


def _tensorboard(run_dir: Path) -> Any:
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"))


def _log_validation(
    writer: Any, metrics: dict[str, Any], class_names: list[str], step: int
) -> None:
    writer.add_scalar("val/miou", metrics["miou"], step)
    writer.add_scalar("val/dice", metrics["dice"], step)
    for name, iou in zip(class_names, metrics["iou_per_class"], strict=False):
        if iou is not None:
            writer.add_scalar(f"val/iou_{name}", iou, step)
    writer.flush()


def build_report(
    run_dir: Path,
    state: dict[str, Any],
    facts: dict[str, Any],
    config: ExperimentConfig,
    stopped_early: bool,
) -> dict[str, Any]:
    """The run's report: metrics per epoch, the best epoch and its checkpoint (JSON-safe)."""
    keys = ("epoch", "step", "miou", "dice", "pixel_accuracy", "iou_per_class", "train", "seconds")
    return {
        "class_names": facts["class_names"],
        "epochs": [{k: h[k] for k in keys} for h in state["history"]],
        "best_epoch": state["best_epoch"],
        "best_miou": state["best_miou"],
        "best_checkpoint": (
            str(run_dir / "best" / ADAPTER_FILE) if state["best_epoch"] >= 0 else None
        ),
        "stopped_early": stopped_early,
        "steps": state["step"],
        "mode": config.student.mode,
        "model_type": config.student.model_type,
    }


def write_report_files(run_dir: Path, report: dict[str, Any]) -> None:
    """RUN_DIR/report.json (replaced atomically) and RUN_DIR/report.md."""
    tmp = run_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(run_dir / "report.json")
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
        "--debug", action="store_true",
        help="run the per-worker loop in this process (no worker processes): breakpoints and pdb work",
    )  # fmt: skip
    add_config_arguments(parser)


def run_cli(args: argparse.Namespace) -> int:
    from semisup.runtime import ray_runtime

    config = config_from_arguments(args)
    with ray_runtime(config.ray):
        report = run_training(args.store, config, args.out, resume=args.resume, debug=args.debug)
    print(f"best validation mIoU {report['best_miou']:.4f} at epoch {report['best_epoch']}; "
          f"report in {args.out / 'report.md'}")  # fmt: skip
    return 0

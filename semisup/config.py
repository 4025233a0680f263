"""Typed experiment configuration: one dataclass per component, composed into ExperimentConfig.

Strict in, plain out: ``to_dict`` gives plain dicts that cross into Ray; ``from_dict`` reads them
back and rejects unknown keys and wrong types with an error that names the key. YAML files and
``--set section.key=value`` overrides go through the same path. Defaults are the reference recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")
_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


SplitBy = Literal["source", "folder", "block"]


@dataclass(frozen=True)
class PrepConfig:
    """How rasters become a tile store (``semisup prep``)."""

    tile_size: int = 256  # pixels; SAM runs at this size through the tile-size adaptation
    overlap: int = 0  # pixels shared by neighbouring tiles of the grid
    split_by: SplitBy = "source"  # unit of the split: never neighbouring tiles of one image
    block_size: int = 1024  # pixels; side of a spatial block when split_by == "block"
    val_fraction: float = 0.2  # of labelled split units
    labeled_fraction: float = 0.125  # of the remaining labelled units; 1/8 as in UniMatch
    val_sources: tuple[str, ...] = ()  # glob patterns on source ids forced into val
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.tile_size >= 16, "prep.tile_size", self.tile_size, "an integer >= 16")
        _check(
            0 <= self.overlap < self.tile_size,
            "prep.overlap",
            self.overlap,
            f"an integer in [0, tile_size={self.tile_size})",
        )
        _check(
            self.block_size >= self.tile_size, "prep.block_size", self.block_size, ">= tile_size"
        )
        _check(0.0 <= self.val_fraction < 1.0, "prep.val_fraction", self.val_fraction, "in [0, 1)")
        _check(
            0.0 <= self.labeled_fraction <= 1.0,
            "prep.labeled_fraction",
            self.labeled_fraction,
            "in [0, 1]",
        )


@dataclass(frozen=True)
class StreamConfig:
    """How Ray Data streams tiles from a store."""

    halo: int = 0  # pixels of context read around each tile, padded at raster borders
    skip_nodata: bool = True  # drop tiles with no valid pixel
    tiles_per_task: int = 64  # tiles per read task; larger tasks amortise Ray's per-task cost
    read_cpus: float = 0.5  # CPUs per read task: fractional so reads never starve other work

    def __post_init__(self) -> None:
        _check(self.halo >= 0, "stream.halo", self.halo, "an integer >= 0")
        _check(self.tiles_per_task >= 1, "stream.tiles_per_task", self.tiles_per_task, ">= 1")
        _check(self.read_cpus > 0, "stream.read_cpus", self.read_cpus, "> 0")


Placement = Literal["pack", "spread"]


@dataclass(frozen=True)
class RayConfig:
    """How a local Ray is started when no cluster address is given, and how work is placed."""

    address: str | None = None  # None: $RAY_ADDRESS (set inside `ray job submit`), else local
    num_cpus: int | None = None  # local Ray only; None = all cores
    num_gpus: int | None = None  # local Ray only; None = every visible GPU
    object_store_mb: int = 512  # local Ray only
    dashboard: bool = False  # local Ray only; bound to 127.0.0.1
    placement: Placement = "pack"  # Train workers and actor pools: pack onto as few nodes as
    # fit (Ray's PACK / default scheduling), or spread: one Train worker per node
    # (STRICT_SPREAD) and the actors over the nodes (SPREAD)


@dataclass(frozen=True)
class AugmentConfig:
    """Every augmentation parameter. Defaults favour geometry over colour (aerial imagery)."""

    weak_flip: bool = True
    weak_rot90: bool = True
    rotation_deg: float = 180.0  # strong view: uniform in ±rotation_deg
    scale_min: float = 0.75  # strong view: log-uniform scale range
    scale_max: float = 1.33
    colour_strength: float = 0.2  # brightness/contrast/saturation jitter amplitude; 0 = off
    hue: float = 0.02
    blur_prob: float = 0.2
    cutmix_prob: float = 0.5  # UniMatch applies CutMix to the strong view with p = 0.5

    def __post_init__(self) -> None:
        checks = {
            "augment.rotation_deg": 0 <= self.rotation_deg <= 180,
            "augment.scale_min": 0 < self.scale_min <= self.scale_max,
            "augment.colour_strength": 0 <= self.colour_strength <= 1,
            "augment.hue": 0 <= self.hue <= 0.5,
            "augment.blur_prob": 0 <= self.blur_prob <= 1,
            "augment.cutmix_prob": 0 <= self.cutmix_prob <= 1,
        }
        for key, ok in checks.items():
            _check(ok, key, getattr(self, key.split(".")[1]), "a value in its valid range")


FinetuneMode = Literal["full", "decoder", "lora"]
TargetSource = Literal["pseudo", "ema", "both", "oracle"]
ThresholdMode = Literal["fixed", "flexmatch", "freematch", "softmatch", "calibrated"]
# per-pixel uncertainty measures, each a function in semisup.uncertainty (its MEASURES)
UncertaintyMeasure = Literal["entropy", "margin", "disagreement", "tta"]


@dataclass(frozen=True)
class StudentConfig:
    """The student model and its fine-tuning mode."""

    model_type: str = "tiny"  # tiny | vit_b | vit_l | vit_h
    checkpoint: str | None = None  # official SAM checkpoint (path or URL); None = random init
    mode: FinetuneMode = "decoder"  # decoder-only first: the cheapest mode that often suffices
    lora_rank: int = 8
    lora_alpha: float = 16.0  # peft's usual pair with rank 8 (scale alpha / rank = 2)
    lora_dropout: float = 0.0
    lora_targets: str = "qv"  # "qv" (as SAMed) or "qkv"
    hires_path: bool = True  # stride-4 conv path: a patch-16 ViT alone misses roads at 256 px
    # Image-encoder attention kernel (semisup.sam_attention); no parameter depends on it.
    # "sdpa" equals the "reference" matmuls within 1e-5 in fp32 (tests/test_sam_attention.py).
    attention: Literal["reference", "sdpa", "flex"] = "sdpa"

    def __post_init__(self) -> None:
        _check(
            self.model_type in ("tiny", "vit_b", "vit_l", "vit_h"),
            "student.model_type",
            self.model_type,
            "one of tiny, vit_b, vit_l, vit_h",
        )
        _check(self.lora_rank >= 1, "student.lora_rank", self.lora_rank, "an integer >= 1")
        _check(self.lora_alpha > 0, "student.lora_alpha", self.lora_alpha, "> 0")
        _check(0 <= self.lora_dropout < 1, "student.lora_dropout", self.lora_dropout, "in [0, 1)")
        _check(
            self.lora_targets in ("qv", "qkv"),
            "student.lora_targets",
            self.lora_targets,
            "'qv' or 'qkv'",
        )


@dataclass(frozen=True)
class SslConfig:
    """Consistency regularisation on unlabeled tiles."""

    enabled: bool = True
    target: TargetSource = "both"  # offline SAM pseudo-labels, online EMA teacher, or both;
    # "oracle": the unlabeled tiles' ground truth at confidence 1, a check of the machinery
    confidence_threshold: float = 0.95  # FixMatch/UniMatch threshold (fixed, flexmatch modes)
    threshold_mode: ThresholdMode = "fixed"  # how much each pixel counts: semisup.thresholds
    calibration_run: str | None = None  # calibrated mode: the teacher's run folder; its best
    # epoch measured on the validation tiles the confidence above which it was 90 % right
    threshold_momentum: float = 0.99  # EMA of the adaptive thresholds' statistics, per step
    # (FreeMatch uses 0.999 per image batch; a step here holds B×H×W pixels)
    distribution_alignment: bool = False  # EMA teacher's class marginal aligned to the
    # labelled one (ReMixMatch): p · p_labelled / p_teacher, renormalised
    strong_views: int = 1  # strong views per unlabeled tile, each with its own loss (UniMatch: 2)
    feature_dropout: float = 0.0  # UniMatch's feature-perturbation stream: the weak view's
    # encoder features through channel dropout at this rate (UniMatch: 0.5) against the same
    # target; 0 turns the stream off. The consistency term is then half image views, half this
    dice_weight: float = 0.0  # soft Dice on the consistency targets too, weighted per pixel
    # and scaled by the share used (semisup.losses.consistency_loss); 0: cross-entropy only
    unlabeled_weight: float = 1.0
    ramp_up_steps: int = 200  # steps until the unlabeled weight is reached
    ema_momentum: float = 0.999  # Mean Teacher / UniMatch default
    unlabeled_batch_ratio: int = 1  # unlabeled tiles per labeled tile in a step (FixMatch's mu)

    def __post_init__(self) -> None:
        _check(
            0 <= self.confidence_threshold <= 1,
            "ssl.confidence_threshold",
            self.confidence_threshold,
            "in [0, 1]",
        )
        _check(self.unlabeled_weight >= 0, "ssl.unlabeled_weight", self.unlabeled_weight, ">= 0")
        _check(self.dice_weight >= 0, "ssl.dice_weight", self.dice_weight, ">= 0")
        _check(self.ramp_up_steps >= 0, "ssl.ramp_up_steps", self.ramp_up_steps, ">= 0")
        _check(0 <= self.ema_momentum <= 1, "ssl.ema_momentum", self.ema_momentum, "in [0, 1]")
        _check(
            self.unlabeled_batch_ratio >= 1,
            "ssl.unlabeled_batch_ratio",
            self.unlabeled_batch_ratio,
            ">= 1",
        )
        _check(
            0 <= self.threshold_momentum < 1,
            "ssl.threshold_momentum",
            self.threshold_momentum,
            "in [0, 1)",
        )
        _check(self.strong_views in (1, 2), "ssl.strong_views", self.strong_views, "1 or 2")
        _check(
            0 <= self.feature_dropout < 1, "ssl.feature_dropout", self.feature_dropout, "in [0, 1)"
        )
        _check(
            not self.distribution_alignment or self.uses_ema_teacher,
            "ssl.distribution_alignment",
            self.distribution_alignment,
            "false unless ssl.target is 'ema' or 'both' (offline pseudo-labels carry no "
            "class distribution to align)",
        )

    @property
    def uses_pseudo_labels(self) -> bool:
        """The targets include the store's offline pseudo-labels (``pseudo`` or ``both``)."""
        return self.target in ("pseudo", "both")

    @property
    def uses_ema_teacher(self) -> bool:
        """The targets include the online EMA teacher's predictions (``ema`` or ``both``)."""
        return self.target in ("ema", "both")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop and its Ray Train scaling."""

    num_workers: int = 1  # Ray Train workers; 0 runs the loop in this process (debugging)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int = 0  # 0: Ray's default (one per whole CPU reserved); reads are light, so
    # on a small machine a worker may compute with more threads than the CPUs it reserves
    cache_mb: int = 1024  # a worker holds the training splits (and its validation share) in
    # memory while they fit this budget together; a split past it is read from the store per batch
    batch_size: int = 8  # global labeled tiles per step, split evenly across workers
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: momentum 0.9 (linear in the gradients)
    lr: float = 3e-4  # at the reference batch of 8; scaled linearly with batch_size
    weight_decay: float = 0.01
    epochs: int = 10
    steps_per_epoch: int = 50
    warmup_steps: int = 20
    dice_weight: float = 1.0
    early_stop_patience: int = 4  # epochs without a better validation mIoU before stopping
    checkpoint_every_steps: int = 0  # 0: checkpoint at the end of every epoch only
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    node_wait_s: float = 900.0  # after a node is lost, how long a run waits for the nodes to
    # host its workers again before it fails naming the node and the checkpoint to resume from
    storage: str | None = None  # where Ray Train keeps checkpoints: a path or a URL Ray accepts
    # (s3://, gs://, ...); None = RUN_DIR/ray
    bf16: bool = True  # autocast on GPU only
    seed: int = 0
    init_from: str | None = None  # warm start: an adapter file, or a run folder whose best
    # adapter the student starts from (same base and adapter layout); None = from the base

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, "train.num_workers", self.num_workers, ">= 0")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, ">= 1")
        _check(
            self.num_workers == 0 or self.batch_size % self.num_workers == 0,
            "train.batch_size",
            self.batch_size,
            f"a multiple of train.num_workers={self.num_workers}",
        )
        _check(self.lr > 0, "train.lr", self.lr, "> 0")
        _check(self.epochs >= 1, "train.epochs", self.epochs, ">= 1")
        _check(self.steps_per_epoch >= 1, "train.steps_per_epoch", self.steps_per_epoch, ">= 1")
        _check(
            self.early_stop_patience >= 1,
            "train.early_stop_patience",
            self.early_stop_patience,
            ">= 1",
        )
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker", self.cpus_per_worker, "> 0")
        _check(self.torch_threads >= 0, "train.torch_threads", self.torch_threads, ">= 0")
        _check(self.cache_mb >= 0, "train.cache_mb", self.cache_mb, ">= 0")
        _check(self.node_wait_s > 0, "train.node_wait_s", self.node_wait_s, "> 0")


@dataclass(frozen=True)
class PipelineConfig:
    """What ``semisup run`` ingests, where it writes, and which of its stages run."""

    out: str = "runs/semisup"  # the run folder: every stage's outputs, run.json and run.log;
    # on a multi-node cluster it must be on a filesystem every node mounts
    images: tuple[str, ...] = ()  # raster files or folders to ingest (relative to the cwd)
    labels: tuple[str, ...] = ()  # label files or folders, the i-th with the i-th image folder
    label_colors: str | None = None  # colour map JSON {"#RRGGBB": class id}, or "dubai"
    class_names: tuple[str, ...] = ()  # in class-id order; () = from the labels
    generated_scenes: int = 0  # > 0: ingest this many generated aerial-like scenes instead
    scene_size: int = 768  # pixels; side of a generated scene
    stages: tuple[str, ...] = ()  # names of the stages to run (in the pipeline's own order);
    # () = its default stages (semisup.pipeline.STAGES)
    zero_shot_tiles: int = 12  # labelled tiles the zero-shot stage measures
    pseudo_label_actors: int = 2  # teacher actors of the pseudo-label stage
    pseudo_label_gpus: float = 0.0  # GPUs per teacher actor; fractional to share one
    select_budget: int = 16  # unlabeled tiles the select stage proposes for labelling
    select_measure: UncertaintyMeasure = "entropy"  # semisup.uncertainty
    predict_rasters: tuple[str, ...] = ()  # rasters the predict stage maps with the student;
    # () = the image of the store's first validation source
    predict_vectors: bool = True  # also polygons per class (GeoJSON), for rasters with a CRS
    tune_space: str = "lora_rank"  # search space of the optional tune stage (tune_spaces/)
    tune_samples: int = 1  # draws of the tune space; each draw runs every value of a grid
    # (lora_rank: ranks 4, 8, 16, 32 -> 4 trials per draw)
    detect_rasters: tuple[str, ...] = ()  # rasters with boxes for the detect stage; () = the
    # generated scenes' building boxes (pipeline.generated_scenes)
    detect_boxes: tuple[str, ...] = ()  # their box files (CSV or Pascal-VOC XML), by image stem
    detect_box_classes: tuple[str, ...] = ()  # box label renames, NAME[,NAME...]=CLASS
    detect_tile_size: int = 256  # px; tiles of the detect stage's own store
    detect_epochs: int = 2  # the detect stage's Faster R-CNN student trains this many epochs
    detect_steps_per_epoch: int = 4  # of detect_batch_size labeled tiles (and as many unlabeled)
    detect_batch_size: int = 2
    detect_sam_points_per_side: int = 16  # prompt grid of the automatic SAM teacher whose
    # instances are the detect stage's pseudo-boxes (detector.target pseudo or both)
    compare_classes: tuple[str, ...] = ()  # BOX=SEG: the segmentation class that stands for a
    # box class in the compare stage; () = equal names

    def __post_init__(self) -> None:
        _check(bool(self.out), "pipeline.out", self.out, "a folder path")
        _check(
            self.generated_scenes >= 0,
            "pipeline.generated_scenes",
            self.generated_scenes,
            "an integer >= 0",
        )
        _check(self.scene_size >= 64, "pipeline.scene_size", self.scene_size, "an integer >= 64")
        _check(self.zero_shot_tiles >= 1, "pipeline.zero_shot_tiles", self.zero_shot_tiles, ">= 1")
        _check(
            self.pseudo_label_actors >= 1,
            "pipeline.pseudo_label_actors",
            self.pseudo_label_actors,
            ">= 1",
        )
        _check(
            self.pseudo_label_gpus >= 0,
            "pipeline.pseudo_label_gpus",
            self.pseudo_label_gpus,
            ">= 0",
        )
        _check(self.select_budget >= 0, "pipeline.select_budget", self.select_budget, ">= 0")
        _check(self.tune_samples >= 1, "pipeline.tune_samples", self.tune_samples, ">= 1")
        _check(
            len(self.detect_boxes) == len(set(self.detect_boxes)),
            "pipeline.detect_boxes",
            self.detect_boxes,
            "distinct box files",
        )
        _check(
            self.detect_tile_size >= 32,
            "pipeline.detect_tile_size",
            self.detect_tile_size,
            ">= 32 (the detector's coarsest feature level is 1/32 of a tile)",
        )
        for name in (
            "detect_epochs",
            "detect_steps_per_epoch",
            "detect_batch_size",
            "detect_sam_points_per_side",
        ):
            _check(getattr(self, name) >= 1, f"pipeline.{name}", getattr(self, name), ">= 1")


DetectorArch = Literal["fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn"]
DetectorFinetune = Literal["full", "head", "backbone_layers"]
DetectorTarget = Literal["ema", "pseudo", "both"]
Task = Literal["segmentation", "detection"]


@dataclass(frozen=True)
class DetectorConfig:
    """The detection student (``task: detection``): torchvision Faster R-CNN.

    Training reuses ``train.*`` (epochs, batch, lr, seed, patience, storage, failures) and
    ``ssl.*`` (``enabled``, ``unlabeled_weight``, ``ramp_up_steps``, ``ema_momentum``,
    ``unlabeled_batch_ratio``); Unbiased Teacher (Liu et al., 2021) used 4.0 and 0.9996.
    """

    arch: DetectorArch = "fasterrcnn_resnet50_fpn_v2"  # mobilenet_v3_large_fpn: edge devices
    finetune: DetectorFinetune = "head"  # the backbone frozen: the first thing to try
    trainable_backbone_layers: int = 3  # backbone_layers mode: body stages trained, last first
    # (torchvision's count: 0-5 for ResNet-50, 0-6 for MobileNetV3)
    checkpoint: str | None = None  # torchvision-format state dict; None = random weights
    score_threshold: float = 0.05  # detections kept for validation and prediction (torchvision)
    nms_iou: float = 0.5  # torchvision's per-class NMS IoU
    detections_per_tile: int = 300  # above COCO's 100: a tile can hold more tree crowns
    pseudo_score: float = 0.7  # Unbiased Teacher: teacher detections this confident are targets
    # Pseudo-boxes of unlabeled tiles (with ssl.enabled), as ssl.target for masks: "ema" the EMA
    # teacher's detections; "pseudo" the boxes of the store's SAM instances (`semisup
    # pseudo-label --mode automatic`, its pseudo_instances.parquet); "both" their union,
    # then class-wise NMS at nms_iou
    target: DetectorTarget = "ema"
    sam_min_predicted_iou: float = 0.88  # SAM instances kept as pseudo-boxes: SAM's automatic
    sam_min_stability: float = 0.95  # generator's pred_iou_thresh and stability_score_thresh

    def __post_init__(self) -> None:
        stages = 5 if self.arch == "fasterrcnn_resnet50_fpn_v2" else 6
        _check(
            0 <= self.trainable_backbone_layers <= stages,
            "detector.trainable_backbone_layers",
            self.trainable_backbone_layers,
            f"an integer in 0..{stages} for {self.arch}",
        )
        _check(
            0 <= self.score_threshold < 1,
            "detector.score_threshold",
            self.score_threshold,
            "in [0, 1)",
        )
        _check(0 < self.nms_iou <= 1, "detector.nms_iou", self.nms_iou, "in (0, 1]")
        _check(
            self.detections_per_tile >= 1,
            "detector.detections_per_tile",
            self.detections_per_tile,
            ">= 1",
        )
        _check(0 <= self.pseudo_score <= 1, "detector.pseudo_score", self.pseudo_score, "in [0, 1]")
        _check(
            0 <= self.sam_min_stability <= 1,
            "detector.sam_min_stability",
            self.sam_min_stability,
            "in [0, 1]",
        )


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: every component's config, composed."""

    name: str = "semisup"
    task: Task = "segmentation"  # detection: the box student of `detector` (semisup.detection)
    prep: PrepConfig = field(default_factory=PrepConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    ssl: SslConfig = field(default_factory=SslConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)


def require_segmentation(config: ExperimentConfig, command: str) -> None:
    """ConfigError, before any work, when ``command`` (run, tune: SAM teacher, student, mIoU)
    is given a ``task: detection`` config."""
    if config.task == "detection":
        raise ConfigError(
            f"task: detection: semisup {command} runs the segmentation pipeline (SAM teacher and "
            "student, scored by mIoU); train a detector with `semisup train` (its --set "
            "task=detection) and predict boxes with `semisup predict --run RUN --out OUT.csv`"
        )


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}, expected {expected}")


# ---------------------------------------------------------------------------------------------
# Plain dicts in and out


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain, YAML- and JSON-safe dicts, lists and scalars."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    result = plain(config)
    assert isinstance(result, dict)
    return result


# Keys that once existed, with what replaced them: a clearer error than "unknown key".
RETIRED_KEYS: dict[str, str] = {
    "ssl.class_balanced": "per-class thresholds are ssl.threshold_mode=freematch (self-adaptive, "
    "class-wise) or flexmatch; remove the key",
    "stream.shuffle_buffer": "training passes are seeded permutations of the split's tile ids "
    "(semisup.sampling), whatever the read order; remove the key",
}


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from plain data, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    retired = sorted(f"{prefix}{key}" for key in data if f"{prefix}{key}" in RETIRED_KEYS)
    if retired:
        raise ConfigError(f"config key '{retired[0]}' is retired: {RETIRED_KEYS[retired[0]]}")
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; known keys"
            f"{' of ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {key: _coerce(hints[key], value, f"{prefix}{key}") for key, value in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=f"{key}.")  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: got {value!r}, expected one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: got {value!r}, expected a list")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is not bool and isinstance(value, bool))
    ):
        raise ConfigError(
            f"{key}: got {value!r} ({type(value).__name__}), expected {hint.__name__}"
        )
    return value


# ---------------------------------------------------------------------------------------------
# YAML and --set overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"prep.tile_size=512"`` -> (["prep", "tile_size"], 512); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = _yaml_problem(err)
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem})") from None
    return key.strip().split("."), value


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path``; a syntax error names the file, line and column."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({_yaml_problem(err)})") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What PyYAML found wrong, in one line (without its excerpt of the document)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context, mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and mark is not None:
        return f"{problem}, {context} from line {mark.line + 1}"
    return str(problem)


def merge_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to plain config data (a new dict is returned)."""
    merged = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return merged


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """The default config, updated by a YAML file and then by ``--set`` overrides."""
    data = to_dict(ExperimentConfig())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        data = _deep_update(data, loaded)
    return from_dict(ExperimentConfig, merge_overrides(data, overrides))


def _deep_update(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write ``config`` as YAML to ``path`` (every field, in declaration order)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--config FILE`` and repeatable ``--set section.key=value`` flags of every stage."""
    parser.add_argument(
        "--config", type=Path, default=None, help="experiment YAML (defaults: the reference recipe)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set prep.tile_size=512 (repeatable)",
    )


def config_from_arguments(args: argparse.Namespace) -> ExperimentConfig:
    """The experiment config named by ``--config`` and ``--set`` (see ``add_config_arguments``)."""
    return load_config(getattr(args, "config", None), getattr(args, "overrides", None) or ())

"""``semisup train`` with ``task: detection``: the checks before workers start, and the hooks the
shared per-worker loop (``semisup.train_loop``) calls for the Faster R-CNN student.

The loop, its checkpoints, resumption, early stopping and report files are the segmentation
run's; here are only what differs:
- splits: a store's split counts mask labels only, so its box-only sources are all
  ``unlabeled``. Detection splits the tiles of sources *with boxes* by the unit rules the store
  was split with (``data_prep.splits``, its recorded split_by, fractions and seed); tiles of
  sources without boxes stay unlabeled;
- the step: ``semisup.detection.steps`` on the store's box targets of labeled tiles, and with
  ``ssl.enabled`` the Unbiased-Teacher term on unlabeled tiles, whose pseudo-boxes come from the
  EMA teacher, from the store's SAM instances or both (``detector.target``);
- the score: COCO box AP over the validation tiles (``box_ap``, the code of
  ``semisup evaluate-boxes``), each rank predicting its share, every rank scoring all of them;
- the best weights: the detector's state dict, ``RUN_DIR/best/detector.pt``, which
  ``load_detector_checkpoint`` (and ``detector.checkpoint``) reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from data_prep.boxes import BoxSet
from semisup import columns as C
from semisup import store as tile_store
from semisup.config import ConfigError, ExperimentConfig
from semisup.detection.box_ap import box_average_precision
from semisup.detection.model import DetectorCheckpointError, build_detector
from semisup.detection.steps import BoxBatch, DetectionRecipe, detection_step
from semisup.detection.targets import BoxTargets, SamPseudoBoxes, check_sam_pseudo_boxes
from semisup.model_input import prepare_batch
from semisup.sampling import STRONG_VIEW, WEAK_VIEW, derive_keys
from semisup.steps import unwrap
from semisup.train_state import Trainables

if TYPE_CHECKING:
    from semisup.train_loop import WorkerRun

DETECTOR_FILE = "detector.pt"
VALIDATION_BATCH = 8  # tiles per validation forward pass
LABELED_COLUMNS = (C.IMAGE, C.VALID, C.SOURCE, C.TILE_ID, C.Y0, C.X0)
UNLABELED_COLUMNS = (C.IMAGE, C.VALID, C.SOURCE, C.TILE_ID, C.Y0, C.X0)
AP_KEYS = ("ap", "ap50", "ap75")


# ---------------------------------------------------------------------------------------------
# Driver side


def detection_facts(
    store: str, config: ExperimentConfig, splits: Mapping[str, Sequence[int]] | None
) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """What workers need to know about the store (``store.store_facts``' keys, with the box
    classes as classes), and each split's tile ids; or an error naming what is missing.

    ``splits``: explicit tile ids per split name, else the box sources' split (module doc).

    Raises:
        NoBoxesError: the store holds no boxes.
        ConfigError: a key that cannot work with this store (``detector.checkpoint``, SAM
            pseudo-boxes of ``detector.target`` the store cannot give, ...).
        ValueError: a split without tiles, or validation tiles without a box.
    """
    if config.train.init_from is not None:
        raise ConfigError(
            f"train.init_from={config.train.init_from!r} warm-starts the SAM student; a detector "
            "starts from detector.checkpoint"
        )
    root = tile_store.open_store(store)
    meta = tile_store.read_store_meta(root)
    targets = BoxTargets(root, store)  # NoBoxesError: the one-line refusal of a box-less store
    index = tile_store.read_tile_index(store).to_pandas()
    tile_ids = (
        box_splits(root, meta, index, targets)
        if splits is None
        else {name: sorted(int(i) for i in splits.get(name, ())) for name in C.SPLITS}
    )
    for split in (C.LABELED, C.VAL):
        if not tile_ids[split]:
            raise ValueError(f"store {store}: the {split!r} split has no tiles (detection)")
    val_boxes = sum(len(truth.boxes) for truth in val_truths(store, targets, tile_ids[C.VAL]))
    if val_boxes == 0:
        raise ValueError(
            f"store {store}: the validation tiles hold no box; box AP needs truth to score against"
        )
    classes = list(targets.class_names)
    check_detector(config, len(classes))
    if config.ssl.enabled and config.detector.target != "ema" and tile_ids[C.UNLABELED]:
        key = f"detector.target={config.detector.target!r}"
        check_sam_pseudo_boxes(store, classes, tile_ids[C.UNLABELED], key)
    band_scale = {}
    for source_id in meta.sources:
        source = tile_store.read_source_meta(root, source_id)
        band_scale[source_id] = (list(source.band_low), list(source.band_high))
    facts = {
        "num_classes": len(classes),
        "class_names": classes,
        "tile_size": meta.tile_size,
        "band_scale": band_scale,
        "tiles_per_split": {name: len(ids) for name, ids in tile_ids.items()},
    }
    return facts, tile_ids


def box_splits(
    root: Any, meta: tile_store.StoreMeta, index: Any, targets: BoxTargets
) -> dict[str, list[int]]:
    """Tile ids per split: the tiles of sources with boxes split by the store's own unit rules
    (``data_prep.splits``, with the parameters recorded in the store), the rest unlabeled."""
    from data_prep.splits import split_tiles

    params = meta.split
    folder_of = {
        s: str(Path(tile_store.read_source_meta(root, s).image_path).parent) for s in meta.sources
    }
    names = split_tiles(
        index[C.SOURCE].tolist(),
        index[C.Y0].tolist(),
        index[C.X0].tolist(),
        labelled_sources=targets.sources_with_boxes,
        folder_of=folder_of,
        split_by=params.get("split_by", "source"),
        block_size=int(params.get("block_size", 1024)),
        val_fraction=float(params.get("val_fraction", 0.2)),
        labeled_fraction=float(params.get("labeled_fraction", 0.125)),
        val_sources=tuple(params.get("val_sources", ())),
        seed=int(params.get("seed", 0)),
    )
    ids = index[C.TILE_ID].to_numpy()
    return {
        name: sorted(int(i) for i, n in zip(ids, names, strict=True) if n == name)
        for name in C.SPLITS
    }


def check_detector(config: ExperimentConfig, num_classes: int) -> None:
    """``detector.checkpoint`` loads into the configured detector, or a ConfigError naming it."""
    detector = config.detector
    if detector.checkpoint is None:
        return
    try:
        build_detector(
            num_classes,
            arch=detector.arch,
            finetune=detector.finetune,
            trainable_backbone_layers=detector.trainable_backbone_layers,
            checkpoint=detector.checkpoint,
            tile_size=64,
        )
    except DetectorCheckpointError as err:
        raise ConfigError(f"detector.checkpoint={detector.checkpoint!r}: {err}") from err


# ---------------------------------------------------------------------------------------------
# Worker side


def box_batch(
    batch: Mapping[str, Any],
    targets: BoxTargets,
    band_scale: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]],
    device: torch.device,
) -> BoxBatch:
    """Tile columns (IMAGE, VALID, SOURCE, Y0, X0) -> images B×3×S×S in [0, 1] with each tile's
    store boxes (N×4 pixel-edge xyxy) and labels (N int64, class id + 1: 0 is background)."""
    images = prepare_batch(batch, band_scale, device)[C.IMAGE]
    boxes, labels = [], []
    for source, y0, x0 in zip(batch[C.SOURCE], batch[C.Y0], batch[C.X0], strict=True):
        tile = targets.tile(str(source), int(y0), int(x0))
        boxes.append(torch.from_numpy(tile.boxes).to(device))
        labels.append(torch.from_numpy(tile.labels + 1).to(device))
    return BoxBatch(images, boxes, labels)


def sam_box_batch(
    batch: Mapping[str, Any],
    images: torch.Tensor,
    sam_boxes: SamPseudoBoxes,
    device: torch.device,
) -> BoxBatch:
    """Unlabeled tiles (TILE_ID, Y0, X0 columns; ``images`` B×3×S×S in [0, 1]) with their SAM
    pseudo-boxes (N×4 pixel-edge xyxy), labels (N int64, all 1: the store's one box class) and
    scores (N float32 predicted IoU)."""
    boxes, labels, scores = [], [], []
    for tile_id, y0, x0 in zip(batch[C.TILE_ID], batch[C.Y0], batch[C.X0], strict=True):
        tile, iou = sam_boxes.tile(int(tile_id), int(y0), int(x0))
        boxes.append(torch.from_numpy(tile.boxes).to(device))
        labels.append(torch.from_numpy(tile.labels + 1).to(device))
        scores.append(torch.from_numpy(iou).to(device))
    return BoxBatch(images, boxes, labels, scores)


def _keys(batch: Mapping[str, Any] | None, view: int) -> torch.Tensor | None:
    if batch is None or C.SAMPLE_KEY not in batch:
        return None
    return derive_keys(torch.as_tensor(np.asarray(batch[C.SAMPLE_KEY], np.int64)), view)


class DetectionTask:
    """The hooks of ``semisup.train_loop.TaskHooks`` for the Faster R-CNN student."""

    score = "ap"
    epoch_keys: tuple[str, ...] = (*AP_KEYS, "per_class", "predicted_boxes", "truth_boxes")
    best_file = DETECTOR_FILE
    halo = 0  # box targets are in the tile's own frame

    def __init__(self, config: ExperimentConfig, loop_config: dict[str, Any]) -> None:
        store = loop_config["store"]
        self.targets = BoxTargets(tile_store.open_store(store), store)
        self.class_names = list(loop_config["facts"]["class_names"])
        self.tile_size = int(loop_config["facts"]["tile_size"])  # px; predict's default window
        self.truths = val_truths(store, self.targets, loop_config["splits"][C.VAL])
        ssl, detector = config.ssl, config.detector
        self.recipe = DetectionRecipe(
            augment=config.augment,
            pseudo_score=detector.pseudo_score,
            unlabeled_weight=ssl.unlabeled_weight,
            ramp_up_steps=ssl.ramp_up_steps,
            ema_momentum=ssl.ema_momentum,
            target=detector.target,
            nms_iou=detector.nms_iou,
        )
        self.sam_boxes = (
            SamPseudoBoxes(
                store,
                self.tile_size,
                min_predicted_iou=detector.sam_min_predicted_iou,
                min_stability=detector.sam_min_stability,
            )
            if loop_config["use_unlabeled"] and detector.target != "ema"
            else None
        )

    def build(
        self,
        config: ExperimentConfig,
        facts: Mapping[str, Any],
        loop_config: dict[str, Any],
        device: torch.device,
    ) -> Trainables:
        from semisup.ema import make_ema_teacher
        from semisup.train_loop import build_optimizer

        detector = config.detector
        torch.manual_seed(config.train.seed)  # the same random start on every worker
        model = build_detector(
            int(facts["num_classes"]),
            arch=detector.arch,
            finetune=detector.finetune,
            trainable_backbone_layers=detector.trainable_backbone_layers,
            checkpoint=detector.checkpoint,
            tile_size=int(facts["tile_size"]),
            score_threshold=detector.score_threshold,
            nms_iou=detector.nms_iou,
            detections_per_tile=detector.detections_per_tile,
        ).to(device)
        teacher = make_ema_teacher(model) if loop_config["use_unlabeled"] else None
        return Trainables(model, build_optimizer(config, model), teacher, weights_of=detector_state)

    def columns(
        self, loop_config: dict[str, Any]
    ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        return LABELED_COLUMNS, UNLABELED_COLUMNS, LABELED_COLUMNS

    def step(
        self,
        run: WorkerRun,
        labeled: dict[str, np.ndarray],
        unlabeled: dict[str, np.ndarray] | None,
    ) -> dict[str, float]:
        batch = box_batch(labeled, self.targets, run.band_scale, run.device)
        images: torch.Tensor | BoxBatch | None = None
        if unlabeled is not None:
            images = prepare_batch(unlabeled, run.band_scale, run.device)[C.IMAGE]
            if self.sam_boxes is not None:
                images = sam_box_batch(unlabeled, images, self.sam_boxes, run.device)
        return detection_step(
            run.model,
            run.trainables.optimizer,
            batch,
            images,
            teacher=run.trainables.teacher,
            recipe=self.recipe,
            step=run.state.step,
            keys=(
                _keys(labeled, WEAK_VIEW),
                _keys(unlabeled, WEAK_VIEW),
                _keys(unlabeled, STRONG_VIEW),
            ),
        )

    def validate(self, run: WorkerRun) -> dict[str, Any]:
        """Box AP, AP50, AP75 and per class over every validation tile."""
        assert run.val_reader is not None
        model = unwrap(run.model).eval()  # unwrapped: ranks may hold unequal shares
        predicted: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        share = run.val_share
        for lo in range(0, len(share), VALIDATION_BATCH):
            batch = run.val_reader.read(share[lo : lo + VALIDATION_BATCH])
            images = prepare_batch(batch, run.band_scale, run.device)[C.IMAGE]
            with torch.inference_mode():
                found = model(list(images))
            for tile_id, d in zip(batch[C.TILE_ID], found, strict=True):
                boxes, labels, scores = (d[k].cpu().numpy() for k in ("boxes", "labels", "scores"))
                predicted.append((int(tile_id), boxes, labels, scores))
        everything = gather(predicted, run.collective.world_size)
        return score_boxes(everything, self.truths, self.class_names)

    def save_weights(self, model: nn.Module, path: Path) -> None:
        torch.save(detector_state(model), path)

    def log_validation(self, writer: Any, metrics: dict[str, Any], step: int) -> None:
        for key in AP_KEYS:
            writer.add_scalar(f"val/{key}", metrics[key], step)
        for name, scores in metrics["per_class"].items():
            if scores["ap"] is not None:
                writer.add_scalar(f"val/ap_{name}", scores["ap"], step)
        writer.flush()

    def describe(self, config: ExperimentConfig) -> dict[str, Any]:
        detector = config.detector
        return {"arch": detector.arch, "finetune": detector.finetune, "tile_size": self.tile_size}


def val_truths(store: str, targets: BoxTargets, tile_ids: Sequence[int]) -> list[BoxSet]:
    """The store's boxes of every validation tile, one BoxSet each (images named by tile id)."""
    index = tile_store.read_tile_index(store).to_pandas().set_index(C.TILE_ID)
    out = []
    for tile_id in tile_ids:
        row = index.loc[int(tile_id)]
        tile = targets.tile(str(row[C.SOURCE]), int(row[C.Y0]), int(row[C.X0]))
        names = tuple(targets.class_names[k] for k in tile.labels)
        out.append(BoxSet(_image(int(tile_id)), tile.boxes, names, Path(store)))
    return out


def detector_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The detector's whole state dict on the CPU: batch norms' statistics move in training."""
    return {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}


def gather(items: list[Any], world_size: int) -> list[Any]:
    """Every rank's ``items``, concatenated in rank order (the list itself with one worker)."""
    if world_size == 1:
        return items
    import torch.distributed as dist

    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def _image(tile_id: int) -> str:
    return f"tile_{tile_id}"


def score_boxes(
    predicted: Sequence[tuple[int, np.ndarray, np.ndarray, np.ndarray]],
    truths: Sequence[BoxSet],
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Box AP of (tile id, boxes N×4, labels N (class id + 1), scores N) predictions.

    Detections of a class no validation tile holds are left out: COCO leaves such a class out
    of the mean (no truth, no AP), and ``box_average_precision`` refuses them by name.
    """
    present = {name for truth in truths for name in truth.labels}
    predictions = []
    for tile_id, boxes, labels, scores in predicted:
        names = np.array([class_names[int(k) - 1] for k in labels], dtype=object)
        keep = np.isin(names, sorted(present)) if len(names) else np.zeros(0, bool)
        predictions.append(
            BoxSet(
                _image(tile_id),
                boxes[keep].astype(np.float32),
                tuple(names[keep]),
                Path("validation"),
                scores[keep].astype(np.float32),
            )
        )
    result = box_average_precision(predictions, truths)
    return {
        "ap": result.ap,
        "ap50": result.ap50,
        "ap75": result.ap75,
        "per_class": {
            name: {key: getattr(c, key) for key in AP_KEYS} for name, c in result.per_class.items()
        },
        "predicted_boxes": result.predicted_boxes,
        "truth_boxes": result.truth_boxes,
    }


def report_markdown(report: Mapping[str, Any]) -> str:
    """RUN_DIR/report.md of a detection run: AP per epoch and per class."""
    names = list(report["class_names"])
    lines = [
        f"# Training report (detection, {report['arch']}, {report['finetune']})",
        "",
        f"Best validation box AP {report['best_ap']:.4f} at epoch {report['best_epoch']}"
        f"{' (stopped early)' if report['stopped_early'] else ''}; "
        f"checkpoint `{report['best_checkpoint']}`.",
        "",
        "| epoch | step | loss | AP | AP50 | AP75 | "
        + " | ".join(f"AP[{n}]" for n in names)
        + " |",
        "|" + "---|" * (6 + len(names)),
    ]
    for h in report["epochs"]:
        per_class = [(h["per_class"].get(n) or {}).get("ap") for n in names]
        shown = " | ".join("–" if v is None else f"{v:.3f}" for v in per_class)
        lines.append(
            f"| {h['epoch']} | {h['step']} | {h['train'].get('loss', 0.0):.4f} | {h['ap']:.4f} | "
            f"{h['ap50']:.4f} | {h['ap75']:.4f} | {shown} |"
        )
    return "\n".join(lines) + "\n"

"""The SAM teacher: a Ray Data callable class that adds pseudo-labels and confidences to tiles.

A teacher (``MaskTeacher`` or ``SemanticTeacher``, on the base ``Teacher``; ``TEACHERS`` maps a
mode to its class) builds its models once per actor (``__init__``) and labels one batch of tiles
per call (``__call__``, under ``torch.inference_mode()``). ``TeacherConfig`` holds what decides
the labels. Three modes:

- ``automatic``: a grid of point prompts per tile, masks filtered by predicted IoU, stability and
  area (``masks.keep_masks``), deduplicated with box NMS, painted into an instance map;
- ``prompted``: one mask per box prompt of the source (its ``boxes`` array), restricted to the
  box plus a margin, painted with instance id = the box's index in ``boxes`` + 1;
- ``semantic``: class probabilities from a fine-tuned student checkpoint, arg-maxed into class
  ids, optionally refined by SAM's automatic segments (``masks.refine_with_segments``).

Encodings of ``PSEUDO_LABEL`` (S×S per tile, S = model input size):

- instance maps (automatic/prompted, ``output="instances"``): uint16, 0 = background, k >= 1 an
  instance, ``INSTANCE_IGNORE`` (65535) where the pixel is not valid (nodata or padding);
- foreground maps (``output="foreground"``) and semantic labels: uint8, ``IGNORE_INDEX`` (255)
  where not valid; foreground is 0/1, semantic labels are class ids.

``CONFIDENCE`` is S×S float32 in [0, 1], 0 where not valid. ``NUM_MASKS`` counts the masks
painted (automatic, prompted) or the refining segments (semantic).

Instance maps come with ``INSTANCES``: per tile a K×8 float64 array, one row per non-empty mask
(``INSTANCE_FIELDS``: the id painted in ``PSEUDO_LABEL``, the box x0, y0, x1, y1 in source-raster
pixel edges from the *whole* mask before painting, predicted IoU, stability score, area in
pixels). Overlapping masks lose pixels to higher-scoring ones in the painted map; the rows keep
each mask's own extent, so they are the instances as SAM returned them.

Everything except the teacher classes is a plain function of tensors or arrays, usable without Ray.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal, NamedTuple, get_args

import numpy as np
import torch
from segment_anything.modeling import Sam

from semisup import columns as C
from semisup import store as tile_store
from semisup.bands import to_three_bands
from semisup.masks import (
    MaskFilter,
    foreground,
    paint_instances,
    probabilities_to_label,
    refine_with_segments,
)
from semisup.sam import build_sam
from semisup.sam_prompts import (
    INSTANCE_FIELDS,
    MAX_MASKS_PER_TILE,
    automatic_masks,
    best_mask,
    box_centres,
    decode_masks,
    encode_images,
    instance_rows,
    point_grid,
    restrict_to_boxes,
)
from semisup.tile_boxes import boxes_in_tile, source_boxes

TeacherMode = Literal["automatic", "prompted", "semantic"]
PromptKind = Literal["box", "point", "box+point"]
OutputKind = Literal["instances", "foreground"]
MODES: Final[tuple[str, ...]] = get_args(TeacherMode)

NUM_MASKS: Final = "num_masks"  # per-tile int32 column added by the teacher
INSTANCES: Final = "instances"  # per-tile K×8 float64 column: one INSTANCE_FIELDS row per mask
INSTANCE_DTYPE: Final = np.uint16
INSTANCE_IGNORE: Final = 65535  # instance maps: pixel not valid (nodata, padding)
BACKGROUND: Final = 0


# ---------------------------------------------------------------------------------------------
# Label encodings


class LabelEncoding(NamedTuple):
    """How ``PSEUDO_LABEL`` is stored for one mode and output kind."""

    dtype: np.dtype
    ignore: int  # pixels that are not valid (nodata, padding)
    background: int | None  # pixels no mask covers; None for class labels (semantic mode)


def label_encoding(mode: str, output: str = "instances") -> LabelEncoding:
    """The ``PSEUDO_LABEL`` encoding of a teacher mode and output kind."""
    if mode == "semantic":
        return LabelEncoding(np.dtype(np.uint8), C.IGNORE_INDEX, None)
    if output == "foreground":
        return LabelEncoding(np.dtype(np.uint8), C.IGNORE_INDEX, BACKGROUND)
    return LabelEncoding(np.dtype(INSTANCE_DTYPE), INSTANCE_IGNORE, BACKGROUND)


# ---------------------------------------------------------------------------------------------
# Teacher input and prompt geometry (pure)


def teacher_image(
    image: np.ndarray,
    band_low: Sequence[float],
    band_high: Sequence[float],
    bands: Sequence[int] | str = "rgb",
) -> np.ndarray:
    """One tile as the teacher sees it: H×W×C source dtype -> H×W×3 uint8.

    Each band is scaled from the source's [band_low, band_high] to [0, 255]
    (``store.scale_to_uint8``), then reduced to three bands (``bands.to_three_bands``).
    """
    scaled = tile_store.scale_to_uint8(image, tuple(band_low), tuple(band_high))
    return to_three_bands(scaled, bands)


def read_source_boxes(root: Any, source_id: str) -> np.ndarray:
    """N×4 float32 pixel xyxy box prompts of a source group of the store (0×4 when none)."""
    boxes = source_boxes(root, source_id).boxes
    if len(boxes) >= INSTANCE_IGNORE:  # ids are box index + 1 in a uint16 map
        raise ValueError(f"source {source_id} has {len(boxes)} boxes; at most 65534 fit")
    return boxes


# ---------------------------------------------------------------------------------------------
# Semantic teacher: the student's class logits


SemanticModel = Callable[[torch.Tensor], torch.Tensor]
"""B×3×S×S float RGB in [0, 255] -> B×K×S×S class logits."""


class _ScaledInput(torch.nn.Module):
    """Feeds the teacher's [0, 255] images (SAM's input range) to the student, which takes
    [0, 1] like every other caller of it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images / 255.0)


def logits_to_label(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K×H×W class logits -> (H×W int64 class ids, H×W float32 softmax confidence in [0, 1])."""
    return probabilities_to_label(torch.softmax(logits.float(), dim=0))


# ---------------------------------------------------------------------------------------------
# The Ray Data callable class


def select_device(device: str = "auto") -> torch.device:
    """``"auto"``: cuda when a GPU is visible to this process, else cpu; otherwise as named."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---------------------------------------------------------------------------------------------
# What makes the pseudo-labels


# the options that decide a mode's pseudo-labels, besides the model, halo and bands
_CONTENT_OPTIONS: Final[dict[str, tuple[str, ...]]] = {
    "automatic": ("points_per_side", "mask_filter", "output"),
    "prompted": ("prompt", "multimask", "box_margin", "output"),
    "semantic": ("refine",),
}


@dataclass(frozen=True)
class TeacherConfig:
    """A teacher: its mode, model and the options that decide its pseudo-labels.

    ``semisup pseudo-label`` records ``options()`` with every labelling run, so a store labelled
    by one teacher is never silently extended by another (``pseudo_label.teacher_identity``).
    """

    mode: TeacherMode = "automatic"
    model_type: str = "vit_b"  # tiny, vit_b, vit_l or vit_h (semisup.sam.SAM_SPECS)
    checkpoint: str | None = None  # automatic/prompted: SAM checkpoint path or URL, None: SAM
    # with weights drawn from ``seed`` (tests, benchmarks); semantic: the student's run or adapter
    base_checkpoint: str | None = None  # semantic: the SAM the student was fine-tuned from,
    # also the SAM that makes the refining segments
    halo: int = 0  # px of context read around each tile; tile + 2·halo divides by PATCH_SIZE
    bands: Sequence[int] | str = "rgb"  # band composite for ``to_three_bands``
    points_per_side: int = 16  # automatic grid: 16 at 256 px keeps SAM's 32 per 1024 px
    mask_filter: MaskFilter = MaskFilter()  # automatic masks kept (predicted IoU, stability)
    prompt: PromptKind = "box"  # prompted: box, point (the box centre) or box+point
    multimask: bool = False  # prompted: best of SAM's three masks by predicted IoU
    box_margin: float = 0.1  # prompted: share of a box's size a mask may extend beyond it
    output: OutputKind = "instances"  # automatic/prompted: uint16 instance ids or uint8 0/1
    refine: bool = False  # semantic: SAM's automatic segments vote on the class labels
    seed: int = 0  # SAM's weights when there is no checkpoint (the same in every actor)
    nms_iou: float = 0.7  # automatic: box NMS between candidate masks (SAM's AMG default)
    max_masks: int | None = MAX_MASKS_PER_TILE
    background_confidence: float = 0.5  # confidence scale of pixels no mask covers

    def __post_init__(self) -> None:
        for name, known in (
            ("mode", MODES),
            ("prompt", get_args(PromptKind)),
            ("output", get_args(OutputKind)),
        ):
            if getattr(self, name) not in known:
                value = getattr(self, name)
                raise ValueError(f"unknown teacher {name} {value!r}; known: {', '.join(known)}")
        if self.mode == "semantic" and self.checkpoint is None:
            raise ValueError("semantic mode needs the student's adapter as its checkpoint")

    @property
    def sam_masks(self) -> bool:
        """Whether SAM's masks make the labels or refine them (everything but plain semantic)."""
        return self.mode != "semantic" or self.refine

    @property
    def writes_instances(self) -> bool:
        """Whether labels are instance maps with an ``INSTANCES`` table (automatic, prompted)."""
        return self.mode != "semantic" and self.output == "instances"

    def encoding(self) -> LabelEncoding:
        """How this teacher's ``PSEUDO_LABEL`` is stored (``label_encoding``)."""
        return label_encoding(self.mode, self.output)

    def options(self) -> dict[str, Any]:
        """The options that decide this mode's labels, with the band composite (JSON-safe)."""
        names = _CONTENT_OPTIONS[self.mode]
        if self.mode == "semantic" and self.refine:
            names += ("points_per_side", "mask_filter")
        chosen = {name: getattr(self, name) for name in (*names, "bands")}
        if "mask_filter" in chosen:
            chosen["mask_filter"] = asdict(chosen["mask_filter"])
        return dict(json.loads(json.dumps(chosen)))  # as it reads back from the store


@dataclass(frozen=True)
class TeacherModels:
    """What a teacher runs: SAM (automatic, prompted, semantic refinement) and the student's
    class logits (semantic), on CPU."""

    sam: Sam | None
    semantic: SemanticModel | None
    num_classes: int


def build_teacher_models(config: TeacherConfig, image_size: int) -> TeacherModels:
    """Build the teacher's models and load their weights, on CPU.

    Each actor calls it once; ``run_pseudo_label`` calls it once in the driver before any actor
    starts, so a checkpoint or adapter that cannot be read or does not fit fails there, in one
    line naming the file. Without a checkpoint SAM's weights are drawn from ``config.seed``
    (the same in every actor).
    """
    sam = None
    semantic = config.mode == "semantic"
    if config.sam_masks:
        sam_checkpoint = config.base_checkpoint if semantic else config.checkpoint
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # same weights in every actor when no checkpoint
            sam = build_sam(config.model_type, image_size=image_size, checkpoint=sam_checkpoint)
            sam = sam.eval()
    if not semantic or config.checkpoint is None:
        return TeacherModels(sam, None, 0)
    from semisup.student import load_trained_student  # here: only semantic mode needs peft

    trained, num_classes = load_trained_student(
        config.checkpoint,
        model_type=config.model_type,
        image_size=image_size,
        base_checkpoint=config.base_checkpoint,
        seed=config.seed,
    )
    return TeacherModels(sam, _ScaledInput(trained), num_classes)


# ---------------------------------------------------------------------------------------------
# The Ray Data callable classes


class Teacher:
    """Adds ``PSEUDO_LABEL``, ``CONFIDENCE`` and ``NUM_MASKS`` columns to batches of tiles.

    The base of ``MaskTeacher`` (automatic, prompted) and ``SemanticTeacher``: it reads the
    store's band ranges, builds the models once per actor and assembles the output columns;
    each mode's ``_label_tiles`` labels the tiles. ``TEACHERS`` maps a mode to its class.

    Input batch (``semisup.data.read_tiles`` rows): ``IMAGE`` B×S×S×C source dtype, ``VALID``
    B×S×S bool, ``SOURCE`` B str, ``Y0``/``X0`` B int (the tile's raster offset, without halo).
    Output: the input columns except ``IMAGE`` and ``VALID`` (unless ``keep_inputs``), plus
    ``PSEUDO_LABEL`` B×S×S (see ``label_encoding``), ``CONFIDENCE`` B×S×S float32 in [0, 1] and
    ``NUM_MASKS`` B int32; with instance maps, ``INSTANCES``.

    Args:
        store: the tile store (path or fsspec URL): band ranges and box prompts come from it.
        config: the teacher (``TeacherConfig``); ``config.halo`` must match the input rows.
        device: ``auto`` (cuda if available), ``cpu`` or ``cuda[:i]``.
        bf16: run the model under ``torch.autocast("cuda", dtype=torch.bfloat16)`` on GPU.
        points_per_batch: automatic grid points decoded per SAM call (memory, not content).
        keep_inputs: keep ``IMAGE`` and ``VALID`` in the output batch.
        torch_threads: ``torch.set_num_threads`` for this actor (None: leave as is).
        storage_options: fsspec options for ``store``.
    """

    def __init__(
        self,
        store: str,
        config: TeacherConfig,
        *,
        device: str = "auto",
        bf16: bool = True,
        points_per_batch: int = 64,
        keep_inputs: bool = False,
        torch_threads: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.config, self.points_per_batch, self.keep_inputs = config, points_per_batch, keep_inputs
        self.device = select_device(device)
        self.bf16 = bf16 and self.device.type == "cuda"
        self._root = tile_store.open_store(store, "r", storage_options)
        self.image_size = tile_store.read_store_meta(self._root).tile_size + 2 * config.halo
        self._sources: dict[str, tile_store.SourceMeta] = {}
        self.grid = point_grid(config.points_per_side, self.image_size)
        models = build_teacher_models(config, self.image_size)
        self.sam: Sam | None = None if models.sam is None else models.sam.to(self.device).eval()
        semantic = models.semantic
        self.semantic: SemanticModel | None = (
            semantic.to(self.device) if isinstance(semantic, torch.nn.Module) else semantic
        )
        self.num_classes = models.num_classes

    def source_meta(self, source_id: str) -> tile_store.SourceMeta:
        """A source's band ranges and geometry, read once per actor."""
        if source_id not in self._sources:
            self._sources[source_id] = tile_store.read_source_meta(self._root, source_id)
        return self._sources[source_id]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _images(self, batch: Mapping[str, np.ndarray]) -> torch.Tensor:
        """B×3×S×S float32 in [0, 255] on the device, each tile scaled with its source's range."""
        tiles = []
        for image, source_id in zip(batch[C.IMAGE], batch[C.SOURCE], strict=True):
            meta = self.source_meta(str(source_id))
            tiles.append(teacher_image(image, meta.band_low, meta.band_high, self.config.bands))
        stacked = torch.from_numpy(np.stack(tiles)).to(self.device)  # B×S×S×3 uint8
        return stacked.permute(0, 3, 1, 2).float()  # B×3×S×S

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode(), self._autocast():
            images = self._images(batch)
            labels, confidences, counts, rows = zip(*self._label_tiles(images, batch), strict=True)
        encoding = self.config.encoding()
        label = np.stack(labels).astype(encoding.dtype)  # B×S×S
        confidence = np.stack(confidences).astype(np.float32)  # B×S×S
        valid = np.asarray(batch[C.VALID], dtype=bool)
        label[~valid] = encoding.ignore
        confidence[~valid] = 0.0
        dropped = () if self.keep_inputs else (C.IMAGE, C.VALID)
        out = {name: value for name, value in batch.items() if name not in dropped}
        out[C.PSEUDO_LABEL] = label
        out[C.CONFIDENCE] = np.clip(confidence, 0.0, 1.0)
        out[NUM_MASKS] = np.asarray(counts, dtype=np.int32)
        if self.config.writes_instances:
            ragged = np.empty(len(rows), dtype=object)  # B arrays of K×8, K per tile
            ragged[:] = list(rows)
            out[INSTANCES] = ragged
        return out

    def _label_tiles(
        self, images: torch.Tensor, batch: Mapping[str, np.ndarray]
    ) -> Iterator[tuple[np.ndarray, np.ndarray, int, np.ndarray]]:
        """(S×S label, S×S confidence, mask count, K×8 instance rows) per tile, as NumPy on the
        CPU; instance rows are 0×8 where the mode writes none."""
        raise NotImplementedError

    def _automatic_masks(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits N×S×S, predicted IoU N) of the kept automatic masks, best first."""
        assert self.sam is not None
        return automatic_masks(
            self.sam,
            embedding,
            self.grid,
            rules=self.config.mask_filter,
            nms_iou=self.config.nms_iou,
            points_per_batch=self.points_per_batch,
            max_masks=self.config.max_masks,
        )


class MaskTeacher(Teacher):
    """SAM's masks as pseudo-labels: ``automatic`` (a point grid per tile) or ``prompted`` (one
    mask per box prompt of the source), painted into instance or foreground maps."""

    def __init__(self, store: str, config: TeacherConfig, **runtime: Any) -> None:
        if config.mode == "semantic":
            raise ValueError(
                "MaskTeacher makes automatic or prompted labels; semantic mode is SemanticTeacher's"
            )
        super().__init__(store, config, **runtime)
        self._boxes: dict[str, np.ndarray] = {}

    def source_boxes(self, source_id: str) -> np.ndarray:
        """N×4 float32 pixel xyxy box prompts of a source (0×4 when it has none)."""
        if source_id not in self._boxes:
            self._boxes[source_id] = read_source_boxes(self._root, source_id)
        return self._boxes[source_id]

    def _label_tiles(
        self, images: torch.Tensor, batch: Mapping[str, np.ndarray]
    ) -> Iterator[tuple[np.ndarray, np.ndarray, int, np.ndarray]]:
        assert self.sam is not None
        config = self.config
        embeddings = encode_images(self.sam, images)  # B×256×g×g, the encoder batched
        for i in range(len(images)):
            embedding = embeddings[i : i + 1]
            top = int(batch[C.Y0][i]) - config.halo  # the raster pixel at the input's corner
            left = int(batch[C.X0][i]) - config.halo
            if config.mode == "automatic":
                logits, scores = self._automatic_masks(embedding)
                ids = torch.arange(1, len(scores) + 1, device=scores.device)  # paint_instances'
                instances, confidence = paint_instances(
                    logits, scores, config.background_confidence
                )
            else:
                logits, scores, ids = self._prompted_masks(
                    embedding, str(batch[C.SOURCE][i]), top, left
                )
                instances, confidence = self._paint_prompted(logits, scores, ids)
            rows = np.zeros((0, len(INSTANCE_FIELDS)), np.float64)
            if config.writes_instances:
                rows = instance_rows(
                    logits,
                    scores,
                    ids,
                    top=top,
                    left=left,
                    stability_offset=config.mask_filter.stability_offset,
                )
            count = int(instances.unique().gt(0).sum())
            label = foreground(instances) if config.output == "foreground" else instances
            yield label.cpu().numpy(), confidence.float().cpu().numpy(), count, rows

    def _prompted_masks(
        self, embedding: torch.Tensor, source_id: str, top: int, left: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits P×S×S restricted to their boxes, predicted IoU P, instance ids P) of the
        source's boxes in this input; ids = index of the box in the source's ``boxes`` + 1."""
        assert self.sam is not None
        boxes_np, box_index = boxes_in_tile(
            self.source_boxes(source_id), top, left, self.image_size
        )
        ids = torch.from_numpy(box_index + 1).to(self.device)
        if len(box_index) == 0:
            empty = torch.zeros(0, self.image_size, self.image_size, device=self.device)
            return empty, torch.zeros(0, device=self.device), ids
        boxes = torch.from_numpy(boxes_np).to(self.device)
        coords = labels = None
        if "point" in self.config.prompt:
            coords = box_centres(boxes)[:, None, :]  # P×1×2
            labels = torch.ones(len(boxes), 1, dtype=torch.int64, device=self.device)
        logits, iou = decode_masks(
            self.sam,
            embedding,
            point_coords=coords,
            point_labels=labels,
            boxes=boxes if "box" in self.config.prompt else None,
            multimask=self.config.multimask,
        )
        logits, iou = best_mask(logits, iou)  # P×S×S, P
        return restrict_to_boxes(logits, boxes, self.config.box_margin), iou, ids

    def _paint_prompted(
        self, logits: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Paint prompted masks, then renumber painted k -> ``ids[k - 1]``."""
        painted, confidence = paint_instances(logits, scores, self.config.background_confidence)
        if len(ids) == 0:
            return painted, confidence
        instances = torch.where(painted > 0, ids[(painted - 1).clamp(min=0)], painted)
        return instances, confidence


class SemanticTeacher(Teacher):
    """A fine-tuned student's class labels as pseudo-labels (arg-max, softmax confidence),
    optionally refined by SAM's automatic segments (``masks.refine_with_segments``)."""

    def __init__(self, store: str, config: TeacherConfig, **runtime: Any) -> None:
        if config.mode != "semantic":
            raise ValueError(f"SemanticTeacher makes semantic labels, not {config.mode!r} ones")
        super().__init__(store, config, **runtime)

    def _label_tiles(
        self, images: torch.Tensor, batch: Mapping[str, np.ndarray]
    ) -> Iterator[tuple[np.ndarray, np.ndarray, int, np.ndarray]]:
        assert self.semantic is not None
        no_rows = np.zeros((0, len(INSTANCE_FIELDS)), np.float64)
        logits = self.semantic(images)  # B×K×S×S
        # SAM is built for semantic mode only to refine (TeacherConfig.sam_masks)
        embeddings = None if self.sam is None else encode_images(self.sam, images)
        for i in range(len(images)):
            label, confidence = logits_to_label(logits[i])
            count = 0
            if embeddings is not None:
                masks, scores = self._automatic_masks(embeddings[i : i + 1])
                segments, _ = paint_instances(masks, scores, self.config.background_confidence)
                count = int(segments.unique().gt(0).sum())
                label, confidence = refine_with_segments(
                    label, confidence, segments, self.num_classes
                )
            yield label.cpu().numpy(), confidence.float().cpu().numpy(), count, no_rows


TEACHERS: Final[dict[str, type[Teacher]]] = {
    "automatic": MaskTeacher,
    "prompted": MaskTeacher,
    "semantic": SemanticTeacher,
}  # a teacher mode -> the class that labels it


def build_teacher(store: str, config: TeacherConfig, **runtime: Any) -> Teacher:
    """The teacher of ``config.mode`` (``TEACHERS``) on ``store``; ``runtime``: the device,
    precision and actor settings of ``Teacher``."""
    return TEACHERS[config.mode](store, config, **runtime)

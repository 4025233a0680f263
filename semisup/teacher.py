"""The SAM teacher: a Ray Data callable class that adds pseudo-labels and confidences to tiles.

``SamTeacher`` builds its model once per actor (``__init__``) and labels one batch of tiles per
call (``__call__``, under ``torch.inference_mode()``). Three modes:

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

Everything except ``SamTeacher`` is a plain function of tensors or arrays, usable without Ray.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple, get_args

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.amg import (
    batched_mask_to_box,
    build_point_grid,
    calculate_stability_score,
)
from torchvision.ops import batched_nms

from semisup import columns as C
from semisup import store as tile_store
from semisup.bands import to_three_bands
from semisup.masks import (
    MaskFilter,
    foreground,
    keep_masks,
    paint_instances,
    probabilities_to_label,
    refine_with_segments,
)
from semisup.sam import build_sam
from semisup.tile_boxes import boxes_in_tile, source_boxes

TeacherMode = Literal["automatic", "prompted", "semantic"]
PromptKind = Literal["box", "point", "box+point"]
OutputKind = Literal["instances", "foreground"]
MODES: Final[tuple[str, ...]] = get_args(TeacherMode)

NUM_MASKS: Final = "num_masks"  # per-tile int32 column added by the teacher
INSTANCES: Final = "instances"  # per-tile K×8 float64 column: one INSTANCE_FIELDS row per mask
INSTANCE_FIELDS: Final = (
    "instance_id",
    "x0",
    "y0",
    "x1",
    "y1",
    "predicted_iou",
    "stability",
    "area",
)
INSTANCE_DTYPE: Final = np.uint16
INSTANCE_IGNORE: Final = 65535  # instance maps: pixel not valid (nodata, padding)
BACKGROUND: Final = 0
# automatic mode: masks kept per tile, highest predicted IoU first. It bounds the painting work
# and the instance table (a 16-point grid gives up to 768 candidates before NMS); a tile of
# 128-512 px rarely holds more objects than this
MAX_MASKS_PER_TILE: Final = 255
# -inf logits outside a prompt's box: probability 0 and never above the mask threshold.
_OUTSIDE: Final = float("-inf")


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


def box_centres(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """N×4 boxes -> N×2 (x, y) centres, the point prompt derived from a box."""
    return (boxes_xyxy[:, :2] + boxes_xyxy[:, 2:]) / 2


def restrict_to_boxes(
    logits: torch.Tensor, boxes_xyxy: torch.Tensor, margin: float
) -> torch.Tensor:
    """Mask logits with everything outside each prompt's box (plus a margin) set to -inf.

    ``logits``: N×H×W; ``boxes_xyxy``: N×4 tile-frame pixels; ``margin``: fraction of the box's
    width (height) added on the left and right (top and bottom). A box prompt says where the
    object is, so a mask leaking far outside its box is the decoder's mistake, not the object.
    """
    n, height, width = logits.shape
    pad = (
        torch.stack(
            [boxes_xyxy[:, 2] - boxes_xyxy[:, 0], boxes_xyxy[:, 3] - boxes_xyxy[:, 1]], dim=1
        ).repeat(1, 2)
        * margin
    )  # N×4: x, y, x, y
    lo, hi = boxes_xyxy[:, :2] - pad[:, :2], boxes_xyxy[:, 2:] + pad[:, 2:]  # N×2 each
    xs = torch.arange(width, device=logits.device, dtype=torch.float32) + 0.5  # pixel centres
    ys = torch.arange(height, device=logits.device, dtype=torch.float32) + 0.5
    inside_x = (xs[None, :] >= lo[:, 0:1]) & (xs[None, :] <= hi[:, 0:1])  # N×W
    inside_y = (ys[None, :] >= lo[:, 1:2]) & (ys[None, :] <= hi[:, 1:2])  # N×H
    inside = inside_y[:, :, None] & inside_x[:, None, :]  # N×H×W
    return logits.masked_fill(~inside, _OUTSIDE)


def read_source_boxes(root: Any, source_id: str) -> np.ndarray:
    """N×4 float32 pixel xyxy box prompts of a source group of the store (0×4 when none)."""
    boxes = source_boxes(root, source_id).boxes
    if len(boxes) >= INSTANCE_IGNORE:  # ids are box index + 1 in a uint16 map
        raise ValueError(f"source {source_id} has {len(boxes)} boxes; at most 65534 fit")
    return boxes


# ---------------------------------------------------------------------------------------------
# SAM inference on one tile's embedding (plain PyTorch)


def encode_images(model: Sam, images: torch.Tensor) -> torch.Tensor:
    """B×3×S×S float in [0, 255] (RGB) -> image embeddings B×256×(S/16)×(S/16)."""
    return model.image_encoder(model.preprocess(images))


def decode_masks(
    model: Sam,
    embedding: torch.Tensor,
    *,
    point_coords: torch.Tensor | None = None,
    point_labels: torch.Tensor | None = None,
    boxes: torch.Tensor | None = None,
    multimask: bool = False,
    full_size: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks for P prompts on one image embedding.

    ``embedding``: 1×256×g×g; ``point_coords``: P×n×2 tile-frame pixel (x, y) with
    ``point_labels`` P×n (1 foreground, 0 background); ``boxes``: P×4 pixel xyxy. Returns
    (logits P×M×S×S float32, threshold 0; predicted IoU P×M float32), M = 3 with ``multimask``
    else 1, S = the model's input size (the decoder's P×M×4g×4g with ``full_size=False``).
    """
    points = (point_coords, point_labels) if point_coords is not None else None
    sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=None)
    low_res, iou = model.mask_decoder(
        image_embeddings=embedding,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )
    logits = upscale_logits(model, low_res) if full_size else low_res.float()
    return logits, iou.float()


def upscale_logits(model: Sam, low_res: torch.Tensor) -> torch.Tensor:
    """...×4g×4g decoder logits -> ...×S×S float32, bilinear as ``Sam.postprocess_masks``."""
    size = model.image_encoder.img_size
    flat = low_res.float().flatten(0, -3)[:, None]  # N×1×4g×4g
    upscaled = F.interpolate(flat, (size, size), mode="bilinear", align_corners=False)
    return upscaled.reshape(*low_res.shape[:-2], size, size)


def best_mask(logits: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt, the mask with the highest predicted IoU: P×M×S×S, P×M -> P×S×S, P."""
    best = iou.argmax(1)
    rows = torch.arange(len(best), device=logits.device)
    return logits[rows, best], iou[rows, best]


def point_grid(points_per_side: int, size: int) -> torch.Tensor:
    """P×2 (x, y) pixel prompts, P = points_per_side², at cell centres of a size×size tile."""
    return torch.as_tensor(build_point_grid(points_per_side) * size, dtype=torch.float32)


def automatic_masks(
    model: Sam,
    embedding: torch.Tensor,
    grid_xy: torch.Tensor,
    *,
    rules: MaskFilter,
    nms_iou: float = 0.7,
    points_per_batch: int = 64,
    max_masks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's automatic masks for one tile, as ``SamAutomaticMaskGenerator`` on a single crop.

    ``grid_xy``: P×2 pixel point prompts. Each point gives three masks; masks failing ``rules``
    are dropped batch by batch (so at most ``points_per_batch``·3 full-size masks are held),
    then duplicates are removed by box NMS at ``nms_iou`` (0.7: SAM's ``box_nms_thresh``).
    Returns (logits N×S×S float32, predicted IoU N), highest predicted IoU first, N <= max_masks.
    """
    kept_logits, kept_scores = [], []
    for start in range(0, len(grid_xy), points_per_batch):
        coords = grid_xy[start : start + points_per_batch].to(embedding.device)
        labels = torch.ones(len(coords), 1, dtype=torch.int64, device=embedding.device)
        low_res, iou = decode_masks(
            model,
            embedding,
            point_coords=coords[:, None, :],
            point_labels=labels,
            multimask=True,
            full_size=False,
        )
        low_res, iou = low_res.flatten(0, 1), iou.flatten()  # (P·3)×4g×4g, P·3
        # The IoU rule first, as SamAutomaticMaskGenerator does: only survivors are upscaled.
        confident = iou >= rules.min_predicted_iou
        logits, iou = upscale_logits(model, low_res[confident]), iou[confident]
        keep = keep_masks(logits, iou, rules)
        kept_logits.append(logits[keep])
        kept_scores.append(iou[keep])
    logits, scores = torch.cat(kept_logits), torch.cat(kept_scores)
    if len(scores) == 0:
        return logits, scores
    boxes = batched_mask_to_box(logits > 0).float()
    order = batched_nms(boxes, scores, torch.zeros_like(scores), iou_threshold=nms_iou)
    if max_masks is not None:
        order = order[:max_masks]
    return logits[order], scores[order]


def instance_rows(
    logits: torch.Tensor,
    predicted_iou: torch.Tensor,
    instance_ids: torch.Tensor,
    *,
    top: int,
    left: int,
    stability_offset: float = 1.0,
) -> np.ndarray:
    """One ``INSTANCE_FIELDS`` row per non-empty mask: K×8 float64, in the order of the masks.

    ``logits``: N×S×S mask logits (threshold 0) of one tile, before painting; ``predicted_iou``:
    N; ``instance_ids``: N, the id each mask is painted with; (``top``, ``left``): the source
    raster pixel at the tile's (halo's) top-left corner. Boxes are pixel edges (x1, y1
    exclusive) of each whole mask in the source raster; the stability score is SAM's at
    ``stability_offset`` (``MaskFilter.stability_offset``); area counts the mask's pixels.
    """
    if len(logits) == 0:
        return np.zeros((0, len(INSTANCE_FIELDS)), np.float64)
    masks = logits > 0
    area = masks.flatten(1).sum(1).double()  # N
    stability = calculate_stability_score(logits.float(), 0.0, stability_offset).double()
    boxes = batched_mask_to_box(masks).double()  # N×4, x1/y1 the last pixel (inclusive)
    edges = boxes + torch.tensor(
        [left, top, left + 1, top + 1], dtype=torch.float64, device=boxes.device
    )
    rows = torch.cat(
        [
            instance_ids.double()[:, None],
            edges,
            predicted_iou.double()[:, None],
            stability[:, None],
            area[:, None],
        ],
        dim=1,
    )
    return rows[area > 0].cpu().numpy()


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


@dataclass(frozen=True)
class TeacherModels:
    """What a teacher runs: SAM (automatic, prompted, semantic refinement) and the student's
    class logits (semantic), on CPU."""

    sam: Sam | None
    semantic: SemanticModel | None
    num_classes: int


def build_teacher_models(
    *,
    mode: str,
    model_type: str,
    image_size: int,
    checkpoint: str | None,
    base_checkpoint: str | None,
    refine: bool,
    seed: int,
) -> TeacherModels:
    """Build the teacher's models and load their weights, on CPU.

    Each actor calls it once; ``run_pseudo_label`` calls it once in the driver before any actor
    starts, so a checkpoint or adapter that cannot be read or does not fit fails there, in one
    line naming the file. Without a checkpoint SAM's weights are drawn from ``seed`` (the same
    in every actor).
    """
    sam = None
    if mode != "semantic" or refine:
        sam_checkpoint = base_checkpoint if mode == "semantic" else checkpoint
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # same weights in every actor when no checkpoint
            sam = build_sam(model_type, image_size=image_size, checkpoint=sam_checkpoint).eval()
    if mode != "semantic" or checkpoint is None:
        return TeacherModels(sam, None, 0)
    from semisup.student import load_trained_student  # here: only semantic mode needs peft

    trained, num_classes = load_trained_student(
        checkpoint,
        model_type=model_type,
        image_size=image_size,
        base_checkpoint=base_checkpoint,
        seed=seed,
    )
    return TeacherModels(sam, _ScaledInput(trained), num_classes)


class SamTeacher:
    """Adds ``PSEUDO_LABEL``, ``CONFIDENCE`` and ``NUM_MASKS`` columns to batches of tiles.

    Input batch (``semisup.data.read_tiles`` rows): ``IMAGE`` B×S×S×C source dtype, ``VALID``
    B×S×S bool, ``SOURCE`` B str, ``Y0``/``X0`` B int (the tile's raster offset, without halo).
    Output: the input columns except ``IMAGE`` and ``VALID`` (unless ``keep_inputs``), plus
    ``PSEUDO_LABEL`` B×S×S (see ``label_encoding``), ``CONFIDENCE`` B×S×S float32 in [0, 1] and
    ``NUM_MASKS`` B int32.

    Args:
        store: the tile store (path or fsspec URL): band ranges and box prompts come from it.
        mode: ``automatic``, ``prompted`` or ``semantic``.
        model_type: ``tiny``, ``vit_b``, ``vit_l`` or ``vit_h``.
        checkpoint: automatic/prompted: SAM checkpoint path or URL; None builds SAM with
            weights drawn from ``seed`` (tests, benchmarks). Semantic: the student adapter.
        base_checkpoint: semantic mode: the SAM checkpoint the student was fine-tuned from,
            also the SAM that makes the refining segments.
        halo: pixels of context around each tile in the input rows (as given to read_tiles).
        device: ``auto`` (cuda if available), ``cpu`` or ``cuda[:i]``.
        bf16: run the model under ``torch.autocast("cuda", dtype=torch.bfloat16)`` on GPU.
        bands: band composite for ``to_three_bands``.
        points_per_side: automatic grid (16 at 256 px keeps SAM's 32-per-1024 px density).
        mask_filter, nms_iou, points_per_batch, max_masks: automatic mask selection.
        prompt: ``box``, ``point`` (box centre) or ``box+point``.
        multimask: prompted mode: best of SAM's three masks by predicted IoU instead of one.
        box_margin: prompted mode: fraction of a box's size a mask may extend beyond it.
        background_confidence: confidence scale of background pixels (``paint_instances``).
        output: ``instances`` (uint16 ids) or ``foreground`` (uint8 0/1).
        refine: semantic mode: let SAM's automatic segments vote on the class labels.
        torch_threads: ``torch.set_num_threads`` for this actor (None: leave as is).
    """

    def __init__(
        self,
        store: str,
        *,
        mode: str = "automatic",
        model_type: str = "vit_b",
        checkpoint: str | None = None,
        base_checkpoint: str | None = None,
        halo: int = 0,
        device: str = "auto",
        bf16: bool = True,
        bands: Sequence[int] | str = "rgb",
        points_per_side: int = 16,
        points_per_batch: int = 64,
        mask_filter: MaskFilter | None = None,
        nms_iou: float = 0.7,
        max_masks: int | None = MAX_MASKS_PER_TILE,
        prompt: str = "box",
        multimask: bool = False,
        box_margin: float = 0.1,
        background_confidence: float = 0.5,
        output: str = "instances",
        refine: bool = False,
        keep_inputs: bool = False,
        seed: int = 0,
        torch_threads: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        check_settings(mode, prompt, output)
        if mode == "semantic" and checkpoint is None:
            raise ValueError("semantic mode needs the student's adapter as its checkpoint")
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.mode, self.prompt, self.output = mode, prompt, output
        self.multimask, self.box_margin, self.refine = multimask, box_margin, refine
        self.background_confidence = background_confidence
        self.mask_filter = mask_filter or MaskFilter()
        self.nms_iou, self.points_per_batch, self.max_masks = nms_iou, points_per_batch, max_masks
        self.bands, self.halo, self.keep_inputs = bands, halo, keep_inputs
        self.device = select_device(device)
        self.bf16 = bf16 and self.device.type == "cuda"
        self._root = tile_store.open_store(store, "r", storage_options)
        self.image_size = tile_store.read_store_meta(self._root).tile_size + 2 * halo
        self._sources: dict[str, tile_store.SourceMeta] = {}
        self._boxes: dict[str, np.ndarray] = {}
        self.grid = point_grid(points_per_side, self.image_size)
        models = build_teacher_models(
            mode=mode,
            model_type=model_type,
            image_size=self.image_size,
            checkpoint=checkpoint,
            base_checkpoint=base_checkpoint,
            refine=refine,
            seed=seed,
        )
        self.sam: Sam | None = None if models.sam is None else models.sam.to(self.device).eval()
        semantic = models.semantic
        self.semantic: SemanticModel | None = (
            semantic.to(self.device) if isinstance(semantic, torch.nn.Module) else semantic
        )
        self.num_classes = models.num_classes

    # -- per-source data, cached for the actor's lifetime ------------------------------------

    def source_meta(self, source_id: str) -> tile_store.SourceMeta:
        if source_id not in self._sources:
            self._sources[source_id] = tile_store.read_source_meta(self._root, source_id)
        return self._sources[source_id]

    def source_boxes(self, source_id: str) -> np.ndarray:
        """N×4 float32 pixel xyxy box prompts of a source (0×4 when it has none)."""
        if source_id not in self._boxes:
            self._boxes[source_id] = read_source_boxes(self._root, source_id)
        return self._boxes[source_id]

    # -- inference ----------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _images(self, batch: Mapping[str, np.ndarray]) -> torch.Tensor:
        """B×3×S×S float32 in [0, 255] on the device, each tile scaled with its source's range."""
        tiles = []
        for image, source_id in zip(batch[C.IMAGE], batch[C.SOURCE], strict=True):
            meta = self.source_meta(str(source_id))
            tiles.append(teacher_image(image, meta.band_low, meta.band_high, self.bands))
        stacked = torch.from_numpy(np.stack(tiles)).to(self.device)  # B×S×S×3 uint8
        return stacked.permute(0, 3, 1, 2).float()  # B×3×S×S

    @property
    def writes_instances(self) -> bool:
        """Whether batches get ``INSTANCES``: automatic and prompted modes with instance maps."""
        return self.mode != "semantic" and self.output == "instances"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode(), self._autocast():
            images = self._images(batch)
            labels, confidences, counts, rows = zip(*self._label_tiles(images, batch), strict=True)
        encoding = label_encoding(self.mode, self.output)
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
        if self.writes_instances:
            ragged = np.empty(len(rows), dtype=object)  # B arrays of K×8, K per tile
            ragged[:] = list(rows)
            out[INSTANCES] = ragged
        return out

    def _label_tiles(
        self, images: torch.Tensor, batch: Mapping[str, np.ndarray]
    ) -> Iterator[tuple[np.ndarray, np.ndarray, int, np.ndarray]]:
        """(S×S label, S×S confidence, mask count, K×8 instance rows) per tile, as NumPy on the
        CPU; instance rows are 0×8 in semantic mode."""
        no_rows = np.zeros((0, len(INSTANCE_FIELDS)), np.float64)
        if self.mode == "semantic":
            yield from ((*tile, no_rows) for tile in self._semantic(images))
            return
        assert self.sam is not None
        embeddings = encode_images(self.sam, images)  # B×256×g×g, the encoder batched
        for i in range(len(images)):
            embedding = embeddings[i : i + 1]
            top = int(batch[C.Y0][i]) - self.halo  # the raster pixel at the input's corner
            left = int(batch[C.X0][i]) - self.halo
            if self.mode == "automatic":
                logits, scores = self._automatic_masks(embedding)
                ids = torch.arange(1, len(scores) + 1, device=scores.device)  # paint_instances'
                instances, confidence = paint_instances(logits, scores, self.background_confidence)
            else:
                logits, scores, ids = self._prompted_masks(
                    embedding, str(batch[C.SOURCE][i]), top, left
                )
                instances, confidence = self._paint_prompted(logits, scores, ids)
            rows = no_rows
            if self.writes_instances:
                rows = instance_rows(
                    logits,
                    scores,
                    ids,
                    top=top,
                    left=left,
                    stability_offset=self.mask_filter.stability_offset,
                )
            count = int(instances.unique().gt(0).sum())
            label = foreground(instances) if self.output == "foreground" else instances
            yield label.cpu().numpy(), confidence.float().cpu().numpy(), count, rows

    def _automatic_masks(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits N×S×S, predicted IoU N) of the kept automatic masks, best first."""
        assert self.sam is not None
        return automatic_masks(
            self.sam,
            embedding,
            self.grid,
            rules=self.mask_filter,
            nms_iou=self.nms_iou,
            points_per_batch=self.points_per_batch,
            max_masks=self.max_masks,
        )

    def _automatic(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return paint_instances(*self._automatic_masks(embedding), self.background_confidence)

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
        if "point" in self.prompt:
            coords = box_centres(boxes)[:, None, :]  # P×1×2
            labels = torch.ones(len(boxes), 1, dtype=torch.int64, device=self.device)
        logits, iou = decode_masks(
            self.sam,
            embedding,
            point_coords=coords,
            point_labels=labels,
            boxes=boxes if "box" in self.prompt else None,
            multimask=self.multimask,
        )
        logits, iou = best_mask(logits, iou)  # P×S×S, P
        return restrict_to_boxes(logits, boxes, self.box_margin), iou, ids

    def _paint_prompted(
        self, logits: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Paint prompted masks, then renumber painted k -> ``ids[k - 1]``."""
        painted, confidence = paint_instances(logits, scores, self.background_confidence)
        if len(ids) == 0:
            return painted, confidence
        instances = torch.where(painted > 0, ids[(painted - 1).clamp(min=0)], painted)
        return instances, confidence

    def _semantic(self, images: torch.Tensor) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        assert self.semantic is not None
        logits = self.semantic(images)  # B×K×S×S
        embeddings = encode_images(self.sam, images) if self.refine and self.sam else None
        for i in range(len(images)):
            label, confidence = logits_to_label(logits[i])
            count = 0
            if embeddings is not None:
                segments, _ = self._automatic(embeddings[i : i + 1])
                count = int(segments.unique().gt(0).sum())
                label, confidence = refine_with_segments(
                    label, confidence, segments, self.num_classes
                )
            yield label.cpu().numpy(), confidence.float().cpu().numpy(), count


def check_settings(mode: str, prompt: str = "box", output: str = "instances") -> None:
    """``ValueError`` naming the setting when mode, prompt kind or output kind is unknown."""
    for name, value, known in (
        ("mode", mode, MODES),
        ("prompt", prompt, get_args(PromptKind)),
        ("output", output, get_args(OutputKind)),
    ):
        if value not in known:
            raise ValueError(f"unknown teacher {name} {value!r}; known: {', '.join(known)}")

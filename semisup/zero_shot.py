"""Zero-shot SAM on labelled tiles: how good are its masks before any training?

For every labelled tile, each connected component of each class of the label map is one ground
truth instance. SAM is prompted with the component's bounding box, and separately with one
point inside it; each prompted mask is scored by IoU against the component. SAM's automatic mode
is scored by coverage: the fraction of valid pixels that some kept mask covers.

A store with boxes (``semisup prep --boxes``; with or without masks) is also scored as a
detector, by COCO box AP (``semisup.detection.box_ap``, the code of ``semisup evaluate-boxes``)
against each tile's boxes as detection training sees them (``detection.targets.BoxTargets``):

- ``box_ap.prompted``: SAM prompted with the truth boxes themselves, each mask turned back into
  its bounding box (scored by predicted IoU, the truth box's class): how much a box is lost by
  going through a mask;
- ``box_ap.automatic``: SAM's automatic instances as boxes, class-agnostic (every box, truth and
  predicted, one class ``object``): the honest zero-shot detector figure.

``run_zero_shot`` writes into ``out_dir``:

- ``zero_shot.json``: overall and per-class box/point IoU, automatic coverage, ``box_ap``
  (None for a store without boxes), settings;
- ``zero_shot.md``: the same as Markdown tables;
- ``zero_shot_examples.png``: a few tiles: image, ground truth, box-prompted masks, automatic
  masks.

Tiles are read in this process (``store.read_tile``); ``use_ray=True`` streams them with
``semisup.data.read_tiles`` instead. The prompt derivation below is pure NumPy, tested without
SAM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TextIO, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from data_prep.boxes import BoxSet
from semisup import columns as C
from semisup import store as tile_store
from semisup.detection.box_ap import box_average_precision
from semisup.detection.targets import BoxTargets, NoBoxesError
from semisup.masks import MaskFilter, paint_instances
from semisup.sam import SAM_SPECS, checkpoint_sha256, resolve_checkpoint
from semisup.sam_prompts import (
    automatic_masks,
    best_mask,
    decode_masks,
    encode_images,
    instance_rows,
    point_grid,
)
from semisup.teacher import TeacherConfig, build_teacher_models, select_device, teacher_image

JSON_FILE: Final = "zero_shot.json"
MARKDOWN_FILE: Final = "zero_shot.md"
EXAMPLES_FILE: Final = "zero_shot_examples.png"
RANDOM_WEIGHTS_NOTE: Final = (
    "SAM has random weights here (no checkpoint): its masks show the pipeline working, not SAM; "
    "--checkpoint PATH_OR_URL loads official weights"
)
PointMode = Literal["interior", "centroid"]  # a component's point prompt (component_point)
MIN_COMPONENT_PX: Final = 16  # smaller components are label noise at 256 px tiles
AGNOSTIC: Final = "object"  # the one class of the class-agnostic automatic box AP
# 4-connectivity, as scipy.ndimage.label's default structuring element
_NEIGHBOURS: Final = ((-1, 0), (1, 0), (0, -1), (0, 1))


# ---------------------------------------------------------------------------------------------
# Ground-truth instances and their prompts (pure NumPy)


@dataclass(frozen=True)
class ComponentPrompt:
    """One ground-truth instance: a connected component of one class, and its prompts.

    ``box_xyxy``: pixel edges x0, y0, x1, y1 (x1, y1 exclusive) of the component's bounding
    box; ``point_xy``: (x, y) pixel of the point prompt, inside the component; ``mask``: H×W
    bool.
    """

    class_id: int
    box_xyxy: tuple[float, float, float, float]
    point_xy: tuple[float, float]
    area_px: int
    mask: np.ndarray


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of an H×W bool mask: (H×W int32 labels, 0 = outside; count).

    Uses ``scipy.ndimage.label`` when scipy is installed, else a breadth-first search.
    """
    try:
        from scipy import ndimage
    except ImportError:
        return _bfs_components(mask)
    labels, count = ndimage.label(mask)
    return labels.astype(np.int32), int(count)


def _bfs_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    height, width = mask.shape
    labels = np.zeros((height, width), dtype=np.int32)
    count = 0
    for start_y, start_x in zip(*np.nonzero(mask), strict=True):
        if labels[start_y, start_x]:
            continue
        count += 1
        labels[start_y, start_x] = count
        queue = deque([(int(start_y), int(start_x))])
        while queue:
            y, x = queue.popleft()
            for dy, dx in _NEIGHBOURS:
                ny, nx = y + dy, x + dx
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = count
                    queue.append((ny, nx))
    return labels, count


def interior_point(component: np.ndarray) -> tuple[int, int]:
    """(x, y) of the component pixel farthest from its border (outside the tile is border).

    Depth is measured by peeling the component with 4-neighbour erosions (city-block
    distance); among the deepest pixels the one nearest the centroid is returned.
    """
    current = component.astype(bool)
    deepest = current
    while current.any():
        deepest = current
        padded = np.pad(current, 1, constant_values=False)
        current = (
            current & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
    ys, xs = np.nonzero(deepest)
    cy, cx = np.nonzero(component)
    nearest = np.argmin((ys - cy.mean()) ** 2 + (xs - cx.mean()) ** 2)
    return int(xs[nearest]), int(ys[nearest])


def component_point(component: np.ndarray, mode: PointMode = "interior") -> tuple[int, int]:
    """(x, y) point prompt: ``interior`` (farthest from the border) or ``centroid`` (the
    centroid pixel if it lies inside the component, else the interior point)."""
    if mode == "centroid":
        ys, xs = np.nonzero(component)
        y, x = int(round(ys.mean())), int(round(xs.mean()))
        if component[y, x]:
            return x, y
    elif mode != "interior":
        raise ValueError(f"unknown point mode {mode!r}; known: {', '.join(get_args(PointMode))}")
    return interior_point(component)


def component_prompts(
    label: np.ndarray,
    *,
    ignore_index: int = C.IGNORE_INDEX,
    min_area_px: int = MIN_COMPONENT_PX,
    point_mode: PointMode = "interior",
) -> list[ComponentPrompt]:
    """Prompts for every connected component of every class in an H×W label map.

    ``ignore_index`` pixels belong to no component; components under ``min_area_px`` pixels
    are skipped. Ordered by class id, then by component label (raster order of first pixel).
    """
    prompts = []
    for class_id in np.unique(label):
        if class_id == ignore_index:
            continue
        components, count = connected_components(label == class_id)
        for index in range(1, count + 1):
            mask = components == index
            area = int(mask.sum())
            if area < min_area_px:
                continue
            ys, xs = np.nonzero(mask)
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            point = component_point(mask, point_mode)
            prompts.append(ComponentPrompt(int(class_id), box, point, area, mask))
    return prompts


def mask_iou(predicted: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None) -> float:
    """IoU of two H×W bool masks over ``valid`` pixels (all when None); NaN if both empty."""
    if valid is not None:
        predicted, target = predicted & valid, target & valid
    union = np.logical_or(predicted, target).sum()
    if union == 0:
        return float("nan")
    return float(np.logical_and(predicted, target).sum() / union)


# ---------------------------------------------------------------------------------------------
# SAM on one tile (plain PyTorch)


@dataclass
class TileResult:
    """What one tile gave: per component (class, box IoU, point IoU) and automatic coverage."""

    tile_id: int
    class_ids: list[int]
    box_iou: list[float]
    point_iou: list[float]
    automatic_coverage: float
    image: np.ndarray  # S×S×3 uint8, for the examples figure
    label: np.ndarray  # S×S uint8
    valid_share: float  # valid pixels / S×S: edge tiles padded to S count the padding as nodata
    box_instances: np.ndarray  # S×S int64, the box-prompted masks painted
    automatic_instances: np.ndarray  # S×S int64


def score_tile(
    model: Any,
    image: np.ndarray,
    label: np.ndarray,
    valid: np.ndarray,
    *,
    tile_id: int,
    grid_xy: torch.Tensor,
    mask_filter: MaskFilter,
    point_mode: PointMode = "interior",
    min_area_px: int = MIN_COMPONENT_PX,
) -> TileResult:
    """Box/point IoU per component and automatic coverage on one S×S×3 uint8 tile."""
    device = next(model.parameters()).device
    scored = (label != C.IGNORE_INDEX) & valid
    prompts = component_prompts(label, min_area_px=min_area_px, point_mode=point_mode)
    pixels = torch.from_numpy(image).to(device).permute(2, 0, 1)[None].float()  # 1×3×S×S
    embedding = encode_images(model, pixels)
    box_iou, point_iou = [], []
    box_instances = np.zeros(label.shape, dtype=np.int64)
    if prompts:
        boxes = torch.tensor([p.box_xyxy for p in prompts], device=device)
        logits, iou = decode_masks(model, embedding, boxes=boxes)  # P×1×S×S
        box_logits, box_scores = best_mask(logits, iou)
        points = torch.tensor([p.point_xy for p in prompts], dtype=torch.float32, device=device)
        ones = torch.ones(len(prompts), 1, dtype=torch.int64, device=device)
        logits, iou = decode_masks(
            model, embedding, point_coords=points[:, None, :], point_labels=ones, multimask=True
        )
        point_logits, _ = best_mask(logits, iou)  # SAM's choice among its three masks
        box_masks = (box_logits > 0).cpu().numpy()
        point_masks = (point_logits > 0).cpu().numpy()
        for k, prompt in enumerate(prompts):
            box_iou.append(mask_iou(box_masks[k], prompt.mask, scored))
            point_iou.append(mask_iou(point_masks[k], prompt.mask, scored))
        box_instances = paint_instances(box_logits, box_scores)[0].cpu().numpy()
    logits, scores = automatic_masks(model, embedding, grid_xy, rules=mask_filter)
    automatic = paint_instances(logits, scores)[0].cpu().numpy()
    box_instances[~valid] = 0
    automatic[~valid] = 0
    coverage = float((automatic[valid] > 0).mean()) if valid.any() else 0.0
    return TileResult(
        tile_id=tile_id,
        class_ids=[p.class_id for p in prompts],
        box_iou=box_iou,
        point_iou=point_iou,
        automatic_coverage=coverage,
        image=image,
        label=label,
        valid_share=float(valid.mean()),
        box_instances=box_instances,
        automatic_instances=automatic,
    )


def mask_boxes(
    logits: torch.Tensor, scores: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bounding box of each non-empty mask: (K×4 float32 pixel-edge xyxy, K float32
    scores, K int64 indices into the N masks). ``logits``: N×S×S; ``scores``: N."""
    ids = torch.arange(1, len(scores) + 1, device=scores.device)
    rows = instance_rows(logits, scores, ids, top=0, left=0)  # K×8, empty masks dropped
    return (
        rows[:, 1:5].astype(np.float32),
        rows[:, 5].astype(np.float32),
        rows[:, 0].astype(np.int64) - 1,
    )


@dataclass(frozen=True)
class BoxTileResult:
    """One tile as a detector: the truth, the box-prompted masks' boxes (the truth's classes)
    and the automatic masks' boxes (class ``AGNOSTIC``), each a BoxSet named by the tile."""

    truth: BoxSet
    prompted: BoxSet
    automatic: BoxSet


def score_box_tile(
    model: Any,
    image: np.ndarray,
    truth_boxes: np.ndarray,
    truth_names: Sequence[str],
    *,
    tile_id: int,
    grid_xy: torch.Tensor,
    mask_filter: MaskFilter,
) -> BoxTileResult:
    """SAM's masks on one S×S×3 uint8 tile turned into boxes: prompted by ``truth_boxes`` (M×4
    pixel-edge xyxy in the tile, classes ``truth_names``), and automatic."""
    device = next(model.parameters()).device
    pixels = torch.from_numpy(image).to(device).permute(2, 0, 1)[None].float()  # 1×3×S×S
    embedding = encode_images(model, pixels)
    name, where = f"tile_{tile_id}", Path("zero-shot")
    prompted = BoxSet(name, np.zeros((0, 4), np.float32), (), where, np.zeros(0, np.float32))
    if len(truth_boxes):
        prompts = torch.as_tensor(truth_boxes, dtype=torch.float32, device=device)
        logits, iou = best_mask(*decode_masks(model, embedding, boxes=prompts))  # M×S×S, M
        boxes, scores, index = mask_boxes(logits, iou)
        prompted = BoxSet(name, boxes, tuple(truth_names[i] for i in index), where, scores)
    logits, iou = automatic_masks(model, embedding, grid_xy, rules=mask_filter)
    boxes, scores, _ = mask_boxes(logits, iou)
    automatic = BoxSet(name, boxes, (AGNOSTIC,) * len(boxes), where, scores)
    truth = BoxSet(name, np.asarray(truth_boxes, np.float32), tuple(truth_names), Path("truth"))
    return BoxTileResult(truth, prompted, automatic)


def summarise_boxes(results: Sequence[BoxTileResult]) -> dict[str, Any] | None:
    """``box_ap`` of zero_shot.json: tiles, truth boxes, and the box AP (``BoxScores``) of the
    prompted and the class-agnostic automatic boxes; None without tiles."""
    if not results:
        return None
    truths = [r.truth for r in results]
    agnostic = [dataclasses.replace(t, labels=(AGNOSTIC,) * len(t.labels)) for t in truths]
    return {
        "tiles": len(results),
        "truth_boxes": sum(len(t.boxes) for t in truths),
        "prompted": box_average_precision([r.prompted for r in results], truths).to_json(),
        "automatic": box_average_precision([r.automatic for r in results], agnostic).to_json(),
    }


# ---------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class ZeroShotConfig:
    """What ``semisup zero-shot`` measures, and on which tiles.

    ``sam`` is SAM as the automatic teacher runs it (model, checkpoint, point grid, mask filter,
    bands, seed); its mode is ``automatic``.
    """

    sam: TeacherConfig = TeacherConfig(mode="automatic")
    max_tiles: int | None = 32  # labelled tiles measured, evenly spaced in id order; None: all
    split: str | Sequence[str] | None = None  # only tiles of these splits; None: every one
    point_mode: PointMode = "interior"  # see ``component_point``
    min_area_px: int = MIN_COMPONENT_PX  # smallest ground-truth component scored
    examples: int = 4  # tiles drawn in the PNG

    def __post_init__(self) -> None:
        if self.sam.mode != "automatic":
            raise ValueError(f"zero-shot measures SAM's automatic masks, not {self.sam.mode!r}")
        if self.point_mode not in get_args(PointMode):
            known = ", ".join(get_args(PointMode))
            raise ValueError(f"unknown point_mode {self.point_mode!r}; known: {known}")


def run_zero_shot(
    store: str,
    config: ZeroShotConfig,
    out_dir: str | Path,
    *,
    device: str = "auto",
    bf16: bool = True,
    use_ray: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    log: TextIO | None = sys.stderr,
) -> dict[str, Any]:
    """Measure SAM zero-shot on the labelled tiles of ``store``; write json, md and png.

    Args:
        store: path or fsspec URL of a semisup tile store with labels.
        config: the SAM measured (``config.sam``; no checkpoint: weights drawn from its seed)
            and the tiles, prompts and examples (``ZeroShotConfig``).
        out_dir: folder for ``zero_shot.json``, ``zero_shot.md`` and ``zero_shot_examples.png``.
        device, bf16: ``auto`` picks cuda when available; bf16 autocast on GPU only.
        use_ray: stream tiles with ``read_tiles`` (Ray) instead of reading them here.

    Returns the JSON summary (also written to ``zero_shot.json``).
    """
    sam = config.sam
    started = time.perf_counter()
    out = Path(out_dir)
    root = tile_store.open_store(store, "r", storage_options)
    meta = tile_store.read_store_meta(root)
    tiles = _spaced(_labelled_tiles(store, config.split, storage_options), config.max_tiles)
    box_tiles, targets = _box_tiles(store, root, config.split, config.max_tiles, storage_options)
    if not tiles and not box_tiles:
        raise ValueError(
            f"{store}: nothing to measure: no labelled tiles (label_coverage > 0) and no tiles "
            "with boxes"
        )
    torch_device = select_device(device)
    model = build_teacher_models(sam, meta.tile_size).sam  # SAM as the automatic teacher has it
    assert model is not None
    model = model.to(torch_device)
    out.mkdir(parents=True, exist_ok=True)  # only once the checkpoint has loaded
    rules = sam.mask_filter
    grid = point_grid(sam.points_per_side, meta.tile_size)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if bf16 and torch_device.type == "cuda"
        else contextlib.nullcontext()
    )
    results: list[TileResult] = []
    box_results: list[BoxTileResult] = []
    sources = _SourceImages(root, sam.bands)
    reader = _ray_tiles if use_ray else _local_tiles
    with torch.inference_mode(), autocast:
        for row in reader(store, tiles, meta.tile_size, storage_options) if tiles else ():
            results.append(
                score_tile(
                    model,
                    sources.image(row),
                    row[C.LABEL],
                    row[C.VALID],
                    tile_id=int(row[C.TILE_ID]),
                    grid_xy=grid,
                    mask_filter=rules,
                    point_mode=config.point_mode,
                    min_area_px=config.min_area_px,
                )
            )
            if log is not None:
                print(f"zero-shot: {len(results)}/{len(tiles)} tiles", file=log, flush=True)
        for row in box_tiles:
            assert targets is not None
            box_results.append(_score_box_row(model, root, row, targets, sources, grid, rules))
            if log is not None:
                print(
                    f"zero-shot boxes: {len(box_results)}/{len(box_tiles)} tiles",
                    file=log,
                    flush=True,
                )
    summary = summarise(results, meta.class_names)
    summary["box_ap"] = summarise_boxes(box_results)
    summary.update(
        store=str(store),
        model_type=sam.model_type,
        checkpoint=str(sam.checkpoint) if sam.checkpoint else None,
        checkpoint_hash=(
            checkpoint_sha256(resolve_checkpoint(sam.checkpoint))
            if sam.checkpoint
            else f"random-init-seed{sam.seed}"
        ),
        settings={
            "points_per_side": sam.points_per_side,
            "mask_filter": dataclasses.asdict(rules),
            "point_mode": config.point_mode,
            "min_area_px": config.min_area_px,
            "tile_size": meta.tile_size,
        },
        seconds=round(time.perf_counter() - started, 2),
    )
    (out / JSON_FILE).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    (out / MARKDOWN_FILE).write_text(to_markdown(summary))
    note = None if sam.checkpoint else RANDOM_WEIGHTS_NOTE
    shown = example_tiles(results, config.examples, meta.num_classes)
    plot_examples(shown, out / EXAMPLES_FILE, note)
    return summary


def _labelled_tiles(
    store: str, split: str | Sequence[str] | None, storage_options: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """Index rows of tiles with labels (of ``split``), in id order."""
    index = tile_store.read_tile_index(store, storage_options)
    index = index.filter(pc.greater(index.column(C.LABEL_COVERAGE), 0))
    return _in_split(index, split)


def _in_split(index: pa.Table, split: str | Sequence[str] | None) -> list[dict[str, Any]]:
    if split is not None:
        wanted = [split] if isinstance(split, str) else list(split)
        index = index.filter(pc.is_in(index.column(C.SPLIT), pa.array(wanted, pa.string())))
    return sorted(index.to_pylist(), key=lambda row: row[C.TILE_ID])


def _spaced(rows: list[dict[str, Any]], max_tiles: int | None) -> list[dict[str, Any]]:
    """``rows`` evenly spaced down to ``max_tiles`` (None: all)."""
    if max_tiles is not None and len(rows) > max_tiles:
        picks = np.linspace(0, len(rows) - 1, max_tiles).round().astype(int)
        rows = [rows[i] for i in picks]
    return rows


def _box_tiles(
    store: str,
    root: Any,
    split: str | Sequence[str] | None,
    max_tiles: int | None,
    storage_options: Mapping[str, Any] | None,
) -> tuple[list[dict[str, Any]], BoxTargets | None]:
    """Index rows of tiles holding at least one box as detection sees them (of ``split``,
    evenly spaced down to ``max_tiles``), and the store's box targets (None without boxes)."""
    try:
        targets = BoxTargets(root, store)
    except NoBoxesError:
        return [], None
    rows = _in_split(tile_store.read_tile_index(store, storage_options), split)
    rows = [r for r in rows if len(targets.tile(r[C.SOURCE], r[C.Y0], r[C.X0]).boxes)]
    return _spaced(rows, max_tiles), targets


class _SourceImages:
    """Tiles as the teacher sees them, each source's band range read once."""

    def __init__(self, root: Any, bands: Sequence[int] | str) -> None:
        self.root, self.bands = root, bands
        self.sources: dict[str, tile_store.SourceMeta] = {}

    def image(self, row: Mapping[str, Any]) -> np.ndarray:
        """S×S×3 uint8 of a tile row holding ``IMAGE`` and ``SOURCE``."""
        source_id = str(row[C.SOURCE])
        if source_id not in self.sources:
            self.sources[source_id] = tile_store.read_source_meta(self.root, source_id)
        source = self.sources[source_id]
        return teacher_image(row[C.IMAGE], source.band_low, source.band_high, self.bands)


def _score_box_row(
    model: Any,
    root: Any,
    row: Mapping[str, Any],
    targets: BoxTargets,
    sources: _SourceImages,
    grid: torch.Tensor,
    rules: MaskFilter,
) -> BoxTileResult:
    """``score_box_tile`` on the tile of an index row, read here, against its box targets."""
    size = targets.tile_size
    tile = tile_store.read_tile(root[row[C.SOURCE]], row[C.Y0], row[C.X0], size)
    truth = targets.tile(row[C.SOURCE], row[C.Y0], row[C.X0])
    names = [targets.class_names[k] for k in truth.labels]
    image = sources.image({**tile, C.SOURCE: row[C.SOURCE]})
    return score_box_tile(
        model,
        image,
        truth.boxes,
        names,
        tile_id=int(row[C.TILE_ID]),
        grid_xy=grid,
        mask_filter=rules,
    )


def _local_tiles(
    store: str,
    tiles: list[dict[str, Any]],
    tile_size: int,
    storage_options: Mapping[str, Any] | None,
) -> Iterator[dict[str, Any]]:
    root: Any = tile_store.open_store(store, "r", storage_options)
    labels = tile_store.current_labels(root)
    for row in tiles:
        tile = tile_store.read_tile(root[row[C.SOURCE]], row[C.Y0], row[C.X0], tile_size, 0, labels)
        if C.LABEL not in tile:
            continue
        yield {**tile, C.SOURCE: row[C.SOURCE], C.TILE_ID: row[C.TILE_ID]}


def _ray_tiles(
    store: str,
    tiles: list[dict[str, Any]],
    tile_size: int,
    storage_options: Mapping[str, Any] | None,
) -> Iterator[dict[str, Any]]:
    from semisup.data import read_tiles

    wanted = np.array([row[C.TILE_ID] for row in tiles], dtype=np.int64)
    columns = (C.IMAGE, C.LABEL, C.VALID, C.TILE_ID, C.SOURCE)
    dataset = read_tiles(store, columns=columns, storage_options=storage_options)
    # streams tile batches to this process; the tile filter runs in the read tasks
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for i in np.flatnonzero(np.isin(batch[C.TILE_ID], wanted)):
            yield {name: batch[name][i] for name in columns}


# ---------------------------------------------------------------------------------------------
# Reports


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _median(values: Sequence[float]) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.median(finite)) if finite else None


def summarise(
    results: Sequence[TileResult], class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Overall and per-class IoU statistics of scored tiles (IoUs in [0, 1]; None if none)."""
    class_ids = [c for r in results for c in r.class_ids]
    box = [v for r in results for v in r.box_iou]
    point = [v for r in results for v in r.point_iou]
    per_class: list[dict[str, Any]] = []
    for class_id in sorted(set(class_ids)):
        picks = [i for i, c in enumerate(class_ids) if c == class_id]
        name = (
            class_names[class_id]
            if class_names and class_id < len(class_names)
            else f"class_{class_id}"
        )
        per_class.append(
            {
                "class_id": class_id,
                "name": name,
                "components": len(picks),
                "box_iou": _mean([box[i] for i in picks]),
                "point_iou": _mean([point[i] for i in picks]),
            }
        )
    return {
        "tiles": len(results),
        "components": len(class_ids),
        "box_iou": {"mean": _mean(box), "median": _median(box)},
        "point_iou": {"mean": _mean(point), "median": _median(point)},
        "box_miou": _mean([c["box_iou"] for c in per_class if c["box_iou"] is not None]),
        "point_miou": _mean([c["point_iou"] for c in per_class if c["point_iou"] is not None]),
        "automatic_coverage": _mean([r.automatic_coverage for r in results]),
        "per_class": per_class,
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def to_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as a short Markdown report with a per-class table."""
    lines = [
        f"# SAM zero-shot: {summary.get('model_type', '?')} on {summary.get('store', '?')}",
        "",
        f"Checkpoint: `{summary.get('checkpoint') or 'none'}` "
        f"(sha256 {summary.get('checkpoint_hash', '?')}). {summary['tiles']} labelled tiles, "
        f"{summary['components']} ground-truth components.",
        "",
        *([] if summary.get("checkpoint") else [f"{RANDOM_WEIGHTS_NOTE}.", ""]),
        "| metric | mean | median |",
        "| --- | --- | --- |",
        f"| box-prompt IoU | {_fmt(summary['box_iou']['mean'])} "
        f"| {_fmt(summary['box_iou']['median'])} |",
        f"| point-prompt IoU | {_fmt(summary['point_iou']['mean'])} "
        f"| {_fmt(summary['point_iou']['median'])} |",
        f"| automatic coverage | {_fmt(summary['automatic_coverage'])} | |",
        "",
        "| class | components | box IoU | point IoU |",
        "| --- | --- | --- | --- |",
    ]
    for row in summary["per_class"]:
        lines.append(
            f"| {row['name']} | {row['components']} | {_fmt(row['box_iou'])} "
            f"| {_fmt(row['point_iou'])} |"
        )
    return "\n".join(lines + box_lines(summary.get("box_ap"))) + "\n"


def box_lines(box_ap: Mapping[str, Any] | None) -> list[str]:
    """The Markdown table of ``box_ap`` (none without it)."""
    if not box_ap:
        return []
    lines = [
        "",
        f"Box AP on {box_ap['tiles']} tiles with {box_ap['truth_boxes']} boxes:",
        "",
        "| SAM as a detector | AP | AP50 | AP75 | boxes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, title in (
        ("prompted", "prompted by the truth boxes"),
        ("automatic", "automatic (class-agnostic)"),
    ):
        ap = box_ap[key]
        lines.append(
            f"| {title} | {ap['ap']:.3f} | {ap['ap50']:.3f} | {ap['ap75']:.3f} "
            f"| {ap['predicted_boxes']} |"
        )
    return lines


def summary_line(summary: Mapping[str, Any]) -> str:
    """The headline numbers of a zero-shot summary, in one line."""
    line = (
        f"box IoU {_fmt(summary['box_iou']['mean'])}, point IoU "
        f"{_fmt(summary['point_iou']['mean'])}, automatic coverage "
        f"{_fmt(summary['automatic_coverage'])} on {summary['tiles']} tiles"
    )
    box_ap = summary.get("box_ap")
    if box_ap:
        line += (
            f"; box AP {box_ap['prompted']['ap']:.3f} prompted by the truth boxes, "
            f"{box_ap['automatic']['ap']:.3f} automatic (class-agnostic) on {box_ap['tiles']} "
            "tiles"
        )
    return line


def example_tiles(
    results: Sequence[TileResult], count: int, num_classes: int | None
) -> list[TileResult]:
    """Up to ``count`` tiles for the examples figure: mostly valid, with a spread of classes
    (``report.pick_showcase_tiles``)."""
    from semisup.report import pick_showcase_tiles

    if not results or count <= 0:
        return []
    labelled = [r.label[r.label != C.IGNORE_INDEX] for r in results]
    classes = max(num_classes or 0, 1 + max(int(x.max(initial=0)) for x in labelled))
    size = results[0].label.size  # S×S, the same for every tile
    shares = np.stack([np.bincount(x, minlength=classes) / size for x in labelled])
    picks = pick_showcase_tiles(np.array([r.valid_share for r in results]), shares, count)
    return [results[i] for i in picks]


def plot_examples(results: Sequence[TileResult], path: Path, note: str | None = None) -> None:
    """One row per tile: image, ground truth, box-prompted masks, automatic masks; ``note``
    above them. Nodata and unlabelled pixels are left unpainted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(len(results), 1)
    figure, axes = plt.subplots(rows, 4, figsize=(12, 3 * rows), squeeze=False)
    titles = ("image", "ground truth", "box prompts", "automatic")
    for row, result in enumerate(results):
        label = np.ma.masked_equal(result.label.astype(np.int64), C.IGNORE_INDEX)
        layers = (
            None,
            label,
            np.ma.masked_equal(result.box_instances, 0),
            np.ma.masked_equal(result.automatic_instances, 0),
        )
        for col, layer in enumerate(layers):
            axis = axes[row, col]
            axis.imshow(result.image)
            if layer is not None:
                axis.imshow(layer % 20, cmap="tab20", alpha=0.5, vmin=0, vmax=19)
            axis.set_title(f"{titles[col]} (tile {result.tile_id})", fontsize=8)
    for axis in axes.flat:
        axis.axis("off")
    if note:
        figure.suptitle(note, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# Command line: `semisup zero-shot`

CLI_DESCRIPTION = (
    "Measure SAM before any training on the labelled tiles of a store: box- and point-prompted "
    "mask IoU against ground-truth components, automatic-mode coverage, per class; on a store "
    "with boxes, box AP of SAM's masks as boxes (prompted by the truth boxes, and automatic). "
    "Writes zero_shot.json, zero_shot.md and zero_shot_examples.png."
)
CLI_EPILOG = """\
example:
  semisup zero-shot --store dubai.zarr --model vit_b \\
      --checkpoint https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth \\
      --out zero_shot_vit_b --max-tiles 32
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``semisup zero-shot`` flags (and its description and example) to ``parser``."""
    parser.description = parser.description or CLI_DESCRIPTION
    parser.epilog = CLI_EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--store", required=True, help="tile store path or fsspec URL")
    parser.add_argument(
        "--model", choices=tuple(SAM_SPECS), default="vit_b", help="SAM model type (default vit_b)"
    )
    parser.add_argument(
        "--checkpoint",
        metavar="PATH_OR_URL",
        help="SAM checkpoint; without one SAM gets seeded random weights (smoke tests only)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the reports")
    parser.add_argument(
        "--max-tiles",
        type=int,
        default=32,
        metavar="N",
        help="labelled tiles measured, evenly spaced (default 32; 0 for all)",
    )
    parser.add_argument(
        "--split", nargs="+", metavar="SPLIT", help="only tiles of these splits (default: all)"
    )
    parser.add_argument(
        "--points-per-side",
        type=int,
        default=16,
        metavar="N",
        help="automatic mode point grid per tile side (default 16)",
    )
    parser.add_argument(
        "--point-mode",
        choices=get_args(PointMode),
        default="interior",
        help="point prompt: farthest from the border, or the centroid if inside (default interior)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if available), cpu or cuda (default auto)"
    )
    parser.add_argument(
        "--ray", action="store_true", help="stream tiles with Ray Data instead of reading here"
    )


def run_cli(args: argparse.Namespace) -> int:
    """Run ``semisup zero-shot``; prints the headline numbers; returns the exit status."""
    sam = TeacherConfig(
        mode="automatic",
        model_type=args.model,
        checkpoint=args.checkpoint,
        points_per_side=args.points_per_side,
    )
    config = ZeroShotConfig(
        sam=sam, max_tiles=args.max_tiles or None, split=args.split, point_mode=args.point_mode
    )
    if args.ray:
        from semisup.config import RayConfig
        from semisup.runtime import ray_runtime

        with ray_runtime(RayConfig()):
            summary = run_zero_shot(args.store, config, args.out, device=args.device, use_ray=True)
    else:
        summary = run_zero_shot(args.store, config, args.out, device=args.device)
    print(f"zero-shot {args.model}: {summary_line(summary)} -> {args.out}")
    return 0

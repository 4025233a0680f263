"""SAM's prompt encoder and mask decoder as plain PyTorch functions: image embeddings, masks
for point and box prompts, the automatic point grid with its mask filter and NMS, and one
instance row per mask.

The teachers (``semisup.teacher``) and the zero-shot measurement (``semisup.zero_shot``) both
run SAM through these. Images are B×3×S×S float RGB in [0, 255], SAM's own input range; masks
are S×S logits at the input size.
"""

from __future__ import annotations

from typing import Final

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

from semisup.masks import MaskFilter, keep_masks

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
# automatic mode: masks kept per tile, highest predicted IoU first. It bounds the painting work
# and the instance table (a 16-point grid gives up to 768 candidates before NMS); a tile of
# 128-512 px rarely holds more objects than this
MAX_MASKS_PER_TILE: Final = 255
# -inf logits outside a prompt's box: probability 0 and never above the mask threshold.
_OUTSIDE: Final = float("-inf")


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

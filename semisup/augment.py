"""Weak and strong views of a batch (kornia, on whatever device the batch is on).

Geometry moves every spatial column identically: IMAGE bilinearly; LABEL, PSEUDO_LABEL,
CONFIDENCE and VALID by nearest neighbour. Pixels rotated or scaled in from outside the tile become
IGNORE_INDEX / confidence 0 / invalid. Photometric changes touch IMAGE only. Rotation and scale
come first in the strong view: on aerial imagery there is no "up", and ground sampling distance
varies between sensors, while colour is informative (vegetation, water) and is jittered gently.

Batch columns: IMAGE B×C×H×W float in [0, 1]; LABEL and PSEUDO_LABEL B×H×W int64; CONFIDENCE B×H×W
float in [0, 1]; VALID B×H×W bool. Any of the non-image columns may be absent.
"""

from __future__ import annotations

import math

import kornia.augmentation as KA
import torch
from kornia.geometry.transform import get_rotation_matrix2d, warp_affine

from semisup import columns as C
from semisup.config import AugmentConfig

__all__ = ["AugmentConfig", "apply_affine", "cutmix", "photometric", "strong_view", "weak_view"]

Batch = dict[str, torch.Tensor]
_CLASS_COLUMNS = (C.LABEL, C.PSEUDO_LABEL)
_SPATIAL_COLUMNS = (C.IMAGE, C.LABEL, C.PSEUDO_LABEL, C.CONFIDENCE, C.VALID)


def weak_view(
    batch: Batch, config: AugmentConfig, generator: torch.Generator | None = None
) -> Batch:
    """Random flips and 90° rotations: exact pixel permutations, no interpolation."""
    size = batch[C.IMAGE].shape[0]
    device = batch[C.IMAGE].device
    flips = torch.rand(size, generator=generator) < 0.5 if config.weak_flip else torch.zeros(size)
    turns = (
        torch.randint(0, 4, (size,), generator=generator)
        if config.weak_rot90
        else torch.zeros(size, dtype=torch.int64)
    )
    out = {}
    for name, value in batch.items():
        if name not in _SPATIAL_COLUMNS:
            out[name] = value
            continue
        views = []
        for i in range(size):
            view = value[i].flip(-1) if flips[i] else value[i]
            views.append(torch.rot90(view, int(turns[i]), dims=(-2, -1)))
        out[name] = torch.stack(views).to(device)
    return out


def rotation_scale_matrices(
    size: int, height: int, width: int, config: AugmentConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """B×2×3 affine matrices: rotation uniform in ±rotation_deg, scale log-uniform, about the centre."""
    angle = (torch.rand(size, generator=generator) * 2 - 1) * config.rotation_deg
    log_lo, log_hi = math.log(config.scale_min), math.log(config.scale_max)
    scale = torch.exp(log_lo + torch.rand(size, generator=generator) * (log_hi - log_lo))
    center = torch.tensor([(width - 1) / 2, (height - 1) / 2]).expand(size, 2)
    return get_rotation_matrix2d(center, angle, scale[:, None].expand(size, 2))


def apply_affine(batch: Batch, matrices: torch.Tensor) -> Batch:
    """Warp every spatial column by ``matrices`` (B×2×3); outside pixels become unsupervised."""
    image = batch[C.IMAGE]
    height, width = image.shape[-2:]
    matrices = matrices.to(image.device, image.dtype)
    ones = torch.ones_like(image[:, :1])
    # inside: 1 where the warped pixel came from inside the source tile
    inside = warp_affine(ones, matrices, (height, width), mode="nearest")[:, 0] > 0.5
    out = dict(batch)
    out[C.IMAGE] = warp_affine(image, matrices, (height, width), mode="bilinear")
    for name in (C.LABEL, C.PSEUDO_LABEL, C.CONFIDENCE, C.VALID):
        if name not in batch:
            continue
        value = batch[name]
        warped = warp_affine(value[:, None].float(), matrices, (height, width), mode="nearest")[
            :, 0
        ]
        if name in _CLASS_COLUMNS:
            fill = torch.full_like(value, C.IGNORE_INDEX)
            out[name] = torch.where(inside, warped.round().to(value.dtype), fill)
        elif name == C.VALID:
            out[name] = (warped > 0.5) & inside
        else:
            out[name] = torch.where(inside, warped, torch.zeros_like(warped)).to(value.dtype)
    return out


def cutmix(batch: Batch, probability: float, generator: torch.Generator | None = None) -> Batch:
    """Paste a random box from another sample of the batch into each sample, in every column.

    Box side is sqrt(U(0.25, 0.5)) of the tile (a quarter to a half of its area, as UniMatch's
    CutMix). Applied to each sample with ``probability``.
    """
    image = batch[C.IMAGE]
    size, height, width = image.shape[0], image.shape[-2], image.shape[-1]
    if size < 2 or probability <= 0:
        return batch
    partner = torch.roll(torch.arange(size), 1)
    out = {
        name: value.clone() if name in _SPATIAL_COLUMNS else value for name, value in batch.items()
    }
    for i in range(size):
        if torch.rand(1, generator=generator).item() >= probability:
            continue
        side = math.sqrt(0.25 + 0.25 * torch.rand(1, generator=generator).item())
        box_h, box_w = int(height * side), int(width * side)
        y0 = int(torch.randint(0, height - box_h + 1, (1,), generator=generator))
        x0 = int(torch.randint(0, width - box_w + 1, (1,), generator=generator))
        for name in _SPATIAL_COLUMNS:
            if name in batch:
                region = (..., slice(y0, y0 + box_h), slice(x0, x0 + box_w))
                out[name][i][region] = batch[name][int(partner[i])][region]
    return out


def photometric(image: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    """Colour jitter (3-band) or brightness/contrast (other band counts), then Gaussian blur."""
    strength = config.colour_strength
    if strength > 0:
        if image.shape[1] == 3:
            jitter = KA.ColorJitter(strength, strength, strength, config.hue, p=0.8)
            image = jitter(image)
        else:
            gain = 1 + (torch.rand(image.shape[0], 1, 1, 1, device=image.device) * 2 - 1) * strength
            mean = image.mean((1, 2, 3), keepdim=True)
            image = ((image - mean) * gain + mean).clamp(0, 1)
    if config.blur_prob > 0:
        image = KA.RandomGaussianBlur((5, 5), (0.1, 2.0), p=config.blur_prob)(image)
    return image


def strong_view(
    batch: Batch, config: AugmentConfig, generator: torch.Generator | None = None
) -> Batch:
    """Rotation and scale first, then CutMix, then photometric changes to the image only."""
    size, _, height, width = batch[C.IMAGE].shape
    matrices = rotation_scale_matrices(size, height, width, config, generator)
    out = apply_affine(batch, matrices)
    out = cutmix(out, config.cutmix_prob, generator)
    out[C.IMAGE] = photometric(out[C.IMAGE], config)
    return out

"""Weak and strong views of a batch (kornia, on whatever device the batch is on).

Geometry moves every spatial column identically: IMAGE bilinearly; LABEL, PSEUDO_LABEL,
CONFIDENCE and VALID by nearest neighbour. Pixels rotated or scaled in from outside the tile become
IGNORE_INDEX / confidence 0 / invalid. Photometric changes touch IMAGE only. Rotation and scale
come first in the strong view: on aerial imagery there is no "up", and ground sampling distance
varies between sensors, while colour is informative (vegetation, water) and is jittered gently.

Batch columns: IMAGE B×C×H×W float in [0, 1]; LABEL and PSEUDO_LABEL B×H×W int64; CONFIDENCE B×H×W
float in [0, 1]; VALID B×H×W bool. Any of the non-image columns may be absent.

Randomness is per sample: every view takes ``keys`` (B int64, one per sample) and each sample's
choices (flip, turns, angle, scale, CutMix box, colour factors, blur) come from a generator
seeded with its key alone. The training loop derives keys from the sample's place in the global
batch (``semisup.sampling.sample_keys``), so a view does not depend on the batch size, on the
worker that holds the sample or on any process-wide generator. ``keys=None`` draws fresh keys
from torch's global generator.
"""

from __future__ import annotations

import math

import torch
from kornia.color import hsv_to_rgb, rgb_to_grayscale, rgb_to_hsv
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import get_rotation_matrix2d, warp_affine

from semisup import columns as C
from semisup.config import AugmentConfig

__all__ = [
    "AugmentConfig",
    "apply_affine",
    "cutmix",
    "photometric",
    "sample_uniforms",
    "strong_view",
    "weak_view",
]

Batch = dict[str, torch.Tensor]
_CLASS_COLUMNS = (C.LABEL, C.PSEUDO_LABEL)
_SPATIAL_COLUMNS = (C.IMAGE, C.LABEL, C.PSEUDO_LABEL, C.CONFIDENCE, C.VALID)
# Slots of a sample's uniform draws in the strong view: each choice has its own, so switching
# one augmentation off does not shift the random numbers of the others.
_ANGLE, _SCALE, _CUTMIX, _SIDE, _BOX_Y, _BOX_X = 0, 1, 2, 3, 4, 5
_JITTER, _BRIGHTNESS, _CONTRAST, _SATURATION, _HUE, _BLUR, _SIGMA = 6, 7, 8, 9, 10, 11, 12
_STRONG_DRAWS = 13
_JITTER_PROB = 0.8  # share of samples colour-jittered (kornia's ColorJitter default p)
_BLUR_KERNEL = (5, 5)
_BLUR_SIGMA = (0.1, 2.0)  # pixels, uniform (FixMatch/UniMatch RandomGaussianBlur range)


def sample_uniforms(keys: torch.Tensor | None, count: int, size: int) -> torch.Tensor:
    """``size``×``count`` float32 uniforms in [0, 1); row i from a generator seeded by keys[i].

    ``keys`` None draws ``size`` keys from torch's global generator.
    """
    if keys is None:
        keys = torch.randint(0, 2**62, (size,))
    if len(keys) != size:
        raise ValueError(f"{len(keys)} augmentation keys for a batch of {size} samples")
    rows = [torch.rand(count, generator=torch.Generator().manual_seed(k)) for k in keys.tolist()]
    return torch.stack(rows) if rows else torch.zeros(0, count)


def weak_view(batch: Batch, config: AugmentConfig, keys: torch.Tensor | None = None) -> Batch:
    """Random flips and 90° rotations: exact pixel permutations, no interpolation."""
    size = batch[C.IMAGE].shape[0]
    flips, turns = weak_draws(config, keys, size)
    out = {}
    for name, value in batch.items():
        if name not in _SPATIAL_COLUMNS:
            out[name] = value
            continue
        views = []
        for i in range(size):
            view = value[i].flip(-1) if flips[i] else value[i]
            views.append(torch.rot90(view, int(turns[i]), dims=(-2, -1)))
        out[name] = torch.stack(views) if views else value
    return out


def weak_draws(
    config: AugmentConfig, keys: torch.Tensor | None, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weak view's B flips (bool: mirror left-right first) and B quarter turns (0-3,
    counter-clockwise as ``torch.rot90``), from the samples' keys."""
    draws = sample_uniforms(keys, 2, size)
    flips = (draws[:, 0] < 0.5) & config.weak_flip
    turns = (draws[:, 1] * 4).long().clamp(max=3) * int(config.weak_rot90)
    return flips, turns


def strong_draws(keys: torch.Tensor | None, size: int) -> torch.Tensor:
    """The strong view's B×13 uniforms (rotation, scale, CutMix, photometric), from the keys."""
    return sample_uniforms(keys, _STRONG_DRAWS, size)


def rotation_scale_matrices(
    draws: torch.Tensor, height: int, width: int, config: AugmentConfig
) -> torch.Tensor:
    """B×2×3 affine matrices: rotation uniform in ±rotation_deg, scale log-uniform, about the centre.

    ``draws``: B×≥2 uniforms (columns ``_ANGLE`` and ``_SCALE``).
    """
    size = draws.shape[0]
    angle = (draws[:, _ANGLE] * 2 - 1) * config.rotation_deg
    log_lo, log_hi = math.log(config.scale_min), math.log(config.scale_max)
    scale = torch.exp(log_lo + draws[:, _SCALE] * (log_hi - log_lo))
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


def cutmix(
    batch: Batch,
    probability: float,
    keys: torch.Tensor | None = None,
    draws: torch.Tensor | None = None,
) -> Batch:
    """Paste a random box of its pair-mate into each sample, in every spatial column.

    Samples pair up in batch order, (0, 1), (2, 3), ...: each gets a box from the other (a last
    odd sample stays whole). Pairs never straddle two workers' shares when the per-worker batch
    is even, so CutMix sees the same partners however a global batch is split. The box side is
    sqrt(U(0.25, 0.5)) of the tile (a quarter to a half of its area, as UniMatch's CutMix);
    each sample is mixed with ``probability``. ``draws``: B×``_STRONG_DRAWS`` uniforms of the
    strong view (else drawn from ``keys``).
    """
    image = batch[C.IMAGE]
    size, height, width = image.shape[0], image.shape[-2], image.shape[-1]
    if size < 2 or probability <= 0:
        return batch
    draws = sample_uniforms(keys, _STRONG_DRAWS, size) if draws is None else draws
    out = {
        name: value.clone() if name in _SPATIAL_COLUMNS else value for name, value in batch.items()
    }
    for i in range(size):
        partner = i ^ 1  # the other member of the pair (2k, 2k + 1)
        if partner >= size or draws[i, _CUTMIX] >= probability:
            continue
        side = math.sqrt(0.25 + 0.25 * float(draws[i, _SIDE]))
        box_h, box_w = int(height * side), int(width * side)
        y0 = min(int(float(draws[i, _BOX_Y]) * (height - box_h + 1)), height - box_h)
        x0 = min(int(float(draws[i, _BOX_X]) * (width - box_w + 1)), width - box_w)
        for name in _SPATIAL_COLUMNS:
            if name in batch:
                region = (..., slice(y0, y0 + box_h), slice(x0, x0 + box_w))
                out[name][i][region] = batch[name][partner][region]
    return out


def photometric(
    image: torch.Tensor,
    config: AugmentConfig,
    keys: torch.Tensor | None = None,
    draws: torch.Tensor | None = None,
) -> torch.Tensor:
    """Colour jitter (3-band) or a contrast gain (other band counts), then Gaussian blur.

    Per sample, with probability 0.8: brightness, contrast and saturation factors uniform in
    1 ± colour_strength and a hue shift uniform in ±hue turns; then, with ``blur_prob``, a 5×5
    Gaussian blur of sigma uniform in [0.1, 2.0] px. ``image`` B×C×H×W float in [0, 1].
    """
    size = image.shape[0]
    draws = sample_uniforms(keys, _STRONG_DRAWS, size) if draws is None else draws
    draws = draws.to(image.device)
    strength = config.colour_strength
    if strength > 0:
        jitter = (draws[:, _JITTER] < _JITTER_PROB).to(image.dtype)

        def factor(slot: int, amplitude: float) -> torch.Tensor:  # B×1×1×1, 1 where not jittered
            value = 1 + (draws[:, slot] * 2 - 1) * amplitude * jitter
            return value.to(image.dtype)[:, None, None, None]

        if image.shape[1] == 3:
            image = (image * factor(_BRIGHTNESS, strength)).clamp(0, 1)
            mean = rgb_to_grayscale(image).mean((1, 2, 3), keepdim=True)
            image = ((image - mean) * factor(_CONTRAST, strength) + mean).clamp(0, 1)
            grey = rgb_to_grayscale(image)
            image = ((image - grey) * factor(_SATURATION, strength) + grey).clamp(0, 1)
            if config.hue > 0:
                hsv = rgb_to_hsv(image)  # hue in radians [0, 2π)
                shift = (factor(_HUE, config.hue) - 1)[:, 0] * 2 * math.pi
                hue = torch.remainder(hsv[:, 0] + shift, 2 * math.pi)
                image = hsv_to_rgb(torch.cat([hue[:, None], hsv[:, 1:]], 1)).clamp(0, 1)
        else:
            mean = image.mean((1, 2, 3), keepdim=True)
            image = ((image - mean) * factor(_CONTRAST, strength) + mean).clamp(0, 1)
    if config.blur_prob > 0:
        blur = draws[:, _BLUR] < config.blur_prob
        if bool(blur.any()):
            low, high = _BLUR_SIGMA
            sigma = (low + draws[:, _SIGMA] * (high - low)).to(image.dtype)
            blurred = gaussian_blur2d(image, _BLUR_KERNEL, sigma[:, None].expand(size, 2))
            image = torch.where(blur[:, None, None, None], blurred, image)
    return image


def strong_view(batch: Batch, config: AugmentConfig, keys: torch.Tensor | None = None) -> Batch:
    """Rotation and scale first, then CutMix, then photometric changes to the image only."""
    size, _, height, width = batch[C.IMAGE].shape
    draws = strong_draws(keys, size)
    out = apply_affine(batch, rotation_scale_matrices(draws, height, width, config))
    out = cutmix(out, config.cutmix_prob, draws=draws)
    out[C.IMAGE] = photometric(out[C.IMAGE], config, draws=draws)
    return out

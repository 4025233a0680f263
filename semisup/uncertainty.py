"""Per-pixel uncertainty of a segmenter and its pooling to one score per tile (pure functions).

Every map is B×H×W float32 in [0, 1], 1 = most uncertain, so measures can be compared and mixed:

- ``entropy_map``: Shannon entropy of the class probabilities, divided by log K;
- ``margin_map``: 1 − (p₁ − p₂), the gap between the two most likely classes (Scheffer et al.
  2001, "Active hidden Markov models"; the usual margin sampling);
- ``disagreement_map``: 1 − the probability the model gives to a reference label (the teacher's
  pseudo-label), so a student that is sure of the teacher's class scores 0;
- ``tta_disagreement_map``: the mean total-variation distance between each test-time view's
  probabilities (flips, 90° rotations, mapped back) and their mean, rescaled to [0, 1].

``pool_tile_scores`` reduces a map to one score per tile over its valid pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final, get_args

import torch
from torch import Tensor

from semisup import columns as C
from semisup.config import UncertaintyMeasure

MEASURES: Final[tuple[str, ...]] = get_args(UncertaintyMeasure)

# Test-time views: (k quarter turns, horizontal flip). Each is undone on the prediction.
TTA_VIEWS: Final = ((0, False), (0, True), (1, False), (2, False), (3, False), (1, True))


def entropy_map(probabilities: Tensor) -> Tensor:
    """B×K×H×W class probabilities (summing to 1 over K) -> B×H×W normalised entropy in [0, 1]."""
    num_classes = probabilities.shape[1]
    if num_classes < 2:
        return torch.zeros_like(probabilities[:, 0])
    p = probabilities.float().clamp_min(1e-12)
    entropy = -(p * p.log()).sum(1)  # B×H×W, in [0, log K]
    return (entropy / math.log(num_classes)).clamp(0.0, 1.0)


def margin_map(probabilities: Tensor) -> Tensor:
    """B×K×H×W class probabilities -> B×H×W 1 − (top-1 − top-2 probability), in [0, 1]."""
    if probabilities.shape[1] < 2:
        return torch.zeros_like(probabilities[:, 0])
    top2 = probabilities.float().topk(2, dim=1).values  # B×2×H×W
    return (1.0 - (top2[:, 0] - top2[:, 1])).clamp(0.0, 1.0)


def disagreement_map(probabilities: Tensor, reference: Tensor) -> Tensor:
    """1 − p(reference class) per pixel: B×K×H×W probabilities, B×H×W int64 reference labels.

    Pixels whose reference is ``IGNORE_INDEX`` (no teacher label) score 0: there is nothing to
    disagree with.
    """
    known = reference != C.IGNORE_INDEX
    index = torch.where(known, reference, torch.zeros_like(reference)).long()
    agreed = probabilities.float().gather(1, index[:, None]).squeeze(1)  # B×H×W
    return torch.where(known, 1.0 - agreed, torch.zeros_like(agreed)).clamp(0.0, 1.0)


def _view(image: Tensor, turns: int, flip: bool) -> Tensor:
    out = image.flip(-1) if flip else image
    return torch.rot90(out, turns, dims=(-2, -1))


def _unview(prediction: Tensor, turns: int, flip: bool) -> Tensor:
    out = torch.rot90(prediction, -turns, dims=(-2, -1))
    return out.flip(-1) if flip else out


def tta_probabilities(
    predict: Callable[[Tensor], Tensor],
    image: Tensor,
    views: tuple[tuple[int, bool], ...] = TTA_VIEWS,
) -> Tensor:
    """V×B×K×H×W probabilities of ``predict`` (B×3×H×W -> B×K×H×W logits) on flipped/rotated
    copies of the square ``image``, each mapped back onto the original pixel grid."""
    stacked = []
    for turns, flip in views:
        logits = predict(_view(image, turns, flip))
        stacked.append(_unview(logits.float().softmax(1), turns, flip))
    return torch.stack(stacked)


def tta_disagreement_map(view_probabilities: Tensor) -> Tensor:
    """V×B×K×H×W per-view probabilities -> B×H×W disagreement in [0, 1].

    The mean over views of the total-variation distance ½·Σₖ|pᵥ − p̄| to the mean prediction p̄,
    divided by its largest possible value 1 − 1/V (views that each put all mass on a different
    class), so identical views give 0.
    """
    views = view_probabilities.shape[0]
    if views < 2:
        return torch.zeros_like(view_probabilities[0, :, 0])
    mean = view_probabilities.mean(0, keepdim=True)
    distance = 0.5 * (view_probabilities - mean).abs().sum(2).mean(0)  # B×H×W
    return (distance / (1.0 - 1.0 / views)).clamp(0.0, 1.0)


def pool_tile_scores(uncertainty: Tensor, valid: Tensor, top_fraction: float = 1.0) -> Tensor:
    """B×H×W uncertainty map and B×H×W bool valid mask -> B tile scores in [0, 1].

    The mean over the tile's ``top_fraction`` most uncertain valid pixels (1.0: over all valid
    pixels; a smaller fraction favours tiles with a small, very uncertain region, such as one
    unfamiliar building among familiar land). A tile without valid pixels scores 0.
    """
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction: got {top_fraction}, expected a value in (0, 1]")
    flat = torch.where(valid, uncertainty.float(), torch.full_like(uncertainty.float(), -1.0))
    flat = flat.flatten(1)  # B×(H·W); invalid pixels sort last
    counts = valid.flatten(1).sum(1)  # B
    keep = (counts.float() * top_fraction).ceil().long().clamp_min(1)
    ordered = flat.sort(dim=1, descending=True).values
    rank = torch.arange(ordered.shape[1], device=ordered.device)[None]
    chosen = (rank < keep[:, None]) & (ordered >= 0)
    total = (ordered.clamp_min(0) * chosen).sum(1)
    return torch.where(counts > 0, total / keep.float(), torch.zeros_like(total))

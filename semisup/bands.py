"""Band scaling and reducing multi-band imagery to the three bands an RGB-pretrained model takes.

``scale_bands`` maps each band from the store's [band_low, band_high] (data_prep's contrast
stretch) to [0, 1]: the student's input, and ×255 the teacher's 8-bit image.

SAM was pretrained on RGB photographs. A store may hold one band (panchromatic, SAR), three
(RGB) or more (RGB + NIR, multispectral). The teacher sees a three-band composite chosen by
configuration: band indices such as ``(3, 0, 1)`` (NIR false colour for an R,G,B,NIR store) or a
named composite from ``COMPOSITES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, TypeVar

import numpy as np

if TYPE_CHECKING:  # torch is imported where a tensor is handed in: the store stays torch-free
    from torch import Tensor

ImageT = TypeVar("ImageT", np.ndarray, "Tensor")

# Named composites as band indices into the store's band order.
COMPOSITES: Final[dict[str, tuple[int, ...]]] = {
    "rgb": (0, 1, 2),  # the first three bands, as stored
    "gray": (0, 0, 0),  # the first band replicated: panchromatic or single-band stores
}
MEAN: Final = "mean"  # the mean of all bands, replicated: a brightness image for any band count


def scale_bands(image: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Each band of ``image`` (…×C, any numeric dtype) mapped linearly from [low, high] to
    [0, 1], clipped outside: float32. ``low``/``high`` broadcast against ``image`` (C values,
    or B×1×1×C for a batch of tiles from different sources)."""
    lo = np.asarray(low, dtype=np.float32)
    span = np.maximum(np.asarray(high, dtype=np.float32) - lo, 1e-6)
    return np.clip((image.astype(np.float32) - lo) / span, 0.0, 1.0)


def to_three_bands(
    image: ImageT, bands: Sequence[int] | str = "rgb", *, channel_axis: int = -1
) -> ImageT:
    """Select or combine bands of ``image`` into exactly three.

    ``image``: NumPy array or tensor of any dtype with bands along ``channel_axis`` (default last,
    as in the tile store: H×W×C or B×H×W×C; pass ``channel_axis=1`` for B×C×H×W).
    ``bands``: three band indices in [0, C), one index (replicated), a name from ``COMPOSITES``
    or ``"mean"``. A single-band image is replicated to three bands under any named composite.

    Returns the same type, dtype and device with 3 bands on ``channel_axis``; ``"mean"`` is
    averaged in float64 and rounded back for integer dtypes. Raises ``ValueError`` naming the band
    index and the band count when an index is out of range.
    """
    axis = channel_axis % image.ndim
    band_count = image.shape[axis]
    if isinstance(bands, str):
        if bands == MEAN:
            return _replicated_mean(image, axis)
        if bands not in COMPOSITES:
            known = ", ".join([*COMPOSITES, MEAN])
            raise ValueError(f"unknown band composite {bands!r}; known: {known}")
        indices = (0, 0, 0) if band_count == 1 else COMPOSITES[bands]
    else:
        indices = tuple(bands)
        if len(indices) == 1:
            indices = indices * 3
        if len(indices) != 3:
            raise ValueError(f"need 1 or 3 band indices, got {len(indices)}: {indices}")
    for index in indices:
        if not 0 <= index < band_count:
            raise ValueError(
                f"band index {index} is out of range for an image with {band_count} "
                f"band{'s' if band_count != 1 else ''} (valid: 0..{band_count - 1})"
            )
    if isinstance(image, np.ndarray):
        return np.take(image, indices, axis=axis)
    import torch

    return image.index_select(axis, torch.tensor(indices, device=image.device))


def _replicated_mean(image: ImageT, axis: int) -> ImageT:
    if isinstance(image, np.ndarray):
        mean_array = image.astype(np.float64).mean(axis=axis, keepdims=True)
        if not np.issubdtype(image.dtype, np.floating):
            mean_array = np.rint(mean_array)
        return np.repeat(mean_array.astype(image.dtype), 3, axis=axis)
    import torch

    mean = image.to(torch.float64).mean(dim=axis, keepdim=True)
    if not image.is_floating_point():
        mean = mean.round()
    return mean.to(image.dtype).repeat_interleave(3, dim=axis)

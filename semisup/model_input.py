"""What a model takes: tile columns (numpy, as streamed) -> tensors, one pixel convention.

Every student and detector in semisup takes images as B×3×S×S float32 RGB in [0, 1]: each
band mapped from its source's [band_low, band_high] (``semisup.bands.scale_bands``), the first
three bands kept (a single band replicated). Training, validation, evaluation, selection,
prediction and export all feed models through ``prepare_batch`` or the same scaling. Only the
SAM teacher takes [0, 255] (SAM's own normalisation is in 8-bit units).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor

from semisup import columns as C
from semisup.bands import scale_bands, to_three_bands

Batch = dict[str, Tensor]

# tiles (or windows) per model call by default wherever a model predicts (pseudo-labels, maps,
# selection scores); each command's --batch-size changes it
INFERENCE_BATCH: Final = 8


def prepare_batch(
    batch: Mapping[str, Any],
    band_scale: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]],
    device: torch.device | str = "cpu",
) -> Batch:
    """Tile columns (numpy, as streamed) -> model-ready tensors on ``device``.

    IMAGE B×S×S×C (uint8/uint16) becomes B×3×S×S float32 in [0, 1]: the first three bands (a
    single band is replicated), each mapped by its source's ``band_low``/``band_high`` as the
    teacher sees it (``band_scale[source] = (low, high)``). LABEL and PSEUDO_LABEL become int64
    with IGNORE_INDEX wherever VALID is False; CONFIDENCE float32 (0 where invalid); SAMPLE_KEY
    (B int64, the samples' augmentation keys) passes through.
    """
    image = np.asarray(batch[C.IMAGE])
    sources = [str(s) for s in batch[C.SOURCE]]
    low = np.stack([np.asarray(band_scale[s][0], np.float32) for s in sources])  # B×C
    high = np.stack([np.asarray(band_scale[s][1], np.float32) for s in sources])
    scaled = scale_bands(image, low[:, None, None], high[:, None, None])
    scaled = to_three_bands(scaled, "rgb")  # B×S×S×3
    out: Batch = {C.IMAGE: torch.from_numpy(scaled).permute(0, 3, 1, 2).contiguous().to(device)}
    valid = torch.from_numpy(np.array(batch[C.VALID], bool)).to(device)
    out[C.VALID] = valid
    for name in (C.LABEL, C.PSEUDO_LABEL):
        if name in batch:
            ids = torch.from_numpy(np.asarray(batch[name]).astype(np.int64)).to(device)
            out[name] = torch.where(valid, ids, torch.full_like(ids, C.IGNORE_INDEX))
    if C.CONFIDENCE in batch:
        # a copy: Arrow hands over read-only buffers, which torch must not alias
        confidence = torch.from_numpy(np.array(batch[C.CONFIDENCE], np.float32)).to(device)
        out[C.CONFIDENCE] = confidence * valid
    if C.SAMPLE_KEY in batch:
        out[C.SAMPLE_KEY] = torch.as_tensor(np.asarray(batch[C.SAMPLE_KEY], np.int64))
    return out

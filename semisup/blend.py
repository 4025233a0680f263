"""Blending overlapping window predictions into one seamless map, a band of rows at a time.

Pure NumPy; ``semisup.predict`` runs the model and feeds the results in.

Geometry (``window_starts``): along each axis, windows of ``tile`` px start every ``tile -
overlap`` px; the last window is moved back to end at the raster's edge, so no window reaches
past a raster larger than one window (a smaller raster gets one window, padded).

Weights (``window_weights``): a window's class probabilities are weighted by a separable taper,
1 in the middle and a raised-cosine (Hann) ramp from ``floor`` up to 1 over the ``overlap``
pixels at each side. Two neighbours' ramps sum to the constant 1 + floor across their overlap,
so one window fades out exactly as the other fades in and no step shows at a window border. The
floor keeps every weight positive: a pixel at the raster's border, covered by one window only,
keeps that window's prediction.

Accumulation (``BandAccumulator``): windows arrive one window row after another (top to bottom)
for one vertical stripe of the raster. The accumulator holds the weighted probability sums of
only the rows that windows still to come may touch (at most two window heights), and hands back
rows as soon as no later window covers them, as class ids and confidences.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from semisup import columns as C

NODATA: Final = C.IGNORE_INDEX  # 255 in both output bands: not valid (nodata or never predicted)
CONFIDENCE_SCALE: Final = 100  # confidence band: blended max probability in percent, 0..100
DEFAULT_FLOOR: Final = 0.01  # weight at a window's outermost pixel, relative to its centre


def window_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the windows covering ``length`` pixels with ``tile``-px windows.

    Consecutive windows share ``overlap`` pixels, except the last, which is moved back to end at
    ``length`` (sharing more). ``[0]`` when ``length <= tile``. ``overlap`` must be in
    [0, tile / 2]: a pixel is then covered by at most two windows per axis.
    """
    if tile < 1 or not 0 <= 2 * overlap <= tile:
        raise ValueError(f"overlap must be in [0, tile/2 = {tile // 2}] px, got {overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))  # every window that ends before the edge
    return [*starts, length - tile]


def windows_in_span(starts: list[int], tile: int, begin: int, end: int) -> tuple[int, int]:
    """[first, last) indices into ``starts`` of the windows that intersect pixels [begin, end)."""
    first = next(i for i, start in enumerate(starts) if start + tile > begin)
    last = max(i for i, start in enumerate(starts) if start < end) + 1
    return first, last


def stripe_bounds(width: int, stripe_width: int) -> list[tuple[int, int]]:
    """[x0, x1) column ranges of the vertical stripes a raster is processed in, left to right."""
    if stripe_width < 1:
        raise ValueError(f"stripe_width must be >= 1 px, got {stripe_width}")
    return [(x0, min(x0 + stripe_width, width)) for x0 in range(0, width, stripe_width)]


def taper(tile: int, overlap: int, floor: float = DEFAULT_FLOOR) -> np.ndarray:
    """1-D window weight: ``tile`` float32 values, a Hann ramp ``floor`` -> 1 over ``overlap``
    pixels at each end and 1 in between. ``ramp[i] + ramp[overlap - 1 - i] == 1 + floor``."""
    if not 0 < floor <= 1:
        raise ValueError(f"weight floor must be in (0, 1], got {floor}")
    weights = np.ones(tile, dtype=np.float64)
    if overlap:
        phase = (np.arange(overlap) + 0.5) / overlap  # pixel centres across the overlap
        ramp = floor + (1 - floor) * (0.5 - 0.5 * np.cos(np.pi * phase))
        weights[:overlap] = ramp
        weights[tile - overlap :] = ramp[::-1]
    return weights.astype(np.float32)


def window_weights(tile: int, overlap: int, floor: float = DEFAULT_FLOOR) -> np.ndarray:
    """2-D separable window weight: tile×tile float32 in [floor², 1] (``taper`` ⊗ ``taper``)."""
    line = taper(tile, overlap, floor)
    return np.outer(line, line)


def class_map(
    sums: np.ndarray, weight: np.ndarray, valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Blended class ids and confidences from accumulated sums.

    ``sums``: K×h×w float32 weighted class-probability sums; ``weight``: h×w float32 sum of
    weights; ``valid``: h×w bool. Returns (h×w uint8 class ids, h×w uint8 confidence in percent
    0..100 = round(100 · max blended probability)), both ``NODATA`` where a pixel is not valid or
    was never predicted (weight 0).
    """
    covered = valid & (weight > 0)
    probabilities = sums / np.where(covered, weight, 1.0)[None]  # K×h×w, sums to 1 per pixel
    label = probabilities.argmax(0).astype(np.uint8)
    confidence = np.rint(probabilities.max(0) * CONFIDENCE_SCALE).astype(np.uint8)
    label[~covered] = NODATA
    confidence[~covered] = NODATA
    return label, confidence


class BandAccumulator:
    """Weighted class-probability sums over columns [x0, x1) of a raster ``height`` rows high.

    Windows are added window row by window row, top to bottom; ``finish(y)`` returns the blended
    rows from the current top up to ``y`` and forgets them. Rows above the top (already
    finished, e.g. by an interrupted run) and columns outside [x0, x1) of a window are ignored.
    Memory: (K + 2) × ``capacity`` × (x1 - x0) values, ``capacity`` = 2 · tile rows by default.
    """

    def __init__(
        self,
        x0: int,
        x1: int,
        height: int,
        num_classes: int,
        weights: np.ndarray,
        top: int = 0,
        capacity: int | None = None,
    ) -> None:
        self.x0, self.x1, self.height, self.top = x0, x1, height, top
        self.weights = weights
        tile = weights.shape[0]
        rows = capacity or 2 * tile
        width = x1 - x0
        self.sums = np.zeros((num_classes, rows, width), np.float32)  # K×rows×width
        self.weight = np.zeros((rows, width), np.float32)
        self.valid = np.zeros((rows, width), bool)

    def add(self, y0: int, x0: int, probabilities: np.ndarray, valid: np.ndarray) -> None:
        """Add one window at raster pixel (``y0``, ``x0``): ``probabilities`` K×T×T (any float
        dtype, rows summing to 1), ``valid`` T×T bool (False where nodata or padding)."""
        tile = probabilities.shape[-1]
        rows = slice(max(y0, self.top), min(y0 + tile, self.height))
        cols = slice(max(x0, self.x0), min(x0 + tile, self.x1))
        if rows.start >= rows.stop or cols.start >= cols.stop:
            return
        if rows.stop - self.top > self.weight.shape[0]:
            raise ValueError(
                f"window at row {y0} reaches row {rows.stop}, beyond the {self.weight.shape[0]} "
                f"rows held from row {self.top}: finish earlier rows first"
            )
        # the window's part inside the held rows and this stripe, in window and buffer frames
        win = (slice(rows.start - y0, rows.stop - y0), slice(cols.start - x0, cols.stop - x0))
        buf = (
            slice(rows.start - self.top, rows.stop - self.top),
            slice(cols.start - self.x0, cols.stop - self.x0),
        )
        weight = self.weights[win]
        self.sums[(slice(None), *buf)] += probabilities[(slice(None), *win)] * weight
        self.weight[buf] += weight
        self.valid[buf] |= valid[win]

    def finish(self, y_end: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Blend rows [top, ``y_end``) and drop them: (first row, class ids, confidences), each
        h×(x1 - x0) uint8 (see ``class_map``); h = 0 when ``y_end <= top``."""
        y_end = min(y_end, self.height)
        count = max(0, y_end - self.top)
        label, confidence = class_map(self.sums[:, :count], self.weight[:count], self.valid[:count])
        first = self.top
        if count:
            for array in (self.sums, self.weight, self.valid):  # move the rest up
                kept = array[..., count:, :].copy()
                array[..., : kept.shape[-2], :] = kept
                array[..., kept.shape[-2] :, :] = 0
            self.top = y_end
        return first, label, confidence

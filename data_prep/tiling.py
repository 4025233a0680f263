"""Block-wise streaming geometry: the write blocks of a raster and per-tile pixel counts.

A raster is written in chunk-aligned blocks (``block_windows``) so that it never has to fit in
memory; the per-tile statistics of the tile index (valid fraction, label coverage) are
accumulated from the same blocks (``TileCounter``), including tiles that straddle blocks when
tiles overlap.
"""

from __future__ import annotations

import numpy as np

from semisup.store import grid_starts

# Columns per write block: wide enough that GDAL decodes long runs of each strip at once, small
# enough that a block of 256 rows × 8192 columns × 4 bands of uint16 stays at 16 MiB.
MAX_BLOCK_COLUMNS = 8192


def block_windows(
    height: int, width: int, tile_size: int, max_columns: int = MAX_BLOCK_COLUMNS
) -> list[tuple[int, int, int, int]]:
    """(y0, x0, h, w) of the write blocks, row-major.

    Blocks are ``tile_size`` rows by the largest multiple of ``tile_size`` columns that fits in
    ``max_columns`` (at least one tile), clipped at the raster edge, so every block covers whole
    store chunks and each chunk is written exactly once.
    """
    columns = max(tile_size, max_columns // tile_size * tile_size)
    return [
        (y0, x0, min(tile_size, height - y0), min(columns, width - x0))
        for y0 in range(0, height, tile_size)
        for x0 in range(0, width, columns)
    ]


class TileCounter:
    """Counts the True pixels of a mask inside every tile of the grid, fed block by block.

    ``counts`` is n_rows×n_cols int64 in the order of ``semisup.store.tile_windows``. Blocks may
    come in any order and tiles may straddle blocks (overlap, or tiles not aligned to blocks).
    """

    def __init__(self, height: int, width: int, tile_size: int, overlap: int) -> None:
        ys = np.array(grid_starts(height, tile_size, overlap), dtype=np.int64)
        xs = np.array(grid_starts(width, tile_size, overlap), dtype=np.int64)
        self._row_start, self._row_end = ys, np.minimum(ys + tile_size, height)
        self._col_start, self._col_end = xs, np.minimum(xs + tile_size, width)
        self.counts = np.zeros((len(ys), len(xs)), dtype=np.int64)

    def add(self, mask: np.ndarray, y0: int, x0: int) -> None:
        """Add ``mask`` (h×w bool, the block at y0, x0) to every tile it intersects."""
        h, w = mask.shape
        cols = np.flatnonzero((self._col_start < x0 + w) & (self._col_end > x0))
        rows = np.flatnonzero((self._row_start < y0 + h) & (self._row_end > y0))
        if not len(cols) or not len(rows):
            return
        # Prefix sums along x give each block row's count inside each tile's column span...
        prefix_x = np.zeros((h, w + 1), dtype=np.int64)
        np.cumsum(mask, axis=1, out=prefix_x[:, 1:])
        c0 = np.clip(self._col_start[cols] - x0, 0, w)
        c1 = np.clip(self._col_end[cols] - x0, 0, w)
        per_row = prefix_x[:, c1] - prefix_x[:, c0]  # h×len(cols)
        # ...and prefix sums along y of those give each tile's count inside the block.
        prefix_y = np.zeros((h + 1, len(cols)), dtype=np.int64)
        np.cumsum(per_row, axis=0, out=prefix_y[1:])
        r0 = np.clip(self._row_start[rows] - y0, 0, h)
        r1 = np.clip(self._row_end[rows] - y0, 0, h)
        self.counts[np.ix_(rows, cols)] += prefix_y[r1] - prefix_y[r0]

"""Write blocks and per-tile counts, against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.tiling import TileCounter, block_windows
from semisup.store import tile_windows


@pytest.mark.parametrize(("height", "width"), [(1, 1), (300, 700), (3000, 9000), (512, 8192)])
def test_blocks_cover_the_raster_once_and_align_with_chunks(height: int, width: int) -> None:
    tile = 256
    seen = np.zeros((height, width), dtype=np.int32)
    for y0, x0, h, w in block_windows(height, width, tile):
        assert y0 % tile == 0 and x0 % tile == 0  # chunk-aligned
        assert h <= tile and w <= 8192
        assert w % tile == 0 or x0 + w == width  # whole chunks except at the right edge
        seen[y0 : y0 + h, x0 : x0 + w] += 1
    assert (seen == 1).all()


def test_narrow_block_limit_still_holds_one_tile() -> None:
    assert block_windows(10, 600, tile_size=256, max_columns=100) == [
        (0, 0, 10, 256),
        (0, 256, 10, 256),
        (0, 512, 10, 88),
    ]


@pytest.mark.parametrize(
    ("tile", "overlap", "max_columns"), [(64, 0, 128), (64, 16, 128), (50, 30, 50)]
)
def test_tile_counter_matches_brute_force(tile: int, overlap: int, max_columns: int) -> None:
    rng = np.random.default_rng(0)
    height, width = 203, 341
    mask = rng.random((height, width)) < 0.3
    counter = TileCounter(height, width, tile, overlap)
    # Blocks fed in a shuffled order: the counter must not depend on it.
    blocks = block_windows(height, width, tile, max_columns)
    for i in rng.permutation(len(blocks)):
        y0, x0, h, w = blocks[i]
        counter.add(mask[y0 : y0 + h, x0 : x0 + w], y0, x0)
    for row, col, y0, x0, h, w in tile_windows(height, width, tile, overlap):
        assert counter.counts[row, col] == mask[y0 : y0 + h, x0 : x0 + w].sum()

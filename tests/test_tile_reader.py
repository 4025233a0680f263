"""The training workers' reader: tiles by id, in the asked order, as Ray Data reads them."""

from __future__ import annotations

import numpy as np
import pytest
from store_factory import SourceSpec, SyntheticStore, build_store

from semisup import columns as C
from semisup.data import read_tiles
from semisup.tile_reader import TileReader

SOURCES = (
    SourceSpec("a", 100, 140, nodata_box=(0, 0, 40, 40), split=C.LABELED),
    SourceSpec("b", 70, 50, labeled=False, split=C.UNLABELED, texture="smooth"),
)
COLUMNS = (C.IMAGE, C.VALID, C.LABEL, C.TILE_ID, C.SOURCE)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return build_store(str(tmp_path_factory.mktemp("reader") / "tiles.zarr"), SOURCES)


@pytest.mark.parametrize("cache_bytes", [0, 10**8])
@pytest.mark.timeout(120)
def test_tiles_read_by_id_equal_the_streamed_rows_in_the_asked_order(
    synthetic: SyntheticStore, cache_bytes: int, ray_session: None
) -> None:
    streamed = read_tiles(synthetic.url, columns=list(COLUMNS), halo=3, skip_nodata=False)
    rows = {int(row[C.TILE_ID]): row for row in streamed.take_all()}
    ids = np.random.default_rng(0).permutation(sorted(rows))[:17]  # both sources, shuffled
    reader = TileReader(
        synthetic.url, sorted(rows), columns=COLUMNS, halo=3, cache_bytes=cache_bytes
    )
    assert reader.cacheable == bool(cache_bytes)
    for _ in range(2):  # the second read comes from memory when cached
        batch = reader.read(ids)
        assert batch[C.TILE_ID].tolist() == ids.tolist()
        for i, tile_id in enumerate(ids):
            for name in COLUMNS:
                assert np.array_equal(batch[name][i], rows[int(tile_id)][name]), name
    assert batch[C.IMAGE].shape == (17, 38, 38, 3) and batch[C.LABEL].dtype == np.uint8


def test_unknown_tile_ids_are_named(synthetic: SyntheticStore) -> None:
    with pytest.raises(ValueError, match="tile id 99999 is not in the store's tile index"):
        TileReader(synthetic.url, [0, 99999], columns=COLUMNS)
    reader = TileReader(synthetic.url, [0, 1], columns=COLUMNS)
    with pytest.raises(ValueError, match="tile id 2 is not one this reader serves"):
        reader.read([2])

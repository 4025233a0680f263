"""Tiles of a store read by tile id, in any order: what a training worker reads (Ray-free).

Training decides its own order (``semisup.sampling``): every step names the tiles it needs. A
``TileReader`` reads them straight from the Zarr store (a local path every node sees, or object
storage), grouping the tiles of each source chunk-aligned (``semisup.tile_read``). A split that
fits its memory budget is read once, whole, and served from memory after that; a larger one is
read batch by batch, one chunk per array and tile.

Rows are dicts of ``semisup.columns`` with the layout of ``semisup.data.read_tiles``: IMAGE
n×S×S×C in the source dtype, VALID n×S×S bool, LABEL n×S×S uint8, PSEUDO_LABEL/CONFIDENCE when
asked for, TILE_ID n int64 and SOURCE n str; S = tile_size + 2·halo.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semisup import columns as C
from semisup import store as tile_store
from semisup.tile_read import TileGroup, read_tile_group, row_nbytes, source_layouts

TileIds = Sequence[int] | np.ndarray  # int64 tile ids
CACHE_READ_TILES = 64  # tiles per read while a split is loaded into memory (chunk rows shared)


class TileReader:
    """Reads tiles ``tile_ids`` of the store at ``store`` by id; caches them within a budget.

    Args:
        store: local path or fsspec URL of a semisup tile store.
        tile_ids: the tiles this reader may be asked for (a split, or a worker's share of one).
        columns: the columns of each batch (pixel and index columns, as in ``read_tiles``).
        halo: pixels of context read around each tile.
        storage_options: fsspec options for ``store``.
        cache_bytes: hold every tile in memory after the first read when they need at most
            this many bytes (0: never).

    Raises:
        ValueError: a tile id is not in the store's index, or the sources mix image layouts.
    """

    def __init__(
        self,
        store: str,
        tile_ids: TileIds,
        *,
        columns: Sequence[str],
        halo: int = 0,
        storage_options: Mapping[str, Any] | None = None,
        cache_bytes: int = 0,
    ) -> None:
        self.store = str(store)
        self.columns = tuple(columns)
        self.halo = halo
        self._storage_options = dict(storage_options or {})
        root = tile_store.open_store(self.store, "r", self._storage_options)
        self.tile_size = tile_store.read_store_meta(root).tile_size
        wanted = np.unique(np.asarray(tile_ids, np.int64))
        labels = tile_store.current_labels(root)  # one label version for index and arrays
        index = tile_store.read_tile_index(self.store, self._storage_options, labels)
        index = index.filter(pc.is_in(index.column(C.TILE_ID), pa.array(wanted, pa.int64())))
        found = index.column(C.TILE_ID).to_numpy()
        missing = np.setdiff1d(wanted, found)
        if len(missing):
            raise ValueError(
                f"{self.store}: tile id {int(missing[0])} is not in the store's tile index "
                f"({len(missing)} of {len(wanted)} requested ids are missing)"
            )
        self._layouts = source_layouts(self.store, root, index, self.columns, labels)
        self._sources = {name: root[name] for name in self._layouts}
        self._where = {  # tile id -> (source, grid row, grid column, y0, x0, split)
            int(row[C.TILE_ID]): row for row in index.select(list(_POSITION_COLUMNS)).to_pylist()
        }
        size = sum(
            row_nbytes(self.tile_size, halo, self.columns, self._layouts[row[C.SOURCE]])
            for row in self._where.values()
        )
        self.cacheable = 0 < size <= cache_bytes
        self.nbytes = size
        self._cache: dict[str, np.ndarray] | None = None
        self._cache_rows: dict[int, int] = {}

    def read(self, tile_ids: TileIds) -> dict[str, np.ndarray]:
        """The tiles ``tile_ids`` in this order, one row each."""
        ids = [int(i) for i in tile_ids]
        unknown = [i for i in ids if i not in self._where]
        if unknown:
            raise ValueError(f"{self.store}: tile id {unknown[0]} is not one this reader serves")
        if self.cacheable and self._cache is None:
            everything = sorted(self._where)
            parts = [
                self._read_from_store(everything[lo : lo + CACHE_READ_TILES])
                for lo in range(0, len(everything), CACHE_READ_TILES)
            ]
            self._cache = {name: np.concatenate([p[name] for p in parts]) for name in self.columns}
            self._cache_rows = {tile_id: row for row, tile_id in enumerate(everything)}
        if self._cache is not None:
            rows = np.array([self._cache_rows[i] for i in ids], np.int64)
            return {name: column[rows] for name, column in self._cache.items()}
        return self._read_from_store(ids)

    def _read_from_store(self, ids: list[int]) -> dict[str, np.ndarray]:
        """Read ``ids`` from the store: each source's tiles as one row-major group."""
        positions: list[np.ndarray] = []
        parts: list[dict[str, np.ndarray]] = []
        by_source: dict[str, list[int]] = {}
        for position, tile_id in enumerate(ids):
            by_source.setdefault(self._where[tile_id][C.SOURCE], []).append(position)
        for source_id, where in by_source.items():
            rows = [self._where[ids[p]] for p in where]
            order = sorted(range(len(rows)), key=lambda k: (rows[k][C.ROW], rows[k][C.COL]))
            group = _group(source_id, [rows[k] for k in order])
            parts.append(
                read_tile_group(
                    self._sources[source_id],
                    group,
                    tile_size=self.tile_size,
                    halo=self.halo,
                    columns=self.columns,
                    layout=self._layouts[source_id],
                )
            )
            positions.append(np.asarray(where, np.int64)[order])
        back = np.argsort(np.concatenate(positions), kind="stable")  # group order -> asked order
        return {name: np.concatenate([p[name] for p in parts])[back] for name in self.columns}


_POSITION_COLUMNS = (C.TILE_ID, C.SOURCE, C.ROW, C.COL, C.Y0, C.X0, C.SPLIT)


def _group(source_id: str, rows: list[dict[str, Any]]) -> TileGroup:
    """A ``TileGroup`` of index rows (dicts) of one source, in the given (row-major) order."""

    def column(name: str, dtype: Any) -> np.ndarray:
        return np.array([row[name] for row in rows], dtype=dtype)

    return TileGroup(
        source_id=source_id,
        tile_id=column(C.TILE_ID, np.int64),
        row=column(C.ROW, np.int32),
        col=column(C.COL, np.int32),
        y0=column(C.Y0, np.int64),
        x0=column(C.X0, np.int64),
        split=column(C.SPLIT, object),
    )

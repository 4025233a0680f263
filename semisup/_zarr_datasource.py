"""Ray Data datasource for the Zarr tile store: the only module that touches Ray's read internals.

``Datasource``, ``ReadTask`` and ``BlockMetadata`` are Ray developer APIs (Ray is pinned for them);
``semisup.data.read_tiles`` is the public face. A read task reads one ``TileGroup``: up to
``tiles_per_task`` tiles of one source in row-major order, chunk-aligned, through
``semisup.tile_read.read_tile_group``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.context import DataContext
from ray.data.datasource import Datasource, ReadTask

from semisup import columns as C
from semisup import store as tile_store
from semisup.tile_read import (
    INDEX_DTYPES,
    STRING_COLUMNS,
    SourceLayout,
    TileGroup,
    read_tile_group,
    row_nbytes,
)

# Bytes per output block at most. A task reads its group chunk-aligned and yields it in blocks
# of up to this size, which bounds a worker's memory and its pending output when tasks are
# large. Not smaller: each block costs the driver and the worker a fixed overhead (measured on
# 2 cores: 64-tile tasks of 256 px tiles took 2.5 CPU ms/tile as one 17 MiB block, 2.8 as
# three blocks of up to 8 MiB, 3.0 as five of up to 4 MiB). Ray's own target is 128 MiB.
TARGET_BLOCK_BYTES = 32 * 1024**2


class ZarrTileDatasource(Datasource):
    """Tiles of a semisup store, one read task per ``TileGroup``.

    Planning happens here in the driver; a read task carries only the store URL, its storage
    options and its group's tile positions, opens the store in the worker and yields its group
    in blocks of about ``target_block_bytes`` (default ``TARGET_BLOCK_BYTES``).
    """

    def __init__(
        self,
        url: str,
        groups: Sequence[TileGroup],
        layouts: Mapping[str, SourceLayout],
        *,
        tile_size: int,
        halo: int,
        columns: Sequence[str],
        storage_options: Mapping[str, Any] | None = None,
        target_block_bytes: int | None = None,
    ) -> None:
        super().__init__()
        self._url = url
        self._groups = list(groups)
        self._layouts = dict(layouts)
        self._tile_size = tile_size
        self._halo = halo
        self._columns = tuple(columns)
        self._storage_options = dict(storage_options or {})
        self._target_block_bytes = target_block_bytes or TARGET_BLOCK_BYTES
        self._schemas = {
            layout: block_schema(tile_size, halo, self._columns, layout)
            for layout in set(self._layouts.values())
        }

    @property
    def num_tasks(self) -> int:
        return len(self._groups)

    def get_name(self) -> str:
        return "ZarrTiles"

    def _row_nbytes(self, group: TileGroup) -> int:
        layout = self._layouts[group.source_id]
        return row_nbytes(self._tile_size, self._halo, self._columns, layout)

    def estimate_inmemory_data_size(self) -> int:
        return sum(len(group) * self._row_nbytes(group) for group in self._groups)

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: DataContext | None = None,
    ) -> list[ReadTask]:
        # The task count is fixed by the tile groups (chunk alignment matters more than the
        # requested parallelism); read_tiles passes override_num_blocks to match it.
        tasks = []
        for group in self._groups:
            layout = self._layouts[group.source_id]
            read_fn = functools.partial(
                _read_blocks,
                url=self._url,
                storage_options=self._storage_options,
                group=group,
                tiles_per_block=max(1, self._target_block_bytes // self._row_nbytes(group)),
                tile_size=self._tile_size,
                halo=self._halo,
                columns=self._columns,
                layout=layout,
            )
            metadata = BlockMetadata(  # covers every block the task yields
                num_rows=len(group),
                size_bytes=len(group) * self._row_nbytes(group),
                input_files=None,
                exec_stats=None,
            )
            schema = self._schemas[layout]
            tasks.append(ReadTask(read_fn, metadata, schema, per_task_row_limit))
        return tasks

    def read_in_driver(self) -> list[Block]:
        """Every block, read in this process (for process-local stores such as memory://)."""
        return [block for task in self.get_read_tasks(self.num_tasks) for block in task()]


def block_schema(
    tile_size: int, halo: int, columns: Sequence[str], layout: SourceLayout
) -> pa.Schema:
    """The Arrow schema of the blocks, taken from a one-row block of zeros."""
    span = tile_size + 2 * halo
    zeros = {
        C.IMAGE: np.zeros((1, span, span, layout.bands), dtype=layout.dtype),
        C.VALID: np.zeros((1, span, span), dtype=bool),
        C.LABEL: np.zeros((1, span, span), dtype=np.uint8),
        C.PSEUDO_LABEL: np.zeros((1, span, span), dtype=layout.pixel_dtype(C.PSEUDO_LABEL)),
        C.CONFIDENCE: np.zeros((1, span, span), dtype=np.float32),
        **{name: np.zeros(1, dtype=dtype) for name, dtype in INDEX_DTYPES.items()},
        **{name: np.array([""], dtype=object) for name in STRING_COLUMNS},
    }
    return _to_block({name: zeros[name] for name in columns}).schema


def _to_block(batch: dict[str, np.ndarray]) -> Block:
    # converts named numpy columns to an Arrow table (tensor columns for the pixel arrays)
    return BlockAccessor.batch_to_block(batch)


def _read_blocks(
    *,
    url: str,
    storage_options: Mapping[str, Any],
    group: TileGroup,
    tiles_per_block: int,
    tile_size: int,
    halo: int,
    columns: Sequence[str],
    layout: SourceLayout,
) -> Iterator[Block]:
    """Body of one read task: open the source group in this worker, yield the group in blocks."""
    source = tile_store.open_store(url, "r", storage_options)[group.source_id]
    for part in group.parts(tiles_per_block):
        batch = read_tile_group(
            source, part, tile_size=tile_size, halo=halo, columns=columns, layout=layout
        )
        yield _to_block(batch)

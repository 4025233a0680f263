"""Reading tiles out of a semisup Zarr store: Ray-free, shared by every reader.

A ``TileGroup`` is a set of tiles of one source in row-major order. ``read_tile_group`` covers it
with a few rectangles of whole tile runs (one per run of neighbouring tiles, runs of equal extent
in consecutive grid rows merged), reads each rectangle once per array and cuts the tiles out of
it, so a group costs a handful of chunk-aligned zarr reads instead of three per tile. Ray Data's
read tasks (``semisup._zarr_datasource``) and the training loop's reader by tile id
(``semisup.tile_reader``) both use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from semisup import columns as C
from semisup import store as tile_store

# Per-tile pixel columns and their padding value outside the raster (see store.read_tile).
PIXEL_FILL: dict[str, int | float | bool] = {
    C.IMAGE: 0,
    C.VALID: False,
    C.LABEL: C.IGNORE_INDEX,
    C.PSEUDO_LABEL: C.IGNORE_INDEX,  # for uint16 instance ids: 65535, see pixel_fill
    C.CONFIDENCE: 0.0,
}
# Per-tile position columns, copied from the tile index, with their numpy dtypes.
INDEX_DTYPES: dict[str, str] = {
    C.TILE_ID: "int64",
    C.ROW: "int32",
    C.COL: "int32",
    C.Y0: "int64",
    C.X0: "int64",
}
STRING_COLUMNS = (C.SOURCE, C.SPLIT)
ALL_COLUMNS: tuple[str, ...] = (*PIXEL_FILL, *INDEX_DTYPES, *STRING_COLUMNS)
# The teacher's columns are read only when asked for by name: most readers do not need them.
DEFAULT_COLUMNS: tuple[str, ...] = tuple(
    name for name in ALL_COLUMNS if name not in (C.PSEUDO_LABEL, C.CONFIDENCE)
)


@dataclass(frozen=True)
class SourceLayout:
    """What a reader needs to know about one source: pixel dtype, bands, whether it has labels."""

    bands: int
    dtype: str
    labeled: bool
    pseudo_dtype: str | None = None  # dtype of the teacher's pseudo_label array, None if absent
    # The array LABEL is read from: the store's current label version (store.current_labels).
    label_array: str = C.LABEL

    def array_name(self, name: str) -> str:
        """The zarr array that holds pixel column ``name`` in this source's group."""
        return self.label_array if name == C.LABEL else name

    def pixel_dtype(self, name: str) -> str:
        """The dtype of pixel column ``name`` in this source's rows."""
        dtypes = {C.IMAGE: self.dtype, C.VALID: "bool", C.LABEL: "uint8", C.CONFIDENCE: "float32"}
        return dtypes.get(name, self.pseudo_dtype or "uint8")

    def stores(self, name: str) -> bool:
        """Whether the source holds an array for pixel column ``name`` (else rows are fill)."""
        if name == C.LABEL:
            return self.labeled
        if name in (C.PSEUDO_LABEL, C.CONFIDENCE):
            return self.pseudo_dtype is not None
        return True


def pixel_fill(name: str, dtype: str) -> int | float | bool:
    """Padding of pixel column ``name``: PIXEL_FILL, or the dtype's maximum for pseudo-labels
    (255 = IGNORE_INDEX for uint8 class ids, 65535 = not valid for uint16 instance ids)."""
    if name == C.PSEUDO_LABEL:
        return int(np.iinfo(dtype).max)
    return PIXEL_FILL[name]


@dataclass(frozen=True)
class TileGroup:
    """The tiles of one read task: all from ``source_id``, row-major, each column a 1-D array."""

    source_id: str
    tile_id: np.ndarray  # n int64
    row: np.ndarray  # n int32, grid row
    col: np.ndarray  # n int32, grid column
    y0: np.ndarray  # n int64, pixel offset of the tile (without halo)
    x0: np.ndarray  # n int64
    split: np.ndarray  # n object (str)

    def __len__(self) -> int:
        return len(self.tile_id)

    def parts(self, size: int) -> list[TileGroup]:
        """Consecutive sub-groups of up to ``size`` tiles, in order."""
        return [
            TileGroup(
                self.source_id,
                *(column[lo : lo + size] for column in (self.tile_id, self.row, self.col)),
                *(column[lo : lo + size] for column in (self.y0, self.x0, self.split)),
            )
            for lo in range(0, len(self), size)
        ]


def group_tiles(index: pa.Table, tiles_per_task: int) -> list[TileGroup]:
    """Cut a (filtered) tile index into groups of up to ``tiles_per_task`` tiles of one source.

    Tiles are sorted by source, then grid row, then grid column, so consecutive tiles of a group
    are neighbours on the grid and their windows share chunk rows.
    """
    if index.num_rows == 0:
        return []
    order = index.sort_by([(C.SOURCE, "ascending"), (C.ROW, "ascending"), (C.COL, "ascending")])
    cols = {name: order.column(name).to_numpy() for name in (*INDEX_DTYPES, *STRING_COLUMNS)}
    sources = cols[C.SOURCE]
    # start of each source's run of rows in the sorted index
    starts = np.flatnonzero(np.r_[True, sources[1:] != sources[:-1]])
    ends = np.r_[starts[1:], len(sources)]
    groups = []
    for start, end in zip(starts, ends, strict=True):
        for lo in range(start, end, tiles_per_task):
            part = slice(lo, min(lo + tiles_per_task, end))
            groups.append(
                TileGroup(
                    source_id=str(sources[start]),
                    tile_id=cols[C.TILE_ID][part].astype(np.int64),
                    row=cols[C.ROW][part].astype(np.int32),
                    col=cols[C.COL][part].astype(np.int32),
                    y0=cols[C.Y0][part].astype(np.int64),
                    x0=cols[C.X0][part].astype(np.int64),
                    split=cols[C.SPLIT][part].astype(object),
                )
            )
    return groups


def covering_windows(group: TileGroup) -> list[np.ndarray]:
    """Partition a row-major group into rectangles of whole tiles; returns tile indices of each.

    A run is a maximal sequence of tiles in one grid row with consecutive columns. Runs of
    consecutive grid rows with the same column range merge into one rectangle. The union of
    the rectangles' tiles is the group, and no rectangle holds a tile outside it.
    """
    if len(group) == 0:
        return []
    breaks = np.flatnonzero((np.diff(group.row) != 0) | (np.diff(group.col) != 1)) + 1
    runs = np.split(np.arange(len(group)), breaks)
    rectangles: list[list[np.ndarray]] = []
    for run in runs:
        if rectangles:
            last = rectangles[-1][-1]
            same_columns = (
                group.col[run[0]] == group.col[last[0]]
                and group.col[run[-1]] == group.col[last[-1]]
            )
            if same_columns and group.row[run[0]] == group.row[last[0]] + 1:
                rectangles[-1].append(run)
                continue
        rectangles.append([run])
    return [np.concatenate(runs_of_rect) for runs_of_rect in rectangles]


def read_tile_group(
    source: Any,
    group: TileGroup,
    *,
    tile_size: int,
    halo: int,
    columns: Sequence[str],
    layout: SourceLayout,
) -> dict[str, np.ndarray]:
    """Read every tile of ``group`` from the zarr group ``source``; Ray-free.

    Returns the requested columns, n rows each: IMAGE n×S×S×C source dtype, VALID n×S×S bool,
    LABEL n×S×S uint8 (all IGNORE_INDEX when the source is unlabelled), S = tile_size + 2·halo,
    padded outside the raster exactly like ``store.read_tile``; index columns as 1-D arrays.
    """
    span = tile_size + 2 * halo
    n = len(group)
    batch: dict[str, np.ndarray] = {}
    pixel_columns = [name for name in PIXEL_FILL if name in columns]
    for name in pixel_columns:
        dtype = layout.pixel_dtype(name)
        trailing = (layout.bands,) if name == C.IMAGE else ()
        batch[name] = np.full((n, span, span, *trailing), pixel_fill(name, dtype), dtype=dtype)
    stored = [name for name in pixel_columns if layout.stores(name)]
    for tiles in covering_windows(group) if stored else []:
        top, left = int(group.y0[tiles].min()) - halo, int(group.x0[tiles].min()) - halo
        height = int(group.y0[tiles].max()) - halo - top + span
        width = int(group.x0[tiles].max()) - halo - left + span
        for name in stored:
            fill = pixel_fill(name, layout.pixel_dtype(name))
            array = source[layout.array_name(name)]
            window = tile_store.read_window(array, top, left, height, width, fill)
            for i in tiles:
                dy, dx = int(group.y0[i]) - halo - top, int(group.x0[i]) - halo - left
                batch[name][i] = window[dy : dy + span, dx : dx + span]
    index_arrays = {
        C.TILE_ID: group.tile_id,
        C.ROW: group.row,
        C.COL: group.col,
        C.Y0: group.y0,
        C.X0: group.x0,
        C.SOURCE: np.full(n, group.source_id, dtype=object),
        C.SPLIT: group.split,
    }
    batch.update({name: array for name, array in index_arrays.items() if name in columns})
    return {name: batch[name] for name in columns}


def row_nbytes(tile_size: int, halo: int, columns: Sequence[str], layout: SourceLayout) -> int:
    """Estimated in-memory bytes of one row (pixels exactly, strings approximately)."""
    pixels = (tile_size + 2 * halo) ** 2
    sizes = {
        C.IMAGE: pixels * layout.bands * np.dtype(layout.dtype).itemsize,
        C.VALID: -(-pixels // 8),  # Arrow packs booleans into bits
        C.LABEL: pixels,
        C.PSEUDO_LABEL: pixels * np.dtype(layout.pixel_dtype(C.PSEUDO_LABEL)).itemsize,
        C.CONFIDENCE: pixels * 4,
        C.SOURCE: 24,  # offset plus a short id
        C.SPLIT: 16,
        **{name: np.dtype(dtype).itemsize for name, dtype in INDEX_DTYPES.items()},
    }
    return int(sum(sizes[name] for name in columns))


def source_layouts(
    store: str,
    root: Any,
    index: pa.Table,
    columns: Sequence[str],
    labels: tile_store.LabelVersion | None = None,
) -> dict[str, SourceLayout]:
    """Layout of every source in ``index``; image bands and dtype must agree for uniform rows.

    Labels come from ``labels``, the label version ``index`` was read with (default: the
    store's current one).
    """
    labels = labels if labels is not None else tile_store.current_labels(root)
    layouts = {}
    for source_id in index.column(C.SOURCE).unique().to_pylist():
        meta = tile_store.read_source_meta(root, source_id)
        group = root[source_id]
        pseudo = group.get(C.PSEUDO_LABEL)
        label_name = labels.array_name(group)
        layouts[source_id] = SourceLayout(
            bands=meta.bands,
            dtype=meta.dtype,
            labeled=label_name is not None,
            pseudo_dtype=None if pseudo is None else str(pseudo.dtype),
            label_array=label_name or C.LABEL,
        )
    kinds = {(layout.bands, layout.dtype) for layout in layouts.values()}
    if C.IMAGE in columns and len(kinds) > 1:
        raise ValueError(
            f"{store!r}: the selected sources mix image layouts (bands, dtype) "
            f"{sorted(kinds)}; a batch needs one. Select a split with a single layout."
        )
    return layouts

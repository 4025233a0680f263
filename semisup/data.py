"""Streaming tiles from a semisup Zarr store into a Ray Dataset.

``read_tiles`` is the one way the pipeline reads a store: it filters the tile index in the driver
and hands groups of neighbouring tiles to parallel read tasks, which read whole chunk rows and
cut the tiles out (see ``semisup._zarr_datasource``). Rows are dicts of ``semisup.columns``:

- ``IMAGE``: S×S×C in the source dtype; ``VALID``: S×S bool; ``LABEL``: S×S uint8, IGNORE_INDEX
  where unlabelled (every row has one, all IGNORE_INDEX for unlabelled sources);
- ``PSEUDO_LABEL`` (S×S, the teacher's dtype: uint8 class ids, or uint16 instance ids) and
  ``CONFIDENCE`` (S×S float32) once ``semisup pseudo-label`` has written them; sources without
  them give IGNORE_INDEX (65535 for uint16) and confidence 0. Asked for only by name;
- ``TILE_ID``, ``ROW``, ``COL``, ``Y0``, ``X0`` (integers) and ``SOURCE``, ``SPLIT`` (strings);

with S = tile_size + 2·halo. Pixels outside the raster, around the halo or past a short edge tile,
are padded with image 0, valid False and label IGNORE_INDEX, exactly like ``store.read_tile``.

Where the store may live: a local path (on a multi-node cluster, one every node can read), or any
fsspec URL that worker processes can reach (s3://, gs://, ...) with ``storage_options`` passed to
every reader. ``memory://`` stores exist only in the process that wrote them, so they are read
eagerly in the driver and handed to Ray as materialised blocks: for tests and tiny stores only.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, Final

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import ray

from semisup import columns as C
from semisup import store as tile_store
from semisup._zarr_datasource import ZarrTileDatasource
from semisup.config import StreamConfig
from semisup.runtime import ensure_ray
from semisup.tile_read import ALL_COLUMNS, DEFAULT_COLUMNS, group_tiles, source_layouts

__all__ = ["read_tiles", "read_tiles_from_config"]


TILES_PER_TASK: Final = 64  # read_tiles' default: tiles of one source per read task


def read_tiles(
    store: str,
    *,
    split: str | Sequence[str] | None = None,
    halo: int = 0,
    skip_nodata: bool = True,
    columns: Sequence[str] | None = None,
    tiles_per_task: int = TILES_PER_TASK,
    read_cpus: float = 0.5,
    storage_options: Mapping[str, Any] | None = None,
    tile_ids: Sequence[int] | None = None,
    shuffle_seed: int | None = None,
) -> ray.data.Dataset:
    """A lazily read, streaming Dataset with one row per tile of the store at ``store``.

    Args:
        store: local path or fsspec URL of a semisup tile store.
        split: keep only tiles of this split (or of these splits); None keeps every tile.
        halo: pixels of context read on each side of a tile; rows are S×S with
            S = tile_size + 2·halo.
        skip_nodata: drop tiles whose ``valid_fraction`` in the index is 0.
        columns: the columns to produce (default: ``DEFAULT_COLUMNS``, every column but the
            teacher's PSEUDO_LABEL and CONFIDENCE); pixel arrays not asked for are not read.
        tiles_per_task: tiles per read task, taken from one source in row-major order. Larger
            tasks amortise Ray's per-task cost; a task yields its tiles in blocks of at most
            32 MiB.
        read_cpus: CPUs reserved by each read task. Fractional (default 0.5) so that reads
            never take every CPU away from Train workers and actors. Whatever it reserves,
            at most one read task per cluster CPU runs at a time (see
            ``_max_concurrent_reads``).
        storage_options: fsspec options for ``store`` (endpoint, credentials, ...); they travel
            with every read task.
        tile_ids: keep only these tiles (after the split filter), e.g. an experiment's own
            labelled subset of the training pool.
        shuffle_seed: start the read tasks in an order drawn with this seed instead of store
            order (source by source), so a training pass does not see one image after another;
            tiles inside a task stay neighbours (chunk-aligned reads).

    Raises:
        FileNotFoundError: nothing exists at ``store``.
        ValueError: ``store`` is not a semisup store, or a split name, column name or numeric
            argument is not one that is expected.
    """
    selected = _check_columns(store, columns)
    _check_numbers(store, halo=halo, tiles_per_task=tiles_per_task, read_cpus=read_cpus)
    root, meta, index = _open(store, storage_options)
    index = _filter_index(store, index, split, skip_nodata)
    if tile_ids is not None:
        index = index.filter(pc.is_in(index.column(C.TILE_ID), pa.array(tile_ids, pa.int64())))
    layouts = source_layouts(store, root, index, selected)
    groups = group_tiles(index, tiles_per_task)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(groups)
    datasource = ZarrTileDatasource(
        store,
        groups,
        layouts,
        tile_size=meta.tile_size,
        halo=halo,
        columns=selected,
        storage_options=storage_options,
    )
    if _is_process_local(store):
        # wraps blocks read here in the driver as a Dataset (workers cannot see this store)
        return ray.data.from_arrow(datasource.read_in_driver() or _empty_table(selected))
    # runs one read task per tile group, each reserving read_cpus CPUs, at most one per CPU
    return ray.data.read_datasource(
        datasource,
        num_cpus=read_cpus,
        concurrency=max(1, min(datasource.num_tasks, _max_concurrent_reads())),
        override_num_blocks=max(1, datasource.num_tasks),
    )


def read_tiles_from_config(store: str, config: StreamConfig, **kwargs: Any) -> ray.data.Dataset:
    """``read_tiles`` with halo, skip_nodata, tiles_per_task and read_cpus taken from ``config``
    (training reads its splits by tile id instead: see ``semisup.tile_reader``)."""
    return read_tiles(
        store,
        halo=config.halo,
        skip_nodata=config.skip_nodata,
        tiles_per_task=config.tiles_per_task,
        read_cpus=config.read_cpus,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# Checking arguments and planning the read (driver side)


def _check_columns(store: str, columns: Sequence[str] | None) -> tuple[str, ...]:
    if columns is None:
        return DEFAULT_COLUMNS
    if isinstance(columns, str):
        columns = [columns]
    unknown = [name for name in columns if name not in ALL_COLUMNS]
    if unknown or not columns:
        raise ValueError(
            f"read_tiles({store!r}): unknown column {unknown[0] if unknown else '(none given)'!r};"
            f" expected a non-empty subset of {', '.join(ALL_COLUMNS)}"
        )
    return tuple(dict.fromkeys(columns))  # drop repeats, keep order


def _check_numbers(store: str, *, halo: int, tiles_per_task: int, read_cpus: float) -> None:
    if halo < 0:
        raise ValueError(f"read_tiles({store!r}): halo must be >= 0, got {halo!r}")
    if tiles_per_task < 1:
        raise ValueError(
            f"read_tiles({store!r}): tiles_per_task must be >= 1, got {tiles_per_task!r}"
        )
    if read_cpus <= 0:
        raise ValueError(f"read_tiles({store!r}): read_cpus must be > 0, got {read_cpus!r}")


def _open(
    store: str, storage_options: Mapping[str, Any] | None
) -> tuple[Any, tile_store.StoreMeta, pa.Table]:
    """Open the store's root group, its metadata and its tile index, with errors that name it."""
    fs, path = fsspec.core.url_to_fs(str(store), **dict(storage_options or {}))
    if not fs.exists(path):
        raise FileNotFoundError(f"tile store {store!r} not found (expected a semisup Zarr store)")
    try:
        root = tile_store.open_store(store, "r", storage_options)
        meta = tile_store.read_store_meta(root)
        # the index of the label version this root names (source_layouts reads the same)
        index = tile_store.read_tile_index(store, storage_options, tile_store.current_labels(root))
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise ValueError(
            f"{store!r} is not a semisup tile store (expected a Zarr group with "
            f"attrs[{tile_store.META_KEY!r}] and {tile_store.TILE_INDEX_FILE}): {err}"
        ) from err
    return root, meta, index


def _filter_index(
    store: str, index: pa.Table, split: str | Sequence[str] | None, skip_nodata: bool
) -> pa.Table:
    if split is not None:
        wanted = [split] if isinstance(split, str) else list(split)
        known = sorted(set(C.SPLITS) | set(index.column(C.SPLIT).unique().to_pylist()))
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise ValueError(
                f"read_tiles({store!r}): unknown split {unknown[0]!r}; expected one of "
                f"{', '.join(known)}"
            )
        index = index.filter(pc.is_in(index.column(C.SPLIT), pa.array(wanted, pa.string())))
    if skip_nodata:
        index = index.filter(pc.greater(index.column(C.VALID_FRACTION), 0))
    return index


def _max_concurrent_reads() -> int:
    """One running read task per CPU of the cluster, whatever ``read_cpus`` reserves.

    A read task decodes chunks on zarr's thread pool, so it keeps about a core busy by itself;
    more tasks than cores only contend. Measured on 2 cores: four concurrent tasks (read_cpus
    0.5) spent about twice the CPU time per tile of two, and streamed 40% slower.
    """
    ensure_ray()  # callers may start (or join) their own Ray first
    return max(1, int(ray.cluster_resources().get("CPU", 1)))  # CPUs of every node, busy or not


def _is_process_local(store: str) -> bool:
    return fsspec.utils.get_protocol(str(store)) == "memory"


def _empty_table(columns: Sequence[str]) -> pa.Table:
    return pa.table({name: pa.array([], pa.null()) for name in columns})

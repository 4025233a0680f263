"""Pseudo-labelling a tile store with the SAM teacher on Ray: read -> actor pool -> write back.

``run_pseudo_label`` streams tiles with ``semisup.data.read_tiles``, labels them in a pool of
teacher actors (``teacher.TEACHERS``) and writes the results into the store, beside ``image``
in each source::

    STORE.zarr/
      attrs["semisup_pseudo_label"]   the teacher run that wrote them (mode, model, checkpoint...)
      pseudo_labels.parquet           one row per labelled tile (MANIFEST_SCHEMA)
      pseudo_labels.parts/            per-batch manifest parts of a run in progress
      pseudo_instances.parquet        automatic/prompted instance maps: one row per instance
                                      (INSTANCE_SCHEMA)
      pseudo_instances.parts/         per-batch instance parts of a run in progress
      <source_id>/
        pseudo_label  H×W  uint16 instance ids (automatic, prompted; 0 background, 65535 not
                           valid) or uint8 (semantic class ids, foreground 0/1; 255 not valid)
        confidence    H×W  float32 in [0, 1], 0 where not valid

Both arrays are chunked like ``image`` (tile×tile) when tiles do not overlap. With an overlap,
each tile *owns* the pixels from its origin up to the next tile's origin (stride×stride, the
last tile of a row or column up to the raster's edge) and writes only those; the arrays are then
chunked stride×stride, so every chunk is written by exactly one tile and concurrent writers never
share a chunk. Pixels of tiles not labelled (not in the split, or all nodata) keep the fill value
(not valid / 0).

Resumable and exactly once: a batch's arrays are written first, then its manifest part (an
atomic file named after its tile ids). A rerun reads the manifest and the parts and labels only
the tiles not in them; a retried writer finds its part and skips. An interrupted tile is written
again with the same content, since the teacher is deterministic (fixed weights, no sampling).
Actors that die are restarted by Ray Data and their batches retried. At the end the parts are
compacted into ``pseudo_labels.parquet``.

The instance table (``pseudo_instances.parquet``) holds one row per mask the teacher painted
into an instance map: source, tile id, instance id (the id in ``pseudo_label``), the box x0, y0,
x1, y1 in source-raster pixel edges of the *whole* mask before painting (overlapping masks lose
pixels in the painted map, not in the table), predicted IoU, stability score and area in pixels
(``sam_prompts.instance_rows``). A mask with no pixel has no row. With overlapping tiles the rows of
a tile describe its whole input, so an instance near a tile border can have a row in each tile
that sees it. The table follows the manifest: a batch's instance part (the same file name as
its manifest part) is written before the manifest part, and a part counts only once its
manifest part exists; each tile's rows come from one part only, so a rerun never duplicates
rows. Compaction writes the table before the manifest and deletes the instance parts first.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import io
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TextIO, get_args

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from fsspec.implementations.local import LocalFileSystem

from semisup import columns as C
from semisup import store as tile_store
from semisup.actor_pool import ActorPoolConfig, add_actor_pool_arguments, map_with_pool
from semisup.atomic import write_bytes_atomic
from semisup.data import TILES_PER_TASK, read_tiles
from semisup.model_input import INFERENCE_BATCH
from semisup.progress import Progress
from semisup.runtime import ensure_ray
from semisup.sam import PATCH_SIZE, SAM_SPECS, checkpoint_sha256, resolve_checkpoint
from semisup.sam_prompts import INSTANCE_FIELDS
from semisup.teacher import (
    INSTANCES,
    MODES,
    NUM_MASKS,
    TEACHERS,
    OutputKind,
    PromptKind,
    Teacher,
    TeacherConfig,
    build_teacher_models,
)
from semisup.tile_read import group_tiles

DEFAULT_POOL: Final = ActorPoolConfig(actors=2)  # two teacher actors share a node
MANIFEST_FILE: Final = "pseudo_labels.parquet"
PARTS_DIR: Final = "pseudo_labels.parts"
INSTANCES_FILE: Final = "pseudo_instances.parquet"
INSTANCE_PARTS_DIR: Final = "pseudo_instances.parts"
RUN_ATTR: Final = "semisup_pseudo_label"
RUN_FORMAT_VERSION: Final = 1
MEAN_CONFIDENCE: Final = "mean_confidence"
COVERAGE: Final = "coverage"

MANIFEST_SCHEMA: Final = pa.schema(
    [
        (C.TILE_ID, pa.int64()),
        (C.SOURCE, pa.string()),
        (C.ROW, pa.int32()),
        (C.COL, pa.int32()),
        (MEAN_CONFIDENCE, pa.float32()),  # mean over the tile's valid owned pixels
        (COVERAGE, pa.float32()),  # fraction of owned pixels neither background nor not valid
        (NUM_MASKS, pa.int32()),
        ("mode", pa.string()),
        ("model_type", pa.string()),
        ("checkpoint_hash", pa.string()),
    ]
)
INSTANCE_ID: Final = INSTANCE_FIELDS[0]
INSTANCE_SCHEMA: Final = pa.schema(
    [
        (C.SOURCE, pa.string()),
        (C.TILE_ID, pa.int64()),
        (INSTANCE_ID, pa.int32()),  # the id painted in pseudo_label
        ("x0", pa.float32()),  # box of the whole mask, source-raster pixel edges
        ("y0", pa.float32()),
        ("x1", pa.float32()),  # exclusive
        ("y1", pa.float32()),
        ("predicted_iou", pa.float32()),
        ("stability", pa.float32()),
        ("area", pa.int64()),  # pixels of the mask in the teacher's input
    ]
)
_TEACHER_INPUT = (C.IMAGE, C.VALID, C.TILE_ID, C.SOURCE, C.ROW, C.COL, C.Y0, C.X0)
WRITE_CPUS: Final = 0.25  # per writer task: zarr writes are light and must never wait for a core
POOL_ATTEMPTS: Final = 3  # teacher pools started per run when actors die (OOM kill, segfault)
STATE_ATTR: Final = "semisup_pseudo_label_state"  # "running" until the run's manifest is compact


class PseudoLabelMismatch(ValueError):
    """The store holds pseudo-labels from a different teacher run; the message says what differs."""


# ---------------------------------------------------------------------------------------------
# Geometry and statistics (pure)


def owned_span(start: int, length: int, tile_size: int, overlap: int) -> tuple[int, int]:
    """[begin, end) raster pixels owned along one axis by the tile starting at ``start``.

    A tile owns from its start to the next tile's start (``tile_size - overlap`` pixels); the
    last tile of the axis (``start + tile_size >= length``) owns up to ``length``.
    """
    stride = tile_size - overlap
    last = start + tile_size >= length
    return start, (length if last else min(start + stride, length))


def owned_window(
    y0: int, x0: int, height: int, width: int, tile_size: int, overlap: int
) -> tuple[int, int, int, int]:
    """(y_begin, y_end, x_begin, x_end) raster pixels owned by the tile at (``y0``, ``x0``)."""
    ys, ye = owned_span(y0, height, tile_size, overlap)
    xs, xe = owned_span(x0, width, tile_size, overlap)
    return ys, ye, xs, xe


def pseudo_label_chunks(height: int, width: int, tile_size: int, overlap: int) -> tuple[int, int]:
    """Chunk shape of the pseudo-label arrays: the tile (no overlap) or the stride (overlap)."""
    side = tile_size - overlap
    return min(side, height), min(side, width)


def tile_stats(
    label: np.ndarray, confidence: np.ndarray, ignore: int, background: int | None
) -> tuple[float, float]:
    """(mean confidence, coverage) of one tile's owned pixels.

    ``label``: h×w pseudo-labels; ``confidence``: h×w float in [0, 1]. The mean confidence is
    over pixels whose label is not ``ignore`` (0 when there are none); coverage is the fraction
    of all h×w pixels whose label is neither ``ignore`` nor ``background``.
    """
    valid = label != ignore
    covered = valid if background is None else valid & (label != background)
    mean_confidence = float(confidence[valid].mean()) if valid.any() else 0.0
    return mean_confidence, float(covered.mean()) if label.size else 0.0


def instance_table(tile_ids: np.ndarray, sources: Any, rows: Any) -> pa.Table:
    """The instance rows of a batch of tiles as an INSTANCE_SCHEMA table.

    ``tile_ids``: B int; ``sources``: B source ids; ``rows``: B arrays K×8 of
    ``teacher.INSTANCE_FIELDS`` (the teacher's ``INSTANCES`` column), K per tile.
    """
    per_tile = [np.asarray(r, dtype=np.float64).reshape(-1, len(INSTANCE_FIELDS)) for r in rows]
    counts = [len(r) for r in per_tile]
    stacked = np.concatenate([np.zeros((0, len(INSTANCE_FIELDS))), *per_tile])  # ΣK×8
    columns: dict[str, Any] = {
        C.SOURCE: np.repeat(np.asarray([str(s) for s in sources], dtype=object), counts),
        C.TILE_ID: np.repeat(np.asarray(tile_ids, dtype=np.int64), counts),
    }
    for i, name in enumerate(INSTANCE_FIELDS):
        columns[name] = stacked[:, i]
    return pa.Table.from_pydict(
        {
            name: pa.array(columns[name]).cast(INSTANCE_SCHEMA.field(name).type)
            for name in INSTANCE_SCHEMA.names
        },
        schema=INSTANCE_SCHEMA,
    )


def part_name(tile_ids: np.ndarray) -> str:
    """Manifest part file name of a batch: the same tiles always give the same name."""
    ids = np.sort(np.asarray(tile_ids, dtype=np.int64))
    return f"part-{int(ids[0]):09d}-{hashlib.sha1(ids.tobytes()).hexdigest()[:16]}.parquet"


# ---------------------------------------------------------------------------------------------
# Files beside the store (local paths or fsspec URLs)


def _fs(store: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    fs, root = fsspec.core.url_to_fs(str(store), **dict(storage_options or {}))
    return fs, root.rstrip("/")


def _write_table_atomic(fs: Any, path: str, table: pa.Table) -> None:
    """Write a parquet file so that readers see all of it or nothing."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    if isinstance(fs, LocalFileSystem):
        write_bytes_atomic(path, buffer.getvalue())
    else:
        fs.pipe_file(path, buffer.getvalue())  # one object PUT: atomic on object stores


def read_manifest(store: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """Every tile recorded so far: ``pseudo_labels.parquet`` plus the parts of unfinished runs,
    one row per tile id (MANIFEST_SCHEMA)."""
    fs, root = _fs(store, storage_options)
    tables = []
    manifest = f"{root}/{MANIFEST_FILE}"
    if fs.exists(manifest):
        tables.append(_read_table(fs, manifest))
    parts = f"{root}/{PARTS_DIR}"
    tables += [_read_table(fs, p) for p in _part_paths(fs, parts)]
    if not tables:
        return MANIFEST_SCHEMA.empty_table()
    frame = pa.concat_tables(tables).to_pandas()
    frame = frame.drop_duplicates(subset=C.TILE_ID, keep="first").sort_values(C.TILE_ID)
    return pa.Table.from_pandas(frame, schema=MANIFEST_SCHEMA, preserve_index=False)


def _read_table(fs: Any, path: str, schema: pa.Schema = MANIFEST_SCHEMA) -> pa.Table:
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh).cast(schema)


def _part_paths(fs: Any, folder: str) -> list[str]:
    """The part files of a parts folder, sorted by name (none when it does not exist)."""
    if not fs.exists(folder):
        return []
    return sorted(p for p in fs.ls(folder, detail=False) if _is_part(p))


def read_instances(store: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """Every instance recorded so far (INSTANCE_SCHEMA): ``pseudo_instances.parquet`` plus the
    parts of recorded batches (their manifest part exists). A tile's rows come from the first
    of these that holds the tile (the file, then parts by name), as the manifest keeps a tile's
    first row: rows are never duplicated."""
    fs, root = _fs(store, storage_options)
    tables = []
    if fs.exists(f"{root}/{INSTANCES_FILE}"):
        tables.append(_read_table(fs, f"{root}/{INSTANCES_FILE}", INSTANCE_SCHEMA))
    recorded = {Path(p).name for p in _part_paths(fs, f"{root}/{PARTS_DIR}")}
    for path in _part_paths(fs, f"{root}/{INSTANCE_PARTS_DIR}"):
        if Path(path).name in recorded:  # an unrecorded part is a batch that is labelled again
            tables.append(_read_table(fs, path, INSTANCE_SCHEMA))
    seen: set[int] = set()
    kept = []
    for table in tables:
        ids = table.column(C.TILE_ID).to_numpy()
        kept.append(table.filter(pa.array(~np.isin(ids, list(seen)))))
        seen.update(ids.tolist())
    if not kept:
        return INSTANCE_SCHEMA.empty_table()
    return pa.concat_tables(kept).sort_by([(C.TILE_ID, "ascending"), (INSTANCE_ID, "ascending")])


def has_instance_table(store: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether a finished teacher run wrote the instance table (``pseudo_instances.parquet``)."""
    fs, root = _fs(store, storage_options)
    return bool(fs.exists(f"{root}/{INSTANCES_FILE}"))


def _is_part(path: str) -> bool:
    name = Path(path).name
    return name.startswith("part-") and name.endswith(".parquet")


def compact_manifest(
    store: str, storage_options: Mapping[str, Any] | None = None, *, instances: bool = False
) -> pa.Table:
    """Fold the parts into ``pseudo_labels.parquet`` (written first), then delete the parts.

    With ``instances``, the instance parts are folded into ``pseudo_instances.parquet`` first
    and deleted before the manifest parts, which say which instance parts count."""
    fs, root = _fs(store, storage_options)
    if instances:
        _write_table_atomic(fs, f"{root}/{INSTANCES_FILE}", read_instances(store, storage_options))
    table = read_manifest(store, storage_options)
    _write_table_atomic(fs, f"{root}/{MANIFEST_FILE}", table)
    for name in (INSTANCE_PARTS_DIR, PARTS_DIR):
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}", recursive=True)
    return table


# ---------------------------------------------------------------------------------------------
# The writer: runs in Ray tasks after the teacher


def write_tiles(
    batch: dict[str, np.ndarray],
    *,
    store: str,
    storage_options: Mapping[str, Any] | None,
    tile_size: int,
    overlap: int,
    halo: int,
    ignore: int,
    background: int | None,
    run: Mapping[str, str],
) -> dict[str, np.ndarray]:
    """Write a batch of teacher outputs into the store, then record it; returns its manifest rows.

    Each tile writes only the pixels it owns (``owned_window``) into its source's
    ``pseudo_label`` and ``confidence`` arrays; then the batch's instance part (when the batch
    has ``INSTANCES``) and its manifest part are written atomically, in that order. A batch
    whose manifest part already exists (a retried task) is not written again.
    """
    fs, root_path = _fs(store, storage_options)
    part = f"{root_path}/{PARTS_DIR}/{part_name(batch[C.TILE_ID])}"
    if fs.exists(part):
        return _numpy_columns(_read_table(fs, part))
    root = tile_store.open_store(store, "r+", storage_options)
    sizes: dict[str, tuple[int, int]] = {}
    stats = []
    for i, source_id in enumerate(str(s) for s in batch[C.SOURCE]):
        if source_id not in sizes:
            meta = tile_store.read_source_meta(root, source_id)
            sizes[source_id] = (meta.height, meta.width)
        y0, x0 = int(batch[C.Y0][i]), int(batch[C.X0][i])
        ys, ye, xs, xe = owned_window(y0, x0, *sizes[source_id], tile_size, overlap)
        rows = slice(ys - y0 + halo, ye - y0 + halo)  # the owned window in the tile's frame
        cols = slice(xs - x0 + halo, xe - x0 + halo)
        label = batch[C.PSEUDO_LABEL][i][rows, cols]
        confidence = batch[C.CONFIDENCE][i][rows, cols]
        group: Any = root[source_id]
        group[C.PSEUDO_LABEL][ys:ye, xs:xe] = label
        group[C.CONFIDENCE][ys:ye, xs:xe] = confidence
        stats.append(tile_stats(label, confidence, ignore, background))
    n = len(stats)
    table = pa.table(
        {
            C.TILE_ID: batch[C.TILE_ID].astype(np.int64),
            C.SOURCE: [str(s) for s in batch[C.SOURCE]],
            C.ROW: batch[C.ROW].astype(np.int32),
            C.COL: batch[C.COL].astype(np.int32),
            MEAN_CONFIDENCE: np.array([s[0] for s in stats], dtype=np.float32),
            COVERAGE: np.array([s[1] for s in stats], dtype=np.float32),
            NUM_MASKS: batch[NUM_MASKS].astype(np.int32),
            **{key: [run[key]] * n for key in ("mode", "model_type", "checkpoint_hash")},
        },
        schema=MANIFEST_SCHEMA,
    )
    if INSTANCES in batch:  # before the manifest part, which records the batch
        fs.makedirs(f"{root_path}/{INSTANCE_PARTS_DIR}", exist_ok=True)
        instances = instance_table(batch[C.TILE_ID], batch[C.SOURCE], batch[INSTANCES])
        _write_table_atomic(fs, f"{root_path}/{INSTANCE_PARTS_DIR}/{Path(part).name}", instances)
    fs.makedirs(f"{root_path}/{PARTS_DIR}", exist_ok=True)
    _write_table_atomic(fs, part, table)
    return _numpy_columns(table)


def _numpy_columns(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def keep_tiles(batch: dict[str, np.ndarray], *, tile_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The rows of ``batch`` whose tile id is in ``tile_ids`` (the tiles this run labels)."""
    keep = np.isin(batch[C.TILE_ID], tile_ids)
    return {name: column[keep] for name, column in batch.items()}


# ---------------------------------------------------------------------------------------------
# The run


def teacher_identity(teacher: TeacherConfig, bf16_on_gpu: bool) -> dict[str, Any]:
    """What decides the pseudo-labels' content: compared with the store's before a run.

    The teacher's mode, model, weights (a hash of the checkpoint or adapter file), halo and
    precision, and ``teacher.options()``.
    """
    semantic = teacher.mode == "semantic"
    identity = {
        "version": RUN_FORMAT_VERSION,
        "mode": teacher.mode,
        "model_type": teacher.model_type,
        "checkpoint_hash": _hash_of(teacher.mode, teacher.checkpoint, teacher.seed),
        "base_checkpoint_hash": (
            _hash_of("", teacher.base_checkpoint, teacher.seed) if semantic else ""
        ),
        "halo": teacher.halo,
        "precision": "bf16" if bf16_on_gpu else "fp32",
        "teacher": teacher.options(),
    }
    return dict(json.loads(json.dumps(identity)))  # as it reads back from the store's attributes


def _hash_of(mode: str, checkpoint: str | None, seed: int) -> str:
    if checkpoint is None:
        return f"random-init-seed{seed}"
    if mode != "semantic":
        return checkpoint_sha256(resolve_checkpoint(checkpoint))
    from semisup.student import adapter_file  # here: only semantic mode needs peft

    return checkpoint_sha256(adapter_file(checkpoint))


def run_pseudo_label(
    store: str,
    teacher: TeacherConfig,
    *,
    pool: ActorPoolConfig = DEFAULT_POOL,
    batch_size: int = INFERENCE_BATCH,
    split: str | Sequence[str] | None = C.UNLABELED,
    bf16: bool = True,
    overwrite: bool = False,
    max_tiles: int | None = None,
    teacher_cls: type[Teacher] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    log: TextIO | None = sys.stderr,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Label the tiles of ``split`` with ``teacher`` and write the results into ``store``.

    Args:
        store: local path or fsspec URL of a semisup tile store (written in place).
        teacher: the teacher (``TeacherConfig``); semantic mode takes the student's run or
            adapter as its checkpoint. Recorded with the run (``teacher_identity``).
        pool: the teacher actors (``ActorPoolConfig``): at most one per read task (Ray Data
            leaves the actors beyond its read tasks idle, and warns), so a small store gets
            fewer. By default each reserves ``clamp((cluster CPUs - 1) / actors, 0.1, 1)``
            CPUs, leaving one CPU to the read and write tasks.
        batch_size: tiles per teacher call (the image encoder runs on the whole batch).
        split: split(s) to label; None labels every tile.
        bf16: bfloat16 autocast on GPU actors.
        overwrite: discard the store's pseudo-labels first. Without it, a store labelled by a
            different teacher (mode, model, checkpoint or options) is a PseudoLabelMismatch.
        max_tiles: label at most this many of the remaining tiles (lowest tile ids first).
        teacher_cls: the actor class; default ``TEACHERS[teacher.mode]`` (a subclass with the
            same constructor may replace it).
        storage_options: fsspec options for ``store``.
        log: progress lines (tiles done / total, tiles/s); None for silence.
        on_progress: called with (tiles done, tiles total) after each batch is written.

    Returns a summary: tiles total/already done/processed, seconds, tiles/s, mean confidence and
    coverage over all labelled tiles, the run identity and the manifest path.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    root = tile_store.open_store(store, "r+", storage_options)
    meta = tile_store.read_store_meta(root)
    _check_halo(meta.tile_size, teacher.halo)
    identity = _checked_identity(teacher, bf16 and pool.gpus_per_actor > 0, meta.tile_size)
    selected = _selected_tiles(store, split, storage_options)
    fresh = _prepare_store(
        store, root, meta, selected, identity, teacher, overwrite, storage_options, log
    )
    todo, already = _todo(store, selected, max_tiles, storage_options)
    progress = Progress(
        log,
        selected.num_rows,
        label="pseudo-label",
        unit="tiles",
        already=already,
        on_advance=on_progress,
    )
    actors = min(pool.actors, max(1, len(group_tiles(selected, TILES_PER_TASK))))
    pool = dataclasses.replace(pool, actors=actors)
    actor_kwargs = dict(
        store=store,
        config=teacher,
        bf16=bf16,
        storage_options=storage_options,
        device=pool.device(),
        torch_threads=pool.threads(),
    )
    pipeline = functools.partial(
        _pipeline,
        store,
        split=split,
        teacher=teacher,
        meta=meta,
        identity=identity,
        actor_cls=teacher_cls or TEACHERS[teacher.mode],
        actor_kwargs=actor_kwargs,
        pool=pool,
        batch_size=batch_size,
        storage_options=storage_options,
    )
    try:
        _label_with_pools(pipeline, todo, progress.advance, store, storage_options, log)
    except BaseException:
        if fresh and read_manifest(store, storage_options).num_rows == 0:
            _clear(store, root, storage_options)  # nothing was labelled: leave no trace
        raise
    progress.say()
    manifest = compact_manifest(store, storage_options, instances=teacher.writes_instances)
    root.attrs[STATE_ATTR] = "complete"
    return _summary(store, manifest, selected, identity, progress, already)


def _checked_identity(teacher: TeacherConfig, bf16_on_gpu: bool, tile_size: int) -> dict[str, Any]:
    """The run identity (``teacher_identity``) of a labelling run, after loading its weights
    once when it has any: before the store is touched or an actor starts, a checkpoint or
    adapter that cannot be read or does not fit fails in one line naming it."""
    identity = teacher_identity(teacher, bf16_on_gpu)
    if teacher.checkpoint is not None or teacher.base_checkpoint is not None:
        build_teacher_models(teacher, tile_size + 2 * teacher.halo)
    return identity


def _todo(
    store: str, selected: pa.Table, max_tiles: int | None, storage_options: Any
) -> tuple[np.ndarray, int]:
    """(tile ids of ``selected`` not yet labelled, at most ``max_tiles``; how many were)."""
    done = set(read_manifest(store, storage_options).column(C.TILE_ID).to_pylist())
    todo = np.array(sorted(set(selected.column(C.TILE_ID).to_pylist()) - done), dtype=np.int64)
    already = selected.num_rows - len(todo)
    return (todo if max_tiles is None else todo[:max_tiles]), already


def _check_halo(tile_size: int, halo: int) -> None:
    """``ValueError`` unless the teacher's input (the tile and its halo) divides into patches."""
    if (tile_size + 2 * halo) % PATCH_SIZE:
        raise ValueError(
            f"tile_size + 2·halo = {tile_size + 2 * halo} px must divide by SAM's patch "
            f"size {PATCH_SIZE}"
        )


def _label_with_pools(
    pipeline: Callable[[np.ndarray], Any],
    todo: np.ndarray,
    advance: Callable[[int], None],
    store: str,
    storage_options: Mapping[str, Any] | None,
    log: TextIO | None,
) -> None:
    """Run ``pipeline(todo)`` and count its written rows with ``advance``. When a teacher actor
    dies (killed for memory, a crash), start a new pool for the tiles not yet recorded, up to
    ``POOL_ATTEMPTS`` pools: recorded batches are never labelled twice."""
    for attempt in range(1, POOL_ATTEMPTS + 1):
        if not len(todo):
            return
        ensure_ray()  # callers may start (or join) their own Ray first
        try:
            for rows in pipeline(todo):
                advance(len(rows[C.TILE_ID]))
            return
        except ray.exceptions.ActorDiedError as err:
            if attempt == POOL_ATTEMPTS:
                raise
            recorded = read_manifest(store, storage_options).column(C.TILE_ID).to_numpy()
            todo = todo[~np.isin(todo, recorded)]
            if log is not None:
                print(
                    f"pseudo-label: a teacher actor died ({str(err).splitlines()[0]}); a new "
                    f"pool labels the {len(todo)} tiles not yet recorded",
                    file=log,
                    flush=True,
                )


def _selected_tiles(
    store: str, split: str | Sequence[str] | None, storage_options: Mapping[str, Any] | None
) -> pa.Table:
    """The tile index rows this run labels: the split's tiles with at least one valid pixel,
    as ``read_tiles`` streams them."""
    index = tile_store.read_tile_index(store, storage_options)
    if split is not None:
        wanted = [split] if isinstance(split, str) else list(split)
        index = index.filter(pc.is_in(index.column(C.SPLIT), pa.array(wanted, pa.string())))
    return index.filter(pc.greater(index.column(C.VALID_FRACTION), 0))


def _prepare_store(
    store: str,
    root: Any,
    meta: tile_store.StoreMeta,
    selected: pa.Table,
    identity: dict[str, Any],
    teacher: TeacherConfig,
    overwrite: bool,
    storage_options: Mapping[str, Any] | None,
    log: TextIO | None,
) -> bool:
    """Check the store's teacher run against ``identity`` (or clear it), then create arrays;
    returns whether the store held no pseudo-labels before (or they were cleared).

    Finished pseudo-labels of another teacher are kept unless ``overwrite``. Those of an
    unfinished run of another teacher (one that died or failed) are partial state: they are
    replaced, so that a run that died never blocks the next one. An unfinished run of the same
    teacher is continued.
    """
    recorded = root.attrs.get(RUN_ATTR)
    has_labels = recorded is not None or read_manifest(store, storage_options).num_rows > 0
    unfinished = root.attrs.get(STATE_ATTR) == "running"
    if has_labels and (overwrite or (unfinished and recorded != identity)):
        if not overwrite and log is not None:
            print(
                f"pseudo-label: replacing the partial labels of an unfinished run of another "
                f"teacher in {store}",
                file=log,
                flush=True,
            )
        _clear(store, root, storage_options)
        has_labels = False
    elif has_labels and recorded != identity:
        differing = sorted(
            key
            for key in set(identity) | set(recorded or {})
            if (recorded or {}).get(key) != identity.get(key)
        )
        described = ", ".join(
            f"{key}: store {(recorded or {}).get(key)!r} vs {identity.get(key)!r}"
            for key in differing
        )
        raise PseudoLabelMismatch(
            f"{store} already holds pseudo-labels from another teacher ({described}); "
            "pass overwrite=True (--overwrite) to replace them"
        )
    dtype, ignore, background = teacher.encoding()
    for source_id in sorted(set(selected.column(C.SOURCE).to_pylist())):
        group = root[source_id]
        if C.PSEUDO_LABEL in group:
            continue
        source = tile_store.read_source_meta(root, source_id)
        shape = (source.height, source.width)
        chunks = pseudo_label_chunks(*shape, meta.tile_size, meta.overlap)
        label = group.create_array(
            C.PSEUDO_LABEL, shape=shape, chunks=chunks, dtype=dtype, fill_value=ignore
        )
        label.attrs[RUN_ATTR] = {"ignore": ignore, "background": background, "mode": teacher.mode}
        group.create_array(C.CONFIDENCE, shape=shape, chunks=chunks, dtype="float32", fill_value=0)
    root.attrs[RUN_ATTR] = identity
    root.attrs[STATE_ATTR] = "running"
    return not has_labels


def _clear(store: str, root: Any, storage_options: Mapping[str, Any] | None) -> None:
    """Delete every pseudo-label array, the manifest and its parts, and the run record."""
    for source_id in tile_store.read_store_meta(root).sources:
        group = root[source_id]
        for name in (C.PSEUDO_LABEL, C.CONFIDENCE):
            if name in group:
                del group[name]
    fs, path = _fs(store, storage_options)
    for name in (MANIFEST_FILE, PARTS_DIR, INSTANCES_FILE, INSTANCE_PARTS_DIR):
        if fs.exists(f"{path}/{name}"):
            fs.rm(f"{path}/{name}", recursive=True)
    for name in (RUN_ATTR, STATE_ATTR):
        if name in root.attrs:
            del root.attrs[name]


def _pipeline(
    store: str,
    todo: np.ndarray,
    *,
    split: str | Sequence[str] | None,
    teacher: TeacherConfig,
    meta: tile_store.StoreMeta,
    identity: dict[str, Any],
    actor_cls: type[Teacher],
    actor_kwargs: dict[str, Any],
    pool: ActorPoolConfig,
    batch_size: int,
    storage_options: Mapping[str, Any] | None,
) -> Any:
    """An iterator over the manifest rows of each written batch, as the pipeline runs."""
    _, ignore, background = teacher.encoding()
    tiles = read_tiles(
        store,
        split=split,
        halo=teacher.halo,
        columns=_TEACHER_INPUT,
        storage_options=storage_options,
    )
    # drops tiles labelled by an earlier run; a light task, fused into the read tasks
    tiles = tiles.map_batches(
        functools.partial(keep_tiles, tile_ids=todo), batch_size=None, num_cpus=0.5
    )
    # a fixed pool of teacher actors, each loading SAM once from the small settings it is
    # given; an actor that dies fails this pipeline, and run_pseudo_label starts a new one for
    # the tiles not yet recorded (map_with_pool)
    labelled = map_with_pool(
        tiles, actor_cls, pool, fn_constructor_kwargs=actor_kwargs, batch_size=batch_size
    )
    # writes each batch into the store and records it, in light tasks beside the actors
    writer = functools.partial(
        write_tiles,
        store=store,
        storage_options=storage_options,
        tile_size=meta.tile_size,
        overlap=meta.overlap,
        halo=teacher.halo,
        ignore=ignore,
        background=background,
        run={key: str(identity[key]) for key in ("mode", "model_type", "checkpoint_hash")},
    )
    written = labelled.map_batches(writer, batch_size=None, num_cpus=WRITE_CPUS)
    # streams the small manifest rows back to the driver as batches finish
    return written.iter_batches(batch_size=None, batch_format="numpy")


def _summary(
    store: str,
    manifest: pa.Table,
    selected: pa.Table,
    identity: dict[str, Any],
    progress: Progress,
    already: int,
) -> dict[str, Any]:
    frame: pd.DataFrame = manifest.to_pandas()
    ids = set(selected.column(C.TILE_ID).to_pylist())
    labelled = frame[frame[C.TILE_ID].isin(ids)]
    return {
        "store": str(store),
        "manifest": f"{str(store).rstrip('/')}/{MANIFEST_FILE}",
        "tiles_total": selected.num_rows,
        "tiles_already_done": already,
        "tiles_processed": progress.processed,
        "tiles_remaining": selected.num_rows - len(labelled),
        "seconds": round(progress.seconds, 3),
        "tiles_per_s": round(progress.rate, 3),
        "mean_confidence": float(labelled[MEAN_CONFIDENCE].mean()) if len(labelled) else 0.0,
        "coverage": float(labelled[COVERAGE].mean()) if len(labelled) else 0.0,
        **{key: identity[key] for key in ("mode", "model_type", "checkpoint_hash")},
    }


# ---------------------------------------------------------------------------------------------
# Command line: `semisup pseudo-label`

CLI_DESCRIPTION = (
    "Label the tiles of a store with a SAM teacher in a Ray actor pool and write pseudo_label "
    "and confidence arrays plus pseudo_labels.parquet into the store. Reruns resume: tiles "
    "already written are skipped."
)
CLI_EPILOG = """\
examples:
  semisup pseudo-label --store dubai.zarr --mode automatic --model vit_b \\
      --checkpoint https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth \\
      --actors 2 --batch-size 8
  semisup pseudo-label --store neon.zarr --mode prompted --model tiny --split all --actors 1
  semisup pseudo-label --store dubai.zarr --mode semantic --model vit_b \\
      --checkpoint runs/student/adapter.safetensors --base-checkpoint sam_vit_b_01ec64.pth \\
      --actors 1 --gpus-per-actor 0.5 --overwrite
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``semisup pseudo-label`` flags (and its description and examples) to ``parser``."""
    parser.description = parser.description or CLI_DESCRIPTION
    parser.epilog = CLI_EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--store", required=True, help="tile store path or fsspec URL")
    parser.add_argument(
        "--mode", choices=MODES, default="automatic", help="teacher mode (default automatic)"
    )
    parser.add_argument(
        "--model", choices=tuple(SAM_SPECS), default="vit_b", help="SAM model type (default vit_b)"
    )
    parser.add_argument(
        "--checkpoint",
        metavar="PATH_OR_URL",
        help="SAM checkpoint (automatic, prompted) or student adapter (semantic); "
        "without one SAM gets seeded random weights (for smoke tests only)",
    )
    parser.add_argument(
        "--base-checkpoint",
        metavar="PATH_OR_URL",
        help="semantic mode: the SAM checkpoint the student was fine-tuned from",
    )
    add_actor_pool_arguments(parser, role="teacher", default_actors=2, frees="reads and writes")
    parser.add_argument(
        "--batch-size", type=int, default=8, metavar="B", help="tiles per teacher call (default 8)"
    )
    parser.add_argument(
        "--split",
        default=C.UNLABELED,
        help=f"split to label, or 'all' (default {C.UNLABELED})",
    )
    parser.add_argument(
        "--points-per-side",
        type=int,
        default=16,
        metavar="N",
        help="automatic mode: point grid per tile side (default 16)",
    )
    parser.add_argument(
        "--prompt",
        choices=get_args(PromptKind),
        default="box",
        help="prompted mode: prompt kind (default box)",
    )
    parser.add_argument(
        "--output",
        choices=get_args(OutputKind),
        default="instances",
        help="automatic/prompted: uint16 instance ids or uint8 foreground (default instances)",
    )
    parser.add_argument(
        "--refine", action="store_true", help="semantic mode: refine with SAM automatic segments"
    )
    parser.add_argument(
        "--max-tiles", type=int, metavar="N", help="label at most N of the remaining tiles"
    )
    parser.add_argument("--no-bf16", action="store_true", help="no bfloat16 autocast on GPU")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the store's pseudo-labels first (needed to change mode, model or checkpoint)",
    )
    parser.add_argument(
        "--address", help="Ray cluster address (default: start a local Ray on this machine)"
    )


def run_cli(args: argparse.Namespace) -> int:
    """Run ``semisup pseudo-label``; prints the summary as JSON; returns the exit status."""
    from semisup.config import RayConfig
    from semisup.runtime import ray_runtime

    teacher = TeacherConfig(
        mode=args.mode,
        model_type=args.model,
        checkpoint=args.checkpoint,
        base_checkpoint=args.base_checkpoint,
        points_per_side=args.points_per_side,
        prompt=args.prompt,
        output=args.output,
        refine=args.refine,
    )
    with ray_runtime(RayConfig(address=args.address)):
        summary = run_pseudo_label(
            args.store,
            teacher,
            pool=ActorPoolConfig.from_args(args),
            batch_size=args.batch_size,
            split=None if args.split == "all" else args.split,
            bf16=not args.no_bf16,
            overwrite=args.overwrite,
            max_tiles=args.max_tiles,
        )
    print(json.dumps(summary, indent=2))
    return 0

"""``semisup label import``: new ground truth into an existing local store, as a label version.

An import reads and checks every input first (``semisup.label_inputs``), then plans the new
version source by source: each imported tile's window takes the new mask; a tile that moves from
``unlabeled`` to ``labeled`` may already hold ground truth hidden by the split (prep writes the
labels of every labelled source and hides some by split), and different labels there, or on a
``labeled`` tile, are refused unless ``overwrite``. ``val`` tiles are skipped unless
``include_val`` (and stay ``val``).

Nothing already written is changed. Version N writes ``<source>/label_v<N>`` for each source whose
labels change and ``tiles.v<N>.parquet``, then names them in the root metadata with one atomic
replace (``store.replace_store_meta``). A crash before that leaves the previous version current;
its half-written arrays are unreferenced and are replaced by the next import. The same inputs
(by sha256) imported again are a no-op. Local stores only; one import at a time, and not while a
stage writes the store's root attributes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import zarr

from data_prep.errors import PrepError
from data_prep.labels import ColorMap, check_color_map_ids, load_color_map, parse_color_map
from semisup import columns as C
from semisup import store as tile_store
from semisup.label_inputs import (
    LABEL_SUFFIXES,
    StoreView,
    TileLabel,
    TileSlot,
    read_label_file,
)

EXAMPLE = "semisup label import --store dubai.zarr new_masks/ --label-colors dubai"
HASH_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class ImportResult:
    """What an import did: the store's label version after it, and the tiles it changed.

    ``already_imported``: the inputs were imported before (as ``version``), nothing was written.
    ``changed_tiles``: ids whose labels or split changed; ``moved``: ids moved to ``labeled``;
    ``skipped_val``: val tiles in the inputs left alone (no ``include_val``).
    """

    version: int
    changed_tiles: tuple[int, ...] = ()
    moved: tuple[int, ...] = ()
    skipped_val: tuple[int, ...] = ()
    already_imported: bool = False


@dataclass
class _SourcePlan:
    """One source's new labels: the whole H×W uint8 array and whether any pixel changed."""

    source_id: str
    labels: np.ndarray
    pixels_changed: bool


def import_labels(
    store: str | Path,
    inputs: Sequence[str | Path],
    *,
    label_colors: str | Path | Mapping[str, int] | None = None,
    overwrite: bool = False,
    include_val: bool = False,
    log: TextIO | None = None,
) -> ImportResult:
    """Import the label files ``inputs`` (files or folders of them) into the local ``store``.

    ``label_colors``: a colour map (JSON file or mapping ``{"#RRGGBB": class_id}``) for
    colour-coded masks. Progress goes to ``log`` (default stderr), one line per input file.
    Raises PrepError (nothing written) for a URL store, an input that does not fit the store,
    an unknown colour or class, or a tile that already holds other labels without ``overwrite``.
    """
    say = _printer(log)
    path = _local_store(store)
    root = tile_store.open_store(str(path))
    meta = tile_store.read_store_meta(root)
    current = tile_store.current_labels(root)
    files = _expand(inputs)
    color_map = _color_map(label_colors, meta.num_classes)
    hashes = [{"path": str(file), "sha256": file_sha256(file)} for file in files]
    colors_hash = None if color_map is None else _color_map_sha256(color_map)
    done = _imported_as(meta, hashes, colors_hash, include_val)
    if done is not None:
        say(f"{path}: these inputs were already imported as label version {done}; nothing to do")
        return ImportResult(current.version, already_imported=True)

    index = tile_store.read_tile_index(str(path), labels=current)
    view = _store_view(root, meta, index, color_map)
    new_labels = _read_inputs(files, view, say)
    ids, names = index.column(C.TILE_ID).to_pylist(), index.column(C.SPLIT).to_pylist()
    splits = dict(zip(ids, names, strict=True))
    accepted, skipped_val = _drop_val(new_labels, splits, include_val)
    plans, changed = _plan_sources(root, current, view, accepted, splits, overwrite, include_val)
    moved = sorted({t.tile_id for t in accepted if splits[t.tile_id] == C.UNLABELED})
    touched = sorted(set(changed) | set(moved))
    if skipped_val:
        say(f"left {len(skipped_val)} val tile(s) alone (pass --include-val to import them)")
    if not touched:
        say(f"{path}: every tile already holds these labels; no new label version")
        return ImportResult(current.version, skipped_val=tuple(skipped_val))

    version = current.version + 1
    new_index = _updated_index(index, plans, view, touched, set(moved))
    record = _write_version(path, root, current, version, plans, new_index)
    record = dataclasses.replace(
        record,
        inputs=tuple(hashes),
        tiles=tuple(touched),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        label_colors_sha256=colors_hash,
        include_val=include_val,
    )
    tile_store.replace_store_meta(path, _next_meta(meta, record, new_index))  # the switch
    say(
        f"{path}: label version {version}: {len(touched)} tile(s) updated ({len(moved)} moved "
        f"to {C.LABELED}, {len(changed)} with new labels)"
    )
    return ImportResult(version, tuple(touched), tuple(moved), tuple(skipped_val))


# ---------------------------------------------------------------------------------------------
# Inputs and checks before anything is written


def _printer(log: TextIO | None) -> Any:
    stream = log or sys.stderr
    return lambda message: print(message, file=stream, flush=True)


def _local_store(store: str | Path) -> Path:
    text = str(store)
    if tile_store.is_url(text) and not text.startswith("file://"):
        raise PrepError(
            f"--store {text}: label import writes local stores only; import into a local copy "
            "and upload it"
        )
    path = Path(text.removeprefix("file://")).absolute()
    if not (path / tile_store.ROOT_METADATA_FILE).is_file():
        raise PrepError(f"--store {path}: no such store (expected a folder with zarr.json)")
    return path


def _expand(inputs: Sequence[str | Path]) -> list[Path]:
    """Input files: files as given, folders as their label files (by suffix, not recursive)."""
    if not inputs:
        raise PrepError("no label inputs: give label files or folders")
    files: list[Path] = []
    for item in inputs:
        path = Path(os.path.abspath(item))
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in LABEL_SUFFIXES)
            if not found:
                raise PrepError(f"{path}: no label files ({', '.join(LABEL_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise PrepError(f"{item}: no such file or folder")
    return list(dict.fromkeys(files))


def _color_map(
    label_colors: str | Path | Mapping[str, int] | None, num_classes: int | None
) -> ColorMap | None:
    if label_colors is None:
        return None
    if isinstance(label_colors, Mapping):
        color_map = parse_color_map(label_colors)
    else:
        color_map = load_color_map(label_colors)
    if num_classes is not None:
        check_color_map_ids(color_map, num_classes, source=f"colour map {label_colors}")
    return color_map


def file_sha256(path: Path) -> str:
    """sha256 hex of the file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _color_map_sha256(color_map: ColorMap) -> str:
    return hashlib.sha256(json.dumps(sorted(color_map.items())).encode()).hexdigest()


def _imported_as(
    meta: tile_store.StoreMeta,
    hashes: Sequence[Mapping[str, str]],
    colors_hash: str | None,
    include_val: bool,
) -> int | None:
    """The version that imported the same input contents (colour map and val choice alike)."""
    wanted = sorted(item["sha256"] for item in hashes)
    for record in meta.label_versions:
        version = tile_store.LabelVersion.from_record(record)
        same = sorted(item["sha256"] for item in version.inputs) == wanted
        if same and (version.label_colors_sha256, version.include_val) == (
            colors_hash,
            include_val,
        ):
            return version.version
    return None


def _store_view(
    root: zarr.Group, meta: tile_store.StoreMeta, index: pa.Table, color_map: ColorMap | None
) -> StoreView:
    columns = (C.TILE_ID, C.SOURCE, C.ROW, C.COL, C.Y0, C.X0, C.HEIGHT, C.WIDTH)
    rows = index.select(list(columns)).to_pylist()
    tiles = {
        (row[C.SOURCE], row[C.ROW], row[C.COL]): TileSlot(*(row[name] for name in columns))
        for row in rows
    }
    sources = {s: tile_store.read_source_meta(root, s) for s in meta.sources}
    return StoreView(meta, sources, tiles, color_map)


def _read_inputs(files: Sequence[Path], view: StoreView, say: Any) -> list[TileLabel]:
    labels: list[TileLabel] = []
    for number, file in enumerate(files, start=1):
        found = read_label_file(file, view)
        sources = sorted({label.source_id for label in found})
        say(f"[{number}/{len(files)}] {file}: {len(found)} tile(s) in {', '.join(sources) or '-'}")
        labels += found
    return labels


def _drop_val(
    labels: Sequence[TileLabel], splits: Mapping[int, str], include_val: bool
) -> tuple[list[TileLabel], list[int]]:
    """(labels to import, ids of the val tiles left out)."""
    if include_val:
        return list(labels), []
    kept = [label for label in labels if splits[label.tile_id] != C.VAL]
    skipped = sorted({label.tile_id for label in labels if splits[label.tile_id] == C.VAL})
    return kept, skipped


# ---------------------------------------------------------------------------------------------
# Planning the new version (in memory; refusals happen here, before anything is written)


def _plan_sources(
    root: zarr.Group,
    current: tile_store.LabelVersion,
    view: StoreView,
    labels: Sequence[TileLabel],
    splits: Mapping[int, str],
    overwrite: bool,
    include_val: bool,
) -> tuple[list[_SourcePlan], list[int]]:
    """Each touched source's new labels, and the ids of every tile whose pixels change."""
    plans, changed = [], []
    for source_id in sorted({label.source_id for label in labels}):
        group = root[source_id]
        assert isinstance(group, zarr.Group)
        old = _current_array(group, current, view.sources[source_id])
        mine = [label for label in labels if label.source_id == source_id]
        new = paste_tiles(old, mine, view)
        for tile in view.tiles_of(source_id):
            window = _window(tile)
            if np.array_equal(old[window], new[window]):
                continue
            _check_change(tile, old[window], splits[tile.tile_id], overwrite, include_val, mine)
            changed.append(tile.tile_id)
        plans.append(_SourcePlan(source_id, new, not np.array_equal(old, new)))
    return plans, sorted(changed)


def _current_array(
    group: zarr.Group, current: tile_store.LabelVersion, source: tile_store.SourceMeta
) -> np.ndarray:
    """The source's labels in the current version: H×W uint8, all IGNORE_INDEX if it has none."""
    array = tile_store.label_array(group, current)
    if array is None:
        return np.full((source.height, source.width), C.IGNORE_INDEX, dtype=np.uint8)
    return np.asarray(array[...], dtype=np.uint8)


def _window(tile: TileSlot) -> tuple[slice, slice]:
    return slice(tile.y0, tile.y0 + tile.height), slice(tile.x0, tile.x0 + tile.width)


def paste_tiles(old: np.ndarray, labels: Sequence[TileLabel], view: StoreView) -> np.ndarray:
    """``old`` (H×W uint8) with each tile's window replaced by its new mask.

    Two inputs that give one pixel different labels (the same tile twice, or overlapping
    tiles) are refused: which one wins would depend on the order of the files.
    """
    new, written = old.copy(), np.zeros(old.shape, dtype=bool)
    slots = {tile.tile_id: tile for tile in view.tiles.values()}
    owner = np.full(old.shape, -1, dtype=np.int32)  # index into labels of the writer
    for number, label in enumerate(labels):
        window = _window(slots[label.tile_id])
        clash = written[window] & (new[window] != label.mask)
        if clash.any():
            other = labels[int(owner[window][clash][0])]
            raise PrepError(
                f"{label.origin} and {other.origin} give {int(clash.sum())} pixel(s) of tile "
                f"{slots[label.tile_id].name} different labels"
            )
        new[window], written[window], owner[window] = label.mask, True, number
    return new


def _check_change(
    tile: TileSlot,
    old: np.ndarray,
    split: str,
    overwrite: bool,
    include_val: bool,
    labels: Sequence[TileLabel],
) -> None:
    """Refuse a change to a val tile (without include_val) or to a tile's existing labels."""
    origin = next((label.origin for label in labels if label.tile_id == tile.tile_id), None)
    where = origin or f"an overlapping tile's labels (tile {tile.name})"
    if split == C.VAL and not include_val:
        raise PrepError(
            f"{where}: would change val tile {tile.name} (id {tile.tile_id}); pass --include-val"
        )
    if (old != C.IGNORE_INDEX).any() and not overwrite:
        raise PrepError(
            f"{where}: tile {tile.name} (id {tile.tile_id}, split {split}) already has different "
            "labels; pass --overwrite to replace them"
        )


def _updated_index(
    index: pa.Table,
    plans: Sequence[_SourcePlan],
    view: StoreView,
    touched: Sequence[int],
    moved: set[int],
) -> pa.Table:
    """The tile index of the new version: moved tiles ``labeled``, coverage recomputed."""
    new_labels = {plan.source_id: plan.labels for plan in plans}
    slots = {tile.tile_id: tile for tile in view.tiles.values()}
    coverage = index.column(C.LABEL_COVERAGE).to_numpy(zero_copy_only=False).copy()
    splits = index.column(C.SPLIT).to_pylist()
    row_of = {tile_id: row for row, tile_id in enumerate(index.column(C.TILE_ID).to_pylist())}
    for tile_id in touched:
        tile, row = slots[tile_id], row_of[tile_id]
        window = new_labels[tile.source_id][_window(tile)]  # h×w uint8
        coverage[row] = float(np.mean(window != C.IGNORE_INDEX))
        if tile_id in moved:
            splits[row] = C.LABELED
    index = index.set_column(
        index.schema.get_field_index(C.LABEL_COVERAGE),
        C.LABEL_COVERAGE,
        pa.array(coverage, pa.float32()),
    )
    return index.set_column(
        index.schema.get_field_index(C.SPLIT), C.SPLIT, pa.array(splits, pa.string())
    )


# ---------------------------------------------------------------------------------------------
# Writing the new version beside the old one


def _write_version(
    path: Path,
    root: zarr.Group,
    current: tile_store.LabelVersion,
    version: int,
    plans: Sequence[_SourcePlan],
    index: pa.Table,
) -> tile_store.LabelVersion:
    """Write version ``version``'s label arrays and tile index; the root is not touched yet."""
    writable = tile_store.open_store(str(path), mode="r+")
    arrays = {}
    for source_id in tile_store.read_store_meta(root).sources:
        name = tile_store.label_array_name(root[source_id], current)  # type: ignore[arg-type]
        if name is not None:
            arrays[source_id] = name
    tile_size = tile_store.read_store_meta(root).tile_size
    for plan in plans:
        if not plan.pixels_changed:
            continue
        group = writable[plan.source_id]
        assert isinstance(group, zarr.Group)
        arrays[plan.source_id] = _write_label_array(group, version, plan.labels, tile_size)
    index_file = f"tiles.v{version}.parquet"
    tile_store.write_tile_index(str(path), index, name=index_file)
    return tile_store.LabelVersion(version=version, index_file=index_file, label_arrays=arrays)


def _write_label_array(group: zarr.Group, version: int, labels: np.ndarray, tile_size: int) -> str:
    """Write ``labels`` (H×W uint8) as ``label_v<version>``, chunked like ``label``."""
    name = f"{C.LABEL}_v{version}"
    if name in group:  # left by an import that stopped before its switch: never referenced
        del group[name]
    height, width = labels.shape
    array = group.create_array(
        name,
        shape=labels.shape,
        chunks=(min(tile_size, height), min(tile_size, width)),
        dtype="uint8",
        fill_value=C.IGNORE_INDEX,
    )
    array[...] = labels
    return name


def _next_meta(
    meta: tile_store.StoreMeta, record: tile_store.LabelVersion, index: pa.Table
) -> tile_store.StoreMeta:
    """Root metadata naming ``record`` as current, with the split counts of its index."""
    split = dict(meta.split)
    if "tiles" in split:
        names = index.column(C.SPLIT).to_pylist()
        split["tiles"] = {name: names.count(name) for name in C.SPLITS}
    return dataclasses.replace(
        meta, split=split, label_versions=(*meta.label_versions, record.to_record())
    )


# ---------------------------------------------------------------------------------------------
# Command line: semisup label import


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``semisup label`` with its one action, ``import``."""
    actions = parser.add_subparsers(title="actions", dest="action", metavar="ACTION")
    actions.required = True
    sub = actions.add_parser(
        "import",
        help="add new ground truth to a local store as a new label version",
        description=(
            "Import masks (class ids or colours; named like a source's image, its source id or "
            "a tile SOURCE__rROW_cCOL), GeoJSON/GeoPackage polygons with a 'class' property, or "
            "a Label Studio JSON export. Imported tiles move from unlabeled to labeled; the "
            "store switches to the new label version in one atomic step."
        ),
        epilog=f"example:\n  {EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("labels", nargs="+", metavar="LABELS", help="label files or folders")
    sub.add_argument("--store", required=True, help="the local store to import into")
    sub.add_argument(
        "--label-colors",
        metavar="NAME|MAP.json",
        help='JSON colour map {"#RRGGBB": class_id} for colour-coded masks; '
        "'dubai' names the Dubai set's map",
    )
    sub.add_argument(
        "--overwrite", action="store_true", help="replace tiles' existing, different labels"
    )
    sub.add_argument(
        "--include-val", action="store_true", help="also import labels of val tiles (they stay val)"
    )


def run_cli(args: argparse.Namespace) -> int:
    """Run ``semisup label import``; returns the exit status (input errors are printed)."""
    from semisup.known_imagery import colour_map

    try:
        import_labels(
            args.store,
            args.labels,
            label_colors=colour_map(args.label_colors),
            overwrite=args.overwrite,
            include_val=args.include_val,
        )
    except (PrepError, OSError) as err:
        print(f"semisup label import: error: {err}", file=sys.stderr)
        return 1
    return 0

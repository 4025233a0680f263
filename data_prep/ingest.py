"""``build_store``: source rasters, labels and boxes -> one Zarr v3 tile store (``semisup prep``).

The store layout is the contract in ``semisup.store``. The build is atomic: the store is written
into a temporary sibling directory and renamed into place only when complete, so a failure leaves
nothing at ``out`` (and an existing store is replaced only by a complete new one). A store whose
fingerprint (inputs' paths, sizes and mtimes, and every option) matches is left untouched, so
rerunning the same command is a no-op. Output and inputs are local paths.

Rasters are streamed block by block (``tiling.block_windows``), never read whole, so a GeoTIFF
larger than memory works; PNG and JPEG are the exception (see ``rasters``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import zarr

from data_prep.boxes import (
    BoxSet,
    clip_boxes,
    encode_labels,
    match_boxes,
    parse_box_classes,
    read_box_file,
    rename_box_labels,
)
from data_prep.errors import PrepError
from data_prep.labels import (
    ColorMap,
    LabelRaster,
    check_color_map_ids,
    color_map_num_classes,
    load_color_map,
    parse_color_map,
)
from data_prep.publish import Existing, check_existing, fingerprint, staged
from data_prep.rasters import Raster, band_range, check_image_dtype, open_raster
from data_prep.sources import SourceSpec, discover_sources
from data_prep.splits import split_tiles
from data_prep.tiling import TileCounter, block_windows
from semisup import columns as C
from semisup.config import PrepConfig, from_dict, to_dict
from semisup.store import (
    META_KEY,
    STORE_FORMAT_VERSION,
    TILE_INDEX_SCHEMA,
    SourceMeta,
    StoreMeta,
    create_source_group,
    is_url,
    open_store,
    read_store_meta,
    tile_windows,
    window_bounds,
    write_boxes,
    write_tile_index,
)

PROGRESS_EVERY_S = 1.0


@dataclass(frozen=True)
class PrepResult:
    """What ``build_store`` did: the store's path and root metadata, and whether it was reused."""

    path: Path
    meta: StoreMeta
    up_to_date: bool


@dataclass(frozen=True)
class _Source:
    """A source after validation: its spec, sizes, label options and clipped boxes."""

    spec: SourceSpec
    height: int
    width: int
    boxes: np.ndarray  # N×4 float32 pixel x0, y0, x1, y1
    box_labels: tuple[str, ...]


def build_store(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    labels: Sequence[str | Path] = (),
    label_colors: str | Path | Mapping[str, int] | None = None,
    boxes: Sequence[str | Path] = (),
    box_classes: Sequence[str] = (),
    config: PrepConfig | Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    log: TextIO | None = None,
) -> PrepResult:
    """Build the tile store ``out`` from rasters, labels and boxes.

    ``inputs``: raster files or folders (folders: their *.tif/*.tiff/*.png/*.jpg/*.jpeg/*.npy,
    not recursive). ``labels``: see ``data_prep.sources`` for the pairing. ``label_colors``: a
    JSON colour map file or mapping ``{"#RRGGBB": class_id}`` for colour-coded masks. ``boxes``:
    CSV or Pascal-VOC XML files, matched to sources by image file stem. ``box_classes``: specs
    ``NAME[,NAME...]=CLASS`` renaming box labels (``data_prep.boxes.parse_box_classes``).
    ``config``: PrepConfig or a mapping of its keys (unknown keys are a ConfigError naming them).

    ``num_classes`` is, in order: the argument, ``len(class_names)``, the colour map's largest
    class id + 1, else the largest label id found + 1. Label ids must be < num_classes or 255.

    Images are stored as read (uint8 or uint16, H×W×C). For the 8-bit SAM teacher each source
    records ``band_low``/``band_high``: 0/255 for uint8; for uint16 the 2nd and 98th percentile
    (``np.percentile``, linear) of each band's valid pixels, computed on a nearest-neighbour
    decimated read of at most 2048×2048 pixels, which is every pixel for rasters up to 2048 on a
    side. Labels are H×W uint8 class ids, 255 where unlabelled or where the label file has nodata.

    Progress goes to ``log`` (default: sys.stderr) unless ``quiet``. Raises PrepError for bad
    inputs and ConfigError for bad options; either way nothing is left at ``out``.
    """
    prep = _as_config(config)
    out = _local_path(out)
    progress = _Progress(None if quiet else log or sys.stderr)
    specs = discover_sources(inputs, labels)
    color_map = _load_color_map(label_colors)
    names = tuple(class_names) if class_names is not None else None
    classes = _resolve_num_classes(num_classes, names, color_map)
    if color_map is not None and classes is not None:
        check_color_map_ids(color_map, classes, source=f"colour map {label_colors}")
    box_files = [Path(p) for p in boxes]
    box_map = parse_box_classes(box_classes)
    box_sets = match_boxes(
        [rename_box_labels(s, box_map) for f in box_files for s in read_box_file(f)],
        specs,
        progress.say,
    )

    colors_file = None if isinstance(label_colors, Mapping | None) else Path(label_colors)
    files = [f for spec in specs for f in (spec.image_path, spec.label_path)]
    options = {
        "format": STORE_FORMAT_VERSION,
        "prep": to_dict(prep),
        "num_classes": num_classes,
        "class_names": names,
        "color_map": sorted(color_map.items()) if color_map is not None else None,
        "source_ids": [spec.source_id for spec in specs],
        **({"box_classes": sorted(box_map.items())} if box_map else {}),
    }
    store_fingerprint = fingerprint([*files, colors_file, *box_files], options)

    existing = check_existing(out, store_fingerprint, overwrite)
    if existing is Existing.UP_TO_DATE:
        progress.say(f"{out} is up to date (fingerprint {store_fingerprint[:12]}); nothing to do")
        return PrepResult(out, read_store_meta(open_store(str(out))), up_to_date=True)

    sources = [
        _validate(spec, box_sets.get(spec.source_id, []), color_map, classes) for spec in specs
    ]
    with staged(out, replace=existing is Existing.REPLACE) as tmp:
        meta = _write_store(tmp, sources, prep, color_map, classes, names, progress)
        meta = replace(meta, fingerprint=store_fingerprint)
        # Root metadata goes last: a store that has it is complete.
        open_store(str(tmp), mode="r+").attrs[META_KEY] = meta.to_attrs()
    counts = ", ".join(f"{k} {v}" for k, v in meta.split["tiles"].items())
    tiles = sum(meta.split["tiles"].values())
    progress.say(f"wrote {out}: {len(sources)} sources, {tiles} tiles ({counts})")
    return PrepResult(out, meta, up_to_date=False)


# ---------------------------------------------------------------------------------------------
# Options and checks before anything is written


def _as_config(config: PrepConfig | Mapping[str, Any] | None) -> PrepConfig:
    if config is None:
        return PrepConfig()
    if isinstance(config, PrepConfig):
        return config
    return from_dict(PrepConfig, config, prefix="prep.")


def _local_path(out: str | Path) -> Path:
    if is_url(str(out)) and not str(out).startswith("file://"):
        raise PrepError(f"--out {out}: prep writes local paths only; copy the store afterwards")
    return Path(os.path.abspath(str(out).removeprefix("file://")))


def _load_color_map(label_colors: str | Path | Mapping[str, int] | None) -> ColorMap | None:
    if label_colors is None:
        return None
    if isinstance(label_colors, Mapping):
        return parse_color_map(label_colors)
    return load_color_map(label_colors)


def _resolve_num_classes(
    num_classes: int | None, class_names: tuple[str, ...] | None, color_map: ColorMap | None
) -> int | None:
    if num_classes is not None and not 1 <= num_classes <= C.IGNORE_INDEX:
        raise PrepError(f"num_classes: got {num_classes}, expected 1..{C.IGNORE_INDEX}")
    if class_names is not None:
        if num_classes is not None and len(class_names) != num_classes:
            raise PrepError(
                f"class_names: got {len(class_names)} names for num_classes={num_classes}"
            )
        num_classes = len(class_names)
    if num_classes is None and color_map is not None:
        num_classes = color_map_num_classes(color_map)
    return num_classes


def _validate(
    spec: SourceSpec, box_sets: list[BoxSet], color_map: ColorMap | None, num_classes: int | None
) -> _Source:
    """Open the headers of the image and label: dtype, band count and sizes must fit."""
    with open_raster(spec.image_path) as image:
        check_image_dtype(image)
        height, width = image.height, image.width
    if spec.label_path is not None:
        label = LabelRaster(spec.label_path, color_map, num_classes)
        label.close()
        if (label.height, label.width) != (height, width):
            raise PrepError(
                f"size mismatch: image {spec.image_path} is {width}x{height} (WxH) but label "
                f"{spec.label_path} is {label.width}x{label.height}"
            )
    boxes = np.zeros((0, 4), dtype=np.float32)
    box_labels: tuple[str, ...] = ()
    if box_sets:
        raw = np.concatenate([b.boxes for b in box_sets])
        where = f"boxes of {spec.image_path} from {', '.join(str(b.path) for b in box_sets)}"
        boxes = clip_boxes(raw, height, width, where)
        box_labels = tuple(label for b in box_sets for label in b.labels)
    return _Source(spec, height, width, boxes, box_labels)


# ---------------------------------------------------------------------------------------------
# Writing


def _write_store(
    root_path: Path,
    sources: list[_Source],
    prep: PrepConfig,
    color_map: ColorMap | None,
    num_classes: int | None,
    class_names: tuple[str, ...] | None,
    progress: _Progress,
) -> StoreMeta:
    """Write every source group and the tile index; returns the root metadata (no fingerprint)."""
    root = open_store(str(root_path), mode="w-")
    tables, max_label_id = [], -1
    for number, source in enumerate(sources, start=1):
        tiles = len(tile_windows(source.height, source.width, prep.tile_size, prep.overlap))
        progress.say(
            f"[{number}/{len(sources)}] {source.spec.source_id}: {source.width}x{source.height} px, "
            f"{tiles} tiles"
            + (", labelled" if source.spec.label_path else "")
            + (f", {len(source.boxes)} boxes" if len(source.boxes) else "")
        )
        table, max_id = _write_source(root, source, prep, color_map, num_classes, progress)
        tables.append(table)
        max_label_id = max(max_label_id, max_id)
    if num_classes is None and max_label_id >= 0:
        num_classes = max_label_id + 1  # inferred from the labels themselves
    index, split = _index_with_splits(pa.concat_tables(tables), sources, prep)
    write_tile_index(str(root_path), index)
    return StoreMeta(
        tile_size=prep.tile_size,
        overlap=prep.overlap,
        sources=tuple(s.spec.source_id for s in sources),
        num_classes=num_classes,
        class_names=class_names,
        split=split,
    )


def _index_with_splits(
    index: pa.Table, sources: list[_Source], prep: PrepConfig
) -> tuple[pa.Table, dict[str, Any]]:
    """Number the tiles row-major over the sorted sources and assign their splits.

    Returns the finished tile index and the split parameters (plus tiles per split) that go
    into the root metadata.
    """
    index = index.set_column(0, C.TILE_ID, pa.array(np.arange(index.num_rows, dtype=np.int64)))
    splits = split_tiles(
        index.column(C.SOURCE).to_pylist(),
        index.column(C.Y0).to_pylist(),
        index.column(C.X0).to_pylist(),
        labelled_sources={s.spec.source_id for s in sources if s.spec.label_path is not None},
        folder_of={s.spec.source_id: s.spec.folder for s in sources},
        split_by=prep.split_by,
        block_size=prep.block_size,
        val_fraction=prep.val_fraction,
        labeled_fraction=prep.labeled_fraction,
        val_sources=prep.val_sources,
        seed=prep.seed,
    )
    column = index.schema.get_field_index(C.SPLIT)
    index = index.set_column(column, C.SPLIT, pa.array(splits, pa.string()))
    params = {
        "split_by": prep.split_by,
        "block_size": prep.block_size,
        "val_fraction": prep.val_fraction,
        "labeled_fraction": prep.labeled_fraction,
        "val_sources": list(prep.val_sources),
        "seed": prep.seed,
        "tiles": {name: splits.count(name) for name in C.SPLITS},
    }
    return index, params


def _write_source(
    root: zarr.Group,
    source: _Source,
    prep: PrepConfig,
    color_map: ColorMap | None,
    num_classes: int | None,
    progress: _Progress,
) -> tuple[pa.Table, int]:
    """Stream one source into its group; returns its tile-index rows and its largest label id."""
    spec = source.spec
    label_path = spec.label_path
    label = LabelRaster(label_path, color_map, num_classes) if label_path is not None else None
    try:
        with open_raster(spec.image_path) as image:
            box_names, box_index = encode_labels(source.box_labels)
            meta = _source_meta(spec, image, box_names)
            group = create_source_group(root, meta, prep.tile_size, with_label=label is not None)
            valid_counts, label_counts = _stream_blocks(group, image, label, prep, progress)
            if len(source.boxes):
                write_boxes(group, source.boxes, box_index)
    finally:
        if label is not None:
            label.close()
    table = _tile_rows(spec.source_id, meta, prep, valid_counts, label_counts)
    return table, label.max_id if label is not None else -1


def _source_meta(spec: SourceSpec, image: Raster, box_names: tuple[str, ...]) -> SourceMeta:
    low, high = band_range(image)
    return SourceMeta(
        source_id=spec.source_id,
        image_path=str(spec.image_path),
        height=image.height,
        width=image.width,
        bands=image.bands,
        dtype=image.dtype.name,
        band_low=low,
        band_high=high,
        label_path=str(spec.label_path) if spec.label_path is not None else None,
        crs=image.crs,
        transform=image.transform,
        nodata=image.nodata,
        box_label_names=box_names,
    )


def _stream_blocks(
    group: zarr.Group,
    image: Raster,
    label: LabelRaster | None,
    prep: PrepConfig,
    progress: _Progress,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Copy the raster block by block; returns per-tile valid and labelled pixel counts.

    Counts are n_rows×n_cols int64 over the tile grid; the label counts are None without labels.
    """
    height, width = image.height, image.width
    valid_counts = TileCounter(height, width, prep.tile_size, prep.overlap)
    label_counts = TileCounter(height, width, prep.tile_size, prep.overlap)
    image_array, valid_array = _array(group, C.IMAGE), _array(group, C.VALID)
    label_array = _array(group, C.LABEL) if label is not None else None
    for y0, x0, h, w in block_windows(height, width, prep.tile_size):
        valid = image.read_valid(y0, x0, h, w)  # h×w bool
        image_array[y0 : y0 + h, x0 : x0 + w] = image.read(y0, x0, h, w)  # h×w×C
        valid_array[y0 : y0 + h, x0 : x0 + w] = valid
        valid_counts.add(valid, y0, x0)
        if label is not None and label_array is not None:
            ids = label.read_ids(y0, x0, h, w)  # h×w uint8
            label_array[y0 : y0 + h, x0 : x0 + w] = ids
            label_counts.add(ids != C.IGNORE_INDEX, y0, x0)
        progress.block(group.basename, y0 + h, height)
    return valid_counts.counts, label_counts.counts if label is not None else None


def _array(group: zarr.Group, name: str) -> zarr.Array:
    array = group[name]
    assert isinstance(array, zarr.Array), f"{name} is not an array"
    return array


def _tile_rows(
    source_id: str,
    meta: SourceMeta,
    prep: PrepConfig,
    valid_counts: np.ndarray,
    label_counts: np.ndarray | None,
) -> pa.Table:
    """Tile-index rows of one source (tile_id and split are filled in for the whole store)."""
    windows = tile_windows(meta.height, meta.width, prep.tile_size, prep.overlap)
    rows, cols, y0s, x0s, hs, ws = (np.array(v, dtype=np.int64) for v in zip(*windows, strict=True))
    area = (hs * ws).astype(np.float64)
    valid_fraction = valid_counts[rows, cols] / area
    # Unlabelled sources: coverage 0, so "has labels" filters need no NaN handling.
    coverage = label_counts[rows, cols] / area if label_counts is not None else np.zeros(len(rows))
    bounds = np.array([window_bounds(meta.transform, *w[2:]) for w in windows], dtype=np.float64)
    columns = {
        C.TILE_ID: np.zeros(len(rows), dtype=np.int64),
        C.SOURCE: [source_id] * len(rows),
        C.ROW: rows,
        C.COL: cols,
        C.Y0: y0s,
        C.X0: x0s,
        C.HEIGHT: hs,
        C.WIDTH: ws,
        C.MINX: bounds[:, 0],
        C.MINY: bounds[:, 1],
        C.MAXX: bounds[:, 2],
        C.MAXY: bounds[:, 3],
        C.SPLIT: [C.UNLABELED] * len(rows),
        C.VALID_FRACTION: valid_fraction,
        C.LABEL_COVERAGE: coverage,
    }
    arrays = [pa.array(columns[f.name]).cast(f.type) for f in TILE_INDEX_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=TILE_INDEX_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """Progress lines on a stream; block lines at most once every PROGRESS_EVERY_S seconds."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self._last = time.monotonic()

    def say(self, message: str) -> None:
        if self.stream is not None:
            print(message, file=self.stream, flush=True)
        self._last = time.monotonic()

    def block(self, source_id: str, rows_done: int, height: int) -> None:
        now = time.monotonic()
        if self.stream is None or now - self._last < PROGRESS_EVERY_S or rows_done >= height:
            return
        self.say(f"  {source_id}: rows {rows_done}/{height} ({100 * rows_done // height}%)")

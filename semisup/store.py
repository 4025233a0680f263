"""The Zarr tile store: its layout, and the functions that read and write it.

The layout is a public contract (documented in the README) that every stage reads::

    STORE.zarr/                      Zarr v3 group; attrs["semisup"] holds StoreMeta
      tiles.parquet                  tile index, one row per tile (see TILE_INDEX_COLUMNS)
      tiles.v<N>.parquet             tile index of label version N (after ``semisup label import``)
      <source_id>/                   one group per source raster; attrs hold SourceMeta
        image   H×W×C  source dtype  chunks tile×tile×C
        label   H×W    uint8         chunks tile×tile (class ids, IGNORE_INDEX = unlabelled)
        label_v<N>  H×W uint8        the source's labels as of label version N (same layout)
        valid   H×W    bool          chunks tile×tile (False = nodata)
        boxes   N×4    float32       box prompts, pixel x0, y0, x1, y1 (optional)
        box_label N    int32         index into SourceMeta.box_label_names (optional)

Tiles sit on a grid with stride ``tile_size - overlap`` starting at the raster origin. A tile at
the right or bottom edge may be smaller than ``tile_size``; readers pad it (``read_window``) with
``valid`` False and ``label`` IGNORE_INDEX so that every tile read has the same shape.

Label versions: ``semisup label import`` never rewrites ``label`` or ``tiles.parquet``. It writes
a new version N beside them (``label_v<N>`` for the sources it changes, ``tiles.v<N>.parquet``) and
then names it in ``StoreMeta.label_versions`` with one atomic replace of the root ``zarr.json``.
Readers find the tile index and each source's label array through ``current_labels``; a store
with no version recorded (version 0) reads ``tiles.parquet`` and ``label``.

This module is Ray-free: it is used by data_prep, by the Ray datasource and by the tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from semisup import columns as C
from semisup.atomic import write_json_atomic
from semisup.bands import scale_bands

STORE_FORMAT_VERSION = 1
META_KEY = "semisup"
TILE_INDEX_FILE = "tiles.parquet"
ROOT_METADATA_FILE = "zarr.json"  # Zarr v3 group metadata; its attributes hold StoreMeta
BOXES = "boxes"
BOX_LABEL = "box_label"

# Columns of tiles.parquet. Geo bounds are in the source's CRS, or in pixels when it has none.
TILE_INDEX_SCHEMA = pa.schema(
    [
        (C.TILE_ID, pa.int64()),
        (C.SOURCE, pa.string()),
        (C.ROW, pa.int32()),
        (C.COL, pa.int32()),
        (C.Y0, pa.int64()),
        (C.X0, pa.int64()),
        (C.HEIGHT, pa.int32()),
        (C.WIDTH, pa.int32()),
        (C.MINX, pa.float64()),
        (C.MINY, pa.float64()),
        (C.MAXX, pa.float64()),
        (C.MAXY, pa.float64()),
        (C.SPLIT, pa.string()),
        (C.VALID_FRACTION, pa.float32()),
        (C.LABEL_COVERAGE, pa.float32()),
    ]
)
TILE_INDEX_COLUMNS = tuple(TILE_INDEX_SCHEMA.names)


@dataclass(frozen=True)
class SourceMeta:
    """Attributes of one source group.

    ``transform`` is the affine (a, b, c, d, e, f) of rasterio/affine: x = a·col + b·row + c,
    y = d·col + e·row + f. ``band_low``/``band_high`` give the per-band linear scaling to 8 bit
    for the SAM teacher (see ``scale_to_uint8``).
    """

    source_id: str
    image_path: str
    height: int
    width: int
    bands: int
    dtype: str
    band_low: tuple[float, ...]
    band_high: tuple[float, ...]
    label_path: str | None = None
    crs: str | None = None
    transform: tuple[float, ...] | None = None
    nodata: float | None = None
    box_label_names: tuple[str, ...] = ()

    def to_attrs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> SourceMeta:
        raw = dict(attrs[META_KEY]) if META_KEY in attrs else dict(attrs)
        for key in ("band_low", "band_high", "transform", "box_label_names"):
            if raw.get(key) is not None:
                raw[key] = tuple(raw[key])
        return cls(**raw)


@dataclass(frozen=True)
class StoreMeta:
    """Attributes of the store's root group."""

    tile_size: int
    overlap: int
    sources: tuple[str, ...]
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    ignore_index: int = C.IGNORE_INDEX
    fingerprint: str = ""
    split: dict[str, Any] = field(default_factory=dict)
    version: int = STORE_FORMAT_VERSION
    # One record per ``semisup label import``, oldest first (see ``LabelVersion``); the last
    # is current. Left out of the attrs while empty, so stores without imports read as before.
    label_versions: tuple[dict[str, Any], ...] = ()

    def to_attrs(self) -> dict[str, Any]:
        attrs = dataclasses.asdict(self)
        attrs["label_versions"] = [dict(record) for record in self.label_versions]
        if not self.label_versions:
            del attrs["label_versions"]
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreMeta:
        if META_KEY not in attrs:
            raise ValueError(f"not a semisup store: root attribute {META_KEY!r} is missing")
        raw = dict(attrs[META_KEY])
        if raw.get("version") != STORE_FORMAT_VERSION:
            raise ValueError(
                f"store format version {raw.get('version')!r} is not supported "
                f"(expected {STORE_FORMAT_VERSION})"
            )
        raw["sources"] = tuple(raw["sources"])
        if raw.get("class_names") is not None:
            raw["class_names"] = tuple(raw["class_names"])
        raw["label_versions"] = tuple(dict(record) for record in raw.get("label_versions", ()))
        return cls(**raw)


@dataclass(frozen=True)
class LabelVersion:
    """The ground truth readers see: the tile index file and each source's label array.

    ``version`` 0 is the store as prep wrote it (``tiles.parquet``, arrays ``label``). Version N
    (``semisup label import``) records ``index_file`` ``tiles.v<N>.parquet``, ``label_arrays``
    (every labelled source -> its array name, ``label`` or ``label_v<M>`` with M <= N), the
    ``inputs`` imported (``{"path", "sha256"}``), ``tiles`` (ids whose labels or split changed),
    ``created`` (ISO 8601 UTC) and the import's colour map (sha256) and ``include_val``.
    """

    version: int = 0
    index_file: str = TILE_INDEX_FILE
    label_arrays: Mapping[str, str] = field(default_factory=dict)
    inputs: tuple[Mapping[str, str], ...] = ()
    tiles: tuple[int, ...] = ()
    created: str = ""
    label_colors_sha256: str | None = None
    include_val: bool = False  # whether the import also labelled val tiles

    def array_name(self, source: zarr.Group) -> str | None:
        """Name of ``source``'s label array in this version, None when it has no labels."""
        name = self.label_arrays.get(source.basename, C.LABEL)
        return name if name in source else None

    def to_record(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["label_arrays"] = dict(self.label_arrays)
        record["inputs"] = [dict(item) for item in self.inputs]
        record["tiles"] = list(self.tiles)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> LabelVersion:
        return cls(
            version=int(record["version"]),
            index_file=str(record["index_file"]),
            label_arrays=dict(record["label_arrays"]),
            inputs=tuple(dict(item) for item in record.get("inputs", ())),
            tiles=tuple(int(tile) for tile in record.get("tiles", ())),
            created=str(record.get("created", "")),
            label_colors_sha256=record.get("label_colors_sha256"),
            include_val=bool(record.get("include_val", False)),
        )


def current_labels(root: zarr.Group | Mapping[str, Any]) -> LabelVersion:
    """The current label version of a store, from its root group or the root's attrs.

    Every reader of labels or of the tile index goes through here (``read_tile_index``,
    ``label_array_name``, ``read_tile``), so all of them honour ``semisup label import``.
    """
    attrs: Mapping[str, Any] = root.attrs.asdict() if isinstance(root, zarr.Group) else root
    records = dict(attrs.get(META_KEY) or {}).get("label_versions") or ()
    if not records:
        return LabelVersion()
    return LabelVersion.from_record(max(records, key=lambda record: int(record["version"])))


def label_version(url: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """The store's current label version: 0 until ``semisup label import`` adds one."""
    return current_labels(open_store(url, "r", storage_options)).version


def label_array_name(source: zarr.Group, labels: LabelVersion | None = None) -> str | None:
    """Name of the source group's current label array; None when the source has no labels.

    ``labels`` is the store's ``current_labels``; without it the root is read from the group's
    store (about half a millisecond locally), so a loop over tiles passes it once.
    """
    if labels is None:
        labels = current_labels(zarr.open_group(store=source.store, path="", mode="r"))
    return labels.array_name(source)


def label_array(source: zarr.Group, labels: LabelVersion | None = None) -> zarr.Array | None:
    """The source group's current label array (H×W uint8), None when it has no labels."""
    name = label_array_name(source, labels)
    array = None if name is None else source[name]
    assert array is None or isinstance(array, zarr.Array), f"{name} is not an array"
    return array


# ---------------------------------------------------------------------------------------------
# Opening stores (local paths or fsspec URLs such as s3://, gs://, memory://)


class StoreReadError(OSError):
    """A chunk of a store array cannot be read; the message names the store, source, array
    and chunk."""


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``s3://``, ``memory://``, ...) rather than a local path."""
    return "://" in str(path)


def open_store(
    url: str, mode: str = "r", storage_options: Mapping[str, Any] | None = None
) -> zarr.Group:
    """Open the store's root group; ``url`` is a local path or any fsspec URL."""
    url = str(url)
    if is_url(url) and not url.startswith("file://"):
        store = zarr.storage.FsspecStore.from_url(
            url, storage_options=dict(storage_options or {}), read_only=(mode == "r")
        )
        return zarr.open_group(store=store, mode=mode)  # type: ignore[arg-type]
    return zarr.open_group(store=url.removeprefix("file://"), mode=mode)  # type: ignore[arg-type]


def read_store_meta(group: zarr.Group) -> StoreMeta:
    """The store's root metadata."""
    return StoreMeta.from_attrs(group.attrs.asdict())


def read_source_meta(group: zarr.Group, source_id: str) -> SourceMeta:
    """One source's metadata."""
    return SourceMeta.from_attrs(group[source_id].attrs.asdict())


def _index_location(
    url: str, storage_options: Mapping[str, Any] | None, name: str = TILE_INDEX_FILE
) -> tuple[Any, str]:
    fs, root = fsspec.core.url_to_fs(str(url), **dict(storage_options or {}))
    return fs, f"{root.rstrip('/')}/{name}"


def _stored_labels(url: str, storage_options: Mapping[str, Any] | None) -> LabelVersion:
    """``current_labels`` of the store at ``url``; version 0 when it is no Zarr group (yet)."""
    try:
        root = open_store(url, "r", storage_options)
    except (FileNotFoundError, ValueError):  # no zarr.json: read_tile_index names the problem
        return LabelVersion()
    return current_labels(root)


def read_tile_index(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    labels: LabelVersion | None = None,
) -> pa.Table:
    """The tile index of the store at ``url`` as a pyarrow Table (TILE_INDEX_SCHEMA).

    It is the index of ``labels`` (default: the store's current label version).
    """
    labels = labels if labels is not None else _stored_labels(url, storage_options)
    fs, path = _index_location(url, storage_options, labels.index_file)
    if not fs.exists(path):
        raise FileNotFoundError(
            f"{url}: no tile index {labels.index_file!r}; is this a semisup store?"
        )
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh)


def write_tile_index(
    url: str,
    table: pa.Table,
    storage_options: Mapping[str, Any] | None = None,
    name: str = TILE_INDEX_FILE,
) -> None:
    """Write ``table`` as the store's tile index file ``name`` (prep: ``tiles.parquet``)."""
    fs, path = _index_location(url, storage_options, name)
    with fs.open(path, "wb") as fh:
        pq.write_table(table.cast(TILE_INDEX_SCHEMA), fh)


def replace_store_meta(path: str | Path, meta: StoreMeta) -> None:
    """Make ``meta`` the root metadata of the local store at ``path`` in one atomic step.

    The root ``zarr.json`` is written whole to a temporary file beside it, flushed to disk and
    renamed over the old one (``os.replace``), so a reader or a crash sees either the old
    metadata or the new, never a mix. Local stores only.
    """
    target = Path(path) / ROOT_METADATA_FILE
    document = json.loads(target.read_text())
    document.setdefault("attributes", {})[META_KEY] = meta.to_attrs()
    write_json_atomic(target, document)


# ---------------------------------------------------------------------------------------------
# Writing source groups


def create_source_group(
    root: zarr.Group, meta: SourceMeta, tile_size: int, with_label: bool
) -> zarr.Group:
    """Create the group and empty, tile-chunked arrays for one source raster."""
    group = root.create_group(meta.source_id)
    group.attrs[META_KEY] = meta.to_attrs()
    hw = (meta.height, meta.width)
    chunk = (min(tile_size, meta.height), min(tile_size, meta.width))
    group.create_array(
        C.IMAGE,
        shape=(*hw, meta.bands),
        chunks=(*chunk, meta.bands),
        dtype=meta.dtype,
        fill_value=0,
    )
    group.create_array(C.VALID, shape=hw, chunks=chunk, dtype="bool", fill_value=False)
    if with_label:
        group.create_array(
            C.LABEL, shape=hw, chunks=chunk, dtype="uint8", fill_value=C.IGNORE_INDEX
        )
    return group


def write_boxes(group: zarr.Group, boxes_xyxy: np.ndarray, box_label: np.ndarray) -> None:
    """Store box prompts: ``boxes_xyxy`` N×4 float32 pixels, ``box_label`` N int32."""
    boxes_xyxy = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    group.create_array(BOXES, data=boxes_xyxy, chunks=(max(1, len(boxes_xyxy)), 4))
    group.create_array(
        BOX_LABEL, data=np.asarray(box_label, dtype=np.int32), chunks=(max(1, len(boxes_xyxy)),)
    )


# ---------------------------------------------------------------------------------------------
# Tile geometry (pure functions)


def grid_starts(length: int, tile_size: int, overlap: int) -> list[int]:
    """Start offsets of tiles along one axis of ``length`` pixels (stride tile_size - overlap)."""
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size={tile_size}), got {overlap}")
    stride = tile_size - overlap
    count = 1 if length <= tile_size else math.ceil((length - tile_size) / stride) + 1
    return [i * stride for i in range(count)]


def tile_windows(
    height: int, width: int, tile_size: int, overlap: int = 0
) -> list[tuple[int, int, int, int, int, int]]:
    """(row, col, y0, x0, h, w) of every tile, row-major; h, w are clipped to the raster."""
    windows = []
    for row, y0 in enumerate(grid_starts(height, tile_size, overlap)):
        for col, x0 in enumerate(grid_starts(width, tile_size, overlap)):
            h, w = min(tile_size, height - y0), min(tile_size, width - x0)
            windows.append((row, col, y0, x0, h, w))
    return windows


def window_bounds(
    transform: tuple[float, ...] | None, y0: int, x0: int, h: int, w: int
) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) of a pixel window; pixel coordinates when ``transform`` is None."""
    if transform is None:
        return float(x0), float(y0), float(x0 + w), float(y0 + h)
    a, b, c, d, e, f = transform[:6]
    xs, ys = [], []
    for col, row in ((x0, y0), (x0 + w, y0), (x0, y0 + h), (x0 + w, y0 + h)):
        xs.append(a * col + b * row + c)
        ys.append(d * col + e * row + f)
    return min(xs), min(ys), max(xs), max(ys)


def read_window(
    array: Any, y0: int, x0: int, h: int, w: int, fill: int | float | bool = 0
) -> np.ndarray:
    """Read ``array[y0:y0+h, x0:x0+w]`` (any leading-2-D array-like, e.g. a zarr array).

    The window may reach outside the array (negative offsets, or past the end); those pixels are
    ``fill``. Returns h×w(×C) in the array's dtype.
    """
    H, W = array.shape[0], array.shape[1]
    out = np.full((h, w, *array.shape[2:]), fill, dtype=array.dtype)
    ys, ye = max(y0, 0), min(y0 + h, H)
    xs, xe = max(x0, 0), min(x0 + w, W)
    if ys < ye and xs < xe:
        try:
            out[ys - y0 : ye - y0, xs - x0 : xe - x0] = array[ys:ye, xs:xe]
        except Exception as err:  # a codec, the filesystem or object storage refused a chunk
            raise unreadable_chunk(array, ys, ye, xs, xe, err) from err
    return out


def unreadable_chunk(
    array: Any, ys: int, ye: int, xs: int, xe: int, error: Exception
) -> StoreReadError:
    """A ``StoreReadError`` for a failed read of ``array[ys:ye, xs:xe]``: each chunk of the
    window is read alone to find the first that fails, and the message names it."""
    chunk_h, chunk_w = int(array.chunks[0]), int(array.chunks[1])
    culprit, cause = None, error
    for cy in range(ys // chunk_h, (ye - 1) // chunk_h + 1):
        for cx in range(xs // chunk_w, (xe - 1) // chunk_w + 1):
            try:
                array[cy * chunk_h : (cy + 1) * chunk_h, cx * chunk_w : (cx + 1) * chunk_w]
            except Exception as err:
                culprit, cause = (cy, cx), err
                break
        if culprit is not None:
            break
    store_path = getattr(array, "store_path", None)
    store = getattr(store_path, "store", None)
    root = getattr(store, "root", None) or getattr(store, "path", None) or store
    source, _, name = str(getattr(array, "path", "?")).rpartition("/")
    if culprit is None:
        where = f"rows {ys}-{ye - 1}, columns {xs}-{xe - 1} (no chunk fails on its own)"
    else:
        cy, cx = culprit
        where = (
            f"chunk ({cy}, {cx}) = rows {cy * chunk_h}-{min((cy + 1) * chunk_h, array.shape[0]) - 1}"
            f", columns {cx * chunk_w}-{min((cx + 1) * chunk_w, array.shape[1]) - 1}"
        )
    reason = f"{type(cause).__name__}: {cause}".strip().rstrip(":")
    return StoreReadError(
        f"store {root}: source {source or '?'}, array {name}, {where} cannot be read ({reason})"
    )


def read_tile(
    group: zarr.Group,
    y0: int,
    x0: int,
    size: int,
    halo: int = 0,
    labels: LabelVersion | None = None,
) -> dict[str, np.ndarray]:
    """One tile with ``halo`` pixels of context on each side, padded at raster borders.

    Returns IMAGE (S×S×C source dtype), VALID (S×S bool) and, when the source is labelled,
    LABEL (S×S uint8, from the current label version or ``labels``), with S = size + 2·halo.
    Padding is 0 / False / IGNORE_INDEX.
    """
    span = size + 2 * halo
    ty, tx = y0 - halo, x0 - halo
    out = {
        C.IMAGE: read_window(group[C.IMAGE], ty, tx, span, span, 0),
        C.VALID: read_window(group[C.VALID], ty, tx, span, span, False),
    }
    label = label_array(group, labels)
    if label is not None:
        out[C.LABEL] = read_window(label, ty, tx, span, span, C.IGNORE_INDEX)
    return out


# ---------------------------------------------------------------------------------------------
# Band scaling for the 3-band, 8-bit SAM teacher


def scale_to_uint8(
    image: np.ndarray, low: tuple[float, ...], high: tuple[float, ...]
) -> np.ndarray:
    """Linearly map each band from [low, high] to [0, 255], clipping outside, rounding to nearest.

    ``image``: H×W×C any numeric dtype. For uint8 sources low = 0, high = 255 and this is the
    identity. For 16-bit sources data_prep stores the 2nd and 98th percentiles of the valid
    pixels of each band, the usual contrast stretch for display and for RGB-trained models.
    """
    unit = scale_bands(image, np.asarray(low), np.asarray(high))
    return np.rint(unit * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# What a trainer or an evaluator needs to know about a store


class StoreFacts(TypedDict):
    """``store_facts``: what training workers, evaluation and selection need of a store."""

    num_classes: int
    class_names: list[str]
    tile_size: int
    band_scale: dict[str, tuple[list[float], list[float]]]  # per source: (band_low, band_high)
    tiles_per_split: dict[str, int]
    has_pseudo_labels: bool
    pseudo_label_mode: str | None  # the mode of the teacher that wrote them
    calibrated_threshold: NotRequired[float]  # ssl.threshold_mode=calibrated: the teacher's cut
    detections_per_tile: NotRequired[int]  # detection stores: the most boxes a tile holds


def store_facts(store: str) -> StoreFacts:
    """What workers need to know about the store: classes, tile size, per-source band scaling."""
    root = open_store(store)
    meta = read_store_meta(root)
    if not meta.num_classes:
        raise ValueError(f"store {store}: no num_classes; a labelled store is needed to train")
    index = read_tile_index(store).to_pandas()
    band_scale = {}
    for source_id in meta.sources:
        source = read_source_meta(root, source_id)
        band_scale[source_id] = (list(source.band_low), list(source.band_high))
    counts = index[C.SPLIT].value_counts().to_dict()
    has_pseudo = any(C.PSEUDO_LABEL in root[s] for s in meta.sources)  # type: ignore[operator]
    teacher_run = root.attrs.get("semisup_pseudo_label") or {}  # see semisup.pseudo_label
    return {
        "num_classes": meta.num_classes,
        "class_names": list(meta.class_names or [f"class_{k}" for k in range(meta.num_classes)]),
        "tile_size": meta.tile_size,
        "band_scale": band_scale,
        "tiles_per_split": {k: int(v) for k, v in counts.items()},
        "has_pseudo_labels": has_pseudo,
        "pseudo_label_mode": teacher_run.get("mode") if isinstance(teacher_run, dict) else None,
    }


def band_scales(facts: Mapping[str, Any]) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
    """Per-source (band_low, band_high) of ``store_facts``, as ``prepare_batch`` takes them."""
    return {k: (tuple(v[0]), tuple(v[1])) for k, v in facts["band_scale"].items()}

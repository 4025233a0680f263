"""Reading new ground truth for ``semisup label import``: masks, polygons, Label Studio exports.

Every reader turns one input file into ``TileLabel``s: one tile's new class ids, checked against
the store before anything is written (size, CRS and extent against the source, colours and class
ids against the store's classes). Three kinds of input:

- a class-id or colour-coded mask (PNG, GeoTIFF, ...; ``data_prep.labels.LabelRaster``) named
  ``<source_id>__r<row>_c<col>`` (one tile, row and col as in the tile index), like the source's
  image file (same stem) or ``<source_id>`` (the whole source);
- GeoJSON or GeoPackage polygons with a ``class`` property (class name or id), rasterised with
  ``rasterio.features.rasterize`` in the CRS and transform of each source they fall in;
- a Label Studio JSON export (a list of task dicts with ``annotations``), turned into tile masks
  by ``semisup.labelstudio.export_masks``.

Ray-free; used by ``semisup.label_import``.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio.features
import rasterio.warp
import shapely
import shapely.geometry
import shapely.wkb
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.transform import Affine

from data_prep.errors import PrepError
from data_prep.labels import ColorMap, LabelRaster, allowed_range, out_of_range_ids
from data_prep.rasters import RASTER_SUFFIXES
from semisup import columns as C
from semisup.store import SourceMeta, StoreMeta

TILE_NAME = re.compile(r"^(?P<source>.+)__r(?P<row>\d+)_c(?P<col>\d+)$")
VECTOR_SUFFIXES = (".geojson", ".gpkg")
JSON_SUFFIX = ".json"  # a Label Studio export, or GeoJSON under a .json name
LABEL_SUFFIXES = (*RASTER_SUFFIXES, *VECTOR_SUFFIXES, JSON_SUFFIX)
CLASS_PROPERTY = "class"
GEOJSON_DEFAULT_CRS = "OGC:CRS84"  # RFC 7946: GeoJSON without a "crs" member is lon/lat WGS 84
# A thousandth of a pixel: transforms written by different tools differ in the last digits.
TRANSFORM_TOLERANCE_PX = 1e-3


@dataclass(frozen=True)
class TileLabel:
    """New labels for one tile: ``mask`` h×w uint8 class ids (IGNORE_INDEX = unlabelled), h×w
    the tile's window clipped to the raster as in the tile index; ``origin`` names the input."""

    tile_id: int
    source_id: str
    mask: np.ndarray
    origin: str


@dataclass(frozen=True)
class TileSlot:
    """A tile of the store's index: id, source, grid position and pixel window."""

    tile_id: int
    source_id: str
    row: int
    col: int
    y0: int
    x0: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return tile_name(self.source_id, self.row, self.col)


@dataclass(frozen=True)
class StoreView:
    """What the readers check inputs against: root and source metadata and the tile grid."""

    meta: StoreMeta
    sources: Mapping[str, SourceMeta]
    tiles: Mapping[tuple[str, int, int], TileSlot]  # (source_id, row, col) -> tile
    color_map: ColorMap | None = None

    def tiles_of(self, source_id: str) -> list[TileSlot]:
        return [tile for key, tile in self.tiles.items() if key[0] == source_id]

    def class_names(self) -> tuple[str, ...]:
        """The store's class names, or the ids as strings when it has none."""
        if self.meta.class_names:
            return tuple(self.meta.class_names)
        return tuple(str(i) for i in range(self.meta.num_classes or 0))


def tile_name(source_id: str, row: int, col: int) -> str:
    """``<source_id>__r<row>_c<col>``: how tile masks and Label Studio tasks name a tile."""
    return f"{source_id}__r{row}_c{col}"


def read_label_file(path: Path, view: StoreView) -> list[TileLabel]:
    """The tiles one input file labels, each with at least one labelled pixel.

    Raises PrepError naming the file (and tile, feature or value) for anything that does not
    fit the store.
    """
    suffix = path.suffix.lower()
    if suffix in VECTOR_SUFFIXES:
        labels = vector_labels(path, view)
    elif suffix == JSON_SUFFIX:
        data = _load_json(path)
        if is_label_studio_export(data):
            labels = label_studio_labels(path, view)
        elif isinstance(data, dict) and data.get("type") in ("FeatureCollection", "Feature"):
            labels = vector_labels(path, view)
        else:
            raise PrepError(
                f"{path}: a .json input must be a Label Studio export (a list of tasks with "
                '"annotations") or a GeoJSON FeatureCollection'
            )
    else:
        labels = raster_labels(path, view)
    return [label for label in labels if (label.mask != C.IGNORE_INDEX).any()]


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PrepError(f"{path}: cannot read JSON ({err})") from err


def is_label_studio_export(data: Any) -> bool:
    """A Label Studio JSON export: a non-empty list of task dicts, each with ``annotations``."""
    return (
        isinstance(data, list)
        and bool(data)
        and all(isinstance(task, dict) and "annotations" in task for task in data)
    )


# ---------------------------------------------------------------------------------------------
# Masks


def raster_labels(path: Path, view: StoreView) -> list[TileLabel]:
    """A tile mask (``<source_id>__r<row>_c<col>``) or a whole-source mask, as tile labels."""
    match = TILE_NAME.match(path.stem)
    if match is not None:
        key = (match["source"], int(match["row"]), int(match["col"]))
        if key in view.tiles:
            return [_tile_mask(path, view.tiles[key], view)]
        if key[0] in view.sources:
            rows = 1 + max(tile.row for tile in view.tiles_of(key[0]))
            cols = 1 + max(tile.col for tile in view.tiles_of(key[0]))
            raise PrepError(
                f"{path}: source {key[0]} has no tile r{key[1]}_c{key[2]} (its grid is "
                f"{rows} rows x {cols} columns)"
            )
    source = _source_named(path, view)
    window = (0, 0, source.height, source.width)
    what = f"source {source.source_id} ({source.width}x{source.height})"
    ids = _read_mask(path, view, source, window, [window[2:]], what)  # H×W uint8
    return cut_tiles(ids, view.tiles_of(source.source_id), str(path))


def _tile_mask(path: Path, tile: TileSlot, view: StoreView) -> TileLabel:
    """One tile's mask: h×w as in the index, or tile_size² for an edge tile (cropped)."""
    size = view.meta.tile_size
    window = (tile.y0, tile.x0, tile.height, tile.width)
    what = f"tile {tile.name} ({tile.width}x{tile.height}, or {size}x{size} padded)"
    source = view.sources[tile.source_id]
    ids = _read_mask(path, view, source, window, [window[2:], (size, size)], what)  # h×w uint8
    return TileLabel(tile.tile_id, tile.source_id, ids, f"{path}")


def _read_mask(
    path: Path,
    view: StoreView,
    source: SourceMeta,
    window: tuple[int, int, int, int],
    sizes: Sequence[tuple[int, ...]],
    what: str,
) -> np.ndarray:
    """Class ids of a mask of ``window`` (y0, x0, h, w) of ``source``: h×w uint8.

    The mask's (height, width) must be one of ``sizes`` (``what`` names the expected size) and,
    when georeferenced, its CRS and origin those of the window.
    """
    y0, x0, height, width = window
    label = LabelRaster(path, view.color_map, view.meta.num_classes)
    try:
        _check_georeference(path, label, source, y0, x0)
        if (label.height, label.width) not in sizes:
            raise PrepError(
                f"{path}: size {label.width}x{label.height} (WxH) does not match {what}"
            )
        return label.read_ids(0, 0, height, width)
    finally:
        label.close()


def _source_named(path: Path, view: StoreView) -> SourceMeta:
    """The source a whole-source mask belongs to: by source id, else by image file stem."""
    if path.stem in view.sources:
        return view.sources[path.stem]
    by_stem = [s for s in view.sources.values() if Path(s.image_path).stem == path.stem]
    if len(by_stem) == 1:
        return by_stem[0]
    if by_stem:
        ids = ", ".join(s.source_id for s in by_stem)
        raise PrepError(
            f"{path}: image stem {path.stem!r} names several sources ({ids}); name the mask "
            "after one source id instead"
        )
    example = next(iter(view.tiles.values()), None)
    raise PrepError(
        f"{path}: matches no source or tile of the store; name a mask like the source's image "
        f"file, its source id, or a tile ({example.name if example else 'SOURCE__r0_c0'})"
    )


def _check_georeference(
    path: Path, label: LabelRaster, source: SourceMeta, y0: int, x0: int
) -> None:
    """A georeferenced mask must share the source's CRS and sit on its pixel grid at (y0, x0)."""
    mask_crs, mask_transform = label.raster.crs, label.raster.transform
    if mask_crs is not None and source.crs is not None and not same_crs(mask_crs, source.crs):
        raise PrepError(
            f"{path}: CRS {_crs_name(mask_crs)} does not match source {source.source_id} "
            f"({_crs_name(source.crs)})"
        )
    if mask_transform is None or source.transform is None:
        return
    a, b, c, d, e, f = source.transform[:6]
    expected = (a, b, c + a * x0 + b * y0, d, e, f + d * x0 + e * y0)  # the window's origin
    tolerance = TRANSFORM_TOLERANCE_PX * min(abs(a) or 1.0, abs(e) or 1.0)
    if not np.allclose(mask_transform[:6], expected, rtol=0.0, atol=tolerance):
        raise PrepError(
            f"{path}: extent does not match source {source.source_id}: its origin is "
            f"({mask_transform[2]:.3f}, {mask_transform[5]:.3f}) with pixel size "
            f"{mask_transform[0]:g}x{mask_transform[4]:g}, expected ({expected[2]:.3f}, "
            f"{expected[5]:.3f}) with {a:g}x{e:g}"
        )


def same_crs(first: str, second: str) -> bool:
    """Whether two CRS descriptions (WKT, EPSG codes, ...) name the same CRS."""
    return bool(CRS.from_user_input(first) == CRS.from_user_input(second))


def _crs_name(crs: str) -> str:
    parsed = CRS.from_user_input(crs)
    epsg = parsed.to_epsg()
    return f"EPSG:{epsg}" if epsg is not None else parsed.to_string()[:60]


def cut_tiles(ids: np.ndarray, tiles: Sequence[TileSlot], origin: str) -> list[TileLabel]:
    """Tile labels of a whole-source H×W uint8 id raster, one per tile of ``tiles``."""
    return [
        TileLabel(
            tile.tile_id,
            tile.source_id,
            ids[tile.y0 : tile.y0 + tile.height, tile.x0 : tile.x0 + tile.width],
            f"{origin} (tile {tile.name})",
        )
        for tile in tiles
    ]


# ---------------------------------------------------------------------------------------------
# Polygons


@dataclass(frozen=True)
class Feature:
    """One polygon feature: GeoJSON-like ``geometry``, its class id, its number in the file."""

    geometry: Mapping[str, Any]
    class_id: int
    number: int


def vector_labels(path: Path, view: StoreView) -> list[TileLabel]:
    """Rasterise the file's polygons into every source they fall in, cut into tiles."""
    features, crs = read_gpkg(path) if path.suffix.lower() == ".gpkg" else read_geojson(path)
    classes = [_class_id(path, number, props, view) for number, (_, props) in enumerate(features)]
    parsed = [
        Feature(geometry, class_id, number)
        for number, ((geometry, _), class_id) in enumerate(zip(features, classes, strict=True))
    ]
    placed: set[int] = set()
    labels: list[TileLabel] = []
    for source in view.sources.values():
        shapes = _shapes_in(source, parsed, crs)
        if not shapes:
            continue
        placed.update(feature.number for feature, _ in shapes)
        ids = rasterise(source, [(geometry, f.class_id) for f, geometry in shapes])
        labels += cut_tiles(ids, view.tiles_of(source.source_id), str(path))
    outside = [f for f in parsed if f.number not in placed]
    if outside:
        bounds = shapely.geometry.shape(outside[0].geometry).bounds
        raise PrepError(
            f"{path}: feature {outside[0].number} (bounds {tuple(round(v, 3) for v in bounds)}"
            f" in {_crs_name(crs)}) falls in no source of the store; check its CRS and extent"
        )
    return labels


def rasterise(source: SourceMeta, shapes: Sequence[tuple[Mapping[str, Any], int]]) -> np.ndarray:
    """Burn (geometry in the source's CRS, class id) pairs into the source's pixel grid.

    Returns H×W uint8 class ids, IGNORE_INDEX outside every polygon; later shapes win where
    polygons overlap (``rasterio.features.rasterize``, pixel centres inside).
    """
    assert source.transform is not None, "only georeferenced sources take polygons"
    return rasterio.features.rasterize(
        shapes,
        out_shape=(source.height, source.width),
        transform=Affine(*source.transform[:6]),
        fill=C.IGNORE_INDEX,
        dtype="uint8",
    )


def _shapes_in(
    source: SourceMeta, features: Sequence[Feature], crs: str
) -> list[tuple[Feature, Mapping[str, Any]]]:
    """The features that intersect the source, with their geometry in the source's CRS."""
    if source.transform is None or source.crs is None:
        return []
    a, b, c, d, e, f = source.transform[:6]
    corners = [
        (a * x + b * y + c, d * x + e * y + f) for x, y in ((0, 0), (source.width, source.height))
    ]
    (x_a, y_a), (x_b, y_b) = corners
    extent = shapely.geometry.box(min(x_a, x_b), min(y_a, y_b), max(x_a, x_b), max(y_a, y_b))
    reproject = not same_crs(crs, source.crs)
    shapes = []
    for feature in features:
        geometry = feature.geometry
        if reproject:
            geometry = rasterio.warp.transform_geom(crs, source.crs, geometry)
        if shapely.geometry.shape(geometry).intersects(extent):
            shapes.append((feature, geometry))
    return shapes


def _class_id(path: Path, number: int, properties: Mapping[str, Any], view: StoreView) -> int:
    """A feature's class: a class name of the store, or an id below its class count."""
    value = properties.get(CLASS_PROPERTY)
    names = view.class_names()
    if isinstance(value, str) and value in names:
        return names.index(value)
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        class_id = int(value)
        if not len(out_of_range_ids(np.array([class_id]), view.meta.num_classes)):
            return class_id
    raise PrepError(
        f"{path}: feature {number} has {CLASS_PROPERTY}={value!r}; expected a class name "
        f"({', '.join(names)}) or a class id in {allowed_range(view.meta.num_classes)}"
    )


def read_geojson(path: Path) -> tuple[list[tuple[Mapping[str, Any], Mapping[str, Any]]], str]:
    """(geometry, properties) of every feature, and the CRS (``crs`` member, else CRS84)."""
    data = _load_json(path)
    if not isinstance(data, dict) or data.get("type") not in ("FeatureCollection", "Feature"):
        raise PrepError(f"{path}: expected a GeoJSON FeatureCollection or Feature")
    features = data.get("features", []) if data["type"] == "FeatureCollection" else [data]
    crs_name = ((data.get("crs") or {}).get("properties") or {}).get("name", GEOJSON_DEFAULT_CRS)
    out = []
    for number, feature in enumerate(features):
        geometry = (feature or {}).get("geometry")
        if not geometry or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            kind = (geometry or {}).get("type")
            raise PrepError(f"{path}: feature {number} is a {kind}; expected a (Multi)Polygon")
        out.append((geometry, feature.get("properties") or {}))
    return out, _parse_crs(path, crs_name)


def _parse_crs(path: Path, value: str) -> str:
    try:
        return str(CRS.from_user_input(value).to_wkt())
    except CRSError as err:
        raise PrepError(f"{path}: unknown CRS {value!r} ({err})") from err


def read_gpkg(path: Path) -> tuple[list[tuple[Mapping[str, Any], Mapping[str, Any]]], str]:
    """(geometry, properties) of every feature of a one-layer GeoPackage, and its CRS.

    Read with sqlite3: a GeoPackage geometry is a small header (magic ``GP``, flags, SRS id,
    optional envelope) followed by standard WKB.
    """
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            layers = db.execute(
                "SELECT g.table_name, g.column_name, s.definition FROM gpkg_geometry_columns g "
                "JOIN gpkg_spatial_ref_sys s ON s.srs_id = g.srs_id"
            ).fetchall()
            if len(layers) != 1:
                raise PrepError(f"{path}: expected one feature layer, found {len(layers)}")
            table, column, definition = layers[0]
            cursor = db.execute(f'SELECT * FROM "{table}"')
            names = [item[0] for item in cursor.description]
            rows = cursor.fetchall()
    except sqlite3.Error as err:
        raise PrepError(f"{path}: cannot read GeoPackage ({err})") from err
    features: list[tuple[Mapping[str, Any], Mapping[str, Any]]] = []
    for number, row in enumerate(rows):
        record = dict(zip(names, row, strict=True))
        geometry = shapely.geometry.mapping(_gpkg_geometry(path, number, record.pop(column)))
        if geometry["type"] not in ("Polygon", "MultiPolygon"):
            raise PrepError(
                f"{path}: feature {number} is a {geometry['type']}; expected a (Multi)Polygon"
            )
        features.append((geometry, record))
    return features, _parse_crs(path, definition)


def _gpkg_geometry(path: Path, number: int, blob: bytes | None) -> shapely.Geometry:
    if not blob or blob[:2] != b"GP":
        raise PrepError(f"{path}: feature {number} has no GeoPackage geometry")
    flags = blob[3]  # bit 0: byte order; bits 1-3: envelope kind (none, xy, xyz, xym, xyzm)
    kind = (flags >> 1) & 0b111
    if kind > 4:
        raise PrepError(f"{path}: feature {number} has an invalid GeoPackage envelope ({kind})")
    envelope_bytes = (0, 32, 48, 48, 64)[kind]
    return shapely.wkb.loads(bytes(blob[8 + envelope_bytes :]))


# ---------------------------------------------------------------------------------------------
# Label Studio


def label_studio_labels(path: Path, view: StoreView) -> list[TileLabel]:
    """Tile labels from a Label Studio export, through ``semisup.labelstudio.export_masks``."""
    from semisup.labelstudio import export_masks  # only Label Studio inputs need it

    try:
        masks = export_masks(path, view.class_names())
    except PrepError:
        raise
    except ValueError as err:  # an unknown label or unreadable region, named by task
        raise PrepError(str(err)) from err
    labels = []
    for name, mask in sorted(masks.items()):
        match = TILE_NAME.match(name)
        key = None if match is None else (match["source"], int(match["row"]), int(match["col"]))
        if key is None or key not in view.tiles:
            raise PrepError(f"{path}: task {name!r} names no tile of the store (SOURCE__rROW_cCOL)")
        tile = view.tiles[key]
        mask = np.asarray(mask)
        size = view.meta.tile_size
        if mask.shape not in ((tile.height, tile.width), (size, size)):
            raise PrepError(
                f"{path}: task {name}: mask shape {mask.shape} does not match the tile "
                f"({tile.height}, {tile.width})"
            )
        bad = out_of_range_ids(mask, view.meta.num_classes)
        if bad.size:
            raise PrepError(
                f"{path}: task {name}: class id {int(bad[0])} out of range; allowed "
                f"{allowed_range(view.meta.num_classes)}"
            )
        ids = mask[: tile.height, : tile.width].astype(np.uint8)
        labels.append(TileLabel(tile.tile_id, tile.source_id, ids, f"{path} (task {name})"))
    return labels

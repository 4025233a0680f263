"""Polygons per class from a class map GeoTIFF, band of rows by band of rows, as GeoJSON.

The finished class raster (band 1 of ``semisup predict``'s output) is read in bands of rows and
each band is polygonised with ``rasterio.features.shapes`` (4-connected regions of one class;
nodata is skipped). A region cut by a band border comes out as one piece per band; pieces that
share an edge on the border are dissolved (``shapely.unary_union``) as the next band is read. A
polygon is written out once it no longer touches the band being read, so only the polygons
crossing the current border are held, not the raster or the whole vector layer. Polygons are
built in pixel coordinates (exact integer edges, so shared edges match exactly) and mapped to
the raster's CRS by its affine transform when written.

GeoJSON output: a FeatureCollection with ``properties`` ``class`` (int) and ``area`` (in CRS
units squared: m² for a projected metric CRS), coordinates in the source CRS, and the (pre-RFC
7946) ``crs`` member naming it, ``urn:ogc:def:crs:EPSG::<code>`` when the CRS has an EPSG code,
else its WKT. GDAL and QGIS read that member; RFC 7946 readers assume WGS 84 and ignore it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, TextIO

import numpy as np
import rasterio
import rasterio.features
from rasterio.windows import Window

from semisup.blend import NODATA

ROWS_PER_BAND: Final = 1024


def polygonize(
    path: Path, *, min_area: float = 0.0, rows_per_band: int = ROWS_PER_BAND
) -> Iterator[tuple[int, Any]]:
    """(class id, shapely polygon in the raster's CRS) for every connected region of band 1 of
    ``path`` whose area (CRS units²) is at least ``min_area``; nodata (255) is skipped."""
    from shapely.affinity import affine_transform

    with rasterio.open(path) as ds:
        a, b, c, d, e, f = tuple(ds.transform)[:6]
        pixel_area = abs(a * e - b * d)
        height, width = ds.height, ds.width
        open_pieces: list[tuple[int, Any]] = []  # touching the bottom of the last band read
        for top in range(0, height, rows_per_band):
            bottom = min(top + rows_per_band, height)
            labels = ds.read(1, window=Window(0, top, width, bottom - top))
            pieces = _band_pieces(labels, top)
            done, open_pieces = _dissolve(open_pieces, pieces, top, bottom, height)
            for value, polygon in done:
                if polygon.area * pixel_area >= min_area:
                    yield value, affine_transform(polygon, [a, b, d, e, c, f])


def _band_pieces(labels: np.ndarray, top: int) -> list[tuple[int, Any]]:
    """Polygons (pixel coordinates: x = column, y = row) of the regions of one band of rows."""
    from shapely.geometry import shape

    transform = rasterio.Affine.translation(0, top)
    return [
        (int(value), shape(geometry))
        for geometry, value in rasterio.features.shapes(
            labels, mask=labels != NODATA, connectivity=4, transform=transform
        )
    ]


def _dissolve(
    carried: list[tuple[int, Any]],
    pieces: list[tuple[int, Any]],
    top: int,
    bottom: int,
    height: int,
) -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
    """Merge pieces of a band with the carried pieces they share an edge with on row ``top``.

    Returns (finished polygons, polygons touching row ``bottom`` to carry into the next band).
    Two pieces of one class that meet only at a corner stay apart, as 4-connectivity says.
    """
    import shapely

    parent = list(range(len(carried) + len(pieces)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    everything = carried + pieces
    for j, (value, piece) in enumerate(pieces, start=len(carried)):
        if piece.bounds[1] > top:  # does not reach the band's top row
            continue
        for i, (carried_value, old) in enumerate(carried):
            if carried_value != value or old.bounds[0] > piece.bounds[2]:
                continue
            if old.bounds[2] >= piece.bounds[0] and old.intersection(piece).length > 0:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(everything)):
        groups.setdefault(find(i), []).append(i)
    finished: list[tuple[int, Any]] = []
    still_open: list[tuple[int, Any]] = []
    for members in groups.values():
        value = everything[members[0]][0]
        polygon = (
            everything[members[0]][1]
            if len(members) == 1
            else shapely.unary_union([everything[i][1] for i in members])
        )
        reaches_bottom = bottom < height and polygon.bounds[3] >= bottom
        (still_open if reaches_bottom else finished).append((value, polygon))
    return finished, still_open


def crs_member(crs: rasterio.crs.CRS) -> dict[str, Any]:
    """The GeoJSON ``crs`` member naming ``crs`` (EPSG URN when it has a code, else WKT)."""
    code = crs.to_epsg()
    name = f"urn:ogc:def:crs:EPSG::{code}" if code else crs.to_wkt()
    return {"type": "name", "properties": {"name": name}}


def write_geojson(
    raster: Path, out: Path, *, min_area: float = 0.0, rows_per_band: int = ROWS_PER_BAND
) -> int:
    """Polygonise ``raster``'s class band into the GeoJSON file ``out``; returns the feature
    count. Written to ``out``.partial and renamed when complete. ``ValueError`` when the
    raster has no CRS (coordinates would mean nothing)."""
    with rasterio.open(raster) as ds:
        if ds.crs is None:
            raise ValueError(f"{raster} has no CRS: vector output needs georeferenced input")
        header = {"type": "FeatureCollection", "crs": crs_member(ds.crs)}
    staging = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(staging, "w") as fh:
        fh.write(json.dumps(header)[:-1] + ', "features": [\n')
        for value, polygon in polygonize(raster, min_area=min_area, rows_per_band=rows_per_band):
            _write_feature(fh, count, value, polygon)
            count += 1
        fh.write("\n]}\n")
    os.replace(staging, out)
    return count


def _write_feature(fh: TextIO, index: int, value: int, polygon: Any) -> None:
    import shapely

    feature = {
        "type": "Feature",
        "properties": {"class": value, "area": polygon.area},
        "geometry": json.loads(shapely.to_geojson(polygon)),
    }
    fh.write(("" if index == 0 else ",\n") + json.dumps(feature))

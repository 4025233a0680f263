"""Rasters to predict on, read window by window: GeoTIFF/COG files or the sources of a tile store.

``open_sources`` turns the paths given to ``semisup predict`` into ``RasterSource`` records
(plain, picklable: they travel into Ray read tasks); ``read_strip`` reads one band of rows of a
source, padded outside the raster, and cuts it into model windows. Nothing is read whole:
GeoTIFFs through rasterio windows (``data_prep.rasters``), stores through zarr slices.

Band rule (the student's, ``steps.prepare_batch``): the first three bands are used and a single
band is replicated; each band is scaled from [band_low, band_high] to [0, 1]. For a GeoTIFF
the range is that of ``data_prep.rasters.band_range`` (0..255 for uint8, the 2nd and 98th
percentiles of a decimated read for other dtypes), as ``semisup prep`` stores it for a store's
sources. A two-band raster has no such rule and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semisup import columns as C
from semisup import store as tile_store
from semisup.model_input import prepare_batch

GEOTIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class RasterSource:
    """One raster to predict on: a GeoTIFF (``source_id`` None) or a source group of a store."""

    path: str  # the GeoTIFF, or the Zarr tile store holding ``source_id``
    name: str  # output file stem: the file's stem, or the store's source id
    height: int
    width: int
    bands: int
    dtype: str
    band_low: tuple[float, ...]
    band_high: tuple[float, ...]
    crs: str | None = None  # WKT
    transform: tuple[float, ...] | None = None  # affine a, b, c, d, e, f
    source_id: str | None = None
    fingerprint: str = ""  # changes when the input does: file size and mtime, or the store's

    def describe(self) -> str:
        return self.path if self.source_id is None else f"{self.path} (source {self.source_id})"


def open_sources(paths: Sequence[str | Path]) -> list[RasterSource]:
    """``RasterSource`` records for GeoTIFF files, folders of them, and Zarr tile stores.

    A folder holding ``zarr.json`` is a tile store: every source in it is predicted. Other files
    ``data_prep.rasters`` reads (PNG/JPEG, ``.npy``) are accepted, but PNG/JPEG are decoded
    whole, so only GeoTIFFs (and stores) keep memory bounded. Raises
    ``FileNotFoundError`` for a missing path or an empty folder, ``ValueError`` for a raster
    the band rule cannot feed to the student (two bands) or one rasterio cannot read.
    """
    sources: list[RasterSource] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir() and (path / "zarr.json").is_file():
            sources += _store_sources(path)
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in GEOTIFF_SUFFIXES)
            if not files:
                raise FileNotFoundError(f"{path}: no GeoTIFF (*.tif, *.tiff) in this folder")
            sources += [_geotiff_source(p) for p in files]
        elif path.is_file():
            sources.append(_geotiff_source(path))
        else:
            raise FileNotFoundError(f"{path}: no such raster, folder or tile store")
    for source in sources:
        check_bands(source)
    return sources


def check_bands(source: RasterSource) -> None:
    """``ValueError`` unless the band rule gives the student three bands from ``source``."""
    if source.bands == 2:
        raise ValueError(
            f"{source.describe()} has 2 bands; the student takes 3: a single band is "
            "replicated and the first three of 3 or more bands are used"
        )


def _geotiff_source(path: Path) -> RasterSource:
    from data_prep.rasters import band_range, open_raster

    stat = path.stat()
    with open_raster(path) as raster:
        low, high = band_range(raster)
        return RasterSource(
            path=str(path.resolve()),
            name=path.stem,
            height=raster.height,
            width=raster.width,
            bands=raster.bands,
            dtype=raster.dtype.name,
            band_low=low,
            band_high=high,
            crs=raster.crs,
            transform=raster.transform,
            fingerprint=f"{stat.st_size}-{stat.st_mtime_ns}",
        )


def _store_sources(path: Path) -> list[RasterSource]:
    root = tile_store.open_store(str(path), "r")
    meta = tile_store.read_store_meta(root)
    sources = []
    for source_id in meta.sources:
        source = tile_store.read_source_meta(root, source_id)
        sources.append(
            RasterSource(
                path=str(path.resolve()),
                name=source_id,
                height=source.height,
                width=source.width,
                bands=source.bands,
                dtype=source.dtype,
                band_low=source.band_low,
                band_high=source.band_high,
                crs=source.crs,
                transform=source.transform,
                source_id=source_id,
                fingerprint=meta.fingerprint,
            )
        )
    return sources


class _RasterArray:
    """A ``data_prep.rasters.Raster`` as the 2-D sliceable array ``store.read_window`` takes:
    its pixels (H×W×C) or, with ``valid=True``, its valid-data mask (H×W bool)."""

    def __init__(self, raster: Any, valid: bool) -> None:
        self.raster, self.is_valid = raster, valid
        self.shape = (raster.height, raster.width) + (() if valid else (raster.bands,))
        self.dtype = np.dtype(bool) if valid else raster.dtype

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        window = (rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start)
        return self.raster.read_valid(*window) if self.is_valid else self.raster.read(*window)


def source_arrays(source: RasterSource) -> tuple[Any, Any]:
    """(image H×W×C, valid H×W) of ``source`` as sliceable arrays for ``store.read_window``;
    a GeoTIFF stays open (rasterio) until they are dropped, a store's arrays are zarr arrays."""
    if source.source_id is None:
        from data_prep.rasters import open_raster

        raster = open_raster(Path(source.path))
        return _RasterArray(raster, False), _RasterArray(raster, True)
    group: Any = tile_store.open_store(source.path, "r")[source.source_id]
    return group[C.IMAGE], group[C.VALID]


def read_strip(
    source: RasterSource,
    y0: int,
    x_starts: Sequence[int],
    tile: int,
    arrays: tuple[Any, Any] | None = None,
) -> dict[str, np.ndarray]:
    """The windows at row ``y0`` and columns ``x_starts`` of ``source``, ready for the student.

    Reads the rows [y0, y0 + tile) once, from the first window's left to the last window's right
    edge, padded outside the raster (image 0, not valid), from ``arrays`` (``source_arrays``,
    opened here when None). Returns ``IMAGE`` N×3×T×T float32 in [0, 1] (the band rule, see the
    module docstring) and ``VALID`` N×T×T bool, N = len(x_starts).
    """
    image_array, valid_array = arrays or source_arrays(source)
    left, width = x_starts[0], x_starts[-1] + tile - x_starts[0]
    image = tile_store.read_window(image_array, y0, left, tile, width)
    valid = tile_store.read_window(valid_array, y0, left, tile, width, False)
    cuts = [slice(x - left, x - left + tile) for x in x_starts]
    batch = {
        C.IMAGE: np.stack([image[:, cut] for cut in cuts]),  # N×T×T×C source dtype
        C.VALID: np.stack([valid[:, cut] for cut in cuts]),  # N×T×T
        C.SOURCE: np.array([source.name] * len(cuts)),
    }
    prepared = prepare_batch(batch, {source.name: (source.band_low, source.band_high)})
    return {C.IMAGE: prepared[C.IMAGE].numpy(), C.VALID: batch[C.VALID]}

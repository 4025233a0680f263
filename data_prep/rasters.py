"""Reading rasters window by window: GeoTIFF/COG (rasterio), PNG/JPEG (Pillow) and ``.npy``.

Every reader exposes the same small surface (``Raster``): size, band count, dtype, georeferencing
and windowed ``read``/``read_valid``, so ingest never needs to know the file format. GeoTIFFs are
read through rasterio windows and ``.npy`` files through a memory map, so a raster larger than
RAM streams through. PNG and JPEG have no windowed decoder: they are decoded whole on first read
(use GeoTIFF for large rasters).
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import rasterio
import rasterio.enums
import rasterio.errors
import rasterio.windows
from PIL import Image

from data_prep.errors import PrepError

# Suffixes picked up when an input is a folder (case-insensitive). Explicitly named files of any
# other suffix are still opened, through rasterio (e.g. .jp2, .vrt).
RASTER_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy")
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_DTYPES = ("uint8", "uint16")
# Side of the decimated read for 16-bit percentiles: 2048² = 4 Mpx per band is plenty for a
# 2nd/98th percentile and bounds the time spent on a huge raster.
STATS_MAX_SIDE = 2048
PERCENTILES = (2.0, 98.0)  # the usual contrast stretch of 16-bit imagery to 8 bit


class Raster(ABC):
    """One open raster.

    Attributes: ``height``, ``width``, ``bands`` (C), ``dtype`` (numpy dtype), ``crs`` (WKT or
    None), ``transform`` (affine a, b, c, d, e, f or None when not georeferenced), ``nodata``
    (float or None) and ``palette`` (256×3 uint8 when read with ``keep_palette`` and the file
    has one, else None).
    """

    path: Path
    height: int
    width: int
    bands: int
    dtype: np.dtype[Any]
    crs: str | None = None
    transform: tuple[float, ...] | None = None
    nodata: float | None = None
    palette: np.ndarray | None = None

    @abstractmethod
    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Pixels of the window: h×w×C in ``dtype``. The window must lie inside the raster."""

    @abstractmethod
    def read_valid(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Valid-data mask of the window: h×w bool, False at nodata / transparent pixels."""

    def read_decimated(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole raster subsampled to at most ``max_side`` pixels per side.

        Returns (image h'×w'×C in ``dtype``, valid h'×w' bool). Every pixel when the raster fits.
        """
        step_y, step_x = math.ceil(self.height / max_side), math.ceil(self.width / max_side)
        image = self.read(0, 0, self.height, self.width)[::step_y, ::step_x]
        valid = self.read_valid(0, 0, self.height, self.width)[::step_y, ::step_x]
        return image, valid

    def close(self) -> None:  # noqa: B027 - optional hook, most readers hold nothing open
        pass

    def __enter__(self) -> Raster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {self.height}x{self.width}x{self.bands} {self.dtype})"


class GeoTiffRaster(Raster):
    """A rasterio dataset; every read is a window, so size is bounded by the file system only."""

    def __init__(self, path: Path, keep_palette: bool = False) -> None:
        self.path = path
        with warnings.catch_warnings():
            # Plain (non-georeferenced) TIFFs are fine: they get transform None below.
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self._ds = rasterio.open(path)
        ds = self._ds
        # An alpha band is a validity mask (it feeds dataset_mask), not image content.
        self._indexes = [
            i + 1 for i, ci in enumerate(ds.colorinterp) if ci != rasterio.enums.ColorInterp.alpha
        ] or list(range(1, ds.count + 1))
        self.height, self.width, self.bands = ds.height, ds.width, len(self._indexes)
        dtypes = {ds.dtypes[i - 1] for i in self._indexes}
        if len(dtypes) != 1:
            ds.close()
            raise PrepError(f"{path}: bands have different dtypes {sorted(dtypes)}")
        self.dtype = np.dtype(ds.dtypes[self._indexes[0] - 1])
        self.crs = ds.crs.to_wkt() if ds.crs is not None else None
        georeferenced = ds.crs is not None or not ds.transform.is_identity
        self.transform = tuple(float(v) for v in ds.transform[:6]) if georeferenced else None
        self.nodata = float(ds.nodata) if ds.nodata is not None else None
        if keep_palette and self.bands == 1:
            try:
                colormap = ds.colormap(self._indexes[0])
            except ValueError:  # rasterio raises when the band has no colour table
                colormap = None
            if colormap:
                palette = np.zeros((256, 3), dtype=np.uint8)
                for index, rgba in colormap.items():
                    if 0 <= index < 256:
                        palette[index] = rgba[:3]
                self.palette = palette

    def _window(self, y0: int, x0: int, h: int, w: int) -> rasterio.windows.Window:
        return rasterio.windows.Window(x0, y0, w, h)  # rasterio orders windows col, row, w, h

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        data = self._ds.read(self._indexes, window=self._window(y0, x0, h, w))  # C×h×w
        return np.ascontiguousarray(np.moveaxis(data, 0, -1))  # h×w×C

    def read_valid(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        # GDAL's dataset mask: per-dataset mask band, alpha, or nodata (valid where any band is).
        return np.asarray(self._ds.dataset_mask(window=self._window(y0, x0, h, w)) > 0)

    def read_decimated(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        step_y, step_x = math.ceil(self.height / max_side), math.ceil(self.width / max_side)
        if step_y == step_x == 1:
            return super().read_decimated(max_side)
        # GDAL decimates while reading (nearest), using overviews when the file has them.
        shape = (math.ceil(self.height / step_y), math.ceil(self.width / step_x))
        data = self._ds.read(
            self._indexes,
            out_shape=(self.bands, *shape),
            resampling=rasterio.enums.Resampling.nearest,
        )
        valid = self._ds.dataset_mask(out_shape=shape, resampling=rasterio.enums.Resampling.nearest)
        return np.moveaxis(data, 0, -1), np.asarray(valid > 0)

    def close(self) -> None:
        self._ds.close()


class PillowRaster(Raster):
    """PNG or JPEG, decoded whole on first read; RGBA/LA alpha is the valid mask.

    Palette images become RGB (RGBA with transparency) unless ``keep_palette``, in which case the
    palette indices are the single band and ``palette`` holds the colours (labels.py decides).
    """

    def __init__(self, path: Path, keep_palette: bool = False) -> None:
        self.path = path
        self._keep_palette = keep_palette
        with Image.open(path) as img:  # reads the header only
            self.width, self.height = img.size
            mode = img.mode
        self._mode = mode
        self._pixels: np.ndarray | None = None
        self._alpha: np.ndarray | None = None
        if mode == "P" and keep_palette:
            self.bands, self.dtype = 1, np.dtype(np.uint8)
        elif mode.startswith("I;16"):
            self.bands, self.dtype = 1, np.dtype(np.uint16)
        elif mode in ("I", "F"):
            self.bands, self.dtype = 1, np.dtype(np.int32 if mode == "I" else np.float32)
        elif mode in ("1", "L", "LA"):
            self.bands, self.dtype = 1, np.dtype(np.uint8)
        else:
            self.bands, self.dtype = 3, np.dtype(np.uint8)

    def _decode(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._pixels is not None:
            return self._pixels, self._alpha
        try:
            with Image.open(self.path) as img:
                img.load()
                pixels, alpha = self._to_array(img)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise PrepError(f"{self.path}: cannot decode image ({err})") from err
        self._pixels, self._alpha = pixels, alpha
        return pixels, alpha

    def _to_array(self, img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
        mode = img.mode
        alpha = None
        if mode == "P" and self._keep_palette:
            raw = img.getpalette() or []
            palette = np.zeros((256, 3), dtype=np.uint8)
            colours = np.asarray(raw[: 256 * 3], dtype=np.uint8).reshape(-1, 3)
            palette[: len(colours)] = colours
            self.palette = palette
            return np.asarray(img, dtype=np.uint8)[..., None], None
        if mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif mode == "PA":
            img = img.convert("RGBA")
        elif mode == "1":
            img = img.convert("L")
        elif mode not in ("L", "LA", "RGB", "RGBA", "I", "F") and not mode.startswith("I;16"):
            img = img.convert("RGB")  # CMYK / YCbCr JPEGs and other exotic modes
        array = np.asarray(img)
        if img.mode in ("LA", "RGBA"):
            alpha = array[..., -1] > 0
            array = array[..., :-1]
        if array.ndim == 2:
            array = array[..., None]  # H×W -> H×W×1
        return np.ascontiguousarray(array, dtype=self.dtype), alpha

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        pixels, _ = self._decode()
        return pixels[y0 : y0 + h, x0 : x0 + w]

    def read_valid(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        _, alpha = self._decode()
        if alpha is None:
            return np.ones((h, w), dtype=bool)
        return alpha[y0 : y0 + h, x0 : x0 + w]


class NpyRaster(Raster):
    """A ``.npy`` array, H×W or H×W×C, memory-mapped; every pixel is valid."""

    def __init__(self, path: Path, keep_palette: bool = False) -> None:
        self.path = path
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise PrepError(f"{path}: cannot read .npy file ({err})") from err
        if array.ndim not in (2, 3):
            raise PrepError(f"{path}: expected an H×W or H×W×C array, got shape {array.shape}")
        self._array = array
        self.height, self.width = array.shape[:2]
        self.bands = 1 if array.ndim == 2 else array.shape[2]
        self.dtype = array.dtype.newbyteorder("=") if array.dtype.byteorder == ">" else array.dtype

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        window = np.asarray(self._array[y0 : y0 + h, x0 : x0 + w], dtype=self.dtype)
        return window[..., None] if window.ndim == 2 else window

    def read_valid(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return np.ones((h, w), dtype=bool)

    def read_decimated(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        step_y, step_x = math.ceil(self.height / max_side), math.ceil(self.width / max_side)
        # Strided view of the memory map: only the sampled pixels are paged in.
        image = np.asarray(self._array[::step_y, ::step_x], dtype=self.dtype)
        image = image[..., None] if image.ndim == 2 else image
        return image, np.ones(image.shape[:2], dtype=bool)


def open_raster(path: str | Path, keep_palette: bool = False) -> Raster:
    """Open ``path`` with the reader its suffix calls for; unreadable files raise PrepError."""
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return NpyRaster(path)
        if suffix in PILLOW_SUFFIXES:
            return PillowRaster(path, keep_palette=keep_palette)
        return GeoTiffRaster(path, keep_palette=keep_palette)
    except PrepError:
        raise
    except Image.DecompressionBombError as err:
        raise PrepError(f"{path}: too large to decode as PNG/JPEG; convert it to GeoTIFF") from err
    except (OSError, ValueError, rasterio.errors.RasterioError) as err:
        raise PrepError(f"{path}: cannot read raster ({err})") from err


def check_image_dtype(raster: Raster) -> None:
    """Raise unless the raster's dtype is one the store and the SAM teacher handle."""
    if raster.dtype.name not in IMAGE_DTYPES:
        raise PrepError(
            f"{raster.path}: unsupported image dtype {raster.dtype.name}; "
            f"supported: {', '.join(IMAGE_DTYPES)}"
        )


def band_range(
    raster: Raster, max_side: int = STATS_MAX_SIDE
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band (low, high) for scaling to 8 bit (``semisup.store.scale_to_uint8``).

    uint8: 0 and 255, the identity. uint16: the 2nd and 98th percentile (``np.percentile``,
    linear interpolation) of each band's valid pixels in ``raster.read_decimated(max_side)``,
    which is every pixel when the raster is at most ``max_side`` (2048) px on a side, else a
    nearest-neighbour subsample. A band with no valid pixel gets 0 and 65535.
    """
    if raster.dtype == np.uint8:
        return (0.0,) * raster.bands, (255.0,) * raster.bands
    pixels, valid = raster.read_decimated(max_side)  # h'×w'×C, h'×w'
    values = pixels[valid]  # n×C
    if not len(values):
        full = float(np.iinfo(raster.dtype).max)
        return (0.0,) * raster.bands, (full,) * raster.bands
    low, high = np.percentile(values, PERCENTILES, axis=0)  # C each
    return tuple(float(v) for v in low), tuple(float(v) for v in high)


def list_rasters(folder: Path) -> list[Path]:
    """Raster files directly inside ``folder`` (not recursive), sorted by name."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES
    )

"""The class map GeoTIFF, written band of rows by band of rows, resumably.

Output of ``semisup predict`` for one raster, ``OUT.tif``:

- band 1 ``class``: uint8 class ids; band 2 ``confidence_percent``: uint8, round(100 · the
  blended probability of the chosen class), 0..100; 255 in both where the input is nodata
  (the dataset's nodata value);
- the input's size, CRS and transform; tiled 512×512, DEFLATE-compressed; with ``cog=True``
  copied into a Cloud Optimized GeoTIFF with overviews (mode resampling) once complete;
- the tag ``semisup_predict``: the JSON identity of the run (model, window settings, input).

While it is written, the pixels go to ``OUT.tif.partial`` (a tiled GeoTIFF) and the rows
finished so far, per vertical stripe, to ``OUT.tif.progress.json``. Each band of rows is
written and the file closed (flushed) before the progress record is replaced (atomically), so
the record never claims rows that are not on disk. A rerun with the same identity continues
from the record; once every row is written the partial file becomes ``OUT.tif`` (renamed, or
copied into a COG) and the record is deleted, so a partial output never looks complete.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import rasterio
import rasterio.errors
import rasterio.shutil
from rasterio.windows import Window

from semisup.atomic import write_json_atomic
from semisup.blend import NODATA

BLOCK: Final = 512  # px, GeoTIFF tile side (the COG driver's default too)
TAG: Final = "semisup_predict"
BAND_NAMES: Final = ("class", "confidence_percent")


def partial_path(path: Path) -> Path:
    """The file a map is written to until it is complete."""
    return path.with_name(path.name + ".partial")


def progress_path(path: Path) -> Path:
    """The JSON file that records a map's finished rows, for resuming."""
    return path.with_name(path.name + ".progress.json")


def read_identity(path: Path) -> dict[str, Any] | None:
    """The ``semisup_predict`` tag of a finished output (None when absent or unreadable)."""
    try:
        with rasterio.open(path) as ds:
            text = ds.tags().get(TAG)
    except rasterio.errors.RasterioError:
        return None
    return json.loads(text) if text else None


def describe_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """``key: old vs new`` for every top-level key that differs."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} vs {new.get(k)!r}" for k in keys)


class MapWriter:
    """Writes one class map; rows arrive stripe by stripe, top to bottom within a stripe.

    ``stripes``: the [x0, x1) column ranges (``blend.stripe_bounds``); ``profile``: height,
    width, crs, transform of the input. ``state`` after construction: ``"done"`` (the output
    exists with this identity: nothing to do), ``"resume"`` or ``"new"``; ``rows_done[i]``:
    rows of stripe i already on disk.
    """

    def __init__(
        self,
        path: Path,
        *,
        height: int,
        width: int,
        crs: str | None,
        transform: tuple[float, ...] | None,
        stripes: list[tuple[int, int]],
        identity: dict[str, Any],
        overwrite: bool = False,
        cog: bool = False,
    ) -> None:
        self.path, self.height, self.width = path, height, width
        self.crs, self.transform, self.cog = crs, transform, cog
        self.stripes, self.identity = stripes, identity
        self.rows_done = [0] * len(stripes)
        self.partial, self.progress = partial_path(path), progress_path(path)
        self._pending: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.state = self._decide(overwrite)

    def _decide(self, overwrite: bool) -> str:
        if overwrite:
            return "new"
        found = read_identity(self.path) if self.path.exists() else None
        if found == self.identity:
            self.rows_done = [self.height] * len(self.stripes)
            return "done"
        if self.partial.exists() and self.progress.exists():
            record = json.loads(self.progress.read_text())
            if record.get("identity") != self.identity:
                differs = describe_difference(record.get("identity") or {}, self.identity)
                raise FileExistsError(
                    f"{self.partial} is an interrupted run with other settings ({differs}); "
                    "pass --overwrite to discard it"
                )
            self.rows_done = [int(v) for v in record["rows_done"]]
            return "resume"
        if self.path.exists():
            differs = describe_difference(found, self.identity) if found else "not ours"
            raise FileExistsError(
                f"{self.path} exists from another run ({differs}); pass --overwrite to replace it"
            )
        return "new"

    @property
    def complete(self) -> bool:
        return all(done >= self.height for done in self.rows_done)

    def start(self) -> None:
        """Create the partial file and an empty progress record (state ``new``)."""
        if self.state != "new":
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in (self.partial, self.progress):  # an existing output is replaced at finish
            stale.unlink(missing_ok=True)
        profile = {
            "driver": "GTiff",
            "height": self.height,
            "width": self.width,
            "count": len(BAND_NAMES),
            "dtype": "uint8",
            "nodata": NODATA,
            "tiled": True,
            "blockxsize": BLOCK,
            "blockysize": BLOCK,
            "compress": "deflate",
            "bigtiff": "if_safer",
            "sparse_ok": True,  # blocks not yet written take no space
        }
        if self.crs is not None:
            profile["crs"] = rasterio.crs.CRS.from_wkt(self.crs)
        if self.transform is not None:
            profile["transform"] = rasterio.Affine(*self.transform[:6])
        with warnings.catch_warnings():  # an input without georeferencing gives an output without
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            ds = rasterio.open(self.partial, "w", **profile)
        with ds:
            for index, name in enumerate(BAND_NAMES, start=1):
                ds.set_band_description(index, name)
            ds.update_tags(**{TAG: json.dumps(self.identity, sort_keys=True)})
        self._record()

    def _record(self) -> None:
        write_json_atomic(self.progress, {"identity": self.identity, "rows_done": self.rows_done})

    def add_rows(self, stripe: int, y0: int, label: np.ndarray, confidence: np.ndarray) -> None:
        """Rows [y0, y0 + h) of ``stripe`` (h×stripe-width uint8 each), in order; written once
        whole GeoTIFF block rows (or the last rows) are in."""
        if len(label):
            self._pending.append((y0, label, confidence))
        if not self._pending:
            return
        start = self._pending[0][0]
        end = self._pending[-1][0] + len(self._pending[-1][1])
        flush_to = end if end >= self.height else end // BLOCK * BLOCK
        if flush_to <= start:
            return
        labels = np.concatenate([rows for _, rows, _ in self._pending])
        confidences = np.concatenate([rows for _, _, rows in self._pending])
        count = flush_to - start
        self._write(stripe, start, labels[:count], confidences[:count])
        self._pending = (
            [(flush_to, labels[count:], confidences[count:])] if count < len(labels) else []
        )

    def _write(self, stripe: int, y0: int, label: np.ndarray, confidence: np.ndarray) -> None:
        x0, x1 = self.stripes[stripe]
        window = Window(x0, y0, x1 - x0, len(label))  # rasterio windows are col, row, w, h
        # closing the dataset flushes the blocks to disk before the record says they are there
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            ds = rasterio.open(self.partial, "r+")
        with ds:
            ds.write(label, 1, window=window)
            ds.write(confidence, 2, window=window)
        self.rows_done[stripe] = y0 + len(label)
        self._record()

    def finish(self) -> Path:
        """Move the completed partial file to ``path`` (as a COG when asked); drop the record."""
        if not self.complete:
            raise RuntimeError(f"{self.path}: finish() before every row was written")
        if self.cog:
            staging = self.path.with_name(self.path.name + ".cog")
            rasterio.shutil.copy(
                self.partial,
                staging,
                driver="COG",
                compress="DEFLATE",
                blocksize=BLOCK,
                overview_resampling="MODE",  # class ids must not be averaged
                bigtiff="IF_SAFER",
            )
            os.replace(staging, self.path)
            self.partial.unlink()
        else:
            os.replace(self.partial, self.path)
        self.progress.unlink(missing_ok=True)
        return self.path

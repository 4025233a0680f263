"""Label rasters to class ids: class-id rasters, colour-coded masks and their colour maps.

A colour map is JSON ``{"#RRGGBB": class_id}``; ``255`` (IGNORE_INDEX) marks colours that carry
no supervision (e.g. "unlabeled" and "void"). Colour-coded masks are read as RGB (palette PNGs and
GeoTIFF colour tables are expanded through their palette first); a single-band 8-bit mask read
with a colour map is grey, ``#vvvvvv``, so a 0/255 footprint mask works with
``{"#000000": 0, "#FFFFFF": 1}``. Without a colour map a single-band integer raster holds the
class ids themselves, ``255`` meaning ignore.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.errors import PrepError
from data_prep.rasters import Raster, open_raster
from semisup import columns as C

# Packed 0xRRGGBB colour -> class id.
ColorMap = dict[int, int]

_HEX = re.compile(r"^#?([0-9a-fA-F]{6})$")
MAX_CLASSES = C.IGNORE_INDEX  # ids 0..254 are classes, 255 is IGNORE_INDEX; stored as uint8


class UnknownColorsError(PrepError):
    """Mask pixels whose colour the colour map does not list; ``counts`` maps hex -> pixels."""

    def __init__(self, counts: Mapping[str, int], where: str = "") -> None:
        self.counts = dict(counts)
        listed = ", ".join(f"{hex_} ({n} px)" for hex_, n in self.counts.items())
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}colours not in the colour map: {listed}")


def hex_color(packed: int) -> str:
    """0xRRGGBB -> ``"#RRGGBB"``."""
    return f"#{packed:06X}"


def parse_color_map(data: Mapping[str, Any], source: str = "colour map") -> ColorMap:
    """Validate ``{"#RRGGBB": class_id}`` and pack it; ``source`` names it in errors."""
    if not isinstance(data, Mapping) or not data:
        raise PrepError(f'{source}: expected a non-empty JSON object {{"#RRGGBB": class_id}}')
    color_map: ColorMap = {}
    for key, value in data.items():
        match = _HEX.match(str(key).strip())
        if match is None:
            raise PrepError(f'{source}: key {key!r} is not a colour like "#RRGGBB"')
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            raise PrepError(
                f"{source}: colour {key} maps to {value!r}; expected a class id in "
                f"[0, {MAX_CLASSES - 1}] or {C.IGNORE_INDEX} (ignore)"
            )
        packed = int(match.group(1), 16)
        if packed in color_map:
            raise PrepError(f"{source}: colour {hex_color(packed)} is listed twice")
        color_map[packed] = value
    return color_map


def load_color_map(path: str | Path) -> ColorMap:
    """Read and validate a JSON colour map file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise PrepError(f"colour map {path}: no such file") from err
    except (OSError, json.JSONDecodeError) as err:
        raise PrepError(f"colour map {path}: cannot read JSON ({err})") from err
    return parse_color_map(data, source=f"colour map {path}")


def color_map_num_classes(color_map: ColorMap) -> int | None:
    """Max non-ignore class id + 1; None when every colour is ignored."""
    ids = [v for v in color_map.values() if v != C.IGNORE_INDEX]
    return max(ids) + 1 if ids else None


def check_color_map_ids(color_map: ColorMap, num_classes: int, source: str = "colour map") -> None:
    """Raise if a colour maps to an id that is neither a class (< num_classes) nor ignore."""
    bad = {hex_color(k): v for k, v in color_map.items() if num_classes <= v != C.IGNORE_INDEX}
    if bad:
        listed = ", ".join(f"{k} -> {v}" for k, v in bad.items())
        raise PrepError(
            f"{source}: label id out of range: {listed}; allowed {allowed_range(num_classes)} "
            f"with num_classes={num_classes}"
        )


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """H×W×3 uint8 -> H×W uint32 0xRRGGBB."""
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def colors_to_ids(rgb: np.ndarray, color_map: ColorMap) -> np.ndarray:
    """Map every pixel's colour to its class id.

    ``rgb``: H×W×3 uint8. Returns H×W uint8 class ids (255 = ignore). Raises UnknownColorsError
    listing each colour absent from ``color_map`` with its pixel count.
    """
    packed = pack_rgb(rgb)
    keys = np.array(sorted(color_map), dtype=np.uint32)
    values = np.array([color_map[int(k)] for k in keys], dtype=np.uint8)
    # Binary search against the few known colours: no per-colour pass over the block.
    index = np.minimum(np.searchsorted(keys, packed), len(keys) - 1)
    known = keys[index] == packed
    if not known.all():
        colours, counts = np.unique(packed[~known], return_counts=True)
        order = np.argsort(-counts, kind="stable")
        raise UnknownColorsError({hex_color(int(colours[i])): int(counts[i]) for i in order})
    return values[index]


def out_of_range_ids(ids: np.ndarray, num_classes: int | None) -> np.ndarray:
    """Sorted distinct ids that are neither a class (< num_classes) nor IGNORE_INDEX.

    ``ids``: any integer array. With ``num_classes`` None every id in [0, 254] is a class.
    """
    limit = MAX_CLASSES if num_classes is None else num_classes
    bad = (ids < 0) | ((ids >= limit) & (ids != C.IGNORE_INDEX))
    return np.unique(ids[bad]) if bad.any() else np.empty(0, dtype=ids.dtype)


def allowed_range(num_classes: int | None) -> str:
    """The class ids a label raster may hold, as text for error messages."""
    limit = MAX_CLASSES if num_classes is None else num_classes
    return f"[0, {limit - 1}] or {C.IGNORE_INDEX} (ignore)"


class LabelRaster:
    """A label file read window by window as class ids.

    ``read_ids`` returns h×w uint8 class ids with IGNORE_INDEX where the file has no label
    (unlisted-as-class colours mapped to 255, and nodata/transparent pixels). Ids are checked
    against ``num_classes`` block by block; ``max_id`` tracks the largest class id seen so that
    the class count can be inferred when neither it nor a colour map is given.
    """

    def __init__(self, path: Path, color_map: ColorMap | None, num_classes: int | None) -> None:
        self.path = path
        self.color_map = color_map
        self.num_classes = num_classes
        self.max_id = -1
        self.raster: Raster = open_raster(path, keep_palette=True)
        raster = self.raster
        self.height, self.width = raster.height, raster.width
        if color_map is None:
            if raster.bands != 1:
                raster.close()
                raise PrepError(
                    f"{path}: a {raster.bands}-band label looks colour-coded; "
                    "pass a colour map (--label-colors) to turn its colours into class ids"
                )
            if raster.dtype.kind not in "uib":
                raster.close()
                raise PrepError(
                    f"{path}: class-id labels must be integers, got dtype {raster.dtype.name}"
                )
        elif raster.dtype != np.uint8 or raster.bands not in (1, 3):
            raster.close()
            raise PrepError(
                f"{path}: a colour-coded mask must be 8-bit RGB, palette or grey; got "
                f"{raster.bands} band(s) of {raster.dtype.name}"
            )

    def read_ids(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Class ids of the window: h×w uint8, IGNORE_INDEX where unlabelled."""
        raw = self.raster.read(y0, x0, h, w)  # h×w×C
        # Nodata / transparent label pixels carry no supervision, whatever value they hold, so
        # they are neither colour-mapped nor range-checked.
        valid = self.raster.read_valid(y0, x0, h, w)  # h×w bool
        ids = np.full((h, w), C.IGNORE_INDEX, dtype=np.uint8)
        if self.color_map is not None:
            # Colour-map ids were range-checked once when the map was read (check_color_map_ids).
            rgb = self._as_rgb(raw)[valid][None]  # 1×n×3, the valid pixels
            try:
                ids[valid] = colors_to_ids(rgb, self.color_map)[0]
            except UnknownColorsError as err:
                raise UnknownColorsError(
                    err.counts, where=f"{self.path} (rows {y0}-{y0 + h - 1})"
                ) from None
        else:
            values = raw[..., 0][valid]  # n
            bad = out_of_range_ids(values, self.num_classes)
            if bad.size:
                raise PrepError(self._range_message(bad))
            ids[valid] = values
        labelled = ids[ids != C.IGNORE_INDEX]
        if labelled.size:
            self.max_id = max(self.max_id, int(labelled.max()))
        return ids

    def _as_rgb(self, raw: np.ndarray) -> np.ndarray:
        if self.raster.palette is not None:
            return self.raster.palette[raw[..., 0]]  # h×w palette index -> h×w×3
        if raw.shape[-1] == 1:
            return np.repeat(raw, 3, axis=-1)  # grey v -> #vvvvvv
        return raw

    def _range_message(self, bad: np.ndarray) -> str:
        shown = ", ".join(str(int(v)) for v in bad[:20]) + (" ..." if bad.size > 20 else "")
        return (
            f"{self.path}: label id out of range: {shown}; allowed "
            f"{allowed_range(self.num_classes)}"
            + ("" if self.num_classes is None else f" with num_classes={self.num_classes}")
        )

    def close(self) -> None:
        self.raster.close()

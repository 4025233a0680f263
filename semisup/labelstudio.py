"""Label Studio tasks for proposed tiles, and Label Studio exports read back as class masks.

``write_tasks`` turns chosen tiles of a store into a folder Label Studio imports::

    OUT/
      images/<source_id>__r<row>_c<col>.png   the tile window as 8-bit RGB (display scaling)
      tasks.json                               one task per tile, the model's prediction attached
      label_config.xml                         the labelling interface: the store's class names

Each task's ``predictions`` hold the student's class map as one ``brushlabels`` result per class
present (Label Studio's brush RLE), so the annotator corrects a pre-drawn map instead of drawing
one. ``export_masks`` reads a Label Studio JSON export (``brushlabels`` and ``polygonlabels``
results) back into H×W uint8 class-id masks, ``IGNORE_INDEX`` where nothing was drawn.

The brush RLE is the bit-packed run-length code of Label Studio's frontend (thi.ng/rle-pack, as
``label_studio_sdk.converter.brush`` encodes and decodes it), implemented here in NumPy so that
nothing of Label Studio is needed at run time. The encoded array is the H×W×4 RGBA image,
row-major; a pixel belongs to the region where its alpha is at least ``ALPHA_DRAWN``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast
from xml.sax.saxutils import quoteattr

import numpy as np
import pandas as pd

from semisup import columns as C

if TYPE_CHECKING:
    import zarr

BRUSH: Final = "brush"  # from_name of the BrushLabels tag
POLYGON: Final = "polygon"  # from_name of the PolygonLabels tag
IMAGE: Final = "image"  # to_name: the Image tag
# `d` is resolved against LOCAL_FILES_DOCUMENT_ROOT by Label Studio's local-files view; this
# default expects the document root to be the tasks folder (see the README)
DEFAULT_IMAGE_ROOT: Final = "/data/local-files/?d=images/"
ALPHA_DRAWN: Final = 128  # brush edges are anti-aliased: half-opaque and more counts as drawn
# tab10 colours: distinct for up to ten classes, cycled beyond
COLOURS: Final = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_NAME = re.compile(r"^(?P<source>.+)__r(?P<row>\d+)_c(?P<col>\d+)$")

# ---------------------------------------------------------------------------------------------
# Brush RLE

RLE_WORD_BITS: Final = 8  # values are bytes (RGBA channels)
RLE_SIZES: Final = (3, 4, 8, 16)  # run-length field widths, as label_studio_sdk encodes
_MAX_RUN: Final = 1 << RLE_SIZES[-1]  # longest run one field holds


def encode_rle(values: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a flat uint8 array (an H×W×4 RGBA image, ravelled).

    Every run of equal values is one field group: a repeat flag, the index of its length field
    width in ``RLE_SIZES``, length − 1, the value. Byte-for-byte what
    ``label_studio_sdk.converter.brush.encode_rle`` writes. Returns the bytes as ints.
    """
    flat = np.asarray(values).ravel()
    if flat.size and (flat.min() < 0 or flat.max() > 255):
        raise ValueError(f"brush RLE: values must be bytes, got range [{flat.min()}, {flat.max()}]")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], change]) if flat.size else np.zeros(0, np.int64)
    lengths = np.diff(np.append(starts, flat.size))  # runs
    size_index = np.searchsorted(1 << np.array(RLE_SIZES[:3]), lengths)  # 0..3, by run length
    pieces = np.where(size_index == 3, -(-lengths // _MAX_RUN), 1)  # runs over 2^16 split
    run_of = np.repeat(np.arange(lengths.size), pieces)  # piece -> run
    piece_len = np.full(run_of.size, _MAX_RUN)
    piece_len[np.cumsum(pieces) - 1] = lengths - _MAX_RUN * (pieces - 1)  # each run's last
    index = size_index[run_of]
    fields = np.stack(
        [lengths[run_of] > 1, index, piece_len - 1, flat[starts][run_of]], axis=1
    ).astype(np.int64)  # pieces×4
    widths = np.stack(
        [
            np.ones_like(index),
            np.full_like(index, 2),
            np.array(RLE_SIZES)[index],
            np.full_like(index, RLE_WORD_BITS),
        ],
        axis=1,
    )
    header = [(flat.size, 32), (RLE_WORD_BITS - 1, 5), *[(s - 1, 4) for s in RLE_SIZES]]
    field_values = np.concatenate([[v for v, _ in header], fields.ravel()])
    field_widths = np.concatenate([[w for _, w in header], widths.ravel()])
    bits = _field_bits(field_values, field_widths)
    # the reference pads with 8 - len % 8 zero bits (a whole zero byte when already aligned)
    bits = np.concatenate([bits, np.zeros(8 - bits.size % 8, np.uint8)])
    return np.packbits(bits).tolist()


def _field_bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The bits (uint8 0/1, most significant first) of unsigned ``values`` in ``widths`` bits."""
    owner = np.repeat(np.arange(values.size), widths)  # bit -> field
    offset = np.arange(owner.size) - np.repeat(np.cumsum(widths) - widths, widths)
    shift = widths[owner] - 1 - offset
    return ((values[owner] >> shift) & 1).astype(np.uint8)


def decode_rle(rle: Sequence[int] | bytes) -> np.ndarray:
    """The flat uint8 array a Label Studio brush RLE encodes (inverse of ``encode_rle``)."""
    raw = np.frombuffer(bytes(rle), dtype=np.uint8)
    bits = (np.unpackbits(raw) + ord("0")).tobytes().decode()  # "0101..." for int(…, 2)
    position = 0

    def read(width: int) -> int:
        nonlocal position
        if position + width > len(bits):
            raise ValueError(f"brush RLE: truncated at bit {position} of {len(bits)}")
        position += width
        return int(bits[position - width : position], 2)

    count = read(32)
    word_bits = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(count, dtype=np.uint8)
    i = 0
    while i < count:
        repeat = read(1)
        end = min(count, i + 1 + read(sizes[read(2)]))
        if repeat:
            out[i:end] = read(word_bits)
        else:
            out[i:end] = [read(word_bits) for _ in range(end - i)]
        i = end
    return out


def mask_to_rle(region: np.ndarray) -> list[int]:
    """Brush RLE of a H×W bool region: RGBA 255 inside, 0 outside (label_studio_sdk's mask2rle)."""
    return encode_rle(np.repeat(region.astype(np.uint8).ravel() * 255, 4))


def rle_to_mask(rle: Sequence[int] | bytes, height: int, width: int) -> np.ndarray:
    """H×W bool region of a brush RLE: alpha ≥ ``ALPHA_DRAWN``. Raises if the size differs."""
    flat = decode_rle(rle)
    if flat.size != height * width * 4:
        raise ValueError(
            f"brush RLE holds {flat.size} values, expected {height}×{width}×4 = "
            f"{height * width * 4} for the image"
        )
    return flat.reshape(height, width, 4)[..., 3] >= ALPHA_DRAWN


def polygon_to_mask(
    points_percent: Sequence[Sequence[float]], height: int, width: int
) -> np.ndarray:
    """H×W bool region of a polygon in percent of the image (Label Studio's ``points``).

    Pixel (row, col) is inside when its centre (col + 0.5, row + 0.5) is, in pixel coordinates
    x = percent_x · width / 100, y = percent_y · height / 100 (GDAL's rasterisation rule).
    """
    import rasterio.features
    from rasterio.transform import Affine

    points = np.asarray(points_percent, dtype=np.float64).reshape(-1, 2)
    if len(points) < 3:
        raise ValueError(f"a polygon needs at least 3 points, got {len(points)}")
    ring = np.column_stack([points[:, 0] * width / 100.0, points[:, 1] * height / 100.0])
    shape = {"type": "Polygon", "coordinates": [[*map(tuple, ring), tuple(ring[0])]]}
    inside = rasterio.features.rasterize(
        [(shape, 1)], out_shape=(height, width), transform=Affine.identity(), fill=0, dtype="uint8"
    )
    return inside.astype(bool)


# ---------------------------------------------------------------------------------------------
# Tasks


def tile_name(source: str, row: int, col: int) -> str:
    """``<source_id>__r<row>_c<col>``: a tile's name in file names and exports (tiles.parquet)."""
    return f"{source}__r{int(row)}_c{int(col)}"


def tile_rgb(image: np.ndarray, low: Sequence[float], high: Sequence[float]) -> np.ndarray:
    """H×W×3 uint8 display image of an H×W×C tile: bands scaled as the teacher sees them
    (``store.scale_to_uint8``), the first three kept, a single band replicated."""
    from semisup.bands import to_three_bands
    from semisup.store import scale_to_uint8

    return to_three_bands(scale_to_uint8(image, tuple(low), tuple(high)), "rgb")


def label_config(class_names: Sequence[str]) -> str:
    """Label Studio labelling config: the image, a brush and a polygon tool with every class."""
    labels = "\n".join(
        f"    <Label value={quoteattr(name)} background={quoteattr(COLOURS[k % len(COLOURS)])}/>"
        for k, name in enumerate(class_names)
    )
    return (
        "<View>\n"
        f'  <Image name="{IMAGE}" value="${IMAGE}" zoom="true" zoomControl="true"/>\n'
        f'  <BrushLabels name="{BRUSH}" toName="{IMAGE}">\n{labels}\n  </BrushLabels>\n'
        f'  <PolygonLabels name="{POLYGON}" toName="{IMAGE}" strokeWidth="2">\n{labels}\n'
        "  </PolygonLabels>\n"
        "</View>\n"
    )


def mask_results(mask: np.ndarray, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One ``brushlabels`` result per class present in ``mask`` (H×W uint8 class ids,
    ``IGNORE_INDEX`` undrawn), in Label Studio's result format."""
    height, width = mask.shape
    return [
        {
            "id": f"class{k}",
            "from_name": BRUSH,
            "to_name": IMAGE,
            "type": "brushlabels",
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(mask == k), "brushlabels": [name]},
        }
        for k, name in enumerate(class_names)
        if (mask == k).any()
    ]


TASK_COLUMNS: Final = (C.TILE_ID, C.SOURCE, C.ROW, C.COL, C.Y0, C.X0, C.HEIGHT, C.WIDTH)


def write_tasks(
    store: str,
    chosen: pd.DataFrame,
    out: Path,
    *,
    predictions: Mapping[int, np.ndarray] | None = None,
    image_root: str = DEFAULT_IMAGE_ROOT,
    model_version: str = "semisup",
) -> dict[str, Path]:
    """Write ``out``/images/*.png, tasks.json and label_config.xml for the ``chosen`` tiles.

    ``chosen``: rows of the store's tile index (``TASK_COLUMNS`` at least). ``predictions``:
    tile id -> HEIGHT×WIDTH uint8 class ids of the tile's window, ``IGNORE_INDEX`` where nothing
    is predicted (nodata); attached to each task as its pre-annotation. A task's ``data.image``
    is ``image_root`` + the PNG's file name. Everything is checked before anything is written.
    """
    from PIL import Image

    from semisup.store import open_store, read_source_meta, read_store_meta, read_tile

    root = open_store(store)
    meta = read_store_meta(root)
    class_names = store_class_names(store, meta.class_names, meta.num_classes)
    _check_task_inputs(chosen, predictions, len(class_names), out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    tasks = []
    for row in chosen.itertuples():
        source, height, width = str(row.source), int(row.height), int(row.width)
        name = tile_name(source, row.row, row.col)
        group = cast("zarr.Group", root[source])
        tile = read_tile(group, int(row.y0), int(row.x0), meta.tile_size)
        scale = read_source_meta(root, source)
        rgb = tile_rgb(tile[C.IMAGE][:height, :width], scale.band_low, scale.band_high)
        Image.fromarray(rgb).save(out / "images" / f"{name}.png")
        task: dict[str, Any] = {
            "data": {
                IMAGE: f"{image_root}{name}.png",
                C.SOURCE: source,
                C.ROW: int(row.row),
                C.COL: int(row.col),
                C.TILE_ID: int(row.tile_id),
                C.Y0: int(row.y0),
                C.X0: int(row.x0),
                C.HEIGHT: height,
                C.WIDTH: width,
            }
        }
        if predictions is not None:
            mask = predictions[int(row.tile_id)]
            result = mask_results(mask, class_names)
            task["predictions"] = [{"model_version": model_version, "result": result}]
        tasks.append(task)
    paths = {"tasks": out / "tasks.json", "label_config": out / "label_config.xml"}
    paths["tasks"].write_text(json.dumps(tasks))
    paths["label_config"].write_text(label_config(class_names))
    return paths


def store_class_names(
    store: str, class_names: Sequence[str] | None, num_classes: int | None
) -> list[str]:
    """The store's class names (``class_<k>`` when only a count is recorded)."""
    if class_names:
        return list(class_names)
    if num_classes:
        return [f"class_{k}" for k in range(num_classes)]
    raise ValueError(f"store {store}: no class_names or num_classes; a labelled store is needed")


def _check_task_inputs(
    chosen: pd.DataFrame,
    predictions: Mapping[int, np.ndarray] | None,
    num_classes: int,
    out: Path,
) -> None:
    if (out / "tasks.json").exists():
        raise FileExistsError(f"{out / 'tasks.json'} exists; choose another folder")
    missing = [c for c in TASK_COLUMNS if c not in chosen]
    if missing:
        raise ValueError(f"chosen tiles: missing tile index columns {missing}")
    if predictions is None:
        return
    for row in chosen.itertuples():
        tile_id, shape = int(row.tile_id), (int(row.height), int(row.width))
        if tile_id not in predictions:
            raise ValueError(f"predictions: no class map for tile {tile_id}")
        mask = np.asarray(predictions[tile_id])
        if mask.shape != shape or mask.dtype != np.uint8:
            raise ValueError(
                f"predictions[{tile_id}]: expected a {shape[0]}×{shape[1]} uint8 class map "
                f"(the tile's window), got {mask.shape} {mask.dtype}"
            )
        bad = np.setdiff1d(np.unique(mask), [*range(num_classes), C.IGNORE_INDEX])
        if bad.size:
            raise ValueError(
                f"predictions[{tile_id}]: class ids {bad.tolist()} outside 0..{num_classes - 1} "
                f"and {C.IGNORE_INDEX}"
            )


# ---------------------------------------------------------------------------------------------
# Exports


def export_masks(path: str | Path, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Class masks of a Label Studio JSON export: tile name -> H×W uint8.

    ``path``: the export (``exportType=JSON``), a list of tasks each with ``annotations``. Per
    task the latest annotation (``updated_at``, then ``created_at``, then ``id``) that was not
    cancelled is read; tasks without one are left out. Its ``brushlabels`` and
    ``polygonlabels`` results are painted in order with the id of their label in
    ``class_names`` (a later region wins where two overlap); ``IGNORE_INDEX`` where nothing was
    drawn. Tile names are ``<source_id>__r<row>_c<col>`` (the task's ``data``, or the image's
    file name). Unknown labels, unreadable regions and sizes that disagree raise ``ValueError``
    naming the task.
    """
    path = Path(path)
    try:
        tasks = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a JSON file ({error})") from None
    if not isinstance(tasks, list):
        raise ValueError(f"{path}: expected a Label Studio JSON export (a list of tasks)")
    class_ids = {name: k for k, name in enumerate(class_names)}
    masks: dict[str, np.ndarray] = {}
    for task in tasks:
        where = f"{path}: task {task.get('id')}"
        annotation = latest_annotation(task.get("annotations") or [])
        if annotation is None:
            continue
        name = task_tile_name(task, where)
        if name in masks:
            raise ValueError(f"{where}: tile {name} appears in more than one task")
        masks[name] = annotation_mask(annotation, task, class_ids, f"{where} ({name})")
    return masks


def latest_annotation(annotations: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The most recent annotation not cancelled, or None."""
    kept = [a for a in annotations if not a.get("was_cancelled")]
    if not kept:
        return None

    def when(annotation: Mapping[str, Any]) -> tuple[datetime, int]:
        stamp = annotation.get("updated_at") or annotation.get("created_at")
        moment = datetime.fromisoformat(stamp) if stamp else datetime.min
        return moment.replace(tzinfo=None), int(annotation.get("id") or 0)

    return max(kept, key=when)


def task_tile_name(task: Mapping[str, Any], where: str) -> str:
    """The tile a task shows: ``data`` source/row/col, else the image file's name."""
    data = task.get("data") or {}
    if all(key in data for key in (C.SOURCE, C.ROW, C.COL)):
        return tile_name(str(data[C.SOURCE]), data[C.ROW], data[C.COL])
    stem = Path(str(data.get(IMAGE, "")).split("?d=")[-1]).stem
    if _NAME.match(stem):
        return stem
    raise ValueError(
        f"{where}: cannot tell which tile it shows: expected data.source/row/col or an image "
        f"named <source_id>__r<row>_c<col>.png, got data {dict(data)}"
    )


def annotation_mask(
    annotation: Mapping[str, Any], task: Mapping[str, Any], class_ids: Mapping[str, int], where: str
) -> np.ndarray:
    """H×W uint8 class ids of one annotation's area results, ``IGNORE_INDEX`` elsewhere."""
    data = task.get("data") or {}
    results = [r for r in annotation.get("result") or [] if _is_area(r, where)]
    sizes = {(int(r["original_height"]), int(r["original_width"])) for r in results}
    if C.HEIGHT in data and C.WIDTH in data:
        sizes.add((int(data[C.HEIGHT]), int(data[C.WIDTH])))
    if len(sizes) != 1:
        raise ValueError(
            f"{where}: expected one image size (height, width) over data and results, got "
            f"{sorted(sizes) or 'none'}"
        )
    height, width = sizes.pop()
    mask = np.full((height, width), C.IGNORE_INDEX, dtype=np.uint8)
    for result in results:
        kind = result["type"]
        labels = result.get("value", {}).get(kind) or []
        if len(labels) != 1 or labels[0] not in class_ids:
            raise ValueError(
                f"{where}: {kind} label {labels} is not one of the classes {list(class_ids)}"
            )
        if kind == "brushlabels":
            region = rle_to_mask(result["value"]["rle"], height, width)
        else:
            region = polygon_to_mask(result["value"]["points"], height, width)
        mask[region] = class_ids[labels[0]]
    return mask


def _is_area(result: Mapping[str, Any], where: str) -> bool:
    """True for brush and polygon results; other area types cannot be read as class masks."""
    kind = str(result.get("type", ""))
    if kind == "brushlabels":
        if result.get("value", {}).get("format", "rle") != "rle":
            raise ValueError(
                f"{where}: brush result format {result['value']['format']!r}, expected 'rle'"
            )
        return True
    if kind == "polygonlabels":
        return True
    if kind.endswith("labels"):
        raise ValueError(
            f"{where}: a {kind} result cannot become a class mask; expected brushlabels or "
            "polygonlabels"
        )
    return False  # choices, text areas, relations: not part of the mask

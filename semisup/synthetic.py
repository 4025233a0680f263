"""Generated aerial-like scenes, for the demo when no real imagery is at hand.

A scene is land with roads, rectangular buildings, vegetation blobs and a water body, with the
classes of ``semisup.known_imagery.CLASS_NAMES``. Scenes are written as georeferenced GeoTIFFs
(UTM 40N, 0.5 m pixels, like the Dubai imagery) with class-id PNG masks, and a nodata corner,
so that the demo exercises the same ingestion path as real rasters. Each building (a connected
component of the building class) is also a box, in one CSV of the layout ``semisup prep
--boxes`` reads, for the detection student.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from semisup.columns import IGNORE_INDEX
from semisup.known_imagery import CLASS_NAMES

BUILDING, LAND, ROAD, VEGETATION, WATER = range(len(CLASS_NAMES))
BOXES_FILE = "boxes.csv"  # the scenes' building boxes, beside images/ and masks/
MIN_BOX_PIXELS = 64  # a building cut by the nodata corner down to a sliver is no box

# Mean RGB per class, roughly as in the Dubai imagery.
_CLASS_RGB = np.array(
    [[150, 140, 150], [200, 170, 130], [110, 110, 115], [60, 120, 50], [40, 90, 140]],
    dtype=np.float32,
)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """size×size float32 in about [0, 1]: bilinearly upsampled random cells (cheap texture)."""
    coarse = rng.random((cells + 1, cells + 1), dtype=np.float32)
    t = np.linspace(0, cells, size, endpoint=False, dtype=np.float32)
    i = t.astype(int)
    f = t - i
    rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]  # size×(cells+1)
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def generate_scene(size: int = 768, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image size×size×3 uint8, label size×size uint8 class ids)."""
    rng = np.random.default_rng(seed)
    label = np.full((size, size), LAND, dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    # water: a smooth blob in one corner region
    water = _smooth_noise(rng, size, 3) + 0.6 * (1 - (xx + yy) / (2 * size)) > 1.05
    label[water] = WATER
    # vegetation: patches of a finer noise field
    label[(_smooth_noise(rng, size, 8) > 0.72) & ~water] = VEGETATION
    # roads: a few straight horizontal and vertical bands
    for _ in range(rng.integers(2, 4)):
        y, x = rng.integers(0, size, 2)
        width = int(rng.integers(8, 16))
        label[max(0, y - width // 2) : y + width // 2, :] = ROAD
        label[:, max(0, x - width // 2) : x + width // 2] = ROAD
    # buildings: rectangles on land
    for _ in range(int(size * size / 9000)):
        h, w = rng.integers(12, 48, 2)
        y, x = rng.integers(0, size - 48, 2)
        block = label[y : y + h, x : x + w]
        if (block == LAND).mean() > 0.9:
            block[...] = BUILDING
    texture = _smooth_noise(rng, size, 64)[..., None] * 40 - 20
    image = _CLASS_RGB[label] + texture + rng.normal(0, 6, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_scenes(folder: Path, count: int = 4, size: int = 768, seed: int = 0) -> tuple[Path, Path]:
    """Write ``count`` scenes as ``images/scene_i.tif`` and ``masks/scene_i.png`` under ``folder``.

    Each GeoTIFF has EPSG:32640 and 0.5 m pixels, and a nodata triangle (value 0, all bands) in
    its top-left corner whose mask pixels are 255 (ignore). The buildings' boxes go to
    ``folder/boxes.csv`` (``write_scene_boxes``). Returns (images dir, masks dir).
    """
    import rasterio
    from rasterio.transform import from_origin

    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, label = generate_scene(size, seed + i)
        nodata = np.add.outer(np.arange(size), np.arange(size)) < size // 6
        image[nodata] = 0
        label[nodata] = IGNORE_INDEX
        transform = from_origin(300_000.0 + i * size * 0.5, 2_800_000.0, 0.5, 0.5)
        profile = dict(
            driver="GTiff",
            height=size,
            width=size,
            count=3,
            dtype="uint8",
            crs="EPSG:32640",
            transform=transform,
            nodata=0,
            tiled=True,
            blockxsize=256,
            blockysize=256,
            compress="deflate",
        )
        with rasterio.open(images / f"scene_{i}.tif", "w", **profile) as dst:
            dst.write(image.transpose(2, 0, 1))
        Image.fromarray(label).save(masks / f"scene_{i}.png")
    write_scene_boxes(masks, folder / BOXES_FILE)
    return images, masks


def write_scene_boxes(masks: Path, out: Path) -> Path:
    """Every building of the masks ``masks/scene_*.png`` as a box: ``out`` is a CSV
    ``image_path,xmin,ymin,xmax,ymax,label`` (pixel edges, label ``building``, image_path the
    scene's GeoTIFF name), one row per 4-connected building component of at least
    ``MIN_BOX_PIXELS`` pixels."""
    import csv

    from semisup.detection.compare import component_boxes

    rows = []
    for mask in sorted(masks.glob("scene_*.png")):
        label = np.asarray(Image.open(mask))
        boxes, _, _ = component_boxes(label, None, [BUILDING], min_pixels=MIN_BOX_PIXELS)
        rows += [[f"{mask.stem}.tif", *map(int, box), CLASS_NAMES[BUILDING]] for box in boxes]
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_path", "xmin", "ymin", "xmax", "ymax", "label"])
        writer.writerows(rows)
    return out

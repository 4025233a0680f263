"""Small synthetic tile stores for tests and benchmarks, written with the ``semisup.store`` primitives.

``build_store`` writes a complete store (root attrs, one group per source, ``tiles.parquet``) and
returns the arrays it wrote, so a test can compare anything read back against the truth.
``write_large_geotiff`` writes a raster too large to hold, for windowed prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from semisup import columns as C
from semisup import store


@dataclass(frozen=True)
class SourceSpec:
    """One synthetic source raster.

    ``nodata_box`` is (y0, x0, y1, x1): pixels inside it are nodata (valid False, image 0).
    ``texture`` is "random" (uniform noise, incompressible) or "smooth" (upsampled noise plus
    grain, which compresses about as well as real aerial imagery).
    """

    source_id: str
    height: int
    width: int
    bands: int = 3
    dtype: str = "uint8"
    labeled: bool = True
    split: str = C.LABELED
    nodata_box: tuple[int, int, int, int] | None = None
    texture: str = "random"


@dataclass
class SyntheticStore:
    """What ``build_store`` wrote: per-source truth arrays and the tile index."""

    url: str
    meta: store.StoreMeta
    index: pa.Table
    images: dict[str, np.ndarray] = field(default_factory=dict)  # H×W×C source dtype
    valid: dict[str, np.ndarray] = field(default_factory=dict)  # H×W bool
    labels: dict[str, np.ndarray | None] = field(default_factory=dict)  # H×W uint8 or None

    def tile_ids(self, split: str | None = None) -> set[int]:
        ids = self.index.column(C.TILE_ID).to_pylist()
        if split is None:
            return set(ids)
        splits = self.index.column(C.SPLIT).to_pylist()
        return {tile_id for tile_id, s in zip(ids, splits, strict=True) if s == split}


def make_image(spec: SourceSpec, rng: np.random.Generator) -> np.ndarray:
    """H×W×C image in ``spec.dtype`` with the requested texture."""
    info = np.iinfo(spec.dtype)
    shape = (spec.height, spec.width, spec.bands)
    if spec.texture == "random":
        return rng.integers(0, int(info.max) + 1, size=shape, dtype=spec.dtype)
    if spec.texture != "smooth":
        raise ValueError(f"texture must be 'random' or 'smooth', got {spec.texture!r}")
    cell = 16  # pixels per noise cell: fields and roofs rather than per-pixel noise
    coarse_shape = (-(-spec.height // cell) + 1, -(-spec.width // cell) + 1, spec.bands)
    coarse = rng.uniform(0.1, 0.9, size=coarse_shape).astype(np.float32)
    # bilinear upsampling of the coarse grid, one axis at a time
    ys = np.arange(spec.height, dtype=np.float32) / cell
    xs = np.arange(spec.width, dtype=np.float32) / cell
    y_lo, x_lo = ys.astype(np.int64), xs.astype(np.int64)
    wy, wx = (ys - y_lo)[:, None, None], (xs - x_lo)[None, :, None]
    rows = coarse[y_lo] * (1 - wy) + coarse[y_lo + 1] * wy  # H×W'×C
    smooth = rows[:, x_lo] * (1 - wx) + rows[:, x_lo + 1] * wx  # H×W×C
    grain = rng.normal(0.0, 0.02, size=shape).astype(np.float32)
    return (np.clip(smooth + grain, 0.0, 1.0) * info.max).astype(spec.dtype)


def build_store(
    url: str,
    sources: Sequence[SourceSpec],
    *,
    tile_size: int = 32,
    overlap: int = 0,
    num_classes: int = 4,
    seed: int = 0,
    keep_arrays: bool = True,
) -> SyntheticStore:
    """Write a semisup store at ``url`` (a local path) holding ``sources``.

    Labels are uniform in [0, num_classes) with a sprinkle of IGNORE_INDEX ("random" texture)
    or segments of the first band ("smooth"); pixels inside a nodata box are IGNORE_INDEX. With ``keep_arrays=False`` only the index is kept,
    so large benchmark stores are written one source at a time without holding them in memory.
    """
    rng = np.random.default_rng(seed)
    meta = store.StoreMeta(
        tile_size=tile_size,
        overlap=overlap,
        sources=tuple(s.source_id for s in sources),
        num_classes=num_classes,
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
    )
    root = store.open_store(url, mode="w")
    root.attrs[store.META_KEY] = meta.to_attrs()
    result = SyntheticStore(url=url, meta=meta, index=pa.table({}))
    rows: list[dict[str, object]] = []
    for spec in sources:
        image, valid, label = _source_arrays(spec, num_classes, rng)
        source_meta = store.SourceMeta(
            source_id=spec.source_id,
            image_path=f"synthetic/{spec.source_id}.tif",
            height=spec.height,
            width=spec.width,
            bands=spec.bands,
            dtype=spec.dtype,
            band_low=(0.0,) * spec.bands,
            band_high=(float(np.iinfo(spec.dtype).max),) * spec.bands,
            label_path=f"synthetic/{spec.source_id}_label.png" if spec.labeled else None,
        )
        group = store.create_source_group(root, source_meta, tile_size, with_label=spec.labeled)
        group[C.IMAGE][...] = image
        group[C.VALID][...] = valid
        if label is not None:
            group[C.LABEL][...] = label
        rows.extend(_index_rows(spec, valid, label, tile_size, overlap, first_id=len(rows)))
        if keep_arrays:
            result.images[spec.source_id] = image
            result.valid[spec.source_id] = valid
            result.labels[spec.source_id] = label
    result.index = pa.Table.from_pylist(rows, schema=store.TILE_INDEX_SCHEMA)
    store.write_tile_index(url, result.index)
    return result


def _source_arrays(
    spec: SourceSpec, num_classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    image = make_image(spec, rng)
    valid = np.ones((spec.height, spec.width), dtype=bool)
    if spec.nodata_box is not None:
        y0, x0, y1, x1 = spec.nodata_box
        valid[y0:y1, x0:x1] = False
        image[~valid] = 0
    if not spec.labeled:
        return image, valid, None
    if spec.texture == "smooth":  # segments following the image, as real label maps do
        band = image[..., 0].astype(np.float32) / float(np.iinfo(spec.dtype).max)
        label = np.minimum(band * num_classes, num_classes - 1).astype(np.uint8)
    else:
        label = rng.integers(0, num_classes, size=valid.shape, dtype=np.uint8)
        label[rng.random(valid.shape) < 0.05] = C.IGNORE_INDEX
    label[~valid] = C.IGNORE_INDEX
    return image, valid, label


def _index_rows(
    spec: SourceSpec,
    valid: np.ndarray,
    label: np.ndarray | None,
    tile_size: int,
    overlap: int,
    first_id: int,
) -> list[dict[str, object]]:
    rows = []
    windows = store.tile_windows(spec.height, spec.width, tile_size, overlap)
    for offset, (row, col, y0, x0, h, w) in enumerate(windows):
        minx, miny, maxx, maxy = store.window_bounds(None, y0, x0, h, w)
        window_valid = valid[y0 : y0 + h, x0 : x0 + w]
        coverage = (
            0.0
            if label is None
            else float(np.mean(label[y0 : y0 + h, x0 : x0 + w] != C.IGNORE_INDEX))
        )
        rows.append(
            {
                C.TILE_ID: first_id + offset,
                C.SOURCE: spec.source_id,
                C.ROW: row,
                C.COL: col,
                C.Y0: y0,
                C.X0: x0,
                C.HEIGHT: h,
                C.WIDTH: w,
                "minx": minx,
                "miny": miny,
                "maxx": maxx,
                "maxy": maxy,
                C.SPLIT: spec.split,
                "valid_fraction": float(window_valid.mean()),
                "label_coverage": coverage,
            }
        )
    return rows


def scene_store(root: Path, size: int = 256, tile_size: int = 64, seed: int = 10) -> str:
    """Four generated aerial-like scenes ingested as a store: 1 labeled, 2 unlabeled, 1 val source.

    The scenes (``semisup.synthetic``) have learnable classes, so a student trained on them
    beats its initial weights within a few steps. Returns the store's path.
    """
    from data_prep.ingest import build_store as ingest
    from semisup.synthetic import write_scenes

    images, masks = write_scenes(root, count=4, size=size, seed=seed)
    result = ingest(
        [images],
        root / "store.zarr",
        labels=[masks],
        num_classes=5,
        config={
            "tile_size": tile_size,
            "val_sources": ["scene_3"],
            "labeled_fraction": 0.34,
            "seed": 1,
        },
        quiet=True,
    )
    return str(result.path)


def write_large_geotiff(path: Path, size: int, rows: int = 512) -> Path:
    """A size×size RGB uint8 GeoTIFF (EPSG:32640, 0.5 m, 256 px blocks) with some structure and
    a nodata corner, written ``rows`` rows at a time so the writing process never holds it."""
    import rasterio
    from rasterio.transform import from_origin

    profile = {
        "driver": "GTiff",
        "height": size,
        "width": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32640",
        "transform": from_origin(500_000.0, 4_000_000.0, 0.5, 0.5),
        "nodata": 0,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
    }
    rng = np.random.default_rng(size)
    with rasterio.open(path, "w", **profile) as ds:
        for y0 in range(0, size, rows):
            yy, xx = np.mgrid[y0 : y0 + rows, 0:size]
            base = 128 + 60 * np.sin(xx / 37.0) * np.cos(yy / 53.0)
            band = np.clip(base[None] + rng.normal(0, 12, (3, rows, size)), 1, 255).astype(np.uint8)
            band[:, (xx + yy) < size // 8] = 0  # nodata triangle
            ds.write(band, window=rasterio.windows.Window(0, y0, size, rows))
    return path

"""``build_store`` on small generated rasters: streaming, pairing, formats, rerun and overwrite."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import Affine

from data_prep import rasters
from data_prep.errors import PrepError
from data_prep.ingest import build_store
from data_prep.sources import discover_sources
from semisup import columns as C
from semisup.config import PrepConfig
from semisup.store import open_store, read_source_meta, read_tile_index, tile_windows


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Relative path -> (mtime_ns, sha256) of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture
def small_inputs(tmp_path: Path) -> tuple[list[Path], list[Path]]:
    """Two folders of two 70×90 RGB images each, with class-id masks (ids 0..2, some 255)."""
    rng = np.random.default_rng(0)
    images, masks = [], []
    for folder in ("a", "b"):
        for name in ("x", "y"):
            _png(
                tmp_path / folder / "img" / f"{name}.png",
                rng.integers(0, 256, (70, 90, 3), np.uint8),
            )
            ids = rng.integers(0, 3, (70, 90), np.uint8)
            ids[:5] = 255
            _png(tmp_path / folder / "lab" / f"{name}.png", ids)
        images.append(tmp_path / folder / "img")
        masks.append(tmp_path / folder / "lab")
    return images, masks


def test_raster_larger_than_one_block_streams_and_reads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    height, width, tile = 3000, 9000, 256
    y, x = np.ogrid[0:height, 0:width]
    image = ((y * 31 + x * 17) % 4000 + 100).astype(np.uint16)  # position-coded: no shifts hide
    image[1000:1300, 8500:] = 0  # nodata across a block edge
    transform = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0)
    path = tmp_path / "big.tif"
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 1, "dtype": "uint16"}
    with rasterio.open(
        path,
        "w",
        **profile,
        crs="EPSG:32616",
        transform=transform,
        nodata=0,
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="lzw",
    ) as ds:
        ds.write(image, 1)
    labels = ((y // 100 + x // 100) % 4).astype(np.uint8)
    labels[:, :10] = 255
    np.save(tmp_path / "big.npy", labels)

    windows: list[tuple[int, int]] = []
    read = rasters.GeoTiffRaster.read

    def spy(self: rasters.GeoTiffRaster, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        windows.append((h, w))
        return read(self, y0, x0, h, w)

    monkeypatch.setattr(rasters.GeoTiffRaster, "read", spy)
    out = tmp_path / "big.zarr"
    result = build_store([path], out, labels=[tmp_path / "big.npy"], quiet=True)

    # 12 strips of 256 rows × 2 column blocks (8192 + 808): never the whole raster at once.
    assert len(windows) == 12 * 2 and max(h * w for h, w in windows) <= tile * 8192
    group = open_store(str(out))["big"]
    np.testing.assert_array_equal(group[C.IMAGE][:, :, 0], image)
    np.testing.assert_array_equal(group[C.VALID][:], image != 0)
    np.testing.assert_array_equal(group[C.LABEL][:], labels)
    assert result.meta.num_classes == 4  # inferred: largest id + 1
    index = read_tile_index(str(out)).to_pandas()
    assert len(index) == len(tile_windows(height, width, tile))
    for t in index[index.valid_fraction < 1].itertuples():
        window = image[t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width]
        assert t.valid_fraction == pytest.approx((window != 0).mean(), abs=1e-6)
    meta = read_source_meta(open_store(str(out)), "big")
    assert meta.transform == tuple(transform)[:6] and 100 <= meta.band_low[0] < meta.band_high[0]


def test_rerun_is_a_noop_and_overwrite_replaces(
    tmp_path: Path, small_inputs: tuple[list[Path], list[Path]]
) -> None:
    images, masks = small_inputs
    out = tmp_path / "s.zarr"
    first = build_store(images, out, labels=masks, config=PrepConfig(tile_size=32), quiet=True)
    assert not first.up_to_date
    before = _snapshot(out)

    again = build_store(images, out, labels=masks, config=PrepConfig(tile_size=32), quiet=True)
    assert again.up_to_date and again.meta == first.meta
    assert _snapshot(out) == before  # not a byte, not an mtime changed

    with pytest.raises(
        PrepError, match=r"s\.zarr exists \(built from other inputs/options\); pass --overwrite"
    ):
        build_store(images, out, labels=masks, config=PrepConfig(tile_size=64), quiet=True)
    assert _snapshot(out) == before

    replaced = build_store(
        images, out, labels=masks, config=PrepConfig(tile_size=64), overwrite=True, quiet=True
    )
    assert not replaced.up_to_date and replaced.meta.tile_size == 64
    assert open_store(str(out)).attrs["semisup"]["tile_size"] == 64
    assert _leftovers(out) == []

    # A touched input changes the fingerprint, so the store is no longer up to date.
    first_image = next(images[0].iterdir())
    os.utime(first_image, ns=(1, 1))
    with pytest.raises(PrepError, match="pass --overwrite"):
        build_store(images, out, labels=masks, config=PrepConfig(tile_size=64), quiet=True)


def test_progress_names_every_source(
    tmp_path: Path, small_inputs: tuple[list[Path], list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    images, masks = small_inputs
    build_store(images, tmp_path / "p.zarr", labels=masks, config=PrepConfig(tile_size=32))
    err = capsys.readouterr().err
    assert "[1/4] a__img__x: 90x70 px, 9 tiles, labelled" in err
    assert "[4/4] b__img__y" in err and "wrote" in err


def test_same_file_names_in_several_folders_get_distinct_stable_ids(
    small_inputs: tuple[list[Path], list[Path]],
) -> None:
    images, masks = small_inputs
    specs = discover_sources(images, masks)
    assert [s.source_id for s in specs] == ["a__img__x", "a__img__y", "b__img__x", "b__img__y"]
    assert [s.folder for s in specs] == ["a__img", "a__img", "b__img", "b__img"]
    assert all(s.label_path is not None and s.label_path.stem == s.image_path.stem for s in specs)
    assert all(s.label_path.parent.parent == s.image_path.parent.parent for s in specs)  # type: ignore[union-attr]
    assert discover_sources(images, masks) == specs
    # One folder alone: ids are the file stems.
    assert [s.source_id for s in discover_sources([images[0]])] == ["x", "y"]


def test_label_pairing_by_name_by_position_and_none(
    small_inputs: tuple[list[Path], list[Path]], tmp_path: Path
) -> None:
    images, masks = small_inputs
    files = sorted(masks[0].iterdir())
    # Label files named like the images pair by name, whatever their order.
    by_name = discover_sources([images[0]], files[::-1])
    assert [(s.image_path.stem, s.label_path.stem) for s in by_name] == [("x", "x"), ("y", "y")]  # type: ignore[union-attr]
    # One entry per input: a file for a file (any name), '-' for no labels.
    renamed = tmp_path / "mask_of_x.png"
    renamed.write_bytes(files[0].read_bytes())
    specs = discover_sources([images[0] / "x.png", images[1]], [renamed, "-"])
    assert {s.source_id: s.label_path for s in specs} == {
        "a__img__x": renamed,
        "b__img__x": None,
        "b__img__y": None,
    }


def test_npy_uint16_png_and_alpha_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 256, (40, 50, 4), np.uint8)
    np.save(tmp_path / "in" / "stack.npy", stack) if (tmp_path / "in").mkdir() is None else None
    grey16 = rng.integers(0, 60000, (40, 50), np.uint16)
    Image.fromarray(grey16).save(tmp_path / "in" / "grey16.png")
    rgba = rng.integers(0, 256, (40, 50, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:10, :, 3] = 0
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "in" / "rgba.png")
    out = tmp_path / "f.zarr"
    build_store([tmp_path / "in"], out, config=PrepConfig(tile_size=16), quiet=True)
    root = open_store(str(out))
    np.testing.assert_array_equal(root["stack"][C.IMAGE][:], stack)
    np.testing.assert_array_equal(root["grey16"][C.IMAGE][:, :, 0], grey16)
    assert read_source_meta(root, "grey16").dtype == "uint16"
    np.testing.assert_array_equal(root["rgba"][C.IMAGE][:], rgba[..., :3])
    np.testing.assert_array_equal(root["rgba"][C.VALID][:], rgba[..., 3] > 0)
    index = read_tile_index(str(out)).to_pandas()
    assert (index[C.SPLIT] == C.UNLABELED).all() and (index.label_coverage == 0).all()
    assert open_store(str(out)).attrs["semisup"]["num_classes"] is None


def test_boxes_find_their_image_by_a_longer_path_when_names_repeat(tmp_path: Path) -> None:
    for folder in ("one", "two"):
        _png(tmp_path / folder / "a.png", np.zeros((20, 30, 3), np.uint8))
    (tmp_path / "boxes.csv").write_text(
        "label,image_path,xmin,ymin,xmax,ymax\n"
        "tree,two/a.png,1,2,3,4\n"
        "tree,two/a.png,5,6,40,8\n"  # reaches past the 30 px width: clipped
        "bush,elsewhere.png,1,1,2,2\n"  # not an input: skipped
    )
    out = tmp_path / "b.zarr"
    build_store(
        [tmp_path / "one", tmp_path / "two"], out, boxes=[tmp_path / "boxes.csv"], quiet=True
    )
    root = open_store(str(out))
    assert "boxes" not in root["one__a"]
    assert root["two__a"]["boxes"][:].tolist() == [[1, 2, 3, 4], [5, 6, 30, 8]]
    assert read_source_meta(root, "two__a").box_label_names == ("tree",)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_geotiff_alpha_band_is_the_valid_mask_not_an_image_band(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (4, 30, 40), np.uint8)  # C×H×W, as rasterio writes
    rgba[3] = 255
    rgba[3, :, :7] = 0
    path = tmp_path / "rgba.tif"
    profile = {"driver": "GTiff", "width": 40, "height": 30, "count": 4, "dtype": "uint8"}
    with rasterio.open(path, "w", **profile, photometric="RGB", alpha="YES") as ds:
        ds.write(rgba)
    out = tmp_path / "a.zarr"
    build_store([path], out, config=PrepConfig(tile_size=16), quiet=True)
    group = open_store(str(out))["rgba"]
    np.testing.assert_array_equal(group[C.IMAGE][:], np.moveaxis(rgba[:3], 0, -1))
    np.testing.assert_array_equal(group[C.VALID][:], rgba[3] > 0)
    assert read_source_meta(open_store(str(out)), "rgba").transform is None

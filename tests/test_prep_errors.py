"""Every bad input is an error naming its file, key or value, and leaves nothing at ``--out``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.errors import PrepError
from data_prep.ingest import build_store
from semisup.config import ConfigError, PrepConfig

COLOURS = {"#000000": 0, "#FFFFFF": 1}


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], f"temporary folders left behind: {leftovers}"


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    """tmp/images/{a,b}.png (20×30 RGB) and tmp/masks/{a,b}.png (0/255 grey)."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        _png(tmp_path / "images" / f"{name}.png", rng.integers(0, 256, (20, 30, 3), np.uint8))
        _png(
            tmp_path / "masks" / f"{name}.png", (rng.random((20, 30)) < 0.5).astype(np.uint8) * 255
        )
    (tmp_path / "colours.json").write_text(json.dumps(COLOURS))
    return tmp_path


def _build(scene: Path, **overrides: object) -> None:
    kwargs: dict = {
        "labels": [scene / "masks"],
        "label_colors": scene / "colours.json",
        "config": PrepConfig(tile_size=16),
        "quiet": True,
    }
    kwargs.update(overrides)
    inputs = kwargs.pop("inputs", [scene / "images"])
    build_store(inputs, scene / "out.zarr", **kwargs)


def _expect(scene: Path, error: type[Exception], *fragments: str, **overrides: object) -> None:
    with pytest.raises(error) as info:
        _build(scene, **overrides)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"
    _assert_nothing_left(scene / "out.zarr")


def test_missing_input(scene: Path) -> None:
    _expect(scene, PrepError, "nope.tif", "no such file", inputs=[scene / "nope.tif"])


def test_unreadable_raster(scene: Path) -> None:
    (scene / "images" / "c.tif").write_bytes(b"this is not a tiff")
    _expect(scene, PrepError, "c.tif", "cannot read raster", labels=[], label_colors=None)


def test_truncated_png_fails_while_writing(scene: Path) -> None:
    data = (scene / "images" / "b.png").read_bytes()
    (scene / "images" / "b.png").write_bytes(data[: len(data) // 2])
    _expect(scene, PrepError, "b.png", "cannot decode image")


def test_image_and_mask_sizes_differ(scene: Path) -> None:
    _png(scene / "masks" / "b.png", np.zeros((21, 30), np.uint8))
    _expect(scene, PrepError, "images/b.png", "masks/b.png", "30x20", "30x21")


def test_unknown_mask_colour_in_a_later_source(scene: Path) -> None:
    # Source "a" is written before "b" fails: the partial store must still vanish.
    mask = np.zeros((20, 30), np.uint8)
    mask[:2, :3] = 128
    _png(scene / "masks" / "b.png", mask)
    _expect(scene, PrepError, "masks/b.png", "#808080 (6 px)", "colours not in the colour map")


def test_label_id_out_of_range(scene: Path) -> None:
    ids = np.zeros((20, 30), np.uint8)
    ids[0, :2] = [7, 9]
    np.save(scene / "masks" / "b.npy", ids)
    (scene / "masks" / "b.png").unlink()
    _expect(
        scene,
        PrepError,
        "b.npy",
        "label id out of range: 7, 9",
        "[0, 2] or 255",
        label_colors=None,
        labels=[scene / "masks"],
        num_classes=3,
        inputs=[scene / "images"],
    )


def test_colour_map_id_out_of_range(scene: Path) -> None:
    (scene / "colours.json").write_text(json.dumps({"#000000": 0, "#FFFFFF": 3}))
    _expect(
        scene, PrepError, "colours.json", "label id out of range", "#FFFFFF -> 3", num_classes=2
    )


def test_missing_label_for_an_image(scene: Path) -> None:
    (scene / "masks" / "b.png").unlink()
    _expect(scene, PrepError, "no label for", "images/b.png", "masks")


def test_empty_input_folder(scene: Path) -> None:
    (scene / "empty").mkdir()
    _expect(scene, PrepError, "empty", "no rasters found", inputs=[scene / "empty"], labels=[])


def test_unsupported_dtype(scene: Path) -> None:
    np.save(scene / "float.npy", np.zeros((8, 8, 3), np.float32))
    _expect(
        scene,
        PrepError,
        "float.npy",
        "float32",
        "uint8, uint16",
        inputs=[scene / "float.npy"],
        labels=[],
    )


def test_boxes_for_no_input_image(scene: Path) -> None:
    (scene / "boxes.csv").write_text("image_path,xmin,ymin,xmax,ymax\nzzz.png,1,1,2,2\n")
    _expect(scene, PrepError, "boxes.csv", "zzz.png", boxes=[scene / "boxes.csv"])


def test_val_glob_matching_no_source(scene: Path) -> None:
    config = PrepConfig(tile_size=16, val_sources=("tile_9*",))
    _expect(scene, PrepError, "'tile_9*'", "matches no source", config=config)


def test_unknown_config_key(scene: Path) -> None:
    _expect(scene, ConfigError, "prep.tile_sise", config={"tile_sise": 256})


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"tile_size": 256, "overlap": 256}, "prep.overlap"),
        ({"split_by": "pixel"}, "prep.split_by"),
        ({"val_fraction": 1.5}, "prep.val_fraction"),
    ],
)
def test_bad_config_value(scene: Path, config: dict, key: str) -> None:
    _expect(scene, ConfigError, key, config=config)


def _store_files(out: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in out.rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize(
    "rebuild",
    [
        # other options, no --overwrite
        lambda scene: _build(scene, config=PrepConfig(tile_size=32)),
        # --overwrite, but the new build fails: the old store must survive untouched
        lambda scene: _build(scene, overwrite=True, label_colors={"#000000": 0}),
    ],
    ids=["exists", "overwrite-fails"],
)
def test_existing_store_is_not_modified(scene: Path, rebuild: Callable[[Path], None]) -> None:
    _build(scene)
    out = scene / "out.zarr"
    before = _store_files(out)
    with pytest.raises(PrepError) as info:
        rebuild(scene)
    assert "out.zarr exists" in str(info.value) or "#FFFFFF" in str(info.value)
    assert _store_files(out) == before
    assert [p.name for p in scene.iterdir() if p.name.startswith(".out.zarr.")] == []


def test_out_that_is_not_a_store_is_never_replaced(scene: Path) -> None:
    out = scene / "out.zarr"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(PrepError, match="is not a semisup store"):
        _build(scene, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_interrupt_while_writing_leaves_nothing(
    scene: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from data_prep import labels

    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(labels.LabelRaster, "read_ids", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _build(scene)
    _assert_nothing_left(scene / "out.zarr")


def test_boxes_naming_an_ambiguous_image(scene: Path) -> None:
    for folder in ("one", "two"):
        _png(scene / folder / "a.png", np.zeros((20, 30, 3), np.uint8))
    (scene / "boxes.csv").write_text("image_path,xmin,ymin,xmax,ymax\na.png,1,1,2,2\n")
    _expect(
        scene,
        PrepError,
        "boxes.csv",
        "'a.png' matches 2 sources",
        inputs=[scene / "one", scene / "two"],
        labels=[],
        boxes=[scene / "boxes.csv"],
    )

"""Generated scenes: deterministic, every class present, written as georeferenced rasters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio

from semisup.known_imagery import CLASS_NAMES
from semisup.synthetic import generate_scene, write_scenes


def test_scene_is_deterministic_and_has_every_class() -> None:
    image_a, label_a = generate_scene(256, seed=3)
    image_b, label_b = generate_scene(256, seed=3)
    image_c, _ = generate_scene(256, seed=4)
    assert image_a.shape == (256, 256, 3) and image_a.dtype == np.uint8
    assert label_a.shape == (256, 256) and label_a.dtype == np.uint8
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(label_a, label_b)
    assert not np.array_equal(image_a, image_c)
    large_image, large_label = generate_scene(768, seed=0)
    assert set(np.unique(large_label)) == set(range(len(CLASS_NAMES)))
    # classes must be separable by colour: per-class mean colours differ clearly
    means = np.array([large_image[large_label == k].mean(0) for k in range(len(CLASS_NAMES))])
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distances[~np.eye(len(CLASS_NAMES), dtype=bool)].min() > 20


def test_written_scenes_are_georeferenced_with_a_nodata_corner(tmp_path: Path) -> None:
    images, masks = write_scenes(tmp_path, count=2, size=128, seed=0)
    assert sorted(p.name for p in images.iterdir()) == ["scene_0.tif", "scene_1.tif"]
    with rasterio.open(images / "scene_1.tif") as src:
        assert src.crs.to_epsg() == 32640 and src.res == (0.5, 0.5)
        valid = src.dataset_mask() > 0
        assert not valid[0, 0] and valid[-1, -1]
    assert (masks / "scene_1.png").is_file()

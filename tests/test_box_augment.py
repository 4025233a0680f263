"""Detection views move boxes with the image: checked on a real NEON crown tile."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from kornia.geometry.transform import get_rotation_matrix2d, warp_affine

from semisup.config import AugmentConfig
from semisup.detection.box_augment import (
    affine_boxes,
    strong_box_view,
    turn_boxes,
    weak_box_view,
)
from semisup.tile_boxes import visible_part

SIZE = 128


@pytest.fixture(scope="module")
def crown_tile(shared_data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A 128 px RGB tile of OSBS_029.tif and the crowns wholly inside it (pixel-edge xyxy)."""
    import rasterio
    from rasterio.windows import Window

    neon = shared_data / "neon_trees"
    with rasterio.open(neon / "OSBS_029.tif") as src:
        image = src.read((1, 2, 3), window=Window(0, 0, SIZE, SIZE)).astype(np.float32) / 255
    rows = list(csv.DictReader((neon / "OSBS_029.csv").open()))
    boxes = np.array([[float(r[c]) for c in ("xmin", "ymin", "xmax", "ymax")] for r in rows])
    inside = boxes[(boxes[:, 2] <= SIZE) & (boxes[:, 3] <= SIZE)]
    assert len(inside) >= 2
    return torch.from_numpy(image), torch.from_numpy(inside).float()


def test_flips_and_turns_keep_each_crowns_pixels_in_its_box(
    crown_tile: tuple[torch.Tensor, torch.Tensor],
) -> None:
    image, boxes = crown_tile
    for flip, turns in itertools.product((False, True), range(4)):
        view = image.flip(-1) if flip else image
        view = torch.rot90(view, turns, dims=(-2, -1))
        moved = turn_boxes(boxes, flip, turns, SIZE)
        for (x0, y0, x1, y1), (a0, b0, a1, b1) in zip(
            boxes.int().tolist(), moved.int().tolist(), strict=True
        ):
            crop = image[:, y0:y1, x0:x1]
            crop = torch.rot90(crop.flip(-1) if flip else crop, turns, dims=(-2, -1))
            assert torch.equal(view[:, b0:b1, a0:a1], crop), (flip, turns)


def test_the_weak_view_draws_one_turn_per_sample_for_image_and_boxes(
    crown_tile: tuple[torch.Tensor, torch.Tensor],
) -> None:
    image, boxes = crown_tile
    keys = torch.arange(8)
    view = weak_box_view(
        image.expand(8, -1, -1, -1),
        [boxes] * 8,
        [torch.ones(len(boxes))] * 8,
        AugmentConfig(),
        keys,
    )
    for i in range(8):
        x0, y0, x1, y1 = view.boxes[i][0].int().tolist()
        mass = view.images[i, :, y0:y1, x0:x1].sum()
        a0, b0, a1, b1 = boxes[0].int().tolist()
        assert torch.isclose(mass, image[:, b0:b1, a0:a1].sum())  # the same pixels, moved


def test_a_rotated_and_scaled_box_encloses_its_crown(
    crown_tile: tuple[torch.Tensor, torch.Tensor],
) -> None:
    _, boxes = crown_tile
    matrix = get_rotation_matrix2d(
        torch.tensor([[(SIZE - 1) / 2, (SIZE - 1) / 2]]),
        torch.tensor([30.0]),
        torch.tensor([[1.2, 1.2]]),
    )
    moved = affine_boxes(boxes, matrix[0])
    for box, new in zip(boxes.int().tolist(), moved.tolist(), strict=True):
        mask = torch.zeros(1, 1, SIZE, SIZE)
        mask[..., box[1] : box[3], box[0] : box[2]] = 1
        warped = warp_affine(mask, matrix, (SIZE, SIZE), mode="bilinear")[0, 0]
        ys, xs = torch.nonzero(warped > 0.5, as_tuple=True)
        if len(xs) == 0:
            continue  # turned out of the tile
        x0, y0, x1, y1 = new
        # the crown's pixels lie inside its new box, and the box is tight around them
        assert xs.min() >= math.floor(x0) - 1 and xs.max() + 1 <= math.ceil(x1) + 1
        assert ys.min() >= math.floor(y0) - 1 and ys.max() + 1 <= math.ceil(y1) + 1
        inside = warped[max(0, int(y0)) : int(math.ceil(y1)), max(0, int(x0)) : int(math.ceil(x1))]
        assert inside.sum() >= 0.99 * warped.sum()


def test_strong_view_clips_and_drops_boxes_turned_out_of_the_tile(
    crown_tile: tuple[torch.Tensor, torch.Tensor],
) -> None:
    image, boxes = crown_tile
    config = AugmentConfig(rotation_deg=180.0, scale_min=1.3, scale_max=1.33)
    labels = torch.arange(len(boxes))
    view = strong_box_view(
        image.expand(16, -1, -1, -1), [boxes] * 16, [labels] * 16, config, torch.arange(16)
    )
    assert view.images.shape == (16, 3, SIZE, SIZE)
    for moved, kept in zip(view.boxes, view.labels, strict=True):
        assert len(moved) == len(kept) and ((moved >= 0) & (moved <= SIZE)).all()
        assert len(set(kept.tolist())) == len(kept)  # each crown at most once
    assert sum(len(b) for b in view.boxes) < 16 * len(boxes)  # zoomed in: some crowns leave
    clipped, kept = visible_part(
        torch.tensor([[-30.0, 0, 10, 10], [-5, 0, 15, 10]]), SIZE, min_side_px=2, min_visible=0.5
    )
    assert kept.tolist() == [False, True] and clipped[1].tolist() == [0, 0, 15, 10]

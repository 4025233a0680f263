"""Augmentation: geometry moves image and labels identically (checked on real Dubai tiles)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semisup import columns as C
from semisup.augment import AugmentConfig, apply_affine, cutmix, strong_view, weak_view
from semisup.known_imagery import DUBAI_COLOURS

GEOMETRY_ONLY = AugmentConfig(colour_strength=0.0, blur_prob=0.0, cutmix_prob=0.0)


def _dubai_batch(dubai_dir: Path, size: int = 192) -> dict[str, torch.Tensor]:
    """Two real 192×192 crops; the label is also appended to the image as a 4th channel."""
    images, labels = [], []
    for part in ("001", "005"):
        rgb = np.asarray(Image.open(dubai_dir / "tile_1" / "images" / f"image_part_{part}.jpg"))
        mask = np.asarray(
            Image.open(dubai_dir / "tile_1" / "masks" / f"image_part_{part}.png").convert("RGB")
        )
        codes = (
            (mask[..., 0].astype(np.int64) << 16)
            | (mask[..., 1].astype(np.int64) << 8)
            | mask[..., 2]
        )
        label = np.full(codes.shape, C.IGNORE_INDEX, dtype=np.int64)
        for colour, class_id in DUBAI_COLOURS.items():
            label[codes == int(colour[1:], 16)] = class_id
        images.append(rgb[:size, :size])
        labels.append(label[:size, :size])
    label = torch.from_numpy(np.stack(labels))
    image = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    image = torch.cat([image, (label.float() / 255)[:, None]], 1)  # label rides along as a channel
    return {
        C.IMAGE: image,
        C.LABEL: label,
        C.PSEUDO_LABEL: label.clone(),
        C.CONFIDENCE: torch.rand(label.shape),
        C.VALID: torch.ones(label.shape, dtype=torch.bool),
    }


def _interior(label: torch.Tensor) -> torch.Tensor:
    """Pixels whose 5×5 neighbourhood has one class: bilinear and nearest agree there."""
    x = label.float()[:, None]
    lo = -torch.nn.functional.max_pool2d(-x, 5, 1, 2)
    hi = torch.nn.functional.max_pool2d(x, 5, 1, 2)
    return (lo == hi)[:, 0]


def test_weak_view_is_an_exact_permutation_aligned_across_columns(dubai_dir: Path) -> None:
    batch = _dubai_batch(dubai_dir)
    view = weak_view(batch, AugmentConfig(), torch.tensor([1, 2]))
    ride_along = (view[C.IMAGE][:, 3] * 255).round().long()
    assert torch.equal(ride_along, view[C.LABEL])
    assert torch.equal(view[C.LABEL], view[C.PSEUDO_LABEL])
    for i in range(2):  # a permutation: same histogram
        assert torch.equal(
            view[C.LABEL][i].flatten().sort().values, batch[C.LABEL][i].flatten().sort().values
        )


def test_strong_geometry_keeps_image_and_labels_aligned_on_real_tiles(dubai_dir: Path) -> None:
    batch = _dubai_batch(dubai_dir)
    view = strong_view(batch, GEOMETRY_ONLY, torch.tensor([0, 1]))
    ride_along = (view[C.IMAGE][:, 3] * 255).round().long()
    check = _interior(view[C.LABEL]) & view[C.VALID] & (view[C.LABEL] != C.IGNORE_INDEX)
    assert check.float().mean() > 0.3
    agreement = (ride_along[check] == view[C.LABEL][check]).float().mean().item()
    assert agreement > 0.99
    assert torch.equal(view[C.LABEL], view[C.PSEUDO_LABEL])
    # pixels rotated in from outside the tile carry no supervision
    outside = ~view[C.VALID]
    assert outside.any()
    assert (view[C.LABEL][outside] == C.IGNORE_INDEX).all()
    assert (view[C.CONFIDENCE][outside] == 0).all()


def test_identity_matrix_changes_nothing() -> None:
    batch = {
        C.IMAGE: torch.rand(2, 3, 16, 16),
        C.LABEL: torch.randint(0, 5, (2, 16, 16)),
        C.VALID: torch.ones(2, 16, 16, dtype=torch.bool),
    }
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3)
    out = apply_affine(batch, identity)
    assert torch.allclose(out[C.IMAGE], batch[C.IMAGE], atol=1e-5)
    assert torch.equal(out[C.LABEL], batch[C.LABEL]) and out[C.VALID].all()


def test_photometric_changes_touch_the_image_only() -> None:
    batch = {
        C.IMAGE: torch.rand(4, 3, 32, 32),
        C.LABEL: torch.randint(0, 5, (4, 32, 32)),
        C.CONFIDENCE: torch.rand(4, 32, 32),
    }
    config = AugmentConfig(
        rotation_deg=0.0,
        scale_min=1.0,
        scale_max=1.0,
        cutmix_prob=0.0,
        colour_strength=0.5,
        blur_prob=1.0,
    )
    out = strong_view(batch, config, torch.arange(4))
    assert not torch.allclose(out[C.IMAGE], batch[C.IMAGE], atol=1e-3)
    assert torch.equal(out[C.LABEL], batch[C.LABEL])
    assert torch.allclose(out[C.CONFIDENCE], batch[C.CONFIDENCE])


def test_cutmix_pastes_the_same_box_into_every_column() -> None:
    label = torch.stack(
        [torch.zeros(32, 32, dtype=torch.int64), torch.ones(32, 32, dtype=torch.int64)]
    )
    batch = {C.IMAGE: label[:, None].float().expand(2, 3, 32, 32).clone(), C.LABEL: label}
    out = cutmix(batch, 1.0, torch.tensor([0, 1]))
    pasted = out[C.LABEL][0] == 1
    assert 0.2 < pasted.float().mean() < 0.55
    assert torch.equal(out[C.IMAGE][0, 0] == 1, pasted)


def test_bad_augment_values_are_named() -> None:
    with pytest.raises(ValueError, match="augment.scale_min"):
        AugmentConfig(scale_min=2.0, scale_max=1.0)
    with pytest.raises(ValueError, match="augment.cutmix_prob"):
        AugmentConfig(cutmix_prob=1.5)

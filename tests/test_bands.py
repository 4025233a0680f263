"""Three-band composites for the RGB-pretrained teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semisup.bands import to_three_bands


def _bands_as_values(height: int, width: int, band_count: int, dtype=np.uint16) -> np.ndarray:
    """H×W×C image whose band ``c`` holds the value ``10 * (c + 1)`` everywhere."""
    values = 10 * (np.arange(band_count) + 1)
    return np.broadcast_to(values, (height, width, band_count)).astype(dtype)


def test_rgb_takes_first_three_bands_of_a_four_band_image():
    image = _bands_as_values(4, 5, 4)
    out = to_three_bands(image, "rgb")
    assert out.shape == (4, 5, 3)
    assert out.dtype == np.uint16
    assert out[0, 0].tolist() == [10, 20, 30]


def test_indices_select_a_false_colour_composite():
    out = to_three_bands(_bands_as_values(2, 2, 4), (3, 0, 1))  # NIR, R, G for an R,G,B,NIR store
    assert out[1, 1].tolist() == [40, 10, 20]


@pytest.mark.parametrize("bands", ["rgb", "gray", "mean", (0,), (0, 0, 0)])
def test_single_band_is_replicated(bands):
    image = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    out = to_three_bands(image, bands)
    assert out.shape == (3, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], image[..., 0])


def test_gray_replicates_the_first_band():
    out = to_three_bands(_bands_as_values(2, 2, 4), "gray")
    assert out[0, 0].tolist() == [10, 10, 10]


def test_mean_averages_bands_and_keeps_integer_dtype():
    image = np.array([[[1, 2, 4, 6]]], dtype=np.uint8)  # mean 3.25 -> 3
    out = to_three_bands(image, "mean")
    assert out.dtype == np.uint8
    assert out.tolist() == [[[3, 3, 3]]]
    floats = to_three_bands(image.astype(np.float32), "mean")
    np.testing.assert_allclose(floats, 3.25)


def test_tensor_channels_first_batch():
    image = torch.arange(2 * 5 * 3 * 3, dtype=torch.float32).reshape(2, 5, 3, 3)  # B×C×H×W
    out = to_three_bands(image, (4, 2, 0), channel_axis=1)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 3, 3, 3)
    assert torch.equal(out, image[:, [4, 2, 0]])
    mean = to_three_bands(image, "mean", channel_axis=1)
    assert torch.allclose(mean, image.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1))
    assert mean.is_contiguous()


def test_out_of_range_index_names_index_and_band_count():
    with pytest.raises(ValueError, match=r"band index 4 is out of range for an image with 4 bands"):
        to_three_bands(_bands_as_values(2, 2, 4), (4, 2, 1))
    with pytest.raises(ValueError, match=r"band index 2 is out of range for an image with 2 bands"):
        to_three_bands(_bands_as_values(2, 2, 2), "rgb")
    with pytest.raises(ValueError, match=r"band index -1 is out of range"):
        to_three_bands(_bands_as_values(2, 2, 4), (-1, 0, 1))


def test_bad_selections_are_refused():
    image = _bands_as_values(2, 2, 4)
    with pytest.raises(ValueError, match=r"need 1 or 3 band indices, got 2"):
        to_three_bands(image, (0, 1))
    with pytest.raises(ValueError, match=r"unknown band composite 'ndvi'; known: rgb, gray, mean"):
        to_three_bands(image, "ndvi")

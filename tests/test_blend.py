"""The blending math of `semisup predict`: window geometry, weights, and the row-band accumulator."""

from __future__ import annotations

import numpy as np
import pytest

from semisup import blend


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(0, keepdims=True))
    return shifted / shifted.sum(0, keepdims=True)


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [(900, 256, 64), (1000, 256, 0), (256, 256, 64), (100, 256, 64), (513, 128, 64), (257, 256, 1)],
)
def test_windows_cover_the_axis_with_the_overlap(length: int, tile: int, overlap: int) -> None:
    starts = blend.window_starts(length, tile, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    covered = np.zeros(max(length, tile), int)
    for start in starts:
        covered[start : start + tile] += 1
    assert covered[:length].min() >= 1 and covered[:length].max() <= 3  # 3: the moved last
    if length > tile:
        assert starts[-1] + tile == length  # the last window ends at the edge, no padding
        steps = np.diff(starts)
        assert np.all(steps[:-1] == tile - overlap) and 0 < steps[-1] <= tile - overlap


def test_window_starts_refuse_more_than_half_overlap() -> None:
    with pytest.raises(ValueError, match="overlap must be in"):
        blend.window_starts(1000, 256, 129)


def test_taper_ramps_sum_to_a_constant_across_an_overlap() -> None:
    tile, overlap, floor = 64, 16, 0.05
    line = blend.taper(tile, overlap, floor)
    assert line.min() == pytest.approx(floor + (1 - floor) * (0.5 - 0.5 * np.cos(np.pi / 32)))
    assert np.all(line[overlap:-overlap] == 1) and np.all(np.diff(line[:overlap]) > 0)
    # the right ramp of one window over the left ramp of the next: a constant sum, no step
    np.testing.assert_allclose(line[-overlap:] + line[:overlap], 1 + floor, rtol=1e-6)
    weights = blend.window_weights(tile, overlap, floor)
    assert weights.shape == (tile, tile) and weights.min() > 0
    np.testing.assert_allclose(weights, np.outer(line, line))


def _blend_field(
    field: np.ndarray, tile: int, overlap: int, stripe: int, bias: float = 0.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut a K×H×W probability field into windows, as a model whose windows each add their own
    random logit bias would see it, and blend them back stripe by stripe, window row by row."""
    rng = np.random.default_rng(seed)
    k, height, width = field.shape
    weights = blend.window_weights(tile, overlap, blend.DEFAULT_FLOOR)
    label = np.full((height, width), 255, np.uint8)
    confidence = np.full((height, width), 255, np.uint8)
    row_starts = blend.window_starts(height, tile, overlap)
    col_starts = blend.window_starts(width, tile, overlap)
    padded = np.zeros((k, height + tile, width + tile), np.float32)
    padded[:, :height, :width] = field
    for x0, x1 in blend.stripe_bounds(width, stripe):
        first, last = blend.windows_in_span(col_starts, tile, x0, x1)
        accumulator = blend.BandAccumulator(x0, x1, height, k, weights)
        for r, y in enumerate(row_starts):
            for x in col_starts[first:last]:
                window = padded[:, y : y + tile, x : x + tile]
                shift = bias * rng.standard_normal((k, 1, 1))
                probabilities = _softmax(np.log(np.maximum(window, 1e-12)) + shift)
                accumulator.add(y, x, probabilities, np.ones((tile, tile), bool))
            end = row_starts[r + 1] if r + 1 < len(row_starts) else height
            top, rows_label, rows_conf = accumulator.finish(end)
            label[top : top + len(rows_label), x0:x1] = rows_label
            confidence[top : top + len(rows_label), x0:x1] = rows_conf
    return label, confidence, field.argmax(0)


@pytest.mark.parametrize(("tile", "overlap", "stripe"), [(32, 8, 1000), (32, 16, 48), (40, 0, 64)])
def test_windows_that_agree_blend_back_to_the_field_exactly(
    tile: int, overlap: int, stripe: int
) -> None:
    """A model whose windows agree where they overlap (no context effects) must give back the
    whole-raster prediction: any offset, weight or stripe-border error changes pixels."""
    rng = np.random.default_rng(1)
    field = _softmax(rng.normal(size=(3, 101, 150)).astype(np.float32) * 3)
    label, confidence, truth = _blend_field(field, tile, overlap, stripe)
    np.testing.assert_array_equal(label, truth)
    np.testing.assert_array_equal(confidence, np.rint(field.max(0) * 100).astype(np.uint8))


def test_disagreeing_windows_blend_without_steps_at_window_borders() -> None:
    """Windows that disagree (each adds its own bias, like context effects of a real model):
    blended with the taper, neighbouring pixels stay close; cut hard at window borders, the
    probability jumps there."""
    height = width = 192
    field = np.full((2, height, width), 0.5, np.float32)  # the truth is flat
    tile, overlap = 64, 32
    rng = np.random.default_rng(0)
    weights = blend.window_weights(tile, overlap, blend.DEFAULT_FLOOR)
    sums = np.zeros((2, height, width), np.float32)
    total = np.zeros((height, width), np.float32)
    hard = np.zeros((2, height, width), np.float32)
    for y in blend.window_starts(height, tile, overlap):
        for x in blend.window_starts(width, tile, overlap):
            window = field[:, y : y + tile, x : x + tile]
            probabilities = _softmax(np.log(window) + 1.5 * rng.standard_normal((2, 1, 1)))
            sums[:, y : y + tile, x : x + tile] += probabilities * weights
            total[y : y + tile, x : x + tile] += weights
            hard[:, y : y + tile, x : x + tile] = probabilities  # last window wins
    blended = sums[0] / total
    step_blended = np.abs(np.diff(blended, axis=1)).max()
    step_hard = np.abs(np.diff(hard[0], axis=1)).max()
    assert step_hard > 0.2  # the windows do disagree
    assert step_blended < step_hard / 8


def test_class_map_marks_nodata_and_unpredicted_pixels() -> None:
    sums = np.array([[[0.2, 1.6, 0.0]], [[0.8, 0.4, 0.0]]], np.float32)  # K=2, 1×3
    weight = np.array([[1.0, 2.0, 0.0]], np.float32)
    valid = np.array([[True, False, True]])
    label, confidence = blend.class_map(sums, weight, valid)
    assert label.tolist() == [[1, 255, 255]] and confidence.tolist() == [[80, 255, 255]]


def test_accumulator_ignores_rows_already_finished() -> None:
    """On resume the blender starts at the first unwritten row; earlier rows of a window are
    dropped rather than folded into the wrong rows."""
    tile = 8
    weights = blend.window_weights(tile, 2)
    accumulator = blend.BandAccumulator(0, 8, 20, 2, weights, top=6)
    probabilities = np.zeros((2, tile, tile), np.float32)
    probabilities[1] = 1.0
    accumulator.add(0, 0, probabilities, np.ones((tile, tile), bool))
    top, label, _ = accumulator.finish(8)
    assert top == 6 and label.shape == (2, 8) and np.all(label == 1)
    top, label, _ = accumulator.finish(12)
    assert top == 8 and np.all(label == 255)  # rows no window covered: not predicted

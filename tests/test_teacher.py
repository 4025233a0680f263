"""The SAM teacher without Ray: prompt geometry, mask selection on a scripted decoder, and the
callable class on tiny SAM and on a saved student checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from store_factory import SourceSpec, build_store
from torch import nn

from semisup import columns as C
from semisup import store as tile_store
from semisup.masks import MaskFilter, paint_instances
from semisup.sam_prompts import (
    INSTANCE_FIELDS,
    automatic_masks,
    instance_rows,
    point_grid,
    restrict_to_boxes,
)
from semisup.teacher import (
    INSTANCE_IGNORE,
    INSTANCES,
    NUM_MASKS,
    TeacherConfig,
    build_teacher,
    label_encoding,
    teacher_image,
)
from semisup.tile_boxes import boxes_in_tile

TILE = 64  # px; tiny SAM and the scripted decoder both run at this size
LENIENT = MaskFilter(min_predicted_iou=-1e9, min_stability=0.0, min_area_px=4)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models are fastest single-threaded, and other tests share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Pure helpers


def test_boxes_are_shifted_into_the_tile_clipped_and_filtered() -> None:
    boxes = np.array(
        [
            [210, 110, 230, 130],  # inside the tile at (y0=100, x0=200)
            [190, 150, 210, 180],  # crosses the left edge
            [300, 300, 320, 320],  # elsewhere
            [180, 120, 200, 140],  # touches the left edge only: no area inside
        ],
        dtype=np.float32,
    )
    shifted, index = boxes_in_tile(boxes, y0=100, x0=200, size=64)
    assert index.tolist() == [0, 1]
    np.testing.assert_array_equal(shifted[0], [10, 10, 30, 30])
    np.testing.assert_array_equal(shifted[1], [0, 50, 10, 64])  # clipped to [0, 64]
    assert shifted.dtype == np.float32
    empty, none = boxes_in_tile(np.zeros((0, 4)), 0, 0, 64)
    assert empty.shape == (0, 4) and none.shape == (0,)
    # detection targets also drop boxes mostly outside: box 1 shows 10×14 of its 20×30 px
    assert boxes_in_tile(boxes, y0=100, x0=200, size=64, min_visible=0.23)[1].tolist() == [0, 1]
    assert boxes_in_tile(boxes, y0=100, x0=200, size=64, min_visible=0.24)[1].tolist() == [0]


def test_restricted_logits_stay_inside_the_padded_box() -> None:
    logits = torch.full((2, 40, 40), 5.0)
    boxes = torch.tensor([[10.0, 10.0, 20.0, 30.0], [0.0, 0.0, 40.0, 40.0]])
    restricted = restrict_to_boxes(logits, boxes, margin=0.1)
    inside = restricted[0] > 0
    ys, xs = torch.nonzero(inside, as_tuple=True)
    # 10 % of 10 px wide = 1 px, of 20 px high = 2 px, on each side
    assert (int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())) == (9, 20, 8, 31)
    assert bool((restricted[1] > 0).all())  # a box covering the tile keeps everything
    assert torch.sigmoid(restricted[0][~inside]).max() == 0  # outside: probability 0


def test_teacher_input_scales_each_band_then_selects_three() -> None:
    image = np.stack([np.full((4, 4), v, dtype=np.uint16) for v in (100, 200, 300, 400)], -1)
    out = teacher_image(image, (100, 100, 100, 0), (300, 300, 300, 800), bands=(3, 0, 1))
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    assert out[0, 0].tolist() == [128, 0, 128]  # 400/800, (100-100)/200, (200-100)/200


def test_label_encodings() -> None:
    assert label_encoding("automatic") == (np.dtype(np.uint16), INSTANCE_IGNORE, 0)
    assert label_encoding("prompted", "foreground") == (np.dtype(np.uint8), C.IGNORE_INDEX, 0)
    assert label_encoding("semantic") == (np.dtype(np.uint8), C.IGNORE_INDEX, None)


# ---------------------------------------------------------------------------------------------
# A scripted SAM: the decoder returns the object under each point, or the prompt's box grown


OBJECTS = ((8, 8, 24, 24), (36, 32, 60, 56))  # x0, y0, x1, y1 on a 64 px tile, multiples of 4


class _Encoder(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.img_size = size
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.img_size // 16
        return torch.zeros(len(images), 256, grid, grid)


class _Prompts:
    """Passes raw coordinates through as the 'sparse embedding'."""

    def __call__(self, points: Any, boxes: Any, masks: Any) -> tuple[torch.Tensor, None]:
        return (boxes[:, None, :] if boxes is not None else points[0]), None

    def get_dense_pe(self) -> None:
        return None


class _Decoder:
    """Three masks per point (its object twice, then the whole tile), or a box grown by 8 px."""

    def __init__(self, size: int) -> None:
        self.low = size // 4  # SAM's low-resolution mask side

    def _square(self, x0: float, y0: float, x1: float, y1: float) -> torch.Tensor:
        mask = torch.full((self.low, self.low), -10.0)
        rows = slice(max(int(y0), 0) // 4, max(int(y1), 0) // 4)
        mask[rows, max(int(x0), 0) // 4 : max(int(x1), 0) // 4] = 10.0
        return mask

    def __call__(self, *, sparse_prompt_embeddings: torch.Tensor, multimask_output: bool, **_: Any):
        masks, scores = [], []
        for prompt in sparse_prompt_embeddings[:, 0]:
            if len(prompt) == 4:  # a box
                x0, y0, x1, y1 = prompt.tolist()
                one = self._square(x0 - 8, y0 - 8, x1 + 8, y1 + 8)
                masks.append(torch.stack([one] * (3 if multimask_output else 1)))
                scores.append(torch.full((len(masks[-1]),), 0.9))
                continue
            x, y = prompt.tolist()
            hit = [o for o in OBJECTS if o[0] <= x < o[2] and o[1] <= y < o[3]]
            obj = self._square(*hit[0]) if hit else torch.full((self.low, self.low), -10.0)
            masks.append(torch.stack([obj, obj, torch.full_like(obj, 10.0)]))
            scores.append(torch.tensor([0.95, 0.9, 0.99]))
        return torch.stack(masks), torch.stack(scores)


class ScriptedSam(nn.Module):
    def __init__(self, size: int = TILE) -> None:
        super().__init__()
        self.image_encoder = _Encoder(size)
        self.prompt_encoder = _Prompts()
        self.mask_decoder = _Decoder(size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return images


def test_automatic_masks_keep_one_mask_per_object() -> None:
    sam = ScriptedSam()
    logits, scores = automatic_masks(
        sam, torch.zeros(1, 256, 4, 4), point_grid(8, TILE), rules=MaskFilter(min_area_px=16)
    )
    # 64 points give 192 masks: whole-tile ones fail the area rule, empty ones too, and NMS
    # folds the many copies of each object into one.
    assert len(logits) == len(OBJECTS) and torch.all(scores == 0.95)
    found = sorted(tuple(int(v) for v in _bbox(mask > 0)) for mask in logits)
    assert found == sorted(OBJECTS)


def _bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ---------------------------------------------------------------------------------------------
# The callable class


@pytest.fixture(scope="module")
def box_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two 128×128 sources of 64 px tiles; the first has three boxes, one across tiles."""
    url = str(tmp_path_factory.mktemp("teacher") / "boxes.zarr")
    build_store(
        url,
        [
            SourceSpec("a", 128, 128, texture="smooth", nodata_box=(0, 120, 8, 128)),
            SourceSpec("b", 100, 100, texture="smooth"),
        ],
        tile_size=TILE,
    )
    root = tile_store.open_store(url, "r+")
    boxes = np.array([[4, 4, 20, 28], [50, 50, 80, 80], [100, 100, 120, 124]], np.float32)
    tile_store.write_boxes(root["a"], boxes, np.zeros(3, np.int32))
    return url


def _batch(url: str, rows: list[tuple[str, int, int]]) -> dict[str, np.ndarray]:
    """A read_tiles-like batch of the tiles (source, y0, x0)."""
    root = tile_store.open_store(url)
    tiles = [tile_store.read_tile(root[s], y0, x0, TILE) for s, y0, x0 in rows]
    return {
        C.IMAGE: np.stack([t[C.IMAGE] for t in tiles]),
        C.VALID: np.stack([t[C.VALID] for t in tiles]),
        C.TILE_ID: np.arange(len(rows), dtype=np.int64),
        C.SOURCE: np.array([s for s, _, _ in rows], dtype=object),
        C.Y0: np.array([y for _, y, _ in rows], dtype=np.int64),
        C.X0: np.array([x for _, _, x in rows], dtype=np.int64),
    }


ALL_TILES = [("a", 0, 0), ("a", 0, 64), ("a", 64, 0), ("a", 64, 64), ("b", 64, 64)]


def test_prompted_masks_carry_their_box_index_and_stay_in_their_box(box_store: str) -> None:
    teacher = build_teacher(
        box_store, TeacherConfig(mode="prompted", model_type="tiny", box_margin=0.1)
    )
    teacher.sam = ScriptedSam()  # masks spill 8 px beyond every box
    out = teacher(_batch(box_store, ALL_TILES))
    assert C.IMAGE not in out and C.VALID not in out
    label, confidence = out[C.PSEUDO_LABEL], out[C.CONFIDENCE]
    assert label.dtype == np.uint16 and confidence.dtype == np.float32
    boxes = tile_store.open_store(box_store)["a"][tile_store.BOXES][...]
    mosaic = np.zeros((128, 128), np.int64)
    for (source, y0, x0), tile in zip(ALL_TILES, label, strict=True):
        if source == "a":
            mosaic[y0 : y0 + TILE, x0 : x0 + TILE] = tile
    for box_id, (x0, y0, x1, y1) in enumerate(boxes, start=1):
        ys, xs = np.nonzero(mosaic == box_id)
        assert len(ys), f"box {box_id} has no mask"
        pad_x, pad_y = 0.1 * (x1 - x0), 0.1 * (y1 - y0)
        assert xs.min() >= x0 - pad_x - 1 and xs.max() < x1 + pad_x + 1
        assert ys.min() >= y0 - pad_y - 1 and ys.max() < y1 + pad_y + 1
    # the box across four tiles is painted in each of them; source b has no boxes
    assert {int(v) for v in np.unique(label[3])} >= {0, 2, 3}
    assert all(2 in np.unique(tile) for tile in label[:4])
    inside_b = np.zeros((TILE, TILE), bool)
    inside_b[:36, :36] = True  # source b is 100 px: 36 px of its last tile are in the raster
    assert out[NUM_MASKS].tolist()[4] == 0 and np.all(label[4][inside_b] == 0)
    np.testing.assert_allclose(confidence[4][inside_b], 0.5)  # the background confidence
    assert np.all(label[4][~inside_b] == INSTANCE_IGNORE)  # padding is not valid
    # nodata pixels of source a (rows 0-7, cols 120-127, in tile (0, 64))
    assert np.all(label[1][:8, 56:] == INSTANCE_IGNORE) and np.all(confidence[1][:8, 56:] == 0)


def _painted_boxes(label: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """Pixel-edge bounding box of each instance id painted in an S×S map (tile frame)."""
    boxes = {}
    for k in np.unique(label):
        if 0 < k < INSTANCE_IGNORE:
            boxes[int(k)] = _bbox(torch.from_numpy(label == k))
    return boxes


def test_instance_rows_are_the_whole_masks_before_painting() -> None:
    logits = torch.full((2, 16, 16), -5.0)
    logits[0, 2:10, 3:12] = 5.0  # the stronger mask
    logits[1, 4:14, 5:8] = 5.0  # overlaps it: keeps only rows 10-13 when painted
    scores = torch.tensor([0.9, 0.8])
    rows = instance_rows(logits, scores, torch.tensor([7, 9]), top=100, left=40)
    assert rows.shape == (2, len(INSTANCE_FIELDS)) and rows.dtype == np.float64
    field = {name: rows[:, i] for i, name in enumerate(INSTANCE_FIELDS)}
    np.testing.assert_array_equal(field["instance_id"], [7, 9])
    boxes = np.stack([field[k] for k in ("x0", "y0", "x1", "y1")], 1)
    np.testing.assert_array_equal(boxes, [[43, 102, 52, 110], [45, 104, 48, 114]])
    np.testing.assert_array_equal(field["area"], [72, 30])
    np.testing.assert_allclose(field["predicted_iou"], [0.9, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(field["stability"], [1.0, 1.0])  # ±5 logits: no pixel moves
    painted = paint_instances(logits, scores)[0].numpy()
    assert _painted_boxes(painted)[2] == (5, 10, 8, 14)  # painting cut the weaker mask
    empty = instance_rows(
        torch.full((1, 16, 16), -1.0), scores[:1], torch.tensor([1]), top=0, left=0
    )
    assert empty.shape == (0, len(INSTANCE_FIELDS))  # an empty mask is no instance


@pytest.mark.parametrize("mode", ["automatic", "prompted"])
def test_instance_rows_are_the_bounding_boxes_of_the_teacher_masks(
    box_store: str, mode: str
) -> None:
    teacher = build_teacher(
        box_store,
        TeacherConfig(
            mode=mode,
            model_type="tiny",
            box_margin=0.1,
            points_per_side=8,
            mask_filter=MaskFilter(min_area_px=16),
        ),
    )
    teacher.sam = ScriptedSam()  # objects of OBJECTS under points; boxes grown by 8 px
    tiles = [("a", 0, 0), ("a", 64, 64)]
    out = teacher(_batch(box_store, tiles))
    assert [len(rows) for rows in out[INSTANCES]] == out[NUM_MASKS].tolist()
    for (_, y0, x0), label, rows in zip(tiles, out[C.PSEUDO_LABEL], out[INSTANCES], strict=True):
        assert len(rows) > 0
        ids = rows[:, 0].astype(int).tolist()
        in_tile = rows[:, 1:5] - [x0, y0, x0, y0]  # source raster -> tile frame
        # the scripted masks do not overlap: each row's box is its painted instance's box
        painted = _painted_boxes(label)
        assert sorted(painted) == sorted(ids)
        for k, box in zip(ids, in_tile, strict=True):
            assert tuple(box) == painted[k]
        if mode == "automatic":
            assert sorted(map(tuple, in_tile)) == sorted(OBJECTS)
    foreground = build_teacher(
        box_store, TeacherConfig(mode=mode, model_type="tiny", output="foreground")
    )
    assert INSTANCES not in foreground(_batch(box_store, tiles[:1]))


def test_tiny_sam_automatic_is_batch_invariant(box_store: str) -> None:
    teacher = build_teacher(
        box_store,
        TeacherConfig(mode="automatic", model_type="tiny", points_per_side=4, mask_filter=LENIENT),
    )
    together = teacher(_batch(box_store, ALL_TILES))
    alone = teacher(_batch(box_store, ALL_TILES[2:3]))
    assert together[C.PSEUDO_LABEL].shape == (5, TILE, TILE)
    assert together[NUM_MASKS].dtype == np.int32 and together[NUM_MASKS].max() >= 1
    assert together[C.CONFIDENCE].min() >= 0 and together[C.CONFIDENCE].max() <= 1
    # A tile's pseudo-label does not depend on its batch up to float rounding (the batched
    # encoder may take another GEMM path for another batch size: a few ulp here at 64 px).
    flipped = np.mean(alone[C.PSEUDO_LABEL][0] != together[C.PSEUDO_LABEL][2])
    assert flipped < 1e-3
    np.testing.assert_allclose(alone[C.CONFIDENCE][0], together[C.CONFIDENCE][2], atol=1e-6)
    same_seed = build_teacher(
        box_store,
        TeacherConfig(mode="automatic", model_type="tiny", points_per_side=4, mask_filter=LENIENT),
    )
    np.testing.assert_array_equal(
        same_seed(_batch(box_store, ALL_TILES[2:3]))[C.CONFIDENCE], alone[C.CONFIDENCE]
    )
    foreground = build_teacher(
        box_store,
        TeacherConfig(
            mode="automatic",
            model_type="tiny",
            points_per_side=4,
            mask_filter=LENIENT,
            output="foreground",
        ),
    )(_batch(box_store, ALL_TILES[2:3]))
    assert foreground[C.PSEUDO_LABEL].dtype == np.uint8
    np.testing.assert_array_equal(
        foreground[C.PSEUDO_LABEL][0], (alone[C.PSEUDO_LABEL][0] > 0).astype(np.uint8)
    )


@pytest.fixture(scope="module")
def student_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A full-mode tiny student for 3 classes at 64 px, saved as an adapter by the test."""
    from semisup.student import build_student, save_adapter

    # Built from seed 0 like the teacher's rebuild: without a base checkpoint the buffers that
    # no adapter carries (the decoder's random position encoding) come from the seed.
    torch.manual_seed(0)
    model = build_student("tiny", 3, TILE, mode="full")
    with torch.no_grad():  # move away from the zero-initialised head so classes differ
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    path = save_adapter(model, tmp_path_factory.mktemp("student") / "adapter.safetensors")
    return path, model.eval()


def test_semantic_mode_labels_with_the_saved_student(
    box_store: str, student_adapter: tuple[Path, nn.Module]
) -> None:
    path, student = student_adapter
    teacher = build_teacher(
        box_store, TeacherConfig(mode="semantic", model_type="tiny", checkpoint=str(path.parent))
    )
    batch = _batch(box_store, ALL_TILES)
    out = teacher(batch)
    label, confidence = out[C.PSEUDO_LABEL], out[C.CONFIDENCE]
    assert label.dtype == np.uint8
    valid = batch[C.VALID]
    assert set(np.unique(label[valid])) <= {0, 1, 2} and np.all(label[~valid] == C.IGNORE_INDEX)
    with torch.inference_mode():
        images = torch.from_numpy(batch[C.IMAGE]).permute(0, 3, 1, 2).float() / 255
        probs = torch.softmax(student(images), dim=1)  # B×3×S×S
    expected_conf, expected_label = probs.max(1)
    np.testing.assert_array_equal(label[valid], expected_label.numpy()[valid])
    np.testing.assert_allclose(confidence[valid], expected_conf.numpy()[valid], atol=1e-5)
    assert confidence.min() >= 1 / 3 - 1e-6 or np.any(~valid)  # max of 3 probabilities
    refined = build_teacher(
        box_store,
        TeacherConfig(
            mode="semantic",
            model_type="tiny",
            checkpoint=str(path),
            refine=True,
            points_per_side=4,
            mask_filter=LENIENT,
        ),
    )(batch)
    assert refined[NUM_MASKS].max() >= 1  # SAM segments voted
    assert set(np.unique(refined[C.PSEUDO_LABEL][valid])) <= {0, 1, 2}


def test_semantic_mode_refuses_a_student_of_another_size(
    tmp_path: Path, student_adapter: tuple[Path, nn.Module]
) -> None:
    url = str(tmp_path / "big.zarr")
    build_store(url, [SourceSpec("s", 128, 128)], tile_size=128)
    with pytest.raises(ValueError, match="tiny at 64 px"):
        build_teacher(
            url,
            TeacherConfig(mode="semantic", model_type="tiny", checkpoint=str(student_adapter[0])),
        )
    with pytest.raises(ValueError, match="adapter as its checkpoint"):
        build_teacher(url, TeacherConfig(mode="semantic", model_type="tiny"))
    with pytest.raises(ValueError, match="unknown teacher mode"):
        build_teacher(url, TeacherConfig(mode="panoptic", model_type="tiny"))

"""SAM building, tile-size adaptation and checkpoint loading, on the tiny spec with saved weights."""

from __future__ import annotations

import functools
import hashlib
import http.server
import math
import pathlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.modeling.image_encoder import get_rel_pos

from semisup.sam import (
    MAX_WINDOW_PADDING,
    SAM_SPECS,
    CheckpointError,
    build_sam,
    checkpoint_sha256,
    choose_window_size,
    guess_model_type,
    load_checkpoint,
    load_sam_state_dict,
    official_checkpoint_url,
    resize_pos_embed,
    resize_rel_pos,
    resolve_checkpoint,
)

TINY = SAM_SPECS["tiny"]


def _with_random_position_tables(sam: Sam, seed: int = 0) -> dict[str, torch.Tensor]:
    """``sam``'s state dict with the (zero-initialised) position tables filled with noise."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = sam.state_dict()
    for key, value in state_dict.items():
        if key.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")):
            state_dict[key] = 0.1 * torch.randn(value.shape, generator=generator)
    return state_dict


def _reference_tiny_sam() -> Sam:
    """The tiny spec at 1024 px, built literally as segment_anything/build_sam.py builds models."""
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=2,
            embed_dim=64,
            img_size=1024,
            mlp_ratio=4,
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=(1,),
            window_size=14,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256,
            image_embedding_size=(64, 64),
            input_image_size=(1024, 1024),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=256, mlp_dim=256, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=64,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, torch.Tensor]:
    """A full tiny Sam state dict at 1024 px, the layout of the official checkpoints."""
    torch.manual_seed(0)
    return _with_random_position_tables(build_sam("tiny", image_size=1024))


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_weights: dict[str, torch.Tensor], tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "sam_tiny_test.pth"
    torch.save(tiny_weights, path)
    return path


def _image(size: int, seed: int = 0) -> torch.Tensor:
    """3×S×S float32 in [0, 255], the input format of ``Sam.forward``."""
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)) * 255


def _predict_box(sam: Sam, image: torch.Tensor, box: list[float]) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        (output,) = sam(
            [{"image": image, "original_size": image.shape[-2:], "boxes": torch.tensor([box])}],
            multimask_output=True,
        )
    return output


# ---- tile-size adaptation ---------------------------------------------------------------------


def test_adapted_build_at_1024_matches_reference_build(tiny_weights, tiny_checkpoint):
    reference = _reference_tiny_sam()
    reference.load_state_dict(tiny_weights)
    # The reference attention path: the attention kernels are compared in test_sam_attention.py.
    adapted = build_sam("tiny", image_size=1024, checkpoint=tiny_checkpoint, attention="reference")
    image = _image(1024)
    with torch.inference_mode():
        batch = torch.stack([reference.preprocess(image)])
        expected = reference.image_encoder(batch)
        embeddings = adapted.image_encoder(batch)
    assert embeddings.shape == (1, 256, 64, 64)
    torch.testing.assert_close(embeddings, expected, rtol=0, atol=1e-6)
    box = [100.0, 200.0, 600.0, 700.0]
    torch.testing.assert_close(
        _predict_box(adapted, image, box)["low_res_logits"],
        _predict_box(reference, image, box)["low_res_logits"],
        rtol=0,
        atol=1e-5,
    )


@pytest.mark.slow
def test_vit_b_adapted_build_at_1024_matches_official_builder():
    # ~45 s on 2 CPU threads: two vit_b forward passes at 1024 px.
    torch.manual_seed(0)
    reference = sam_model_registry["vit_b"]()
    weights = _with_random_position_tables(reference)
    reference.load_state_dict(weights)
    adapted = build_sam("vit_b", image_size=1024, attention="reference")
    load_sam_state_dict(adapted, weights, model_type="vit_b")
    batch = torch.stack([reference.preprocess(_image(1024))])
    with torch.inference_mode():
        torch.testing.assert_close(
            adapted.image_encoder(batch), reference.image_encoder(batch), rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("tile_size", [256, 512])
def test_tiny_model_runs_end_to_end_at_tile_size(tile_size, tiny_checkpoint):
    sam = build_sam("tiny", image_size=tile_size, checkpoint=tiny_checkpoint)
    grid = tile_size // 16
    assert sam.image_encoder.img_size == tile_size
    assert sam.prompt_encoder.input_image_size == (tile_size, tile_size)
    assert sam.prompt_encoder.image_embedding_size == (grid, grid)

    images = torch.stack([sam.preprocess(_image(tile_size, seed)) for seed in (0, 1)])
    with torch.inference_mode():
        embeddings = sam.image_encoder(images)
    assert embeddings.shape == (2, 256, grid, grid)
    assert torch.isfinite(embeddings).all()

    box = [0.1 * tile_size, 0.2 * tile_size, 0.6 * tile_size, 0.9 * tile_size]
    output = _predict_box(sam, _image(tile_size), box)
    assert output["masks"].shape == (1, 3, tile_size, tile_size)
    assert output["masks"].dtype == torch.bool
    assert output["low_res_logits"].shape == (1, 3, 4 * grid, 4 * grid)

    # The stock predictor resizes to image_encoder.img_size, so it works at the tile size too.
    predictor = SamPredictor(sam)
    predictor.set_image((_image(tile_size).permute(1, 2, 0).numpy()).astype(np.uint8))
    masks, scores, _ = predictor.predict(box=np.array(box), multimask_output=True)
    assert masks.shape == (3, tile_size, tile_size)
    assert scores.shape == (3,)


def test_pos_embed_and_rel_pos_resized_from_1024_checkpoint(tiny_weights, tiny_checkpoint):
    sam = build_sam("tiny", image_size=256, checkpoint=tiny_checkpoint)
    original = tiny_weights["image_encoder.pos_embed"]  # 1×64×64×64
    expected = F.interpolate(
        original.permute(0, 3, 1, 2),
        size=(16, 16),
        mode="bicubic",
        align_corners=False,
        antialias=True,
    ).permute(0, 2, 3, 1)
    torch.testing.assert_close(sam.image_encoder.pos_embed, expected, rtol=0, atol=0)

    # Block 0 is windowed (8×8 windows at 256 px), block 1 global over the 16×16 grid.
    for block, size in ((0, 8), (1, 16)):
        key = f"image_encoder.blocks.{block}.attn.rel_pos_h"
        table = sam.state_dict()[key]
        assert table.shape == (2 * size - 1, 32)
        # Resized tables give the relative embeddings SAM itself interpolates from the original.
        torch.testing.assert_close(
            get_rel_pos(size, size, table),
            get_rel_pos(size, size, tiny_weights[key]),
            rtol=0,
            atol=1e-6,
        )


def test_resizing_is_identity_when_sizes_match():
    pos_embed = torch.randn(1, 64, 64, 8)
    rel_pos = torch.randn(127, 4)
    assert resize_pos_embed(pos_embed, 64) is pos_embed
    assert resize_rel_pos(rel_pos, 127) is rel_pos


def test_resizing_keeps_dtype():
    assert resize_pos_embed(torch.randn(1, 64, 64, 8).half(), 16).dtype == torch.float16
    assert resize_rel_pos(torch.randn(27, 4).bfloat16(), 15).shape == (15, 4)


@pytest.mark.parametrize(
    ("token_grid", "window"),
    [(64, 14), (40, 14), (32, 8), (16, 8), (48, 12), (14, 14), (8, 8)],
)
def test_choose_window_size(token_grid, window):
    assert choose_window_size(token_grid) == window


def test_chosen_windows_never_pad_much():
    for grid in range(1, 129):
        window = choose_window_size(grid)
        padded = math.ceil(grid / window) * window
        assert 1 - (grid / padded) ** 2 <= MAX_WINDOW_PADDING, grid
        assert window == grid if grid <= 14 else 7 <= window <= 14


def test_build_rejects_bad_sizes_and_types():
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        build_sam("tiny", image_size=250)
    with pytest.raises(
        ValueError, match=r"unknown SAM model type 'vit_x'.*vit_b, vit_l, vit_h, tiny"
    ):
        build_sam("vit_x")


def test_explicit_window_size_is_used():
    sam = build_sam("tiny", image_size=256, window_size=16)
    assert [block.window_size for block in sam.image_encoder.blocks] == [16, 0]


# ---- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    trained = build_sam("tiny", image_size=256)
    trained.load_state_dict(_with_random_position_tables(trained, seed=1))
    path = tmp_path / "tiny_256.pth"
    torch.save(trained.state_dict(), path)

    loaded = build_sam("tiny", image_size=256, checkpoint=path)
    fresh = build_sam("tiny", image_size=256)
    images = torch.stack([trained.preprocess(_image(256))])
    with torch.inference_mode():
        assert torch.equal(loaded.image_encoder(images), trained.image_encoder(images))
        assert not torch.equal(fresh.image_encoder(images), trained.image_encoder(images))
    box = [10.0, 20.0, 200.0, 240.0]
    assert torch.equal(
        _predict_box(loaded, _image(256), box)["low_res_logits"],
        _predict_box(trained, _image(256), box)["low_res_logits"],
    )


def test_official_weights_of_another_type_name_both_and_count():
    with torch.device("meta"):  # shapes only: no memory, no init time
        vit_b, vit_l = build_sam("vit_b"), build_sam("vit_l")
    model_keys, checkpoint_keys = set(vit_b.state_dict()), set(vit_l.state_dict())
    with pytest.raises(CheckpointError) as caught:
        load_sam_state_dict(vit_b, vit_l.state_dict(), model_type="vit_b")
    message = str(caught.value)
    match = re.match(
        r"vit_l weights given for vit_b: (\d+) missing keys, (\d+) unexpected, "
        r"(\d+) shape mismatches \(.*first shape mismatch: (\S+) checkpoint (\S+) vs model (\S+)\)",
        message,
    )
    assert match, message
    assert int(match[1]) == len(model_keys - checkpoint_keys) == 0
    assert int(match[2]) == len(checkpoint_keys - model_keys) == 12 * 14  # vit_l's extra blocks
    assert int(match[3]) > 0
    assert match[4] == "image_encoder.pos_embed"
    assert (match[5], match[6]) == ("1×64×64×1024", "1×64×64×768")


def test_tiny_checkpoint_into_vit_b_is_refused(tiny_checkpoint):
    with torch.device("meta"):
        vit_b = build_sam("vit_b", image_size=256)
    # vit_b's encoder blocks 2-11 (14 tensors each) and decoder layer 1 are not in the checkpoint.
    missing = set(vit_b.state_dict()) - set(torch.load(tiny_checkpoint, weights_only=True))
    assert len(missing) == 10 * 14 + 36
    with pytest.raises(
        CheckpointError,
        match=r"^checkpoint \S+tiny\S*: tiny weights given for vit_b: 176 missing keys, 0 ",
    ):
        load_checkpoint(vit_b, tiny_checkpoint, model_type="vit_b")


def test_checkpoint_of_another_tiny_spec_is_refused(tmp_path):
    from dataclasses import replace

    other_spec = replace(TINY, encoder_embed_dim=96, encoder_depth=3)
    path = tmp_path / "other.pth"
    torch.save(build_sam(other_spec, image_size=256).state_dict(), path)
    tiny = build_sam("tiny", image_size=256)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tiny, path)  # the model's type is guessed from its shapes
    assert str(caught.value).startswith(
        f"checkpoint {path}: unknown SAM (embed 96, depth 3) weights given for tiny: 0 missing "
        "keys, 14 unexpected, "
    )


def test_guess_model_type_from_official_shapes():
    for name in ("vit_b", "vit_l", "vit_h"):
        with torch.device("meta"):
            assert guess_model_type(build_sam(name).state_dict()) == name
    assert guess_model_type({"decoder.weight": torch.zeros(1)}) == "non-SAM"


def test_checkpoint_with_pickled_code_is_refused(tmp_path, tiny_weights):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    path = tmp_path / "payload.pth"
    torch.save({**tiny_weights, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        build_sam("tiny", image_size=256, checkpoint=path)
    assert not marker.exists()


def test_checkpoint_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a flat state dict"):
        build_sam("tiny", image_size=256, checkpoint=path)


def test_missing_local_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_sam("tiny", image_size=256, checkpoint=tmp_path / "absent.pth")


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass


@pytest.fixture()
def checkpoint_server(tiny_checkpoint) -> Iterator[tuple[str, list[str]]]:
    """Serve the tiny checkpoint's folder on 127.0.0.1; yields its URL and the request log."""
    requests: list[str] = []
    handler = functools.partial(
        type("Handler", (_CountingHandler,), {"requests": requests}),
        directory=str(tiny_checkpoint.parent),
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/{tiny_checkpoint.name}", requests
    finally:
        server.shutdown()
        server.server_close()


def test_url_checkpoint_is_downloaded_once(checkpoint_server, tiny_checkpoint, tmp_path):
    url, requests = checkpoint_server
    cache = tmp_path / "cache"
    first = build_sam("tiny", image_size=256, checkpoint=url, cache_dir=cache)
    second = build_sam("tiny", image_size=256, checkpoint=url, cache_dir=cache)
    assert requests == [f"/{tiny_checkpoint.name}"]
    cached = cache / tiny_checkpoint.name
    assert checkpoint_sha256(cached) == checkpoint_sha256(tiny_checkpoint)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_file_url_lands_in_semisup_cache(monkeypatch, tiny_checkpoint, tmp_path):
    monkeypatch.setenv("SEMISUP_CACHE", str(tmp_path))
    path = resolve_checkpoint(tiny_checkpoint.as_uri())
    assert path == tmp_path / "checkpoints" / tiny_checkpoint.name
    assert path.read_bytes() == tiny_checkpoint.read_bytes()


def test_local_path_is_used_in_place(tiny_checkpoint):
    assert resolve_checkpoint(str(tiny_checkpoint)) == tiny_checkpoint


def test_checkpoint_sha256_prefix(tiny_checkpoint):
    expected = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()[:12]
    assert checkpoint_sha256(tiny_checkpoint) == expected


def test_official_checkpoint_urls():
    assert official_checkpoint_url("vit_b").endswith("/segment_anything/sam_vit_b_01ec64.pth")
    assert official_checkpoint_url("vit_l").endswith("/segment_anything/sam_vit_l_0b3195.pth")
    assert official_checkpoint_url("vit_h").endswith("/segment_anything/sam_vit_h_4b8939.pth")
    with pytest.raises(ValueError, match="no official checkpoint for 'tiny'"):
        official_checkpoint_url("tiny")

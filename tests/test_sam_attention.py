"""The fused attention paths of SAM's image encoder against segment-anything's own attention."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos
from torch.utils._python_dispatch import TorchDispatchMode

from semisup.config import ConfigError, StudentConfig, load_config
from semisup.sam import build_sam, choose_window_size, resize_rel_pos
from semisup.sam_attention import (
    ATTENTION_IMPLEMENTATIONS,
    RelPosAttention,
    flex_attention_available,
    rel_pos_table,
    set_attention,
)
from semisup.student import build_student

TOLERANCE = 1e-5  # max abs difference in fp32
VIT_B_EMBED_DIM, VIT_B_HEADS, VIT_B_WINDOW = 768, 12, 14  # segment_anything build_sam_vit_b


def _max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _random_position_tables(model: torch.nn.Module, seed: int) -> None:
    """Fill every zero-initialised rel_pos table of ``model`` with noise (std 0.5), in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("rel_pos_h", "rel_pos_w", "pos_embed")):
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))


def _encode(sam: torch.nn.Module, image_size: int, seed: int = 0) -> torch.Tensor:
    """Image embeddings of two random images: 2×256×G×G float32."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, image_size, image_size, generator=generator)
    with torch.inference_mode():
        return sam.image_encoder(images)


# ---- single vit_b blocks ----------------------------------------------------------------------


@functools.cache
def _vit_b_block_at_1024(windowed: bool) -> Block:
    """A vit_b encoder block with random weights and position tables, built for 1024 px."""
    torch.manual_seed(0)
    block = Block(
        dim=VIT_B_EMBED_DIM,
        num_heads=VIT_B_HEADS,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=VIT_B_WINDOW if windowed else 0,
        input_size=(64, 64),
    ).eval()
    _random_position_tables(block, seed=1)
    return block


def _vit_b_block(windowed: bool, image_size: int) -> Block:
    """The 1024 px block rebuilt for ``image_size`` px with its position tables resized on load,
    as :func:`semisup.sam.resize_state_dict` resizes an official checkpoint."""
    if image_size == 1024:
        return _vit_b_block_at_1024(windowed)
    grid = image_size // 16
    window = choose_window_size(grid, VIT_B_WINDOW) if windowed else 0
    block = Block(
        dim=VIT_B_EMBED_DIM,
        num_heads=VIT_B_HEADS,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=window,
        input_size=(grid, grid),
    ).eval()
    state_dict = _vit_b_block_at_1024(windowed).state_dict()
    length = 2 * (window or grid) - 1
    for key in ("attn.rel_pos_h", "attn.rel_pos_w"):
        state_dict[key] = resize_rel_pos(state_dict[key], length)
    block.load_state_dict(state_dict, strict=True)
    return block


@pytest.mark.parametrize("image_size", [1024, 256, 512])
@pytest.mark.parametrize("windowed", [True, False], ids=["window", "global"])
def test_sdpa_block_equals_reference_block(windowed, image_size):
    block = _vit_b_block(windowed, image_size)
    grid = image_size // 16
    tokens = torch.randn(1, grid, grid, VIT_B_EMBED_DIM, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        set_attention(block, "reference")
        expected = block(tokens)
        set_attention(block, "sdpa")
        actual = block(tokens)
    assert isinstance(block.attn, RelPosAttention) and block.attn.implementation == "sdpa"
    assert _max_abs_difference(actual, expected) <= TOLERANCE


def test_position_tables_change_the_block_output():
    # The equality above is only evidence if the bias matters: dropping it moves the output.
    block = _vit_b_block(windowed=True, image_size=256)
    tokens = torch.randn(1, 16, 16, VIT_B_EMBED_DIM, generator=torch.Generator().manual_seed(2))
    unbiased = RelPosAttention.from_attention(block.attn, "reference")
    unbiased.use_rel_pos = False
    with torch.inference_mode():
        set_attention(block, "reference")
        with_bias = block.attn(block.norm1(tokens))
        without_bias = unbiased(block.norm1(tokens))
    assert _max_abs_difference(with_bias, without_bias) > 100 * TOLERANCE


# ---- the whole tiny encoder -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny SAM state dict at 1024 px with random position tables, saved from the reference
    path: the layout of the official checkpoints."""
    torch.manual_seed(0)
    sam = build_sam("tiny", image_size=1024, attention="reference")
    _random_position_tables(sam, seed=3)
    path = tmp_path_factory.mktemp("weights") / "sam_tiny_reference.pth"
    torch.save(sam.state_dict(), path)
    return path


@pytest.mark.parametrize("image_size", [1024, 256, 512])
def test_sdpa_encoder_equals_reference_encoder(tiny_checkpoint, image_size):
    # Block 0 is windowed, block 1 global; below 1024 px the checkpoint's tables are resized.
    reference = build_sam(
        "tiny", image_size=image_size, checkpoint=tiny_checkpoint, attention="reference"
    )
    sdpa = build_sam("tiny", image_size=image_size, checkpoint=tiny_checkpoint, attention="sdpa")
    expected, actual = _encode(reference, image_size), _encode(sdpa, image_size)
    assert actual.shape == (2, 256, image_size // 16, image_size // 16)
    assert _max_abs_difference(actual, expected) <= TOLERANCE


def test_reference_state_dict_loads_strictly_into_sdpa_model(tiny_checkpoint):
    weights = torch.load(tiny_checkpoint, weights_only=True)
    reference = build_sam("tiny", image_size=1024, attention="reference")
    reference.load_state_dict(weights, strict=True)
    sdpa = build_sam("tiny", image_size=1024, attention="sdpa")
    assert list(sdpa.state_dict()) == list(weights)
    sdpa.load_state_dict(weights, strict=True)
    for key, value in sdpa.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert _max_abs_difference(_encode(sdpa, 1024), _encode(reference, 1024)) <= TOLERANCE


def test_sdpa_gradients_equal_reference_gradients(tiny_checkpoint):
    # Training backpropagates through the bias into q and the position tables.
    gradients = {}
    for implementation in ("reference", "sdpa"):
        sam = build_sam(
            "tiny", image_size=256, checkpoint=tiny_checkpoint, attention=implementation
        )
        images = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(4))
        sam.image_encoder(images).square().mean().backward()
        gradients[implementation] = {
            name: parameter.grad for name, parameter in sam.image_encoder.named_parameters()
        }
    for name, expected in gradients["reference"].items():
        assert expected is not None and expected.abs().max() > 0, name
        assert _max_abs_difference(gradients["sdpa"][name], expected) <= TOLERANCE, name


@pytest.mark.slow  # torch.compile of flex_attention: ~10 s idle, minutes on a loaded 2-core CPU
@pytest.mark.skipif(
    not flex_attention_available(), reason="torch.nn.attention.flex_attention not installed"
)
def test_flex_encoder_equals_reference_encoder(tiny_checkpoint):
    reference = build_sam("tiny", image_size=256, checkpoint=tiny_checkpoint, attention="reference")
    flex = build_sam("tiny", image_size=256, checkpoint=tiny_checkpoint, attention="flex")
    assert _max_abs_difference(_encode(flex, 256), _encode(reference, 256)) <= TOLERANCE


# ---- the relative-position index --------------------------------------------------------------


@pytest.mark.parametrize(("q_size", "k_size", "length"), [(8, 8, 15), (8, 8, 27), (4, 8, 15)])
def test_rel_pos_table_equals_segment_anything(q_size, k_size, length):
    table = torch.randn(length, 16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        rel_pos_table(q_size, k_size, table), get_rel_pos(q_size, k_size, table), rtol=0, atol=0
    )


class _CpuTensorSeen(TorchDispatchMode):
    """Records whether any operation reads or makes a CPU tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        tensors = [
            value
            for value in (*args, *(kwargs or {}).values(), result)
            if isinstance(value, torch.Tensor)
        ]
        self.seen |= any(tensor.device.type == "cpu" for tensor in tensors)
        return result


def test_rel_pos_index_is_built_on_the_tables_device():
    # A meta table stands for a GPU one: a CPU-built index would make the host wait on it.
    table = torch.randn(15, 16, device="meta")
    with _CpuTensorSeen() as ours:
        rel_pos_table(8, 8, table)
    with _CpuTensorSeen() as segment_anything:
        get_rel_pos(8, 8, table)
    assert not ours.seen
    assert segment_anything.seen


# ---- the switch -------------------------------------------------------------------------------


def test_build_sam_defaults_to_sdpa_and_keeps_the_reference_path():
    for implementation in ATTENTION_IMPLEMENTATIONS:
        if implementation == "flex" and not flex_attention_available():
            continue
        sam = build_sam("tiny", image_size=256, attention=implementation)
        assert [block.attn.implementation for block in sam.image_encoder.blocks] == [
            implementation
        ] * 2
    default = build_sam("tiny", image_size=256)
    assert {block.attn.implementation for block in default.image_encoder.blocks} == {"sdpa"}
    with pytest.raises(ValueError, match=r"unknown attention implementation 'fast'"):
        build_sam("tiny", image_size=256, attention="fast")  # type: ignore[arg-type]


def test_set_attention_switches_every_block_in_place():
    sam = build_sam("tiny", image_size=256, attention="reference")
    before = {key: value.data_ptr() for key, value in sam.state_dict().items()}
    assert set_attention(sam, "sdpa") == 2
    assert {key: value.data_ptr() for key, value in sam.state_dict().items()} == before
    plain = Attention(64, num_heads=2, use_rel_pos=True, input_size=(4, 4))
    holder = torch.nn.Sequential(plain)
    assert set_attention(holder, "reference") == 1
    assert isinstance(holder[0], RelPosAttention) and holder[0].qkv is plain.qkv


def test_build_student_threads_attention_through():
    model = build_student("tiny", 3, 64, mode="lora", attention="reference")
    assert {block.attn.implementation for block in model.image_encoder.blocks} == {"reference"}
    default = build_student("tiny", 3, 64, mode="lora")
    assert {block.attn.implementation for block in default.image_encoder.blocks} == {"sdpa"}


def test_config_attention_choices_match_the_implementations():
    hint = get_type_hints(StudentConfig)["attention"]
    assert get_args(hint) == ATTENTION_IMPLEMENTATIONS
    assert StudentConfig().attention == "sdpa"
    assert load_config(overrides=["student.attention=reference"]).student.attention == "reference"
    with pytest.raises(ConfigError, match="student.attention"):
        load_config(overrides=["student.attention=fast"])

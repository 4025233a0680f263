"""The SAM student: shapes, fine-tuning modes, LoRA, adapters and learning, on the tiny spec."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file

from semisup.sam import SAM_SPECS, CheckpointError, build_sam, resize_state_dict
from semisup.student import (
    ADAPTER_METADATA_KEY,
    PARAMETER_GROUPS,
    REINITIALISED_DECODER_KEYS,
    AdapterError,
    QvLoRALinear,
    SamSegmenter,
    build_student,
    load_adapter,
    merge_adapter,
    parameter_group,
    read_adapter_spec,
    save_adapter,
    trainable_parameter_report,
)
from semisup.synthetic import generate_scene

TINY = SAM_SPECS["tiny"]
NUM_CLASSES = 5
SIZE = 256


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run these small models on one intra-op thread.

    On the shared 2-core test machine, two OpenMP threads next to another busy process stall at
    every barrier: the learning test measured 33-54 s on 2 threads against 3-5 s on one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, torch.Tensor]:
    """A full tiny Sam state dict at 1024 px (official layout) with non-zero position tables."""
    torch.manual_seed(0)
    state_dict = build_sam("tiny", image_size=1024).state_dict()
    generator = torch.Generator().manual_seed(1)
    for key, value in state_dict.items():
        if key.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")):
            state_dict[key] = 0.1 * torch.randn(value.shape, generator=generator)
    return state_dict


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_weights: dict[str, torch.Tensor], tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "sam_tiny_test.pth"
    torch.save(tiny_weights, path)
    return path


def _student(seed: int = 0, **kwargs) -> SamSegmenter:
    torch.manual_seed(seed)
    options = {"mode": "lora", "lora_rank": 4} | kwargs
    return build_student("tiny", NUM_CLASSES, options.pop("image_size", SIZE), **options)


def _images(batch: int = 2, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """B×3×S×S float32 in [0, 1]."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _perturb_trainable(model: torch.nn.Module, seed: int) -> None:
    """Move every trainable weight off its init, so that LoRA and zero-init layers matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter += 0.05 * torch.randn(parameter.shape, generator=generator)


def _predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return model(images)


# ---- shapes and modes ---------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "batch"), [(256, 2), (512, 2), (1024, 1)])
def test_logits_are_batch_by_class_by_tile(size: int, batch: int) -> None:
    model = _student(mode="decoder", image_size=size)
    logits = _predict(model, _images(batch, size))
    assert logits.shape == (batch, NUM_CLASSES, size, size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_wrong_input_size_is_refused() -> None:
    with pytest.raises(ValueError, match="expected a B×3×256×256 image batch"):
        _student(mode="decoder")(_images(1, 128))


@pytest.mark.parametrize(
    ("targets", "per_block"),
    [
        # fused qkv: A is r×d, B is 3d×r
        ("qkv", lambda d, r: r * d + 3 * d * r),
        # q and v: their own A (r×d) and B (d×r) each
        ("qv", lambda d, r: 2 * (r * d + d * r)),
        # qkv plus the output projection (d -> d)
        (("qkv", "attn.proj"), lambda d, r: (r * d + 3 * d * r) + (r * d + d * r)),
    ],
)
def test_lora_trains_only_adapters_decoder_and_head(targets, per_block) -> None:
    rank = 4
    model = _student(lora_targets=targets, lora_rank=rank)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {parameter_group(name) for name in trainable} == {"lora", "decoder", "head"}
    assert all("lora_" in name for name in trainable if name.startswith("image_encoder.")), (
        "only LoRA weights of the encoder train"
    )
    expected = TINY.encoder_depth * per_block(TINY.encoder_embed_dim, rank)
    report = trainable_parameter_report(model)
    assert report["lora/trainable"] == report["lora/total"] == expected
    assert report["encoder/trainable"] == 0


@pytest.mark.parametrize("targets", ["qkv", "qv"])
def test_lora_starts_as_the_identity(targets: str) -> None:
    base = _student(seed=3, mode="decoder")
    adapted = _student(seed=3, lora_targets=targets)
    assert any(isinstance(m, LoraLayer | QvLoRALinear) for m in adapted.modules())
    images = _images()
    torch.testing.assert_close(_predict(adapted, images), _predict(base, images), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["decoder", "lora", "full"])
def test_backward_reaches_exactly_the_trainable_parameters(mode: str) -> None:
    model = _student(mode=mode)
    model(_images()).logsumexp(1).mean().backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            # Every trainable weight is used, so DDP needs no find_unused_parameters.
            assert parameter.grad is not None, name
        else:
            assert parameter.grad is None, name
    encoder = [p for n, p in model.named_parameters() if parameter_group(n) == "encoder"]
    decoder = [p for n, p in model.named_parameters() if parameter_group(n) == "decoder"]
    assert all((p.grad is None) == (mode != "full") for p in encoder)
    assert all(p.grad is not None for p in decoder)


@pytest.mark.parametrize(("mode", "keeps_graph"), [("decoder", False), ("lora", True)])
def test_frozen_encoder_runs_without_autograd(mode: str, keeps_graph: bool) -> None:
    model = _student(mode=mode)
    seen: list[bool] = []
    model.image_encoder.register_forward_hook(lambda _m, _i, out: seen.append(out.requires_grad))
    model(_images(1))
    assert seen == [keeps_graph]


def test_parameter_report_adds_up() -> None:
    model = _student(mode="decoder", hires_path=False)
    report = trainable_parameter_report(model)
    assert report["total"] == sum(p.numel() for p in model.parameters())
    assert report["total"] == sum(report[f"{g}/total"] for g in PARAMETER_GROUPS)
    assert report["trainable"] == sum(report[f"{g}/trainable"] for g in PARAMETER_GROUPS)
    assert report["head/total"] == 0
    assert report["trainable"] == report["decoder/total"]


# ---- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["decoder", "lora"])
def test_official_checkpoint_initialises_the_encoder(
    mode: str, tiny_weights: dict[str, torch.Tensor], tiny_checkpoint: Path
) -> None:
    model = _student(mode=mode, checkpoint=tiny_checkpoint)
    # The checkpoint is at 1024 px; its position tables are resized to the 256 px student.
    reference = build_sam("tiny", image_size=SIZE)
    expected = resize_state_dict(tiny_weights, reference)
    own = model.state_dict()
    encoder_keys = [key for key in expected if key.startswith("image_encoder.")]
    assert len(encoder_keys) > 20
    for key in encoder_keys:
        student_key = key.replace("attn.qkv.", "attn.qkv.base_layer.") if mode == "lora" else key
        torch.testing.assert_close(own[student_key], expected[key], rtol=0, atol=0, msg=key)
    for key in (
        "mask_decoder.transformer.layers.0.mlp.lin1.weight",
        "mask_decoder.iou_token.weight",
    ):
        torch.testing.assert_close(own[key], expected[key], rtol=0, atol=0)
    assert model.spec is not None and model.spec.base_checkpoint_sha256 is not None
    # One fresh mask token per class where the checkpoint had 4.
    assert own["mask_decoder.mask_tokens.weight"].shape == (NUM_CLASSES, 256)
    assert not any(key.startswith(REINITIALISED_DECODER_KEYS[2]) for key in own)


def test_checkpoint_with_other_missing_keys_is_refused(
    tiny_weights: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    broken = dict(tiny_weights)
    del broken["image_encoder.neck.0.weight"]
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(CheckpointError, match="1 missing keys.*image_encoder.neck.0.weight"):
        _student(checkpoint=path)


# ---- adapters -----------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", ["qkv", "qv"])
def test_adapter_round_trip_reproduces_outputs(
    targets: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    trained = _student(seed=1, lora_targets=targets, checkpoint=tiny_checkpoint)
    _perturb_trainable(trained, seed=10)
    path = save_adapter(trained, tmp_path / "adapter.safetensors")
    # Another seed: everything outside the base checkpoint must come from the adapter.
    fresh = _student(seed=2, lora_targets=targets, checkpoint=tiny_checkpoint)
    load_adapter(fresh, path)
    images = _images()
    torch.testing.assert_close(_predict(fresh, images), _predict(trained, images), rtol=0, atol=0)
    report = trainable_parameter_report(trained)
    assert path.stat().st_size < 4 * report["trainable"] + 16_384  # float32 weights + header
    assert read_adapter_spec(path) == trained.spec


def test_swapping_adapters_gives_the_last_ones_outputs(tmp_path: Path) -> None:
    images = _images()
    paths, outputs = [], []
    for name, seed in (("a", 11), ("b", 12)):
        model = _student(lora_targets="qv")
        _perturb_trainable(model, seed)
        paths.append(save_adapter(model, tmp_path / f"{name}.safetensors"))
        outputs.append(_predict(model, images))
    serving = _student(lora_targets="qv")
    load_adapter(serving, paths[0])
    torch.testing.assert_close(_predict(serving, images), outputs[0], rtol=0, atol=0)
    load_adapter(serving, paths[1])
    torch.testing.assert_close(_predict(serving, images), outputs[1], rtol=0, atol=0)
    assert not torch.allclose(outputs[0], outputs[1])


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (
            {"num_classes": 4},
            r"adapter for tiny/5 classes/256 px \(lora qkv r4 alpha16, hires path\) "
            r"given to a tiny/4 classes/256 px",
        ),
        ({"image_size": 512}, "given to a tiny/5 classes/512 px"),
        ({"mode": "decoder"}, r"given to a tiny/5 classes/256 px \(decoder, hires path\)"),
        ({"lora_targets": "qv"}, r"\(lora qv r4 alpha16, hires path\) model"),
        ({"lora_rank": 8}, r"\(lora qkv r8 alpha16, hires path\) model"),
        ({"lora_alpha": 4}, r"\(lora qkv r4 alpha4, hires path\) model"),
        ({"hires_path": False}, r"\(lora qkv r4 alpha16, no hires path\) model"),
    ],
)
def test_mismatched_adapter_is_refused(other: dict, message: str, tmp_path: Path) -> None:
    path = save_adapter(_student(), tmp_path / "adapter.safetensors")
    options = {"num_classes": NUM_CLASSES, "mode": "lora", "lora_rank": 4} | other
    torch.manual_seed(0)
    model = build_student(
        "tiny", options.pop("num_classes"), options.pop("image_size", SIZE), **options
    )
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, path)


def test_adapter_for_another_model_type_is_refused(tmp_path: Path) -> None:
    path = save_adapter(_student(), tmp_path / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
        metadata = file.metadata()
    fields = json.loads(metadata[ADAPTER_METADATA_KEY]) | {"model_type": "vit_b"}
    metadata[ADAPTER_METADATA_KEY] = json.dumps(fields)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(
        AdapterError,
        match=r"adapter for vit_b/5 classes/256 px .* given to a tiny/5 classes/256 px",
    ):
        load_adapter(_student(), path)


def test_adapter_from_another_base_checkpoint_is_refused(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    path = save_adapter(_student(checkpoint=tiny_checkpoint), tmp_path / "adapter.safetensors")
    with pytest.raises(AdapterError, match="base checkpoint [0-9a-f]{12} given to a model built"):
        load_adapter(_student(), path)


@pytest.mark.parametrize("targets", ["qkv", "qv", ("qkv", "mlp.lin1")])
def test_merged_model_matches_and_has_no_lora(targets) -> None:
    model = _student(lora_targets=targets)
    _perturb_trainable(model, seed=5)
    images = _images()
    merged = merge_adapter(model)
    torch.testing.assert_close(_predict(merged, images), _predict(model, images), rtol=0, atol=1e-5)
    assert not any(isinstance(m, LoraLayer | QvLoRALinear) for m in merged.modules())
    assert not any("lora_" in name or "base_layer" in name for name, _ in merged.named_parameters())
    assert isinstance(merged.image_encoder.blocks[0].attn.qkv, torch.nn.Linear)
    # the original keeps its adapters
    assert any(isinstance(m, LoraLayer | QvLoRALinear) for m in model.modules())


# ---- bad settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lora_rank": -1}, r"student.lora_rank: got -1, expected an integer >= 1"),
        ({"lora_rank": 2.0}, r"student.lora_rank: got 2.0, expected an integer >= 1"),
        ({"lora_alpha": 0}, r"student.lora_alpha: got 0, expected a number > 0"),
        ({"lora_dropout": 1.0}, r"student.lora_dropout: got 1.0, expected a number in \[0, 1\)"),
        ({"mode": "adapter"}, r"student.mode: got 'adapter', expected one of full, decoder, lora"),
        ({"lora_targets": "qk"}, r"student.lora_targets: got 'qk', expected 'qkv', 'qv' or"),
        ({"lora_targets": ()}, r"student.lora_targets: got \(\), expected"),
        (
            {"lora_targets": ("qkv", "query")},
            r"student.lora_targets: 'query' matches no Linear layer of the image encoder; "
            r"its Linear layers end in: attn.proj, attn.qkv, mlp.lin1, mlp.lin2",
        ),
        (
            {"lora_targets": ("qkv", "proj")},
            r"student.lora_targets: 'proj' also matches patch_embed.proj \(Conv2d\)",
        ),
    ],
)
def test_bad_settings_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _student(**kwargs)


def test_unknown_model_type_is_named() -> None:
    with pytest.raises(ValueError, match="unknown SAM model type 'vit_s'"):
        build_student("vit_s", NUM_CLASSES, SIZE)


# ---- learning -----------------------------------------------------------------------------------


def _synthetic_crops(count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` crops of generated scenes: (N×3×S×S float in [0, 1], N×S×S int64 class ids)."""
    images, labels = [], []
    for seed in range(count // 4):
        image, label = generate_scene(size=2 * size, seed=seed)
        for y in (0, size):
            for x in (0, size):
                images.append(image[y : y + size, x : x + size])
                labels.append(label[y : y + size, x : x + size])
    image_batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return image_batch, torch.from_numpy(np.stack(labels)).long()


@pytest.mark.parametrize("mode", ["decoder", "lora"])
def test_a_few_dozen_steps_lower_the_loss(mode: str) -> None:
    size, steps, batch = 128, 25, 8
    images, labels = _synthetic_crops(16, size)
    model = _student(mode=mode, image_size=size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def loss_on_all() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(images), labels).item()

    before = loss_on_all()
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        index = torch.randperm(len(images), generator=generator)[:batch]
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = loss_on_all()
    assert after < 0.5 * before, (before, after)

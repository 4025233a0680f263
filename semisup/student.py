"""The student: a prompt-free SAM semantic segmenter, its fine-tuning modes and its adapters.

:class:`SamSegmenter` keeps SAM's image encoder and mask decoder and drops the prompts, as SAMed
does (Zhang & Liu 2023, "Customized Segment Anything Model for Medical Image Segmentation",
github.com/hitachinsk/SAMed): the decoder gets one learned mask token per class, no sparse
prompts and the dense "no mask" embedding, so it predicts one mask per class. A small
convolutional stem adds stride-4 image detail to the decoder's upsampled embedding (measured here:
a patch-16 ViT alone never learns roads or vegetation at 256 px).

Fine-tuning modes (:data:`MODES`):

- ``full``: every parameter is trained;
- ``decoder``: the image encoder is frozen and run without autograd; decoder and head train;
- ``lora``: the encoder is frozen and low-rank adapters (Hu et al. 2021, "LoRA") on its attention
  projections train with the decoder and head. Targets: ``"qkv"`` (peft LoRA on the fused
  projection), ``"qv"`` (:class:`QvLoRALinear`, updates of the query and value thirds only, as
  SAMed does) or a tuple of module-name patterns handed to peft.

An adapter file (:func:`save_adapter`) holds only the trained weights as safetensors, with a JSON
description of the model in its metadata, so one frozen base can serve many adapters.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Final

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, Sam
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from torch import Tensor, nn

from semisup.sam import (
    build_sam,
    checkpoint_sha256,
    get_spec,
    load_sam_state_dict,
    read_state_dict,
    resolve_checkpoint,
)
from semisup.sam_attention import AttentionImplementation

MODES: Final = ("full", "decoder", "lora")
LORA_TARGET_PRESETS: Final = ("qkv", "qv")

# Decoder weights of an official checkpoint that the student re-initialises instead of loading:
# the mask tokens and their hypernetwork MLPs become one per class (their count follows
# num_classes, and SAM's "whole/part/subpart" tokens mean nothing as classes), and the mask-quality
# head is dropped. SAMed's ``load_from`` skips the same three groups. Every other key of the
# checkpoint must fit the model exactly.
REINITIALISED_DECODER_KEYS: Final = (
    "mask_decoder.mask_tokens.",
    "mask_decoder.output_hypernetworks_mlps.",
    "mask_decoder.iou_prediction_head.",
)

ADAPTER_METADATA_KEY: Final = "semisup.student"
ADAPTER_FORMAT_VERSION: Final = 1


class AdapterError(ValueError):
    """An adapter file does not fit the model it is loaded onto; the message says what differs."""


@dataclass(frozen=True)
class StudentSpec:
    """What a student was built as; written into adapter files and compared on load."""

    model_type: str
    num_classes: int
    image_size: int  # pixels
    mode: str  # one of MODES, or "merged" after merge_adapter
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: str | tuple[str, ...]
    hires_path: bool
    base_checkpoint_sha256: str | None  # prefix of the official checkpoint's SHA-256, if any

    def base(self) -> str:
        """Short name of the frozen base, e.g. ``"vit_b/5 classes/256 px"``."""
        return f"{self.model_type}/{self.num_classes} classes/{self.image_size} px"

    def adapter_layout(self) -> str:
        """What decides the adapter's tensors, e.g. ``"lora qv r8 alpha16, hires path"``."""
        layout = self.mode
        if self.mode == "lora":
            targets = self.lora_targets
            names = targets if isinstance(targets, str) else "+".join(targets)
            layout += f" {names} r{self.lora_rank} alpha{self.lora_alpha:g}"
        return layout + (", hires path" if self.hires_path else ", no hires path")


# ---- modules ----------------------------------------------------------------------------------


class HighResolutionPath(nn.Module):
    """Stride-4 convolutional detail fused into the decoder's upsampled embedding.

    SAM's decoder upsamples 16 px tokens to a stride-4 embedding with transposed convolutions
    only, so detail finer than a token (roads 8-16 px wide, small vegetation patches) must be
    recovered from the token alone. This stem sees the pixels directly. The last fusion conv is
    zero-initialised (as ControlNet's "zero convolutions"), so at init the decoder output is
    exactly SAM's and the path grows from there.
    """

    def __init__(self, embedding_channels: int, stem_channels: int = 32) -> None:
        super().__init__()
        half = stem_channels // 2
        # GroupNorm, not BatchNorm: no running statistics to carry in adapters or EMA copies.
        self.stem = nn.Sequential(
            nn.Conv2d(3, half, kernel_size=3, stride=2, padding=1, bias=False),
            nn.GroupNorm(8, half),
            nn.GELU(),
            nn.Conv2d(half, stem_channels, kernel_size=3, stride=2, padding=1, bias=False),
            nn.GroupNorm(8, stem_channels),
            nn.GELU(),
        )
        fuse_out = nn.Conv2d(embedding_channels, embedding_channels, kernel_size=1, bias=False)
        nn.init.zeros_(fuse_out.weight)
        self.fuse = nn.Sequential(
            nn.Conv2d(
                embedding_channels + stem_channels,
                embedding_channels,
                kernel_size=3,
                padding=1,
                bias=False,
            ),
            nn.GroupNorm(8, embedding_channels),
            nn.GELU(),
            fuse_out,
        )

    def forward(self, image: Tensor, mask_embedding: Tensor) -> Tensor:
        """``image``: B×3×S×S normalised; ``mask_embedding``: B×C×S/4×S/4 -> B×C×S/4×S/4."""
        detail = self.stem(image)  # B×stem×S/4×S/4
        return mask_embedding + self.fuse(torch.cat([mask_embedding, detail], dim=1))


class QvLoRALinear(nn.Module):
    """LoRA on the query and value thirds of SAM's fused ``qkv`` Linear; keys are untouched.

    peft can only adapt a whole Linear, so this wraps it: ``qkv(x) + [B_q A_q x, 0, B_v A_v x] ·
    alpha / rank``. Initialised as the LoRA paper and peft do (A Kaiming-uniform, B zero), so the
    wrapper starts as the identity. Attribute names follow peft (``base_layer``, ``lora_*``).
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        dim = base_layer.in_features
        if base_layer.out_features != 3 * dim:
            raise ValueError(
                f"q/v LoRA needs a fused qkv Linear (out = 3 × in), got {base_layer.in_features}"
                f" -> {base_layer.out_features}"
            )
        self.base_layer = base_layer
        self.scaling = alpha / rank  # LoRA paper §4.1: ΔW x is scaled by alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A_q = nn.Linear(dim, rank, bias=False)
        self.lora_B_q = nn.Linear(rank, dim, bias=False)
        self.lora_A_v = nn.Linear(dim, rank, bias=False)
        self.lora_B_v = nn.Linear(rank, dim, bias=False)
        for down, up in ((self.lora_A_q, self.lora_B_q), (self.lora_A_v, self.lora_B_v)):
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))  # peft's default init of A
            nn.init.zeros_(up.weight)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ...×dim -> ...×3·dim, the [q, k, v] projections."""
        q, k, v = self.base_layer(x).chunk(3, dim=-1)
        h = self.lora_dropout(x)
        q = q + self.lora_B_q(self.lora_A_q(h)) * self.scaling
        v = v + self.lora_B_v(self.lora_A_v(h)) * self.scaling
        return torch.cat([q, k, v], dim=-1)

    def delta_weight(self) -> Tensor:
        """3·dim×dim update that :meth:`forward` adds to ``base_layer.weight`` (rows q, k, v)."""
        delta_q = self.lora_B_q.weight @ self.lora_A_q.weight  # dim×dim
        delta_v = self.lora_B_v.weight @ self.lora_A_v.weight
        return torch.cat([delta_q, torch.zeros_like(delta_q), delta_v]) * self.scaling


class SamSegmenter(nn.Module):
    """SAM image encoder + mask decoder giving per-class logits without prompts.

    Every class has a learned mask token; the decoder runs them with SAM's IoU token, no sparse
    prompts and the dense "no mask" embedding (SAMed's prompt-free use of SAM), and each class's
    hypernetwork MLP turns its token into weights over the stride-4 mask embedding.
    """

    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        mask_decoder: MaskDecoder,
        pe_layer: PositionEmbeddingRandom,
        no_mask_embed: nn.Embedding,
        *,
        pixel_mean: Tensor,
        pixel_std: Tensor,
        hires_path: bool = True,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.mask_decoder = mask_decoder
        self.pe_layer = pe_layer
        self.no_mask_embed = no_mask_embed
        self.image_size: int = image_encoder.img_size
        self.num_classes: int = mask_decoder.num_mask_tokens
        embedding_channels = mask_decoder.transformer_dim // 8  # channels of the upscaled output
        self.hires = HighResolutionPath(embedding_channels) if hires_path else None
        # SAM's ImageNet mean/std in 0-255 units, C×1×1; not saved, as in Sam.
        self.register_buffer("pixel_mean", pixel_mean.reshape(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", pixel_std.reshape(-1, 1, 1), persistent=False)
        self.spec: StudentSpec | None = None  # set by build_student

    def forward(self, image: Tensor, feature_dropout: float = 0.0) -> Tensor:
        """``image``: B×3×S×S float in [0, 1], S = ``image_size`` -> B×K×S×S float logits.

        ``feature_dropout`` > 0 zeroes whole channels of the encoder's embeddings at that rate
        (rescaling the rest) before decoding: UniMatch's feature perturbation, in training only.
        """
        if image.ndim != 4 or image.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"expected a B×3×{self.image_size}×{self.image_size} image batch, "
                f"got {tuple(image.shape)}"
            )
        pixels = (image * 255.0 - self.pixel_mean) / self.pixel_std
        # A frozen encoder runs without autograd: no activations are kept for it (decoder mode).
        encoder_trains = any(p.requires_grad for p in self.image_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trains):
            embeddings = self.image_encoder(pixels)  # B×256×G×G, G = S/16
        if feature_dropout > 0:
            embeddings = F.dropout2d(embeddings, feature_dropout, training=self.training)
        mask_embedding, class_weights = self._decode(embeddings)
        if self.hires is not None:
            mask_embedding = self.hires(pixels, mask_embedding)
        low_res = torch.einsum("bkc,bchw->bkhw", class_weights, mask_embedding)  # B×K×S/4×S/4
        return F.interpolate(low_res, size=image.shape[-2:], mode="bilinear", align_corners=False)

    def _decode(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """B×C×G×G image embeddings -> (B×C/8×4G×4G mask embedding, B×K×C/8 class weights).

        SAM's ``MaskDecoder.predict_masks`` without the prompt batching: its
        ``repeat_interleave`` expects one image per call, here every image has its own tokens.
        """
        decoder = self.mask_decoder
        batch, channels, grid, _ = embeddings.shape
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])  # (1+K)×C
        tokens = tokens.unsqueeze(0).expand(batch, -1, -1)  # B×(1+K)×C
        src = embeddings + self.no_mask_embed.weight.reshape(1, channels, 1, 1)
        pos = self.pe_layer((grid, grid)).unsqueeze(0).expand(batch, -1, -1, -1)  # B×C×G×G
        hidden, src = decoder.transformer(src, pos, tokens)  # B×(1+K)×C, B×G²×C
        class_tokens = hidden[:, 1:]  # B×K×C; token 0 is SAM's IoU token
        src = src.transpose(1, 2).reshape(batch, channels, grid, grid)  # B×C×G×G
        mask_embedding = decoder.output_upscaling(src)  # B×C/8×4G×4G
        class_weights = torch.stack(
            [mlp(class_tokens[:, k]) for k, mlp in enumerate(decoder.output_hypernetworks_mlps)],
            dim=1,
        )  # B×K×C/8
        return mask_embedding, class_weights


# ---- building ---------------------------------------------------------------------------------


def build_student(
    model_type: str,
    num_classes: int,
    image_size: int,
    *,
    checkpoint: str | Path | None = None,
    mode: str = "decoder",
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    lora_targets: str | tuple[str, ...] = "qkv",
    hires_path: bool = True,
    attention: AttentionImplementation = "sdpa",
) -> SamSegmenter:
    """A :class:`SamSegmenter` for ``image_size`` px tiles, set up for fine-tuning ``mode``.

    ``model_type``: a key of ``semisup.sam.SAM_SPECS``. ``checkpoint``: path or URL of an
    official SAM state dict, resized to ``image_size`` by ``semisup.sam``; the decoder keys in
    :data:`REINITIALISED_DECODER_KEYS` are skipped on purpose, every other key must fit. LoRA
    (``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``lora_targets``) is used in ``lora``
    mode only; rank 8 and alpha 16 are peft's usual pair (scale alpha / rank = 2). Defaults to a
    randomly initialised model in train mode; seed torch for reproducible initialisation.
    ``attention``: the image encoder's attention kernel (``semisup.sam.build_sam``); it changes
    no parameter, so adapters and checkpoints move freely between settings.
    """
    _check_student_args(mode, num_classes, lora_rank, lora_alpha, lora_dropout, lora_targets)
    spec = get_spec(model_type)
    # One mask token per class: MaskDecoder makes num_multimask_outputs + 1 tokens.
    sam = build_sam(
        replace(spec, num_multimask_outputs=num_classes - 1),
        image_size=image_size,
        attention=attention,
    )
    sha = None if checkpoint is None else _load_base_weights(sam, checkpoint, model_type)
    model = _segmenter_from_sam(sam, hires_path=hires_path)
    model.train()
    if mode == "lora":
        _add_lora(model.image_encoder, lora_targets, lora_rank, lora_alpha, lora_dropout)
    _set_trainable(model, mode)
    model.spec = StudentSpec(
        model_type=model_type,
        num_classes=num_classes,
        image_size=image_size,
        mode=mode,
        lora_rank=lora_rank,
        lora_alpha=float(lora_alpha),
        lora_dropout=float(lora_dropout),
        lora_targets=lora_targets if isinstance(lora_targets, str) else tuple(lora_targets),
        hires_path=hires_path,
        base_checkpoint_sha256=sha,
    )
    return model


def _check_student_args(
    mode: str,
    num_classes: int,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
    lora_targets: str | tuple[str, ...],
) -> None:
    """``ValueError`` naming the first bad setting, e.g. ``student.lora_rank: got -1, ...``."""
    checks = (
        ("mode", mode, mode in MODES, f"one of {', '.join(MODES)}"),
        ("num_classes", num_classes, _is_int(num_classes) and num_classes >= 1, "an integer >= 1"),
        ("lora_rank", lora_rank, _is_int(lora_rank) and lora_rank >= 1, "an integer >= 1"),
        ("lora_alpha", lora_alpha, _is_number(lora_alpha) and lora_alpha > 0, "a number > 0"),
        (
            "lora_dropout",
            lora_dropout,
            _is_number(lora_dropout) and 0 <= lora_dropout < 1,
            "a number in [0, 1)",
        ),
        (
            "lora_targets",
            lora_targets,
            lora_targets in LORA_TARGET_PRESETS
            or (
                isinstance(lora_targets, tuple | list)
                and len(lora_targets) > 0
                and all(isinstance(t, str) and t for t in lora_targets)
            ),
            "'qkv', 'qv' or a non-empty tuple of module-name patterns",
        ),
    )
    for key, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"student.{key}: got {value!r}, expected {expected}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _load_base_weights(sam: Sam, checkpoint: str | Path, model_type: str) -> str:
    """Load an official checkpoint into ``sam`` except the re-initialised decoder keys.

    Those keys keep ``sam``'s fresh values; every other key goes through
    ``semisup.sam.load_sam_state_dict``, which resizes the position tables and refuses missing,
    unexpected and shape-mismatched keys. Returns the checkpoint's SHA-256 prefix.
    """
    path = resolve_checkpoint(checkpoint)
    state_dict = read_state_dict(path)
    fresh = sam.state_dict()
    state_dict = {
        k: v for k, v in state_dict.items() if not k.startswith(REINITIALISED_DECODER_KEYS)
    }
    state_dict |= {k: v for k, v in fresh.items() if k.startswith(REINITIALISED_DECODER_KEYS)}
    load_sam_state_dict(sam, state_dict, model_type=model_type)
    return checkpoint_sha256(path)


def _segmenter_from_sam(sam: Sam, *, hires_path: bool) -> SamSegmenter:
    decoder = sam.mask_decoder
    # The mask-quality head is unused: semantic logits need none, and an unused trainable head
    # would make DistributedDataParallel fail on parameters without gradients.
    decoder.iou_prediction_head = nn.Identity()
    return SamSegmenter(
        sam.image_encoder,
        decoder,
        sam.prompt_encoder.pe_layer,
        sam.prompt_encoder.no_mask_embed,
        pixel_mean=sam.pixel_mean.flatten(),
        pixel_std=sam.pixel_std.flatten(),
        hires_path=hires_path,
    )


def _add_lora(
    encoder: nn.Module,
    targets: str | tuple[str, ...],
    rank: int,
    alpha: float,
    dropout: float,
) -> None:
    """Insert LoRA layers into ``encoder`` in place (peft for whole Linears, ours for q/v)."""
    if targets == "qv":
        for name, module in list(encoder.named_modules()):
            if name.endswith("attn.qkv") and isinstance(module, nn.Linear):
                _replace_submodule(encoder, name, QvLoRALinear(module, rank, alpha, dropout))
        return
    patterns = ["qkv"] if targets == "qkv" else list(targets)
    modules = dict(encoder.named_modules())
    linear_names = sorted(name for name, m in modules.items() if isinstance(m, nn.Linear))
    for pattern in patterns:
        # peft matches a list entry against the full module name or its dotted suffix.
        matched = [name for name in modules if name == pattern or name.endswith("." + pattern)]
        if not matched:
            suffixes = sorted({name.split(".", 2)[-1] for name in linear_names})
            raise ValueError(
                f"student.lora_targets: {pattern!r} matches no Linear layer of the image "
                f"encoder; its Linear layers end in: {', '.join(suffixes)}"
            )
        # LoRA here is meant for Linear layers; peft would also adapt convolutions silently.
        other = [name for name in matched if not isinstance(modules[name], nn.Linear)]
        if other:
            raise ValueError(
                f"student.lora_targets: {pattern!r} also matches {other[0]} "
                f"({type(modules[other[0]]).__name__}), not a Linear layer; name it more fully "
                f"(e.g. 'attn.{pattern}')"
            )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # annotated int; peft computes alpha / r
        lora_dropout=dropout,
        target_modules=patterns,
    )
    inject_adapter_in_model(config, encoder)


def _set_trainable(model: SamSegmenter, mode: str) -> None:
    model.requires_grad_(True)
    if mode == "decoder":
        model.image_encoder.requires_grad_(False)
    elif mode == "lora":
        for name, parameter in model.image_encoder.named_parameters():
            parameter.requires_grad_("lora_" in name)


def _replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


# ---- adapters ---------------------------------------------------------------------------------


def adapter_state_dict(model: SamSegmenter) -> dict[str, Tensor]:
    """The weights an adapter holds: every trainable parameter (LoRA, decoder and head).

    In ``full`` mode that is the whole model. The head has no buffers (GroupNorm), so
    parameters are all there is to carry.
    """
    return {
        name: parameter.detach().cpu().contiguous()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def save_adapter(model: SamSegmenter, path: str | Path) -> Path:
    """Write the trainable weights of ``model`` to ``path`` as safetensors; returns the path.

    The file's metadata holds the model's :class:`StudentSpec` as JSON under
    :data:`ADAPTER_METADATA_KEY`, which :func:`load_adapter` checks against its model. Sizes
    with 5 classes at 256 px, LoRA rank 8: tiny 6.4 MB; vit_b 17.5 MB (LoRA 1.2 MB, decoder
    16.3 MB, head 0.1 MB) against 364 MB for the whole vit_b student.
    """
    spec = _spec_of(model)
    metadata = {
        ADAPTER_METADATA_KEY: json.dumps(
            {"format_version": ADAPTER_FORMAT_VERSION, **asdict(spec)}, sort_keys=True
        )
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(path), metadata=metadata)
    return path


def read_adapter_spec(path: str | Path) -> StudentSpec:
    """The :class:`StudentSpec` stored in an adapter file's metadata."""
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
    except Exception as err:  # safetensors raises its own SafetensorError, or OSError
        raise AdapterError(f"{path} cannot be read as a safetensors adapter ({err})") from None
    if ADAPTER_METADATA_KEY not in metadata:
        raise AdapterError(
            f"{path} is not a student adapter (no {ADAPTER_METADATA_KEY!r} metadata)"
        )
    fields = json.loads(metadata[ADAPTER_METADATA_KEY])
    version = fields.pop("format_version", None)
    if version != ADAPTER_FORMAT_VERSION:
        raise AdapterError(
            f"{path} has adapter format {version}, this code reads {ADAPTER_FORMAT_VERSION}"
        )
    if isinstance(fields["lora_targets"], list):
        fields["lora_targets"] = tuple(fields["lora_targets"])
    return StudentSpec(**fields)


def load_adapter(model: SamSegmenter, path: str | Path) -> None:
    """Load an adapter written by :func:`save_adapter` onto ``model``, replacing its weights.

    ``model`` must be built on the same base (model type, classes, tile size, base checkpoint)
    with the same adapter layout (mode, LoRA targets/rank/alpha, hires path), otherwise
    :class:`AdapterError` names what differs. Every trainable parameter is overwritten, so
    loading adapter B after adapter A gives exactly B's outputs.
    """
    adapter = read_adapter_spec(path)
    own = _spec_of(model)
    if adapter.base() != own.base() or adapter.adapter_layout() != own.adapter_layout():
        raise AdapterError(
            f"{path}: adapter for {adapter.base()} ({adapter.adapter_layout()}) given to a "
            f"{own.base()} ({own.adapter_layout()}) model"
        )
    if adapter.base_checkpoint_sha256 != own.base_checkpoint_sha256:
        raise AdapterError(
            f"{path}: adapter trained on base checkpoint "
            f"{adapter.base_checkpoint_sha256 or 'none'} given to a model built from "
            f"{own.base_checkpoint_sha256 or 'no checkpoint'}"
        )
    with safe_open(str(path), framework="pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    wanted = dict(model.named_parameters())
    trainable = {name for name, p in wanted.items() if p.requires_grad}
    missing = sorted(trainable - tensors.keys())
    unexpected = sorted(tensors.keys() - trainable)
    mismatched = sorted(
        name for name in trainable & tensors.keys() if tensors[name].shape != wanted[name].shape
    )
    if missing or unexpected or mismatched:
        raise AdapterError(
            f"{path} does not fit the model: {len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(mismatched)} shape-mismatched tensors "
            f"(first: {(missing + unexpected + mismatched)[0]})"
        )
    with torch.no_grad():
        for name in trainable:
            wanted[name].copy_(tensors[name])


def load_student(
    path: str | Path, *, base_checkpoint: str | Path | None = None, seed: int = 0
) -> SamSegmenter:
    """The student an adapter file describes, rebuilt on its base and in eval mode, on CPU.

    The model is built from the spec in the file's metadata on ``base_checkpoint`` (the official
    SAM weights it was fine-tuned from; :func:`load_adapter` checks the hash), then the adapter
    is loaded onto it. A base built without a checkpoint takes its frozen weights from ``seed``,
    so such a student is only reproducible as a ``full`` adapter or with its training seed.
    Further adapters of the same base and layout can be swapped in with :func:`load_adapter`.
    """
    spec = read_adapter_spec(path)
    if spec.mode not in MODES:
        raise AdapterError(f"{path} has mode {spec.mode!r}; expected an unmerged adapter")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_student(
            spec.model_type,
            spec.num_classes,
            spec.image_size,
            checkpoint=base_checkpoint,
            mode=spec.mode,
            lora_rank=spec.lora_rank,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            lora_targets=spec.lora_targets,
            hires_path=spec.hires_path,
        )
    load_adapter(model, path)
    return model.eval()


def adapter_file(checkpoint: str | Path) -> Path:
    """The student adapter at ``checkpoint``: a ``.safetensors`` file, or a folder holding one."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(
                f"{path}: expected one student adapter (*.safetensors), found {len(files)}"
            )
        return files[0]
    if not path.is_file():
        raise FileNotFoundError(f"student checkpoint {path} does not exist")
    return path


def load_trained_student(
    checkpoint: str | Path,
    *,
    model_type: str,
    image_size: int,
    base_checkpoint: str | Path | None = None,
    seed: int = 0,
) -> tuple[SamSegmenter, int]:
    """A trained student as (model, number of classes), on the CPU, checked against the size
    and type its caller builds for.

    ``checkpoint``: an adapter written by ``student.save_adapter`` (or a folder holding one);
    the student is rebuilt from the spec in its metadata on ``base_checkpoint`` (the official
    SAM weights it was fine-tuned from; ``load_adapter`` checks the hash) and the adapter is
    loaded onto it. A base built without a checkpoint takes its frozen weights from ``seed``,
    so such a student is only reproducible as a ``full`` adapter. The model takes B×3×S×S
    float RGB in [0, 1], as in training (``semisup.steps.prepare_batch``).
    """
    path = adapter_file(checkpoint)
    spec = read_adapter_spec(path)
    if spec.model_type != model_type or spec.image_size != image_size:
        raise ValueError(
            f"student {path} is a {spec.model_type} at {spec.image_size} px; expected "
            f"{model_type} at {image_size} px (the store's tile size)"
        )
    return load_student(path, base_checkpoint=base_checkpoint, seed=seed), spec.num_classes


def merge_adapter(model: SamSegmenter) -> SamSegmenter:
    """A copy of ``model`` with every LoRA update folded into its base Linear, for deployment.

    The copy has plain ``nn.Linear`` layers where LoRA layers were (W ← W + ΔW), gives the same
    outputs up to float rounding, is frozen and in eval mode; ``model`` is left unchanged.
    """
    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, QvLoRALinear):
            base = module.base_layer
            with torch.no_grad():
                base.weight += module.delta_weight().to(base.weight.dtype)
            _replace_submodule(merged, name, base)
        elif isinstance(module, LoraLayer):
            module.merge()
            _replace_submodule(merged, name, module.get_base_layer())
    if merged.spec is not None:
        merged.spec = replace(merged.spec, mode="merged")
    merged.requires_grad_(False)
    return merged.eval()


def _spec_of(model: nn.Module) -> StudentSpec:
    spec = getattr(model, "spec", None)
    if not isinstance(spec, StudentSpec):
        raise AdapterError("adapters need a model made by build_student (it has no StudentSpec)")
    return spec


# ---- reporting --------------------------------------------------------------------------------

PARAMETER_GROUPS: Final = ("encoder", "lora", "decoder", "head")


def parameter_group(name: str) -> str:
    """Group of the parameter ``name`` of a :class:`SamSegmenter`: one of PARAMETER_GROUPS."""
    if "lora_" in name:
        return "lora"
    if name.startswith("image_encoder."):
        return "encoder"
    if name.startswith(("mask_decoder.", "no_mask_embed.")):
        return "decoder"
    return "head"


def trainable_parameter_report(model: nn.Module) -> dict[str, int | float]:
    """Parameter counts for logs: ``total``, ``trainable``, ``trainable_fraction``, and per group
    ``<group>/total`` and ``<group>/trainable`` for each of :data:`PARAMETER_GROUPS`."""
    report: dict[str, int | float] = {"total": 0, "trainable": 0}
    for group in PARAMETER_GROUPS:
        report[f"{group}/total"] = report[f"{group}/trainable"] = 0
    for name, parameter in model.named_parameters():
        group, count = parameter_group(name), parameter.numel()
        report["total"] += count
        report[f"{group}/total"] += count
        if parameter.requires_grad:
            report["trainable"] += count
            report[f"{group}/trainable"] += count
    report["trainable_fraction"] = report["trainable"] / max(report["total"], 1)
    return report

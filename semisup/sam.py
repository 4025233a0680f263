"""Building Segment Anything models at any tile size, and loading checkpoints into them.

SAM is pretrained on 1024×1024 px inputs (a 64×64 grid of 16 px patches). Aerial tiles are
smaller (256 or 512 px), and padding each tile to 1024 px would spend up to 16× the compute on
zeros. Instead the model is built at the tile size and the size-dependent parameters of a 1024 px
checkpoint are resized on load:

- ``image_encoder.pos_embed``: 1×G×G×C absolute position embedding over the token grid
  (G = image_size / 16), resized bicubically;
- ``image_encoder.blocks.<i>.attn.rel_pos_{h,w}``: (2·L−1)×head_dim relative position tables,
  where L is the token grid for global-attention blocks and the window for windowed blocks,
  resized linearly along the length.

Both resizes are the identity when the sizes already match, so a model built at 1024 px loads an
official checkpoint unchanged. The attention window is chosen per tile size
(:func:`choose_window_size`) so that small token grids are not padded to mostly-empty windows.

Checkpoints are local paths or http(s)/file URLs, downloaded once into a cache folder. They are
always read with ``torch.load(weights_only=True)``: a checkpoint is data, never code.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final

import torch
import torch.nn.functional as F
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import Tensor, nn

from semisup.sam_attention import AttentionImplementation, set_attention

log = logging.getLogger(__name__)


PATCH_SIZE: Final = 16  # pixels per image-encoder token, in every official SAM model


@dataclass(frozen=True)
class SamSpec:
    """Architecture of one SAM variant; the image size and window are chosen at build time.

    Defaults are those of ``segment_anything/build_sam.py`` (``_build_sam``), shared by the
    official vit_b, vit_l and vit_h checkpoints.
    """

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    patch_size: int = PATCH_SIZE
    prompt_embed_dim: int = 256  # channels of the image embedding and of every prompt token
    window_size: int = 14  # tokens; pretrained window of the windowed-attention blocks
    pretrain_image_size: int = 1024  # pixels; the size official checkpoints are trained at
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    mask_in_chans: int = 16
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3


SAM_SPECS: Final[dict[str, SamSpec]] = {
    # Official values from segment_anything/build_sam.py (build_sam_vit_{b,l,h}).
    "vit_b": SamSpec(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamSpec(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamSpec(1280, 32, 16, (7, 15, 23, 31)),
    # Tests and debugging: the same classes with two small encoder blocks (one windowed, one
    # global) and a one-layer decoder: 2.2 M parameters at 256 px, 2.5 M (10 MB) at 1024 px.
    # prompt_embed_dim stays 256 so that image embeddings have the official B×256×G×G shape.
    "tiny": SamSpec(
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        decoder_depth=1,
        decoder_mlp_dim=256,
        iou_head_hidden_dim=64,
    ),
}

# From the segment-anything README ("Model Checkpoints").
OFFICIAL_CHECKPOINT_URLS: Final[dict[str, str]] = {
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}

# SAM's own 1024 px setting pads the 64×64 token grid to 70×70 for its 14×14 windows: 16% of the
# attended tokens are padding. A default window that pads more than this bound is replaced.
MAX_WINDOW_PADDING: Final = 0.25  # fraction of padded tokens among all attended tokens

POS_EMBED_KEY: Final = "image_encoder.pos_embed"
_REL_POS_KEY = re.compile(r"^image_encoder\.blocks\.(\d+)\.attn\.rel_pos_[hw]$")
_BLOCK_KEY = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message says why."""


def get_spec(model_type: str) -> SamSpec:
    """The :class:`SamSpec` named ``model_type``; ``ValueError`` listing the known names."""
    try:
        return SAM_SPECS[model_type]
    except KeyError:
        raise ValueError(
            f"unknown SAM model type {model_type!r}; known: {', '.join(SAM_SPECS)}"
        ) from None


def choose_window_size(token_grid: int, default: int = 14) -> int:
    """Attention window (tokens) for windowed blocks on a ``token_grid``×``token_grid`` grid.

    ViTDet-style window attention pads the grid up to a multiple of the window. The pretrained
    window of 14 fits SAM's 64-token grid (1024 px) with 16% padding, but not smaller tiles: at
    256 px the 16×16 grid is padded to 28×28, so 3.06× the real tokens (67% zeros) go through
    every windowed block, in four 196-token windows; 8×8 windows cover it exactly with 9.4× fewer
    query-key pairs (4·64² vs 4·196²). At 512 px the 32×32 grid pads to 42×42 (1.72×, 42% zeros).

    Returns ``default`` when its padding is at most ``MAX_WINDOW_PADDING`` of the padded grid
    (64 -> 14, 40 -> 14); the whole grid when it fits in one window (grid <= default);
    otherwise the window in [ceil(default / 2), default] with the least padding, the largest
    on ties, which is the largest divisor of the grid in that range when there is one
    (16 -> 8, 32 -> 8, 48 -> 12). The lower bound keeps windows big enough to see context.
    """
    if token_grid < 1 or default < 1:
        raise ValueError(f"token_grid and default must be >= 1, got {token_grid}, {default}")
    if token_grid <= default:
        return token_grid

    def padded(window: int) -> int:
        return math.ceil(token_grid / window) * window

    if 1 - (token_grid / padded(default)) ** 2 <= MAX_WINDOW_PADDING:
        return default
    candidates = range(math.ceil(default / 2), default + 1)
    return min(candidates, key=lambda window: (padded(window), -window))


def build_sam(
    model_type: str | SamSpec,
    *,
    image_size: int = 1024,
    checkpoint: str | Path | None = None,
    window_size: int | None = None,
    cache_dir: str | Path | None = None,
    attention: AttentionImplementation = "sdpa",
) -> Sam:
    """A ``segment_anything`` :class:`Sam` that takes ``image_size``×``image_size`` inputs.

    ``model_type``: a key of ``SAM_SPECS`` or a :class:`SamSpec`. ``image_size``: pixels, a
    multiple of the patch size (16); the image encoder, prompt encoder and mask postprocessing all
    use it, so ``Sam.forward``, ``SamPredictor`` and ``SamAutomaticMaskGenerator`` work at that
    size and give B×256×(S/16)×(S/16) image embeddings. ``window_size``: tokens, default
    :func:`choose_window_size`. ``checkpoint``: path or URL of a state dict, resized to this
    image size and window on load (see :func:`load_checkpoint`). Returned in eval mode on CPU,
    as ``segment_anything.build_sam`` does. ``attention``: how the image encoder's attention
    is computed (see :mod:`semisup.sam_attention`): ``"sdpa"`` (fused kernel, the bias as an
    additive mask), ``"flex"`` (bias inside a compiled flex_attention kernel) or
    ``"reference"`` (segment-anything's explicit matmuls); the parameters are the same for all.
    """
    spec = get_spec(model_type) if isinstance(model_type, str) else model_type
    if image_size <= 0 or image_size % spec.patch_size:
        raise ValueError(
            f"image_size must be a positive multiple of the patch size {spec.patch_size}, "
            f"got {image_size}"
        )
    token_grid = image_size // spec.patch_size
    if window_size is None:
        window_size = choose_window_size(token_grid, spec.window_size)
    # Constructed as segment_anything/build_sam.py (_build_sam) does, with size and window free.
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.encoder_depth,
            embed_dim=spec.encoder_embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads,
            patch_size=spec.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.encoder_global_attn_indexes,
            window_size=window_size,
            out_chans=spec.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_embed_dim,
            image_embedding_size=(token_grid, token_grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=spec.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=spec.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=spec.decoder_depth,
                embedding_dim=spec.prompt_embed_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_num_heads,
            ),
            transformer_dim=spec.prompt_embed_dim,
            iou_head_depth=spec.iou_head_depth,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
        # ImageNet mean/std in 0-255 pixel units, as in build_sam.py.
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    set_attention(sam.image_encoder, attention)
    sam.eval()
    if checkpoint is not None:
        load_checkpoint(sam, checkpoint, model_type=_spec_name(spec), cache_dir=cache_dir)
    return sam


# ---- resizing size-dependent parameters -------------------------------------------------------


def resize_pos_embed(pos_embed: Tensor, token_grid: int) -> Tensor:
    """Resize a 1×G×G×C absolute position embedding to 1×``token_grid``×``token_grid``×C.

    Bicubic with antialiasing, as timm's ``resample_abs_pos_embed`` does for ViTs (SAM tiles go
    from 64 to 16 tokens, a 4× downsampling where plain bicubic would alias). Returns the input
    unchanged when the grid already matches. Computed in float32, returned in the input dtype.
    """
    if pos_embed.shape[1:3] == (token_grid, token_grid):
        return pos_embed
    channels_first = pos_embed.permute(0, 3, 1, 2).float()  # 1×C×G×G
    resized = F.interpolate(
        channels_first,
        size=(token_grid, token_grid),
        mode="bicubic",
        align_corners=False,
        antialias=True,
    )
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype).contiguous()  # 1×g×g×C


def resize_rel_pos(rel_pos: Tensor, length: int) -> Tensor:
    """Resize an L×head_dim relative position table to ``length``×head_dim, linearly.

    Linear interpolation along the length with ``align_corners=False`` is what SAM's own
    ``get_rel_pos`` applies at run time when a table does not match its attention size, so a
    resized table behaves exactly like the original one read by SAM. Identity when L == length.
    """
    if rel_pos.shape[0] == length:
        return rel_pos
    as_signal = rel_pos.float().t().unsqueeze(0)  # 1×head_dim×L
    resized = F.interpolate(as_signal, size=length, mode="linear", align_corners=False)
    return resized.squeeze(0).t().to(rel_pos.dtype).contiguous()  # length×head_dim


def resize_state_dict(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """``state_dict`` with the position tables resized to ``model``'s shapes.

    Only ``image_encoder.pos_embed`` and the ``rel_pos_{h,w}`` tables are touched, and only when
    their channel/head dimension matches the model's; everything else is passed through, so
    genuine mismatches are left for :func:`load_sam_state_dict` to report.
    """
    target = model.state_dict()
    resized = dict(state_dict)
    for key, value in state_dict.items():
        if key not in target or target[key].shape == value.shape:
            continue
        wanted = target[key].shape
        if key == POS_EMBED_KEY and value.ndim == 4 and value.shape[3] == wanted[3]:
            resized[key] = resize_pos_embed(value, wanted[1])
        elif _REL_POS_KEY.match(key) and value.ndim == 2 and value.shape[1] == wanted[1]:
            resized[key] = resize_rel_pos(value, wanted[0])
    return resized


# ---- loading checkpoints ----------------------------------------------------------------------


def load_sam_state_dict(
    model: Sam, state_dict: Mapping[str, Tensor], *, model_type: str | None = None
) -> None:
    """Load a full-model SAM state dict into ``model``, resizing the position tables first.

    Raises :class:`CheckpointError` naming both model types and counting missing, unexpected and
    shape-mismatched keys when the weights do not fit (e.g. vit_l weights into a vit_b model).
    ``model_type`` names the model in that message; guessed from its shapes when None.
    """
    resized = resize_state_dict(state_dict, model)
    target = model.state_dict()
    missing = [key for key in target if key not in resized]
    unexpected = [key for key in resized if key not in target]
    mismatched = [
        f"{key} checkpoint {_shape(resized[key])} vs model {_shape(target[key])}"
        for key in target
        if key in resized and resized[key].shape != target[key].shape
    ]
    if missing or unexpected or mismatched:
        model_name = model_type or guess_model_type(target)
        firsts = [
            f"first {kind}: {keys[0]}"
            for kind, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            )
            if keys
        ]
        raise CheckpointError(
            f"{guess_model_type(resized)} weights given for {model_name}: "
            f"{len(missing)} missing keys, {len(unexpected)} unexpected, "
            f"{len(mismatched)} shape mismatches ({'; '.join(firsts)})"
        )
    model.load_state_dict(resized, strict=True)


def load_checkpoint(
    model: Sam,
    path_or_url: str | Path,
    *,
    model_type: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Load an official-format checkpoint (a flat state dict of the full Sam) into ``model``.

    ``path_or_url``: a local path, or an http(s)/file URL downloaded once into ``cache_dir``
    (see :func:`resolve_checkpoint`). Read with ``weights_only=True``; position tables are
    resized to the model's image size and window. Returns the local checkpoint path.
    """
    path = resolve_checkpoint(path_or_url, cache_dir=cache_dir)
    state_dict = read_state_dict(path)  # its errors name the file
    try:
        load_sam_state_dict(model, state_dict, model_type=model_type)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    return path


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The flat ``{name: tensor}`` dict stored at ``path``, read to CPU without unpickling code.

    ``weights_only=True`` restricts unpickling to tensors and plain containers, so a checkpoint
    carrying arbitrary Python objects is refused with :class:`CheckpointError` instead of run.
    """
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle.UnpicklingError, RuntimeError, ...
        raise CheckpointError(
            f"cannot read {path} as a tensor-only checkpoint (torch.load weights_only=True): "
            f"{_one_line(error)}"
        ) from error
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(value, Tensor) for value in state_dict.values()
    ):
        raise CheckpointError(
            f"{path} holds a {type(state_dict).__name__}, not a flat state dict of tensors "
            "(the format of the official SAM checkpoints)"
        )
    return dict(state_dict)


def _one_line(error: Exception) -> str:
    """torch.load's reason in one line: its weights-only unpickler's own words when it gives
    them (the rest of its message is advice on loading untrusted code)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = text.split(marker, 1)[1].strip().splitlines()
        return f"not tensors only ({detail[0].strip() if detail else 'unknown content'})"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(error).__name__}: {first}".rstrip(": ")


def resolve_checkpoint(path_or_url: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """A local file for ``path_or_url``, downloading an http(s)/file URL once into the cache.

    The cache folder is ``cache_dir`` if given, else ``$SEMISUP_CACHE/checkpoints``, else
    ``~/.cache/semisup/checkpoints``. A URL is stored under its file name; once that file exists
    it is used without contacting the server. Downloads show a progress bar and land atomically
    (``torch.hub.download_url_to_file`` writes a temporary file, then moves it), so concurrent
    workers never read a partial file.
    """
    text = str(path_or_url)
    url = urllib.parse.urlparse(text)
    if url.scheme not in ("http", "https", "file"):
        path = Path(path_or_url).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return path
    folder = checkpoint_cache_dir(cache_dir)
    name = Path(urllib.parse.unquote(url.path)).name
    if not name:
        raise ValueError(f"checkpoint URL {text!r} does not end in a file name")
    path = folder / name
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s to %s", text, path)
        torch.hub.download_url_to_file(text, str(path), progress=True)
    return path


def checkpoint_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Folder for downloaded checkpoints: ``cache_dir``, ``$SEMISUP_CACHE/checkpoints`` or
    ``~/.cache/semisup/checkpoints``, in that order."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("SEMISUP_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "semisup"
    return base / "checkpoints"


def official_checkpoint_url(model_type: str) -> str:
    """URL of Meta's released checkpoint for ``model_type`` (vit_b, vit_l or vit_h)."""
    try:
        return OFFICIAL_CHECKPOINT_URLS[model_type]
    except KeyError:
        raise ValueError(
            f"no official checkpoint for {model_type!r}; "
            f"released: {', '.join(OFFICIAL_CHECKPOINT_URLS)}"
        ) from None


def checkpoint_sha256(path: str | Path, prefix_chars: int = 12) -> str:
    """First ``prefix_chars`` hex digits of the file's SHA-256, to record in run manifests."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:prefix_chars]


def guess_model_type(state_dict: Mapping[str, Tensor]) -> str:
    """Name of the ``SAM_SPECS`` entry whose encoder width and depth match ``state_dict``.

    Falls back to a description such as ``"unknown SAM (embed 96, depth 3)"``, or
    ``"non-SAM"`` when there is no patch embedding at all.
    """
    patch = state_dict.get("image_encoder.patch_embed.proj.weight")
    if patch is None:
        return "non-SAM"
    blocks = {int(m.group(1)) for key in state_dict if (m := _BLOCK_KEY.match(key))}
    embed_dim, depth = patch.shape[0], len(blocks)
    for name, spec in SAM_SPECS.items():
        if (spec.encoder_embed_dim, spec.encoder_depth) == (embed_dim, depth):
            return name
    return f"unknown SAM (embed {embed_dim}, depth {depth})"


def _spec_name(spec: SamSpec) -> str:
    for name, known in SAM_SPECS.items():
        if known == spec:
            return name
    return f"custom SAM (embed {spec.encoder_embed_dim}, depth {spec.encoder_depth})"


def _shape(tensor: Tensor) -> str:
    return "×".join(str(size) for size in tensor.shape)

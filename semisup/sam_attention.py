"""SAM's image-encoder attention computed by fused kernels, with the official parameters.

segment-anything's ``Attention`` computes ``softmax((q·scale) @ kᵀ + bias) @ v`` with explicit
matmuls: the B·heads×N×N scores, the decomposed relative-position bias added to them and the
softmax probabilities all pass through memory (N = H·W tokens: 4096 for a global block at
1024 px, 196 for a 14×14 window). Its ``get_rel_pos`` also indexes the (possibly GPU) position
tables with an index built on the CPU, a host sync per block.

:class:`RelPosAttention` is a drop-in subclass with the same parameters under the same names,
so official checkpoints load unchanged. ``implementation`` chooses how it computes:

- ``"reference"``: segment-anything's own ``Attention.forward``;
- ``"sdpa"``: ``F.scaled_dot_product_attention`` with the decomposed bias as an additive float
  ``attn_mask`` (the segment-anything-fast approach), its index built on the tensor's device;
- ``"flex"``: ``torch.nn.attention.flex_attention``, compiled with ``torch.compile`` (flex
  attention is only fused when compiled), adding the bias inside the kernel through a
  ``score_mod``, so no N×N tensor reaches memory. The first call per shape compiles (about 2 s
  on a CPU for the tiny spec).

The decomposed bias (MViTv2, arXiv:2112.01526) for query (qh, qw) and key (kh, kw) is
``q · Rh[qh − kh] + q · Rw[qw − kw]``, with unscaled q: two small B·heads×N×H and ×W tables
from which the N×N bias is a broadcast sum.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Final, Literal, get_args

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention
from torch import Tensor, nn

AttentionImplementation = Literal["reference", "sdpa", "flex"]
ATTENTION_IMPLEMENTATIONS: Final[tuple[str, ...]] = get_args(AttentionImplementation)


def flex_attention_available() -> bool:
    """Whether the installed torch has ``torch.nn.attention.flex_attention``."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


class RelPosAttention(Attention):
    """segment-anything's ``Attention`` (same parameters and keys) with a choice of kernel.

    Input and output: B×H×W×C float tokens (a window or the whole grid). Build it with
    :meth:`from_attention`, which reuses an existing module's parameters.
    """

    implementation: AttentionImplementation

    @classmethod
    def from_attention(
        cls, attention: Attention, implementation: AttentionImplementation
    ) -> RelPosAttention:
        """A :class:`RelPosAttention` sharing ``attention``'s parameters (no copy, no RNG)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.num_heads = attention.num_heads
        module.scale = attention.scale
        module.use_rel_pos = attention.use_rel_pos
        module.qkv = attention.qkv
        module.proj = attention.proj
        if attention.use_rel_pos:
            module.rel_pos_h = attention.rel_pos_h
            module.rel_pos_w = attention.rel_pos_w
        module.implementation = _checked(implementation)
        return module

    def forward(self, x: Tensor) -> Tensor:
        if self.implementation == "reference":
            return super().forward(x)
        batch, height, width, _ = x.shape
        tokens = height * width
        # 3×B×heads×N×head_dim
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        rel_h = rel_w = None
        if self.use_rel_pos:
            rel_h, rel_w = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (height, width))
        if self.implementation == "flex":
            out = _flex_attention(q, k, v, rel_h, rel_w, scale=self.scale)
        else:
            bias = None
            if rel_h is not None and rel_w is not None:
                bias = rel_pos_bias(rel_h, rel_w)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        # B×heads×N×head_dim -> B×H×W×C
        out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(batch, height, width, -1))

    def extra_repr(self) -> str:
        return f"implementation={self.implementation!r}"


def set_attention(model: nn.Module, implementation: AttentionImplementation) -> int:
    """Switch every SAM attention block in ``model`` to ``implementation``, in place.

    segment-anything ``Attention`` modules are replaced by :class:`RelPosAttention` sharing
    their parameters; existing :class:`RelPosAttention` modules change implementation. Keys and
    values of ``model.state_dict()`` are unchanged. Returns the number of blocks switched.
    """
    implementation = _checked(implementation)
    switched = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RelPosAttention):
                child.implementation = implementation
            elif isinstance(child, Attention):
                setattr(parent, name, RelPosAttention.from_attention(child, implementation))
            else:
                continue
            switched += 1
    return switched


def rel_pos_table(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """q_size×k_size×head_dim relative embeddings from a (2·L−1)×head_dim table.

    segment-anything's ``get_rel_pos`` (same interpolation when the table's length differs and
    the same coordinate scaling when q_size != k_size), with the index built on ``rel_pos``'s
    device so reading a GPU table does not wait on the host.
    """
    length = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != length:
        signal = rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1)  # 1×head_dim×L
        resized = F.interpolate(signal, size=length, mode="linear")
        rel_pos = resized.reshape(-1, length).permute(1, 0)  # length×head_dim
    device = rel_pos.device
    q_coords = torch.arange(q_size, device=device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def decomposed_rel_pos(
    q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """The two factors of the decomposed bias for self-attention on an H×W grid.

    ``q``: B×heads×N×head_dim queries, unscaled (N = H·W, row-major). ``rel_pos_h``/``_w``:
    (2·H−1)×head_dim and (2·W−1)×head_dim tables. Returns ``rel_h``: B×heads×N×H with
    ``rel_h[..., n, kh] = q_n · Rh[qh(n) − kh]`` and ``rel_w``: B×heads×N×W likewise; the bias of
    query n and key (kh, kw) is ``rel_h[..., n, kh] + rel_w[..., n, kw]``.
    """
    height, width = size
    table_h = rel_pos_table(height, height, rel_pos_h)  # H×H×head_dim
    table_w = rel_pos_table(width, width, rel_pos_w)  # W×W×head_dim
    grid_q = q.unflatten(-2, (height, width))  # B×heads×H×W×head_dim
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, table_h)  # B×heads×H×W×H
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, table_w)  # B×heads×H×W×W
    return rel_h.flatten(2, 3), rel_w.flatten(2, 3)


def rel_pos_bias(rel_h: Tensor, rel_w: Tensor) -> Tensor:
    """B×heads×N×N additive attention bias from :func:`decomposed_rel_pos`'s factors."""
    # B×heads×N×H×1 + B×heads×N×1×W -> B×heads×N×(H·W), keys row-major as the tokens
    return (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).flatten(-2)


def _flex_attention(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor | None, rel_w: Tensor | None, *, scale: float
) -> Tensor:
    """Attention with the decomposed bias added per score inside flex_attention's kernel."""
    flex_attention = _compiled_flex_attention()
    if rel_h is None or rel_w is None:
        return flex_attention(q, k, v, scale=scale)  # type: ignore[return-value]
    width = rel_w.shape[-1]
    bias_h, bias_w = rel_h, rel_w

    def add_rel_pos(
        score: Tensor, batch: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor
    ) -> Tensor:
        # Key kv_idx sits at row kv_idx // W, column kv_idx % W of the grid.
        return (
            score
            + bias_h[batch, head, q_idx, kv_idx // width]
            + bias_w[batch, head, q_idx, kv_idx % width]
        )

    return flex_attention(q, k, v, score_mod=add_rel_pos, scale=scale)  # type: ignore[return-value]


@functools.cache
def _compiled_flex_attention() -> Callable[..., Tensor]:
    """flex_attention compiled once per process; unfused (N×N scores in memory) otherwise."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)  # type: ignore[return-value]


def _checked(implementation: str) -> AttentionImplementation:
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; "
            f"known: {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    if implementation == "flex" and not flex_attention_available():
        raise ValueError(
            "attention 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5); "
            f"this torch is {torch.__version__}"
        )
    return implementation  # type: ignore[return-value]

"""Multi-head attention over the positions of a feature map.

Notation: x (B, C, *S) is a feature map with spatial dims S (images: S = (H, W)); its L = prod(S)
positions are the tokens. Self-attention lets the tokens attend to each other; cross-attention lets
them attend to a context sequence c (B, M, D) (Vaswani et al. 2017; for diffusion U-Nets
Dhariwal & Nichol 2021, self-attention; Rombach et al. 2022, cross-attention to a context).
Both go through torch.nn.functional.scaled_dot_product_attention.

Speed notes (CPU): the feature maps are kept channels-last, so the token view (B, L, C) of
x is free (no copy), and the projections are single fused GEMMs over all B * L tokens.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from torch.nn import functional as F

from torchdiffusion.errors import ConfigError
from torchdiffusion.nn.posenc import RelativePositionBias


def tokens(x: Tensor) -> Tensor:
    """(B, C, *S) -> (B, L, C); a view when x is channels-last."""
    return x.movedim(1, -1).flatten(1, -2)


def untokens(t: Tensor, like: Tensor) -> Tensor:
    """(B, L, C) -> (B, C, *S) with the spatial shape of `like`; a view (channels-last result)."""
    b, _, c = t.shape
    return t.reshape(b, *like.shape[2:], c).movedim(-1, 1)


def split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, L, heads * d) -> (B, heads, L, d), a strided view."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """(B, heads, L, d) -> (B, L, heads * d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def attend(q: Tensor, k: Tensor, v: Tensor, heads: int, rope=None, bias=None) -> Tensor:
    """Multi-head attention of (B, N, C) queries on (B, M, C) keys/values -> (B, N, C), through SDPA (its 1/sqrt(d)
    scale). rope: a posenc.AxialRoPE applied to q and k alike; bias: (heads, N, M) added to the logits (posenc)."""
    q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)  # (B, heads, N|M, d)
    if rope is not None:
        q, k = rope(q), rope(k)
    mask = None if bias is None else bias.to(q.dtype)
    return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def num_heads_for(channels: int, num_heads: int, head_channels: int) -> int:
    """Heads of an attention layer on `channels`: channels // head_channels if head_channels > 0,
    else num_heads. Both must divide the channels exactly."""
    if head_channels > 0:
        if channels % head_channels:
            raise ConfigError(f"head_channels={head_channels} must divide every attention width; "
                              f"{channels} channels is not a multiple of it")
        return channels // head_channels
    if num_heads < 1 or channels % num_heads:
        raise ConfigError(f"num_heads={num_heads} must be >= 1 and divide every attention width; "
                          f"{channels} channels is not a multiple of it (or set head_channels)")
    return num_heads


class SelfAttention(nn.Module):
    """x + W_o MHA(GN(x)) over the L positions of x; W_o starts at zero so the block starts as identity."""

    def __init__(self, channels: int, heads: int, groups: int, eps: float = 1e-6, pos: Optional[nn.Module] = None):
        """pos: None, a posenc.AxialRoPE or a posenc.RelativePositionBias for the feature map's grid S."""
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        if pos is not None:  # registered only when used: without it the module (and its state dict) is as before
            self.pos = pos

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, *S) -> (B, C, *S)."""
        t = tokens(self.norm(x))                                   # (B, L, C)
        q, k, v = self.qkv(t).chunk(3, dim=-1)                     # 3 x (B, L, C)
        pos = getattr(self, "pos", None)
        rope = bias = None
        if pos is not None:
            rope, bias = (None, pos()) if isinstance(pos, RelativePositionBias) else (pos, None)
        return x + untokens(self.proj(attend(q, k, v, self.heads, rope, bias)), x)


class CrossAttention(nn.Module):
    """x + W_o MHA(q = GN(x), k, v = context) (Rombach et al. 2022); W_o starts at zero."""

    def __init__(self, channels: int, context_dim: int, heads: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x (B, C, *S), context (B, M, context_dim) -> (B, C, *S)."""
        q = self.q(tokens(self.norm(x)))                           # (B, L, C)
        k, v = self.kv(context).chunk(2, dim=-1)                   # 2 x (B, M, C)
        return x + untokens(self.proj(attend(q, k, v, self.heads)), x)

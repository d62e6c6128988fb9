"""Positional encodings of token grids: absolute sin-cos, axial rotary (RoPE) and T5 relative bias.

Notation: a grid S = (S_1, ..., S_n) of L = prod(S) tokens (images after patchifying: S = (h, w); video frames:
S = (T,)), flattened row-major (the last axis fastest, as attention.tokens flattens a (B, C, *S) map). A token's
position is p = (p_1, ..., p_n), integer coordinates. Attention tensors are (B, heads, N, d) with N = E + L: E
extra tokens (U-ViT's noise-level and class tokens, context tokens) come first and are never given a position.

- absolute: sincos(S, D) (L, D) is added to the patch tokens once (Vaswani et al. 2017; the 2-D form of
  Peebles & Xie 2023 / MAE): D is split evenly over the axes, each axis gets [sin(p_a w_i), cos(p_a w_i)],
  w_i = 10000^(-i / (D / 2n)).
- rope: axial rotary embedding (Su et al. 2021; RoPE-Axial of Heo et al. 2024, eq. 10): the head dim d is split
  into n equal parts, part a holds d / 2n pairs (q_{2i}, q_{2i+1}) rotated by the angle p_a theta_i with
  theta_i = base^(-i / (d / 2n)). The same pairing and angles act on q and k, so <R(p) q, R(p') k> depends on
  p' - p only (shift invariance); rotations keep norms; SDPA keeps its 1 / sqrt(d) scale.
- relbias: T5's bucketed relative position bias (Raffel et al. 2020, sec. 2.1): a learned per-head scalar
  b[bucket(p'_a - p_a)] added to the attention logits. Buckets are bidirectional (half for each sign), exact up to
  num_buckets / 4 in |distance|, log-spaced beyond, clamped at max_distance. In 2-D the bias is the SUM of
  per-axis terms, b_y[bucket(dy)] + b_x[bucket(dx)] (a table per axis), not one joint bucket of (dy, dx). It is
  shared by all layers (as in T5) and applies to self-attention among patch tokens only (never cross-attention;
  rows and columns of extra tokens get 0).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from torchdiffusion.errors import ConfigError

POS_KINDS = ("absolute", "rope", "relbias")


def check_pos(kind: str, where: str, valid: Sequence[str] = POS_KINDS) -> None:
    if kind not in valid:
        raise ConfigError(f"{where} {kind!r} is not valid; valid: {', '.join(valid)}")


def grid_positions(grid: Sequence[int]) -> Tensor:
    """(L, n) int64 coordinates of the tokens of a grid S, row-major (last axis fastest)."""
    axes = [torch.arange(int(s)) for s in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


def sincos(grid: Sequence[int], dim: int) -> Tensor:
    """(L, dim) float32 absolute sin-cos encoding of the grid's tokens; dim must be a multiple of 2 n."""
    n = len(grid)
    if dim % (2 * n):
        raise ConfigError(f"absolute sin-cos positions need a width divisible by {2 * n} for a {n}-D grid, got {dim}")
    half = dim // (2 * n)
    w = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float64) / half)   # (dim / 2n,)
    pos = grid_positions(grid).to(torch.float64)                             # (L, n)
    parts = []
    for a in range(n):
        angle = pos[:, a:a + 1] * w[None, :]                                 # (L, dim / 2n)
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).to(torch.float32)


class AxialRoPE(nn.Module):
    """Rotates the last L tokens of (B, heads, N, d) queries or keys by their grid positions (module docstring).

    The cos/sin tables are pure functions of (grid, d, base): non-persistent buffers, rebuilt from the config."""

    def __init__(self, grid: Sequence[int], head_dim: int, base: float = 100.0,  # base 100: Heo et al. 2024
                 origin: Sequence[float] = ()):
        """origin: the position of the grid's first token (default 0 on every axis)."""
        super().__init__()
        n = len(grid)
        if head_dim % (2 * n):
            raise ConfigError(f"rope needs a head dim divisible by {2 * n} for a {n}-D grid, got {head_dim}")
        self.grid, self.head_dim = tuple(int(s) for s in grid), head_dim
        m = head_dim // (2 * n)                                              # pairs per axis
        theta = base ** (-torch.arange(m, dtype=torch.float64) / m)          # (m,)
        pos = grid_positions(grid).to(torch.float64)                         # (L, n)
        if origin:
            pos = pos + torch.tensor([float(o) for o in origin], dtype=torch.float64)
        angle = (pos[:, :, None] * theta[None, None, :]).reshape(pos.shape[0], n * m)  # (L, d / 2): axis-major
        angle = angle.repeat_interleave(2, dim=1)                            # (L, d): pair (2i, 2i+1) shares angle i
        self.register_buffer("cos", angle.cos().to(torch.float32), persistent=False)
        self.register_buffer("sin", angle.sin().to(torch.float32), persistent=False)

    @staticmethod
    def rotate_pairs(t: Tensor) -> Tensor:
        """(..., d) -> (..., d) with each pair (a, b) mapped to (-b, a): multiplication by i on C^(d/2)."""
        a, b = t.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([-b, a], dim=-1).flatten(-2)

    def forward(self, t: Tensor) -> Tensor:
        """t (B, heads, E + L, d) -> same shape and dtype; the E leading extra tokens are returned untouched.
        The rotation runs in float32 (under autocast too) and is cast back."""
        L = self.cos.shape[0]
        if t.shape[-2] < L or t.shape[-1] != self.head_dim:
            raise ValueError(f"rope for a {self.grid} grid and head dim {self.head_dim} got tokens {tuple(t.shape)}")
        e = t.shape[-2] - L
        x = t[..., e:, :].float()
        x = x * self.cos + self.rotate_pairs(x) * self.sin
        return torch.cat([t[..., :e, :], x.to(t.dtype)], dim=-2) if e else x.to(t.dtype)


def relative_position_bucket(rel: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """T5's bidirectional bucket of a relative position rel = key - query (int tensor) -> int64 in [0, num_buckets).

    bucket(0) = 0; rel > 0 and rel < 0 fall in disjoint halves; |rel| < num_buckets / 4 has its own bucket, larger
    distances share log-spaced buckets up to max_distance, beyond which the last bucket of the half is used
    (Raffel et al. 2020; the arithmetic of their _relative_position_bucket)."""
    if num_buckets < 4 or num_buckets % 2:
        raise ConfigError(f"relbias num_buckets must be an even number >= 4, got {num_buckets}")
    half = num_buckets // 2
    max_exact = half // 2
    if max_distance <= max_exact:
        raise ConfigError(f"relbias max_distance must exceed num_buckets / 4 = {max_exact}, got {max_distance}")
    rel = rel.to(torch.int64)
    out = (rel > 0).to(torch.int64) * half                                  # keys after the query: upper half
    n = rel.abs()
    far = max_exact + (torch.log(n.clamp(min=1).to(torch.float64) / max_exact)
                       / math.log(max_distance / max_exact) * (half - max_exact)).floor().to(torch.int64)
    far = far.clamp(max=half - 1)
    return out + torch.where(n < max_exact, n, far)


class RelativePositionBias(nn.Module):
    """Per-head logit bias (heads, E + L, E + L) for self-attention among the L grid tokens (module docstring):
    the sum over axes of a learned table indexed by the bucket of the per-axis offset; 0 on extra tokens."""

    def __init__(self, grid: Sequence[int], heads: int, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()  # 32 buckets, max distance 128: Raffel et al. 2020
        pos = grid_positions(grid)                                            # (L, n)
        rel = pos[None, :, :] - pos[:, None, :]                               # (L, L, n): key - query
        self.register_buffer("buckets", relative_position_bucket(rel, num_buckets, max_distance).movedim(-1, 0),
                             persistent=False)                                # (n, L, L)
        # one (num_buckets, heads) table per axis; zero at init, so attention starts position-free
        self.tables = nn.Parameter(torch.zeros(len(grid), num_buckets, heads))

    def forward(self, extra: int = 0) -> Tensor:
        """-> (heads, extra + L, extra + L) float32; rows/columns of the `extra` leading tokens are 0."""
        bias = sum(self.tables[a][self.buckets[a]] for a in range(self.buckets.shape[0]))  # (L, L, heads)
        bias = bias.permute(2, 0, 1)
        return F.pad(bias, (extra, 0, extra, 0)) if extra else bias

"""The convolutional encoder and decoder of the first-stage autoencoders (Esser et al. 2021, Sec. 3.1; Rombach et
al. 2022, Appendix G): residual blocks of GroupNorm + SiLU + 3x3 convolutions, one level per channel multiplier,
a stride-2 down-sampling between levels (nearest up-sampling + conv in the decoder), and an optional single-head
self-attention block in the middle.

Notation: x (B, C, H, W) an image in [-1, 1]; h (B, z, H/f, W/f) a latent; f = 2 ** (len(ch_mult) - 1) the
down-sampling factor (f = 4 for ch_mult of length 3, f = 8 for length 4). H and W need not be equal, but both must
be multiples of f.

    Encoder: conv_in -> [ResBlock x num_res_blocks (-> Downsample)] per level -> mid (ResBlock, Attn?, ResBlock)
             -> GN, SiLU, conv_out (out_channels)
    Decoder: conv_in -> mid (ResBlock, Attn?, ResBlock) -> [ResBlock x (num_res_blocks + 1) (-> Upsample)] per level
             from the deepest -> GN, SiLU, conv_out (out_channels)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..nn.resblock import nearest_upsample_conv2d


def norm_groups(channels: int, groups: int = 32) -> int:
    """The largest divisor of `channels` that is <= groups (32 as LDM for wide layers; fewer for narrow ones)."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


def downsampling_factor(ch_mult: Sequence[int]) -> int:
    """f = 2 ** (number of levels - 1)."""
    return 2 ** (len(ch_mult) - 1)


def check_spatial(shape: Sequence[int], f: int, what: str = "input") -> None:
    """One-line ConfigError unless every spatial side of `shape` (..., H, W) is a positive multiple of f."""
    sides = tuple(int(s) for s in shape[-2:])
    if len(sides) != 2 or any(s < f or s % f for s in sides):
        raise ConfigError(f"{what} of size {'x'.join(map(str, sides))} does not fit an autoencoder with "
                          f"down-sampling factor {f}: height and width must be multiples of {f}")


class ResnetBlock(nn.Module):
    """h = conv2(SiLU(GN(conv1(SiLU(GN(x)))))); out = skip(x) + h (skip: 1x1 conv when the width changes)."""

    def __init__(self, c_in: int, c_out: int, groups: int = 32, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups(c_in, groups), c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_groups(c_out, groups), c_out, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (1x1 q, k, v and output projections), residual."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups(channels, groups), channels, eps=1e-6)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).contiguous()  # (B, 3, 1, HW, C)
        out = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # (B, 1, HW, C)
        return x + self.proj(out.squeeze(1).transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """3x3 stride-2 conv with the asymmetric (0, 1, 0, 1) padding of the reference code: H -> H / 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: H -> 2 H."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return nearest_upsample_conv2d(x, self.conv.weight, self.conv.bias)   # same function, 16/36 of the MACs


def _check(base_channels: int, ch_mult: Sequence[int], num_res_blocks: int) -> None:
    if base_channels < 1 or not ch_mult or any(m < 1 for m in ch_mult) or num_res_blocks < 1:
        raise ConfigError(f"autoencoder: base_channels ({base_channels}), every ch_mult entry ({list(ch_mult)}) and "
                          f"num_res_blocks ({num_res_blocks}) must be >= 1, and ch_mult non-empty")


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> (B, out_channels, H/f, W/f)."""

    def __init__(self, in_channels: int, out_channels: int, base_channels: int, ch_mult: Sequence[int],
                 num_res_blocks: int, mid_attn: bool = True, groups: int = 32, dropout: float = 0.0):
        super().__init__()
        _check(base_channels, ch_mult, num_res_blocks)
        self.f = downsampling_factor(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        widths = [base_channels * m for m in ch_mult]
        c = base_channels
        self.down = nn.ModuleList()
        for level, w in enumerate(widths):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c, w, groups, dropout))
                c = w
            if level < len(widths) - 1:
                blocks.append(Downsample(c))
            self.down.append(nn.Sequential(*blocks))
        self.mid = nn.Sequential(ResnetBlock(c, c, groups, dropout),
                                 AttnBlock(c, groups) if mid_attn else nn.Identity(),
                                 ResnetBlock(c, c, groups, dropout))
        self.norm_out = nn.GroupNorm(norm_groups(c, groups), c, eps=1e-6)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        check_spatial(x.shape, self.f)
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, in_channels, h, w) -> (B, out_channels, f h, f w)."""

    def __init__(self, in_channels: int, out_channels: int, base_channels: int, ch_mult: Sequence[int],
                 num_res_blocks: int, mid_attn: bool = True, groups: int = 32, dropout: float = 0.0):
        super().__init__()
        _check(base_channels, ch_mult, num_res_blocks)
        widths = [base_channels * m for m in ch_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(in_channels, c, 3, padding=1)
        self.mid = nn.Sequential(ResnetBlock(c, c, groups, dropout),
                                 AttnBlock(c, groups) if mid_attn else nn.Identity(),
                                 ResnetBlock(c, c, groups, dropout))
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c, widths[level], groups, dropout))
                c = widths[level]
            if level > 0:
                blocks.append(Upsample(c))
            self.up.append(nn.Sequential(*blocks))
        self.norm_out = nn.GroupNorm(norm_groups(c, groups), c, eps=1e-6)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.up:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def conv_flops(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates x 2 of every Conv2d / Linear of one forward pass of `module` on one input of shape
    (C, H, W) (attention's matmuls included for AttnBlock): the FLOP count the benchmarks compare at."""
    total = [0]
    hooks = []

    def conv_hook(m, inp, out):
        total[0] += 2 * out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def lin_hook(m, inp, out):
        total[0] += 2 * out.numel() * m.in_features

    def attn_hook(m, inp, out):
        b, c, h, w = inp[0].shape
        total[0] += 2 * 2 * b * (h * w) ** 2 * c

    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lin_hook))
        elif isinstance(m, AttnBlock):
            hooks.append(m.register_forward_hook(attn_hook))
    try:
        with torch.no_grad():
            p = next(module.parameters())
            module(torch.zeros((1,) + tuple(input_shape), dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    return total[0]

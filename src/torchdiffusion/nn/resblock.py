"""Residual block conditioned by predicted normalisation parameters, and resampling layers.

Notation: x (B, C, *S) a feature map (images: S = (H, W)); e (B, E) the conditioning embedding
(noise level, plus class label when there is one), already passed through SiLU by the caller.

Residual block (Dhariwal & Nichol 2021, "AdaGN"; Perez et al. 2018, FiLM):
    h = conv1(SiLU(GN(x)))
    (s, b) = W_e e                                  # per-sample, per-channel scale and shift
    h = conv2(SiLU(GN(h) * (1 + s) + b))            # scale_shift_norm=True
    h = conv2(SiLU(GN(h + W_e e)))                  # scale_shift_norm=False (Ho et al. 2020)
    out = skip(x) + h
conv2 starts at zero (Dhariwal & Nichol 2021, improved-diffusion), so every block starts as the
identity (or the skip projection) and the network output starts at zero.

GroupNorm statistics are per sample, so nothing here couples the rows of a batch.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from torchdiffusion.errors import ConfigError

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def conv_nd(dims: int, c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Module:
    """A `dims`-D convolution with 'same' padding for odd kernels."""
    if dims not in _CONV:
        raise ConfigError(f"spatial dims must be 1, 2 or 3, got {dims}")
    return _CONV[dims](c_in, c_out, kernel, stride=stride, padding=kernel // 2)


def check_groups(channels: int, groups: int) -> None:
    if groups < 1 or channels % groups:
        raise ConfigError(f"norm_groups={groups} must divide every GroupNorm width; {channels} channels "
                          f"is not a multiple of it (choose a divisor of model_channels)")


def per_channel(v: Tensor, like: Tensor) -> Tensor:
    """(B, C) -> (B, C, 1, ..., 1), broadcastable against `like` (B, C, *S) of any rank."""
    return v.reshape(v.shape + (1,) * (like.ndim - 2))


class ResBlock(nn.Module):
    """Residual block with AdaGN / FiLM conditioning on an embedding (see module docstring)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, *, groups: int, dropout: float = 0.0,
                 scale_shift_norm: bool = True, dims: int = 2, eps: float = 1e-5):
        super().__init__()
        check_groups(c_in, groups)
        check_groups(c_out, groups)
        self.groups, self.eps, self.scale_shift_norm, self.dropout = groups, eps, scale_shift_norm, dropout
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = conv_nd(dims, c_in, c_out, 3)
        self.emb = nn.Linear(emb_dim, 2 * c_out if scale_shift_norm else c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = conv_nd(dims, c_out, c_out, 3)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = conv_nd(dims, c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x (B, c_in, *S), e (B, emb_dim) (after SiLU) -> (B, c_out, *S)."""
        h = self.conv1(F.silu(self.norm1(x)))
        p = self.emb(e)
        if self.scale_shift_norm:
            # GN(h) * (1 + s) + b with GN's own affine folded into the per-sample factors:
            # (n * gamma + beta) * (1 + s) + b = n * [gamma (1 + s)] + [beta (1 + s) + b]
            s, b = p.chunk(2, dim=1)                                  # (B, C) each
            a = self.norm2.weight * (1 + s)
            c = self.norm2.bias * (1 + s) + b
            n = F.group_norm(h, self.groups, None, None, self.eps)
            h = F.silu(per_channel(c, n).addcmul(n, per_channel(a, n)))
        else:
            h = F.silu(self.norm2(h + per_channel(p, h)))
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        h = self.conv2(h)
        return (x if self.skip is None else self.skip(x)) + h


class Downsample(nn.Module):
    """Halve every spatial size: a stride-2 3x3 conv (Ho et al. 2020) or 2x average pooling."""

    def __init__(self, channels: int, *, with_conv: bool = True, dims: int = 2):
        super().__init__()
        self.dims = dims
        self.conv = conv_nd(dims, channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, *S) -> (B, C, *S / 2); S must be even (checked once by the U-Net config)."""
        return self.conv(x) if self.conv is not None else _AVG_POOL[self.dims](x, 2)


def _fold_taps(w: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The two 2-tap kernels, along `dim`, that a 3-tap kernel becomes on a nearest-doubled axis."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def nearest_upsample_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """conv3x3(nearest_upsample_2x(x)) with padding 1, computed as four 2x2 convs at the input size.

    x (B, C, H, W), weight (O, C, 3, 3), bias (O,) or None -> (B, O, 2H, 2W), in x's memory format.
    Output row 2i + a (a in {0, 1}) of the 3x3 conv reads doubled rows 2i + a - 1 .. 2i + a + 1,
    which are input rows {i - 1, i, i} (a = 0) or {i, i, i + 1} (a = 1): two distinct rows, so the
    three row taps fold into two, (w0, w1 + w2) or (w0 + w1, w2); the same holds for columns. Each of
    the four output phases (a, b) is then a 2x2 conv of the zero-padded input, and zero padding at
    the doubled size is zero padding at the input size. The result is the same function with 16/36
    of the multiply-adds; it differs from the direct form by float rounding only (weights are summed
    before the product). The "sub-pixel" view of resize-convolution (Shi et al. 2016; Odena et al. 2016).
    """
    bsz, _, h, w = x.shape
    rows = _fold_taps(weight, 2)
    kernels = [_fold_taps(r, 3) for r in rows]                   # kernels[a][b]: (O, C, 2, 2)
    xp = F.pad(x, (1, 1, 1, 1))
    fmt = (torch.channels_last if x.dim() == 4 and not x.is_contiguous()
           and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
    out = torch.empty((bsz, weight.shape[0], 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=fmt)
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, a::2, b::2] = F.conv2d(xp[:, :, a:a + h + 1, b:b + w + 1], kernels[a][b], bias)
    return out


class Upsample(nn.Module):
    """Double every spatial size: nearest-neighbour repeat, then optionally a 3x3 conv (Ho et al. 2020).

    For images the pair runs as `nearest_upsample_conv2d` (same function, 16/36 of the multiply-adds);
    the parameters are the 3x3 conv's, so checkpoints and converted weights are unchanged.
    """

    def __init__(self, channels: int, *, with_conv: bool = True, dims: int = 2):
        super().__init__()
        self.dims = dims
        self.conv = conv_nd(dims, channels, channels, 3) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, *S) -> (B, C, *2S)."""
        if self.conv is not None and self.dims == 2:
            return nearest_upsample_conv2d(x, self.conv.weight, self.conv.bias)
        h = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(h) if self.conv is not None else h

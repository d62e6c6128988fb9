"""Embeddings of the scalar noise input c_noise.

Notation: c_noise has shape (B,) (float; whatever the preconditioner hands the backbone, e.g. a
DDPM step index in [0, 1000) or ln(sigma) / 4); an embedding maps it to (B, dim).
The backbone does not know what c_noise means; it only embeds a real number.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from torchdiffusion.errors import ConfigError


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a real scalar (Vaswani et al. 2017, as used by Ho et al. 2020).

    emb(c) = [cos(c * f_0), ..., cos(c * f_{h-1}), sin(c * f_0), ..., sin(c * f_{h-1})],
    f_i = max_period^(-i / h), h = dim / 2: geometric frequencies from 1 down to 1 / max_period.
    """

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ConfigError(f"positional embedding dim must be an even number >= 2, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        # not persistent: a pure function of (dim, max_period), rebuilt from the config
        self.register_buffer("freqs", freqs.to(torch.float32), persistent=False)

    def forward(self, c_noise: Tensor) -> Tensor:
        """c_noise (B,) -> (B, dim)."""
        angle = c_noise.to(torch.float32)[:, None] * self.freqs[None, :]
        return torch.cat([angle.cos(), angle.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a real scalar (Tancik et al. 2020; Song et al. 2021, NCSN++).

    emb(c) = [cos(2 pi f c), sin(2 pi f c)] with fixed f ~ N(0, scale^2) (dim / 2 of them).
    The frequencies are a persistent buffer, so saved weights carry them.
    """

    def __init__(self, dim: int, scale: float = 16.0):  # scale 16: Song et al. 2021, NCSN++ configs
        super().__init__()
        if dim < 2 or dim % 2:
            raise ConfigError(f"Fourier embedding dim must be an even number >= 2, got {dim}")
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, c_noise: Tensor) -> Tensor:
        """c_noise (B,) -> (B, dim)."""
        angle = (2 * math.pi) * c_noise.to(torch.float32)[:, None] * self.freqs[None, :]
        return torch.cat([angle.cos(), angle.sin()], dim=1)


def make_noise_embedding(kind: str, dim: int) -> nn.Module:
    """The embedding named by UNetConfig.noise_embedding."""
    if kind == "positional":
        return PositionalEmbedding(dim)
    if kind == "fourier":
        return FourierEmbedding(dim)
    raise ConfigError(f"noise_embedding must be 'positional' or 'fourier', got {kind!r}")

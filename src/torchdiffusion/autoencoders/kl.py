"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3 and Appendix G; "KL-f4" etc.).

Notation: x (B, C, H, W) in [-1, 1]; q(z | x) = N(mean, diag(exp(logvar))) with mean, logvar (B, z, H/f, W/f);
f = 2 ** (len(ch_mult) - 1).

    encoder(x) -> (B, 2 z_channels, H/f, W/f) -> 1x1 quant_conv -> (mean, logvar)     encode(x) -> DiagonalGaussian
    z = mean + exp(logvar / 2) * n,  n ~ N(0, I)                                        posterior.sample(generator)
    1x1 post_quant_conv -> decoder -> x_hat (B, C, H, W)                                 decode(z)

logvar is clamped to [-30, 20] as in the reference code. The KL to N(0, I) is summed over the latent dimensions
(z, H/f, W/f), one value per sample (B,); the training loss (autoencoders.losses) weighs its batch mean by 1e-6.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .blocks import Decoder, Encoder, check_spatial, downsampling_factor


@dataclass(frozen=True)
class KLConfig:
    """Sizes of a KL autoencoder. The defaults are a small f = 4 model for 32x32 images; LDM's KL-f4 uses
    base_channels 128, ch_mult (1, 2, 4), num_res_blocks 2, z_channels 3 (Rombach et al. 2022, Table 8)."""
    base_channels: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)  # f = 2 ** (len - 1): (1, 2, 2) -> f = 4, (1, 2, 2, 4) -> f = 8
    num_res_blocks: int = 1
    z_channels: int = 3  # LDM KL-f4: 3
    mid_attn: bool = True
    norm_groups: int = 32  # GroupNorm groups (fewer where a width is not a multiple)
    dropout: float = 0.0
    channels_last: bool = False  # NHWC weights and activations (faster convolutions on CPUs; same maths)

    def __post_init__(self):
        if self.z_channels < 1:
            raise ValueError(f"z_channels must be >= 1, got {self.z_channels}")
        if len(self.ch_mult) < 1:
            raise ValueError("ch_mult must have at least one entry")


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))); mean, logvar (B, z, *S); logvar clamped to [-30, 20]."""

    def __init__(self, moments: Tensor):
        mean, logvar = moments.chunk(2, dim=1)
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> Tensor:
        """mean + std * n with n drawn from `generator` (on its own device, then moved)."""
        if generator is None:
            n = torch.randn_like(self.mean)
        else:
            n = torch.randn(self.mean.shape, generator=generator, device=generator.device,
                            dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * n

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) = 0.5 sum(mean^2 + var - 1 - logvar) over every dim but the batch: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(1)


class KLAutoencoder(nn.Module):
    """encode(x) -> DiagonalGaussian, decode(z) -> x_hat, forward(x, generator) -> (x_hat, posterior)."""

    kind = "kl"

    def __init__(self, cfg: KLConfig = KLConfig(), in_channels: int = 1):
        super().__init__()
        self.cfg, self.in_channels = cfg, in_channels
        self.f = downsampling_factor(cfg.ch_mult)
        args = (cfg.base_channels, cfg.ch_mult, cfg.num_res_blocks, cfg.mid_attn, cfg.norm_groups, cfg.dropout)
        self.encoder = Encoder(in_channels, 2 * cfg.z_channels, *args)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.decoder = Decoder(cfg.z_channels, in_channels, *args)
        self._format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x.contiguous(memory_format=self._format))))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z.contiguous(memory_format=self._format)))

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None,
                sample: bool = True) -> tuple[Tensor, DiagonalGaussian]:
        """(x_hat, posterior); x_hat decodes a sample of the posterior (its mode with sample=False)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's final conv weight: where LDM's adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def latent_shape(self, data_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(z_channels, H/f, W/f) of data of shape (C, H, W)."""
        check_spatial(data_shape, self.f, "data")
        return (self.cfg.z_channels, int(data_shape[-2]) // self.f, int(data_shape[-1]) // self.f)

"""An image classifier for the frame x = x0 + sigma * n: the encoder half of the U-Net with a noise-level embedding.

Notation: x (B, C, H, W) in model range [-1, 1] plus noise of standard deviation sigma (B,) (sigma = 0 or None:
a clean image); K classes; logits (B, K); features (B, F) with F = model_channels * channel_mult[-1].

Architecture: the downsampling half and middle block of nn.unet (residual blocks with AdaGN conditioned on the
noise level, self-attention at the configured resolutions), then GroupNorm, SiLU and a global average pool to
the features and a linear head to the logits. Dhariwal & Nichol 2021 (Sec. 4, "classifier guidance") train
this shape of network on noisy images for guidance; with sigma = 0 throughout it is a plain classifier.

Input scaling (the only noise-level knowledge in this module, kept beside the network so a classifier checkpoint
is usable on its own): the network sees c_in x with c_in = 1 / sqrt(sigma^2 + sigma_data^2), which gives unit-scale
inputs at every noise level (Karras et al. 2022, eq. 7), and embeds c_noise = ln(max(sigma, sigma_floor)) / 4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from torchdiffusion.errors import ConfigError, TorchDiffusionError
from torchdiffusion.nn.attention import SelfAttention, num_heads_for
from torchdiffusion.nn.embedding import make_noise_embedding
from torchdiffusion.nn.resblock import Downsample, ResBlock, check_groups, conv_nd
from torchdiffusion.nn.unet import check_spatial_size


@dataclass(frozen=True)
class ClassifierConfig:
    image_size: int = 28
    in_channels: int = 1
    num_classes: int = 10
    model_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()  # none by default: at 28x28 convolutions suffice and cost less on CPU
    num_heads: int = 4
    norm_groups: int = 8
    dropout: float = 0.0
    noise_embedding: str = "positional"
    emb_mult: int = 4
    sigma_data: float = 0.5   # Karras et al. 2022; input scaling c_in
    sigma_floor: float = 1e-4  # c_noise of a clean image (sigma = 0) is ln(sigma_floor) / 4
    channels_last: bool = True  # memory layout of the feature maps (speed on CPU, as in nn.unet); same math

    def __post_init__(self):
        for name in ("channel_mult", "attn_resolutions"):  # accept lists (e.g. from YAML)
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("image_size", "in_channels", "model_channels", "num_res_blocks", "emb_mult"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ClassifierConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ConfigError(f"ClassifierConfig.num_classes must be >= 2, got {self.num_classes}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"ClassifierConfig.channel_mult must be a non-empty tuple of ints >= 1, "
                              f"got {self.channel_mult}")
        if self.sigma_data <= 0 or self.sigma_floor <= 0:
            raise ConfigError("ClassifierConfig.sigma_data and sigma_floor must be > 0")
        check_spatial_size(self.image_size, len(self.channel_mult))
        sizes = tuple(self.image_size >> level for level in range(len(self.channel_mult)))
        missing = [r for r in self.attn_resolutions if r not in sizes]
        if missing:
            raise ConfigError(f"ClassifierConfig.attn_resolutions {missing} are not feature-map sizes; "
                              f"valid sizes are {sizes}")
        for m in sorted(set(self.channel_mult)):
            check_groups(self.model_channels * m, self.norm_groups)

    @property
    def feature_dim(self) -> int:
        return self.model_channels * self.channel_mult[-1]


class Classifier(nn.Module):
    """forward(x, sigma=None) -> logits (B, K); features(x, sigma=None) -> (B, F). sigma: None, a float or (B,)."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        if not isinstance(cfg, ClassifierConfig):
            raise ConfigError(f"Classifier expects a ClassifierConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        mc, g = cfg.model_channels, cfg.norm_groups
        emb_dim = cfg.emb_mult * mc
        self.noise_embed = make_noise_embedding(cfg.noise_embedding, mc)
        self.noise_mlp = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = conv_nd(2, cfg.in_channels, mc, 3)
        self.blocks = nn.ModuleList()  # (ResBlock, optional attention) pairs, level by level
        self.attn = nn.ModuleList()
        self.down = nn.ModuleList()
        ch = mc
        for level, mult in enumerate(cfg.channel_mult):
            size = cfg.image_size >> level
            for _ in range(cfg.num_res_blocks):
                w = mc * mult
                self.blocks.append(ResBlock(ch, w, emb_dim, groups=g, dropout=cfg.dropout))
                self.attn.append(SelfAttention(w, num_heads_for(w, cfg.num_heads, 0), g)
                                 if size in cfg.attn_resolutions else nn.Identity())
                ch = w
            self.down.append(Downsample(ch) if level < len(cfg.channel_mult) - 1 else nn.Identity())
        self.mid = ResBlock(ch, ch, emb_dim, groups=g, dropout=cfg.dropout)
        self.norm_out = nn.GroupNorm(g, ch)
        self.head = nn.Linear(ch, cfg.num_classes)
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    def _sigma(self, x: Tensor, sigma) -> Tensor:
        """None, float, 0-d or (B,) -> (B,) float32 on x's device."""
        if sigma is None:
            return x.new_zeros(x.shape[0], dtype=torch.float32)
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if s.ndim == 0:
            s = s.expand(x.shape[0])
        if s.shape != (x.shape[0],):
            raise TorchDiffusionError(f"classifier sigma must be a scalar or ({x.shape[0]},), got {tuple(s.shape)}")
        return s

    def features(self, x: Tensor, sigma=None) -> Tensor:
        """x (B, C, H, W) in the frame (model range plus noise sigma) -> pooled features (B, F)."""
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or tuple(x.shape[2:]) != (cfg.image_size, cfg.image_size):
            raise TorchDiffusionError(f"classifier input must be (B, {cfg.in_channels}, {cfg.image_size}, "
                                      f"{cfg.image_size}), got {tuple(x.shape)}")
        s = self._sigma(x, sigma)
        c_in = (s.double() ** 2 + cfg.sigma_data ** 2).rsqrt().float().reshape(-1, 1, 1, 1)
        c_noise = s.clamp_min(cfg.sigma_floor).log() / 4
        e = F.silu(self.noise_mlp(self.noise_embed(c_noise)))
        x = c_in * x.float()
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x)
        i = 0
        for level in range(len(cfg.channel_mult)):
            for _ in range(cfg.num_res_blocks):
                h = self.attn[i](self.blocks[i](h, e))
                i += 1
            h = self.down[level](h)
        h = self.mid(h, e)
        return F.silu(self.norm_out(h)).mean(dim=(2, 3))  # (B, F)

    def forward(self, x: Tensor, sigma=None) -> Tensor:
        """x (B, C, H, W) -> logits (B, K)."""
        return self.head(self.features(x, sigma))

    def log_prob(self, x: Tensor, y: Tensor, sigma=None) -> Tensor:
        """log p(y | x, sigma) (B,) for labels y (B,) int64."""
        return torch.log_softmax(self(x, sigma), dim=1).gather(1, y.reshape(-1, 1).long()).squeeze(1)


def noise_levels(n: int, sigma_min: float, sigma_max: float, generator: Optional[torch.Generator] = None,
                 p_clean: float = 0.1) -> Tensor:
    """(n,) float32 training noise levels for a noisy classifier: ln(sigma) uniform on [ln sigma_min, ln sigma_max]
    (the sampler's whole range on a log scale, as a Karras grid spans it), and sigma = 0 with probability p_clean."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    s = torch.exp(lo + (hi - lo) * u)
    clean = torch.rand(n, generator=generator, dtype=torch.float64) < p_clean
    return torch.where(clean, torch.zeros_like(s), s).float()

"""diffusers' UNet2DModel layout as a backbone: forward(x, c_noise, cond) -> (B, out_channels, H, W).

This module rebuilds the subset of the `UNet2DModel` architecture of the diffusers library (von Platen et al.,
github.com/huggingface/diffusers, models/unets/unet_2d.py) that DDPM-style pixel models use, with the same module
names, so a `diffusion_pytorch_model.safetensors` state dict loads into it unchanged (config/interop.py reads the
folder; diffusers itself is never imported). The network is DDPM's U-Net (Ho et al. 2020):

    t_emb = Timesteps(c_noise)                      sinusoidal, dim = block_out_channels[0]
    emb   = linear_2(SiLU(linear_1(t_emb)))          (+ class_embedding(label))         (B, E)
    h     = conv_in(x); skips = [h]
    down blocks: layers_per_block x [ResnetBlock2D (+ Attention)], then a stride-2 conv (not on the last level)
    mid:   ResnetBlock2D, Attention (optional), ResnetBlock2D
    up blocks:   (layers_per_block + 1) x [cat(h, skip) -> ResnetBlock2D (+ Attention)], then nearest x2 + conv
    out = conv_out(SiLU(conv_norm_out(h)))

ResnetBlock2D: h = conv1(SiLU(GN(x))); "default": h = GN(h + W SiLU(emb)); "scale_shift": h = GN(h) (1 + s) + b
with (s, b) = W SiLU(emb) (Dhariwal & Nichol 2021); out = (shortcut(x) + conv2(dropout(SiLU(h)))) / output_scale.
Attention (the "deprecated attention block" layout of DDPM's U-Net): x + to_out(MHA(to_q, to_k, to_v of GN(x)))
over the H W positions, heads = channels // attention_head_dim, divided by output_scale.

Timesteps (diffusers' get_timestep_embedding): with h = dim / 2 and f_i = exp(-ln(10000) i / (h - freq_shift)),
emb(t) = [sin(t f), cos(t f)], flipped to [cos, sin] when flip_sin_to_cos. c_noise is the (fractional) DDPM
timestep, what `core.processes.VPDiscrete.c_noise` gives.

Class labels: cond["label"] (B,) int64 in [0, num_class_embeds]; the label num_class_embeds (this project's null
label for classifier-free guidance) adds no class embedding, since a diffusers model has no null class.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from torchdiffusion.errors import ConfigError, TorchDiffusionError

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2D",)
_FROM_DATA = {"derived": "set from the data (model.data_shape)"}


@dataclass(frozen=True)
class DiffusersUNet2DConfig:
    """The supported fields of a diffusers UNet2DModel config.json, under diffusers' names and defaults
    (unet_2d.py). in_channels, out_channels and sample_size follow the model's data shape."""

    sample_size: Union[int, tuple[int, int]] = field(default=32, metadata=_FROM_DATA)
    in_channels: int = field(default=3, metadata=_FROM_DATA)
    out_channels: int = field(default=3, metadata=_FROM_DATA)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    mid_block_type: Optional[str] = "UNetMidBlock2D"
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    attention_head_dim: Optional[int] = 8  # None: one head per attention layer (head width = layer width)
    norm_num_groups: int = 32
    attn_norm_num_groups: Optional[int] = None  # mid-block attention norm; None: norm_num_groups with "default"
    norm_eps: float = 1e-5
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "default"
    add_attention: bool = True  # attention in the mid block
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embedding_dim: Optional[int] = None  # None: 4 * block_out_channels[0]
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    center_input_sample: bool = False
    num_class_embeds: Optional[int] = None  # class embedding table size (class_embed_type None)

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types"):
            object.__setattr__(self, name, tuple(str(v) for v in getattr(self, name)))
        object.__setattr__(self, "block_out_channels", tuple(int(v) for v in self.block_out_channels))
        if not isinstance(self.sample_size, int):
            hw = tuple(int(v) for v in self.sample_size)
            if len(hw) != 2:
                raise ConfigError(f"diffusers_unet2d sample_size must be H or (H, W), got {self.sample_size}")
            object.__setattr__(self, "sample_size", hw[0] if hw[0] == hw[1] else hw)
        n = len(self.block_out_channels)
        bad = [b for b in self.down_block_types if b not in DOWN_BLOCKS]
        bad += [b for b in self.up_block_types if b not in UP_BLOCKS]
        if self.mid_block_type is not None and self.mid_block_type not in MID_BLOCKS:
            bad.append(self.mid_block_type)
        if bad:
            raise ConfigError(f"diffusers_unet2d: block type(s) {', '.join(sorted(set(bad)))} not supported; "
                              f"supported: down {', '.join(DOWN_BLOCKS)}; up {', '.join(UP_BLOCKS)}; mid "
                              f"{', '.join(MID_BLOCKS)} or none")
        if n < 1 or len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(f"diffusers_unet2d: down_block_types ({len(self.down_block_types)}), up_block_types "
                              f"({len(self.up_block_types)}) and block_out_channels ({n}) must have one entry per level")
        if self.layers_per_block < 1 or min(self.block_out_channels) < 1:
            raise ConfigError("diffusers_unet2d: layers_per_block and block_out_channels must be >= 1")
        widths = set(self.block_out_channels)
        for w in sorted(widths):
            if w % self.norm_num_groups:
                raise ConfigError(f"diffusers_unet2d: norm_num_groups={self.norm_num_groups} must divide every "
                                  f"block width; {w} is not a multiple")
            if self.attention_head_dim is not None and w % self.attention_head_dim and self.has_attention(w):
                raise ConfigError(f"diffusers_unet2d: attention_head_dim={self.attention_head_dim} must divide the "
                                  f"attention width {w}")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ConfigError(f"diffusers_unet2d: resnet_time_scale_shift {self.resnet_time_scale_shift!r} is not "
                              f"supported; supported: default, scale_shift")
        if self.num_class_embeds is not None and self.num_class_embeds < 1:
            raise ConfigError(f"diffusers_unet2d: num_class_embeds must be >= 1 or null, got {self.num_class_embeds}")

    def has_attention(self, width: int) -> bool:
        levels = [w for w, d in zip(self.block_out_channels, self.down_block_types) if d.startswith("Attn")]
        levels += [w for w, u in zip(reversed(self.block_out_channels), self.up_block_types) if u.startswith("Attn")]
        return width in levels or (width == self.block_out_channels[-1] and self.mid_block_type is not None
                                   and self.add_attention)

    @property
    def hw(self) -> tuple[int, int]:
        return (self.sample_size, self.sample_size) if isinstance(self.sample_size, int) else self.sample_size

    @property
    def emb_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


def build_diffusers_unet(cfg: DiffusersUNet2DConfig, io) -> "DiffusersUNet2D":
    """The backbone-registry builder: sizes from protocols.BackboneIO; a 'label' class condition of size K needs
    num_class_embeds == K (the loader sets both from config.json)."""
    if len(io.shape) != 3:
        raise ConfigError(f"the diffusers_unet2d backbone takes images (C, H, W); the model's shape is "
                          f"{tuple(io.shape)}")
    for spec in io.conds:
        if spec.kind != "class" or spec.key != "label":
            raise ConfigError(f"the diffusers_unet2d backbone embeds only a class condition named 'label', got "
                              f"{spec.key!r} ({spec.kind})")
        if cfg.num_class_embeds != spec.size:
            raise ConfigError(f"the diffusers_unet2d backbone has num_class_embeds={cfg.num_class_embeds} but the "
                              f"'label' condition has {spec.size} classes")
    if cfg.num_class_embeds is not None and not io.conds:
        raise ConfigError(f"the diffusers_unet2d backbone has num_class_embeds={cfg.num_class_embeds}: it needs a "
                          f"'label' class condition (cond.label kind class, num_classes {cfg.num_class_embeds})")
    return DiffusersUNet2D(replace(cfg, sample_size=tuple(io.shape[1:]), in_channels=io.shape[0],
                                   out_channels=io.out_channels))


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> Tensor:
    """(B,) float timesteps -> (B, dim) float32, as diffusers' get_timestep_embedding (see the module notes)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angle = t.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([angle.sin(), angle.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, c_in: int, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(c_in, dim), nn.Linear(dim, dim)

    def forward(self, t_emb: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(t_emb)))


class ResnetBlock2D(nn.Module):
    """(B, c_in, H, W), emb (B, E) -> (B, c_out, H, W); see the module notes."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, eps: float, shift: str, dropout: float,
                 output_scale: float = 1.0):
        super().__init__()
        self.shift, self.output_scale = shift, output_scale
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, 2 * c_out if shift == "scale_shift" else c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.time_emb_proj(F.silu(emb))[:, :, None, None]
        if self.shift == "scale_shift":
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (skip + h) / self.output_scale


class Attention(nn.Module):
    """x + to_out(MHA(GN(x))) over the H W positions, / output_scale: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, head_dim: Optional[int], groups: Optional[int], eps: float,
                 output_scale: float = 1.0):
        super().__init__()
        self.heads = channels // (head_dim or channels)
        self.output_scale = output_scale
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps) if groups else None
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = x if self.group_norm is None else self.group_norm(x)
        t = h.reshape(B, C, H * W).transpose(1, 2)                               # (B, L, C)
        q, k, v = (proj(t).reshape(B, H * W, self.heads, C // self.heads).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))                # 3 x (B, heads, L, C / heads)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        out = self.to_out[0](a).transpose(1, 2).reshape(B, C, H, W)
        return (out + x) / self.output_scale


class _Resample(nn.Module):
    """diffusers' Downsample2D (stride-2 3x3 conv) / Upsample2D (nearest x2, 3x3 conv), parameters under `conv`."""

    def __init__(self, channels: int, down: bool, padding: int = 1):
        super().__init__()
        self.down, self.padding = down, padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2 if down else 1, padding=padding if down else 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.down:
            if self.padding == 0:  # diffusers pads right and bottom by one before an unpadded stride-2 conv
                x = F.pad(x, (0, 1, 0, 1))
            return self.conv(x)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Block(nn.Module):
    """One level: resnets (each followed by an attention in Attn blocks) and an optional resampler."""

    def __init__(self, resnets: list, attentions: Optional[list], resampler: Optional[nn.Module], down: bool):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        if resampler is not None:
            setattr(self, "downsamplers" if down else "upsamplers", nn.ModuleList([resampler]))


class _MidBlock(nn.Module):
    def __init__(self, resnets: list, attention: Optional[nn.Module]):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([attention]) if attention is not None else None


class DiffusersUNet2D(nn.Module):
    """The UNet2DModel subset of the module notes, with diffusers' parameter names (state dicts load as saved)."""

    def __init__(self, cfg: DiffusersUNet2DConfig):
        super().__init__()
        self.cfg = cfg
        for side in cfg.hw:
            factor = 2 ** (len(cfg.block_out_channels) - 1)
            if side % factor:
                raise ConfigError(f"diffusers_unet2d: image side {side} must be a multiple of {factor} "
                                  f"({len(cfg.block_out_channels)} levels)")
        widths, g, eps, E = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps, cfg.emb_dim
        shift, drop, n = cfg.resnet_time_scale_shift, cfg.dropout, len(cfg.block_out_channels)

        def resnet(c_in, c_out, scale=1.0):
            return ResnetBlock2D(c_in, c_out, E, g, eps, shift, drop, scale)

        def attention(c, groups=g, scale=1.0):
            return Attention(c, cfg.attention_head_dim, groups, eps, scale)

        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], E)
        self.class_embedding = nn.Embedding(cfg.num_class_embeds, E) if cfg.num_class_embeds else None

        self.down_blocks = nn.ModuleList()
        ch = widths[0]
        for i, kind in enumerate(cfg.down_block_types):
            w = widths[i]
            res = [resnet(ch if j == 0 else w, w) for j in range(cfg.layers_per_block)]
            attn = [attention(w) for _ in res] if kind.startswith("Attn") else None
            down = _Resample(w, True, cfg.downsample_padding) if i < n - 1 else None
            self.down_blocks.append(_Block(res, attn, down, True))
            ch = w

        self.mid_block = None
        if cfg.mid_block_type is not None:
            s = cfg.mid_block_scale_factor
            groups = cfg.attn_norm_num_groups or (g if shift == "default" else None)
            self.mid_block = _MidBlock([resnet(ch, ch, s), resnet(ch, ch, s)],
                                       attention(ch, groups, s) if cfg.add_attention else None)

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(widths))
        for i, kind in enumerate(cfg.up_block_types):
            prev, w, skip_in = ch, rev[i], rev[min(i + 1, n - 1)]
            res = []
            for j in range(cfg.layers_per_block + 1):
                skip = skip_in if j == cfg.layers_per_block else w
                res.append(resnet((prev if j == 0 else w) + skip, w))
            attn = [attention(w) for _ in res] if kind.startswith("Attn") else None
            up = _Resample(w, False) if i < n - 1 else None
            self.up_blocks.append(_Block(res, attn, up, False))
            ch = w

        self.conv_norm_out = nn.GroupNorm(g, widths[0], eps=eps)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def embed(self, c_noise: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """(B,) timesteps (+ labels) -> (B, E): the time embedding plus the class embedding (none for the null
        label num_class_embeds)."""
        cfg = self.cfg
        t_emb = timestep_embedding(c_noise, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(t_emb.to(self.conv_in.weight.dtype))
        if self.class_embedding is not None:
            y = cond.get("label")
            k = cfg.num_class_embeds
            if y is None or y.shape != c_noise.shape or y.dtype not in (torch.int32, torch.int64):
                got = "nothing" if y is None else f"{tuple(y.shape)} {y.dtype}"
                raise TorchDiffusionError(f"cond['label'] must be ({c_noise.shape[0]},) int64 in [0, {k}] ({k} = "
                                          f"null label), got {got}")
            real = (y < k).to(emb.dtype)[:, None]
            emb = emb + real * self.class_embedding(y.clamp(max=k - 1))
        return emb

    def forward(self, x: Tensor, c_noise: Tensor, cond: Optional[Mapping[str, Tensor]] = None) -> Tensor:
        """x (B, in_channels, H, W), c_noise (B,) the DDPM timestep -> (B, out_channels, H, W)."""
        cond = {} if cond is None else cond
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise TorchDiffusionError(f"diffusers_unet2d input must be (B, {self.cfg.in_channels}, H, W), got "
                                      f"{tuple(x.shape)}")
        if c_noise.shape != (x.shape[0],):
            raise TorchDiffusionError(f"c_noise must have shape ({x.shape[0]},), got {tuple(c_noise.shape)}")
        emb = self.embed(c_noise, cond)
        if self.cfg.center_input_sample:
            x = 2 * x - 1.0
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            for j, res in enumerate(block.resnets):
                h = res(h, emb)
                if block.attentions is not None:
                    h = block.attentions[j](h)
                skips.append(h)
            if hasattr(block, "downsamplers"):
                h = block.downsamplers[0](h)
                skips.append(h)
        if self.mid_block is not None:
            h = self.mid_block.resnets[0](h, emb)
            if self.mid_block.attentions is not None:
                h = self.mid_block.attentions[0](h)
            h = self.mid_block.resnets[1](h, emb)
        for block in self.up_blocks:
            for j, res in enumerate(block.resnets):
                h = res(torch.cat([h, skips.pop()], dim=1), emb)
                if block.attentions is not None:
                    h = block.attentions[j](h)
            if hasattr(block, "upsamplers"):
                h = block.upsamplers[0](h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

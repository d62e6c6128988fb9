"""The U-Net backbone: forward(x, c_noise, cond) -> tensor of x's shape.

Notation: x (B, C_in, H, W) the network input; c_noise (B,) a real number per sample (what it
means is the preconditioner's business, the network only embeds it); cond a mapping with
optional keys
    "label"   (B,) int64 in [0, num_classes]; num_classes is the "null" (unconditional) label
    "context" (B, M, context_dim) float, attended to by cross-attention
    "concat"  (B, concat_channels, H, W) float, concatenated to x along channels
Levels l = 0 .. len(channel_mult) - 1 run at H / 2^l with model_channels * channel_mult[l] channels.

Architecture: DDPM's U-Net (Ho et al. 2020) with the improvements of Dhariwal & Nichol 2021
(multi-head attention, AdaGN residual blocks, zero-initialised residual and output convs) and
Rombach et al. 2022 (cross-attention to a context sequence). The blocks are in resblock.py and
attention.py.

Speed (CPU training, fp32): the feature maps are channels-last, which lets oneDNN run the
convolutions without layout reorders and makes the attention token view free; GroupNorm's
affine parameters are folded into AdaGN's per-sample scale and shift, so the modulation is one
fused multiply-add.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from torchdiffusion.errors import ConfigError, TorchDiffusionError
from torchdiffusion.nn.attention import CrossAttention, SelfAttention, num_heads_for
from torchdiffusion.nn.embedding import make_noise_embedding
from torchdiffusion.nn.posenc import AxialRoPE, RelativePositionBias, check_pos
from torchdiffusion.nn.resblock import Downsample, ResBlock, Upsample, check_groups, conv_nd


_FROM_DATA = {"derived": "set from the data and the codec (model.data_shape)"}
_FROM_COND = {"derived": "set from the conditioners (the run config's cond section)"}


@dataclass(frozen=True)
class UNetConfig:
    """The U-Net's settings. In a run config (`model.backbone: {kind: unet, ...}`) the input/output sizes and the
    condition fields are not given: build_unet sets them from the data, the codec and the conditioners."""

    image_size: Union[int, tuple[int, int]] = field(default=28, metadata=_FROM_DATA)  # H (== W) or (H, W)
    in_channels: int = field(default=1, metadata=_FROM_DATA)
    out_channels: int = field(default=1, metadata=_FROM_DATA)
    model_channels: int = 64                # base width; level l has model_channels * channel_mult[l]
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2                 # per level on the way down (one more on the way up)
    attn_resolutions: tuple[int, ...] = (7,)  # feature-map sizes that get self-attention
    num_heads: int = 4
    head_channels: int = 0                  # > 0: heads = width // head_channels (overrides num_heads)
    dropout: float = 0.0
    num_classes: int = field(default=0, metadata=_FROM_COND)  # > 0: class embedding of cond["label"]; num_classes = null
    context_dim: int = field(default=0, metadata=_FROM_COND)  # > 0: cross-attention to cond["context"]
    concat_channels: int = field(default=0, metadata=_FROM_COND)  # > 0: cond["concat"] concatenated to the input
    # scalar/vector conditions added to the embedding sum: (key, "scalar" | "vector", size)
    embed_conds: tuple[tuple[str, str, int], ...] = field(default=(), metadata=_FROM_COND)
    noise_embedding: str = "positional"     # or "fourier" (Song et al. 2021)
    scale_shift_norm: bool = True           # AdaGN (Dhariwal & Nichol 2021); False: additive (Ho et al. 2020)
    resample_with_conv: bool = True         # conv in down/up-sampling (Ho et al. 2020)
    norm_groups: int = 32                   # GroupNorm groups (Wu & He 2018; 32 as in Ho et al. 2020)
    mid_attention: bool = True              # self-attention in the middle block
    emb_mult: int = 4                       # embedding width = emb_mult * model_channels (Ho et al. 2020)
    channels_last: bool = True              # memory layout of the feature maps; speed only, same math
    attn_pos: Literal["none", "rope", "relbias"] = "none"  # positions in spatial self-attention: none | rope | relbias (posenc.py)

    def __post_init__(self):
        for name in ("channel_mult", "attn_resolutions"):  # accept lists (e.g. from YAML)
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not isinstance(self.image_size, int):
            hw = tuple(int(v) for v in self.image_size)
            if len(hw) != 2:
                raise ConfigError(f"UNetConfig.image_size must be H or (H, W), got {self.image_size}")
            object.__setattr__(self, "image_size", hw[0] if hw[0] == hw[1] else hw)
        object.__setattr__(self, "embed_conds", tuple((str(k), str(kind), int(n)) for k, kind, n in self.embed_conds))
        for key, kind, n in self.embed_conds:
            if kind not in ("scalar", "vector") or n < 1:
                raise ConfigError(f"UNetConfig.embed_conds: ({key!r}, {kind!r}, {n}) must be a scalar or vector "
                                  f"condition of size >= 1")
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "emb_mult"):
            if getattr(self, name) < 1:
                raise ConfigError(f"UNetConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_classes", "context_dim", "concat_channels", "head_channels"):
            if getattr(self, name) < 0:
                raise ConfigError(f"UNetConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"UNetConfig.channel_mult must be a non-empty tuple of ints >= 1, got {self.channel_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        for m in sorted(set(self.channel_mult)):
            check_groups(self.model_channels * m, self.norm_groups)
        check_pos(self.attn_pos, "UNetConfig.attn_pos", ("none", "rope", "relbias"))

    def check_sizes(self) -> None:
        """The checks that need the input size (a run config learns it from the data: build_unet)."""
        for side in self.hw:
            if side < 1:
                raise ConfigError(f"UNetConfig.image_size must be >= 1, got {self.image_size}")
            check_spatial_size(side, len(self.channel_mult))
        sizes = self.resolutions
        missing = [r for r in self.attn_resolutions if r not in sizes]
        if missing:
            raise ConfigError(f"UNetConfig.attn_resolutions {missing} are not feature-map sizes of this U-Net; "
                              f"valid sizes are {sizes}")

    @property
    def hw(self) -> tuple[int, int]:
        return (self.image_size, self.image_size) if isinstance(self.image_size, int) else self.image_size

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size at each level: the smaller side of the input / 2^l (attn_resolutions refer to it)."""
        return tuple(min(self.hw) >> level for level in range(len(self.channel_mult)))


def build_unet(cfg: UNetConfig, io) -> "UNet":
    """The backbone-registry builder: the U-Net for a protocols.BackboneIO (input shape (C, H, W), output channels,
    declared conditions), with cfg's sizes and condition fields replaced by what io says."""
    if len(io.shape) != 3:
        raise ConfigError(f"the unet backbone takes images (C, H, W); the model's shape is {tuple(io.shape)}")
    fields = dict(image_size=tuple(io.shape[1:]), in_channels=io.shape[0], out_channels=io.out_channels,
                  num_classes=0, context_dim=0, concat_channels=0, embed_conds=())
    embed = []
    for spec in io.conds:
        if spec.kind == "class":
            if spec.key != "label" or fields["num_classes"]:
                raise ConfigError(f"the unet backbone embeds one class condition named 'label', got {spec.key!r}")
            fields["num_classes"] = spec.size
        elif spec.kind == "concat":
            if spec.key != "concat":
                raise ConfigError(f"the unet backbone concatenates cond['concat'], got {spec.key!r}")
            fields["concat_channels"] = spec.size
        elif spec.kind == "frames":
            raise ConfigError(f"the unet backbone takes images; cond {spec.key!r} (frames) needs a video backbone "
                              f"(model.backbone.kind=unet3d)")
        elif spec.kind == "context":
            if spec.key != "context":
                raise ConfigError(f"the unet backbone cross-attends to cond['context'], got {spec.key!r}")
            fields["context_dim"] = spec.size
        else:
            embed.append((spec.key, spec.kind, spec.size))
    fields["embed_conds"] = tuple(embed)
    return UNet(replace(cfg, **fields))


def check_spatial_size(size: int, levels: int) -> None:
    """A size must halve into integers at each of the (levels - 1) downsamplings: 28 -> 14 -> 7 is fine."""
    factor = 2 ** (levels - 1)
    if size % factor:
        chain, s = [str(size)], float(size)
        for _ in range(levels - 1):
            s /= 2
            chain.append(f"{s:g}")
        raise ConfigError(f"size {size} cannot be halved {levels - 1} times into integers "
                          f"({' -> '.join(chain)}); use a multiple of {factor} or fewer levels (len(channel_mult))")


class _Layer(nn.Module):
    """One U-Net layer: a residual block, then self- and cross-attention where configured."""

    def __init__(self, res: ResBlock, attn: Optional[SelfAttention], xattn: Optional[CrossAttention]):
        super().__init__()
        self.res, self.attn, self.xattn = res, attn, xattn

    def forward(self, h: Tensor, e: Tensor, context: Optional[Tensor]) -> Tensor:
        h = self.res(h, e)
        if self.attn is not None:
            h = self.attn(h)
        if self.xattn is not None:
            h = self.xattn(h, context)
        return h


class UNet(nn.Module):
    """U-Net backbone conditioned on c_noise (and optionally a label, a context sequence or an
    image to concatenate); see the module docstring for shapes. The output starts at exactly 0."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if not isinstance(cfg, UNetConfig):
            raise ConfigError(f"UNet expects a UNetConfig, got {type(cfg).__name__}")
        cfg.check_sizes()
        self.cfg = cfg
        mc, g = cfg.model_channels, cfg.norm_groups
        emb_dim = cfg.emb_mult * mc
        self.noise_embed = make_noise_embedding(cfg.noise_embedding, mc)
        self.noise_mlp = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes > 0 else None
        # scalar conditions are embedded like the noise level, vector ones by a linear map; all add to the sum
        self.cond_embed = nn.ModuleDict({
            key: (nn.Sequential(make_noise_embedding(cfg.noise_embedding, mc), nn.Linear(mc, emb_dim))
                  if kind == "scalar" else nn.Linear(n, emb_dim))
            for key, kind, n in cfg.embed_conds}) if cfg.embed_conds else None

        def positions(width: int, heads: int, level: int):
            """None, or the attn_pos encoding of the level's (H / 2^l, W / 2^l) grid (the U-Net's grids halve)."""
            grid = tuple(side >> level for side in cfg.hw)
            if cfg.attn_pos == "rope":
                return AxialRoPE(grid, width // heads)
            if cfg.attn_pos == "relbias":
                return RelativePositionBias(grid, heads)
            return None

        def layer(c_in: int, c_out: int, size: int) -> _Layer:
            res = ResBlock(c_in, c_out, emb_dim, groups=g, dropout=cfg.dropout,
                           scale_shift_norm=cfg.scale_shift_norm)
            attn = xattn = None
            if size in cfg.attn_resolutions:
                heads = num_heads_for(c_out, cfg.num_heads, cfg.head_channels)
                attn = SelfAttention(c_out, heads, g, pos=positions(c_out, heads, sizes.index(size)))
                if cfg.context_dim > 0:
                    xattn = CrossAttention(c_out, cfg.context_dim, heads, g)
            return _Layer(res, attn, xattn)

        self.conv_in = conv_nd(2, cfg.in_channels + cfg.concat_channels, mc, 3)
        widths = [mc * m for m in cfg.channel_mult]
        sizes = cfg.resolutions
        skip_widths = [mc]                               # widths of the tensors kept for the skips
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        ch = mc
        for level, (w, size) in enumerate(zip(widths, sizes)):
            layers = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                layers.append(layer(ch, w, size))
                ch = w
                skip_widths.append(ch)
            self.down.append(layers)
            if level < len(widths) - 1:
                self.downsample.append(Downsample(ch, with_conv=cfg.resample_with_conv))
                skip_widths.append(ch)

        heads = num_heads_for(ch, cfg.num_heads, cfg.head_channels)
        self.mid = _Layer(ResBlock(ch, ch, emb_dim, groups=g, dropout=cfg.dropout,
                                   scale_shift_norm=cfg.scale_shift_norm),
                          SelfAttention(ch, heads, g, pos=positions(ch, heads, len(widths) - 1))
                          if cfg.mid_attention else None,
                          CrossAttention(ch, cfg.context_dim, heads, g) if cfg.context_dim > 0 else None)
        self.mid2 = ResBlock(ch, ch, emb_dim, groups=g, dropout=cfg.dropout, scale_shift_norm=cfg.scale_shift_norm)

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(widths))):
            layers = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                skip = skip_widths.pop()
                check_groups(ch + skip, g)
                layers.append(layer(ch + skip, widths[level], sizes[level]))
                ch = widths[level]
            self.up.append(layers)
            if level > 0:
                self.upsample.append(Upsample(ch, with_conv=cfg.resample_with_conv))
        assert not skip_widths

        self.norm_out = nn.GroupNorm(g, ch)
        self.conv_out = conv_nd(2, ch, cfg.out_channels, 3)
        nn.init.zeros_(self.conv_out.weight)   # output starts at 0 (Dhariwal & Nichol 2021)
        nn.init.zeros_(self.conv_out.bias)
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    # ---------------------------------------------------------------- forward
    def embed(self, c_noise: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """SiLU of the conditioning embedding: noise level (+ class label, + scalar/vector conditions), (B, emb_dim)."""
        emb = self.noise_mlp(self.noise_embed(c_noise))
        if self.label_embed is not None:
            emb = emb + self.label_embed(cond["label"])
        if self.cond_embed is not None:
            for key, net in self.cond_embed.items():
                emb = emb + net(cond[key].to(emb.dtype))
        return F.silu(emb)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Optional[Mapping[str, Tensor]] = None) -> Tensor:
        """x (B, in_channels, H, W), c_noise (B,) float, cond see module docstring -> (B, out_channels, H, W)."""
        cond = {} if cond is None else cond
        self._check_inputs(x, c_noise, cond)
        e = self.embed(c_noise, cond)
        context = cond.get("context") if self.cfg.context_dim > 0 else None
        if self.cfg.concat_channels > 0:
            x = torch.cat([x, cond["concat"].to(x.dtype)], dim=1)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        h = self.conv_in(x)
        hs = [h]
        for level, layers in enumerate(self.down):
            for lay in layers:
                h = lay(h, e, context)
                hs.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                hs.append(h)
        h = self.mid2(self.mid(h, e, context), e)
        for level, layers in enumerate(self.up):
            for lay in layers:
                h = lay(torch.cat([h, hs.pop()], dim=1), e, context)
            if level < len(self.upsample):
                h = self.upsample[level](h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out.contiguous()

    def _check_inputs(self, x: Tensor, c_noise: Tensor, cond: Mapping[str, Tensor]) -> None:
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise TorchDiffusionError(f"UNet input x must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        b = x.shape[0]
        for size in x.shape[2:]:
            check_spatial_size(size, len(cfg.channel_mult))
        if c_noise.shape != (b,):
            raise TorchDiffusionError(f"c_noise must have shape (B,) = ({b},), got {tuple(c_noise.shape)}")
        embedded = {key: (kind, n) for key, kind, n in cfg.embed_conds}
        known = {"label", "context", "concat", *embedded}
        unknown = set(cond) - known
        if unknown:
            raise TorchDiffusionError(f"unknown cond keys {sorted(unknown)}; valid keys are "
                                      f"{', '.join(repr(k) for k in sorted(known))}")
        for key, (kind, n) in embedded.items():
            c = cond.get(key)
            want = (b,) if kind == "scalar" else (b, n)
            if c is None or tuple(c.shape) != want or not c.is_floating_point():
                got = "nothing" if c is None else f"{tuple(c.shape)} {c.dtype}"
                raise TorchDiffusionError(f"cond[{key!r}] must be {want} float, got {got}")
        for key, field in (("label", "num_classes"), ("context", "context_dim"), ("concat", "concat_channels")):
            if key in cond and getattr(cfg, field) == 0:
                raise TorchDiffusionError(f"cond[{key!r}] was given but this UNet has {field}=0; "
                                          f"set {field} > 0 to use it, or leave the key out")
        if cfg.num_classes > 0:
            y = cond.get("label")
            if y is None or y.shape != (b,) or y.dtype not in (torch.int32, torch.int64):
                got = "nothing" if y is None else f"{tuple(y.shape)} {y.dtype}"
                raise TorchDiffusionError(f"num_classes={cfg.num_classes}: cond['label'] must be ({b},) int64 in "
                                          f"[0, {cfg.num_classes}] ({cfg.num_classes} = null label), got {got}")
            if b and (int(y.min()) < 0 or int(y.max()) > cfg.num_classes):
                raise TorchDiffusionError(f"cond['label'] values must be in [0, {cfg.num_classes}] "
                                          f"({cfg.num_classes} = null label), got [{int(y.min())}, {int(y.max())}]")
        if cfg.context_dim > 0:
            c = cond.get("context")
            if c is None or c.ndim != 3 or c.shape[0] != b or c.shape[2] != cfg.context_dim:
                got = "nothing" if c is None else str(tuple(c.shape))
                raise TorchDiffusionError(f"context_dim={cfg.context_dim}: cond['context'] must be "
                                          f"({b}, M, {cfg.context_dim}), got {got}")
        if cfg.concat_channels > 0:
            c = cond.get("concat")
            want = (b, cfg.concat_channels, *x.shape[2:])
            if c is None or tuple(c.shape) != want:
                got = "nothing" if c is None else str(tuple(c.shape))
                raise TorchDiffusionError(f"concat_channels={cfg.concat_channels}: cond['concat'] must be {want}, got {got}")

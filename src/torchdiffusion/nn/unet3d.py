"""The factorised space-time U-Net (Ho et al. 2022, "Video diffusion models", sec. 3): forward(x, c_noise, cond).

Notation: x (B, C, T, H, W) a clip of T frames; c_noise (B,); cond the image U-Net's keys (nn.unet: "label",
scalar/vector conditions, "context", "concat" (B, C_c, T, H, W)) plus the frames conditioner's
    "frame_index"  (B, T) float: each frame's real index in its video (default 0..T-1)
    "independent"  (B, T) bool: frames that are independent images (joint video + image training; default none)

Architecture: the image U-Net of nn/unet.py applied to every frame (its 2-D convolutions, spatial attention and
spatial-only down/up-sampling; the frames ride in the batch axis, B*T), with one temporal attention layer after
every layer of the U-Net (each residual block + spatial attention, the middle block included). A temporal layer
attends, at each spatial position separately, over the T frames:

    h <- h + W_o MHA(GN(h)) along T,   logits_ij += b[bucket(f_j - f_i)],

with f the real frame indices and b a learned per-head table over T5's relative-position buckets
(posenc.relative_position_bucket; Ho et al. use relative position embeddings along time). Only index DIFFERENCES
enter, so a strided clip, an extended clip or a clip of any length T is handled by the same weights: the frame
count is free at sampling time. GroupNorm statistics are per frame, so nothing but temporal attention mixes
frames.

Joint training: with "independent", the temporal attention mask is block-diagonal: an independent image
attends only to itself (the diagonal is always allowed, so no row is fully masked) and the video frames only to
each other. An image's output then never depends on the other frames of its row, and a video frame's never on
the images.

State dict: the image U-Net's weights sit under `image.` with its own names, the temporal layers under
`temporal.`; `load_image_weights` loads a trained image U-Net (same config). The temporal output projections
start at zero, so a fresh or image-initialised 3-D net equals the image net applied frame by frame.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Mapping, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from torchdiffusion.errors import ConfigError, TorchDiffusionError
from torchdiffusion.nn.attention import num_heads_for, tokens, untokens
from torchdiffusion.nn.posenc import relative_position_bucket
from torchdiffusion.nn.unet import UNet, UNetConfig, build_unet, check_spatial_size
from torchdiffusion.protocols import BackboneIO

FRAME_KEYS = ("frame_index", "independent")


@dataclass(frozen=True)
class UNet3DConfig(UNetConfig):
    """The image U-Net's settings (nn.unet.UNetConfig; image_size is the frame size H, W) plus the temporal
    layers'. The frame count is not a setting: it is free at run time."""

    temporal_attention: bool = True     # False: the image U-Net per frame (no layer mixes frames)
    temporal_heads: int = 0             # 0: the spatial layers' rule (num_heads / head_channels)
    temporal_buckets: int = 32          # T5 relative-position buckets (Raffel et al. 2020)
    temporal_max_distance: int = 64     # frame distance beyond which buckets saturate
    temporal_resolutions: tuple[int, ...] = ()  # feature-map sizes with temporal layers; () = every level

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "temporal_resolutions", tuple(int(v) for v in self.temporal_resolutions))
        if self.temporal_heads < 0:
            raise ConfigError(f"UNet3DConfig.temporal_heads must be >= 0, got {self.temporal_heads}")
        relative_position_bucket(torch.zeros(1, dtype=torch.int64), self.temporal_buckets, self.temporal_max_distance)

    def image_config(self) -> UNetConfig:
        return UNetConfig(**{f.name: getattr(self, f.name) for f in fields(UNetConfig)})


def build_unet3d(cfg: UNet3DConfig, io: BackboneIO) -> "UNet3D":
    """The backbone-registry builder: io.shape is (C, T, H, W); T is ignored (free at run time)."""
    if len(io.shape) != 4:
        raise ConfigError(f"the unet3d backbone takes clips (C, T, H, W); the model's shape is {tuple(io.shape)} "
                          f"(use a video data set, e.g. data.kind=moving-mnist)")
    image_io = BackboneIO((io.shape[0], *io.shape[2:]), io.out_channels,
                          tuple(s for s in io.conds if s.kind != "frames"))
    image = build_unet(cfg.image_config(), image_io)
    resolved = {f.name: getattr(image.cfg, f.name) for f in fields(UNetConfig)}
    out = replace(cfg, **resolved)
    missing = [r for r in out.temporal_resolutions if r not in out.resolutions]
    if missing:
        raise ConfigError(f"UNet3DConfig.temporal_resolutions {missing} are not feature-map sizes of this U-Net; "
                          f"valid sizes are {out.resolutions}")
    return UNet3D(out, image=image)


def allowed_pairs(independent: Tensor) -> Tensor:
    """(B, T) bool -> (B, T, T) bool: query i may attend to key j iff i == j or neither is an independent image."""
    video = ~independent
    eye = torch.eye(independent.shape[1], dtype=torch.bool, device=independent.device)
    return eye | (video[:, :, None] & video[:, None, :])


class TemporalAttention(nn.Module):
    """h + W_o MHA(GN(h)) over the frames at each spatial position, with a relative-position bias along time
    (module notes); W_o and the bias table start at zero."""

    def __init__(self, channels: int, heads: int, groups: int, buckets: int, max_distance: int, eps: float = 1e-6):
        super().__init__()
        self.heads, self.buckets, self.max_distance = heads, buckets, max_distance
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.rel = nn.Parameter(torch.zeros(buckets, heads))
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def bias(self, frame_index: Tensor, allowed: Optional[Tensor]) -> Tensor:
        """(B, T) frame indices (+ (B, T, T) allowed pairs) -> (B, 1, heads, T, T) float32 logit bias."""
        rel = (frame_index[:, None, :] - frame_index[:, :, None]).round().to(torch.int64)  # key - query
        b = self.rel[relative_position_bucket(rel, self.buckets, self.max_distance)]      # (B, T, T, heads)
        b = b.permute(0, 3, 1, 2)
        if allowed is not None:
            b = b.masked_fill(~allowed[:, None], float("-inf"))
        return b[:, None]

    def forward(self, h: Tensor, frames: int, bias: Tensor) -> Tensor:
        """h (B*T, C, H, W) frames of B clips, bias from `bias` -> (B*T, C, H, W)."""
        bt, c, hh, ww = h.shape
        b, d = bt // frames, c // self.heads
        qkv = self.qkv(tokens(self.norm(h)))                                   # (B*T, HW, 3C)
        qkv = qkv.view(b, frames, hh * ww, 3, self.heads, d).permute(3, 0, 2, 4, 1, 5)  # (3, B, HW, heads, T, d)
        q, k, v = qkv.unbind(0)
        # attention written out: for the short sequences along time this is faster on CPU than SDPA's masked path
        logits = torch.matmul(q, k.transpose(-1, -2)).mul_(d ** -0.5).add_(bias.to(q.dtype))  # (B, HW, heads, T, T)
        o = torch.matmul(logits.softmax(dim=-1), v)                             # (B, HW, heads, T, d)
        o = o.permute(0, 3, 1, 2, 4).reshape(bt, hh * ww, c)
        return h + untokens(self.proj(o), h)


class UNet3D(nn.Module):
    """Space-time U-Net (module notes): x (B, C, T, H, W) -> (B, out_channels, T, H, W); the output starts at 0."""

    def __init__(self, cfg: UNet3DConfig, image: Optional[UNet] = None):
        super().__init__()
        if not isinstance(cfg, UNet3DConfig):
            raise ConfigError(f"UNet3D expects a UNet3DConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.image = image if image is not None else UNet(cfg.image_config())
        self.temporal = nn.ModuleDict()  # by the position of the U-Net layer it follows (forward order)
        if cfg.temporal_attention:
            for i, (w, size) in enumerate(self._layers()):
                if cfg.temporal_resolutions and size not in cfg.temporal_resolutions:
                    continue
                heads = cfg.temporal_heads or num_heads_for(w, cfg.num_heads, cfg.head_channels)
                if w % heads:
                    raise ConfigError(f"UNet3DConfig.temporal_heads={heads} must divide every width; {w} is not "
                                      f"a multiple of it")
                self.temporal[str(i)] = TemporalAttention(w, heads, cfg.norm_groups, cfg.temporal_buckets,
                                                          cfg.temporal_max_distance)
            if cfg.channels_last:
                self.temporal.to(memory_format=torch.channels_last)

    def _layers(self) -> list[tuple[int, int]]:
        """(output width, feature-map size) of every U-Net layer that may get a temporal layer, in forward order."""
        u, sizes = self.image, self.cfg.resolutions
        out = [(lay.res.conv2.out_channels, sizes[level]) for level, layers in enumerate(u.down) for lay in layers]
        out.append((u.mid2.conv2.out_channels, sizes[-1]))
        out += [(lay.res.conv2.out_channels, sizes[len(sizes) - 1 - k]) for k, layers in enumerate(u.up)
                for lay in layers]
        return out

    def load_image_weights(self, state: Mapping[str, Tensor]) -> None:
        """Load a trained image U-Net's state dict (same image config) into the per-frame layers."""
        self.image.load_state_dict(dict(state), strict=True)

    # ---------------------------------------------------------------- forward
    def frame_cond(self, cond: Mapping[str, Tensor], b: int, t: int) -> dict[str, Tensor]:
        """The image U-Net's cond for the B*T frames: per-clip tensors repeated per frame, "concat" unfolded."""
        out = {}
        for key, v in cond.items():
            if key in FRAME_KEYS:
                continue
            if key == "concat":
                if v.ndim != 5 or v.shape[0] != b or v.shape[2] != t:
                    raise TorchDiffusionError(f"cond['concat'] must be (B, C, T, H, W) = ({b}, C, {t}, H, W), "
                                              f"got {tuple(v.shape)}")
                out[key] = v.transpose(1, 2).flatten(0, 1)
            else:
                out[key] = v.repeat_interleave(t, dim=0)
        return out

    def forward(self, x: Tensor, c_noise: Tensor, cond: Optional[Mapping[str, Tensor]] = None) -> Tensor:
        cond = {} if cond is None else cond
        cfg, u = self.cfg, self.image
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise TorchDiffusionError(f"UNet3D input x must be (B, {cfg.in_channels}, T, H, W), got {tuple(x.shape)}")
        b, _, t = x.shape[:3]
        for size in x.shape[3:]:
            check_spatial_size(size, len(cfg.channel_mult))
        if c_noise.shape != (b,):
            raise TorchDiffusionError(f"c_noise must have shape (B,) = ({b},), got {tuple(c_noise.shape)}")
        fi = cond.get("frame_index")
        fi = torch.arange(t, device=x.device, dtype=torch.float32).expand(b, t) if fi is None else fi
        indep = cond.get("independent")
        if tuple(fi.shape) != (b, t) or (indep is not None and tuple(indep.shape) != (b, t)):
            got = tuple(fi.shape) if tuple(fi.shape) != (b, t) else tuple(indep.shape)
            raise TorchDiffusionError(f"cond['frame_index'] / cond['independent'] must be (B, T) = ({b}, {t}), "
                                      f"got {got}")
        allowed = allowed_pairs(indep.to(torch.bool)) if indep is not None and bool(indep.any()) else None
        position = iter(range(len(self._layers())))
        fi32 = fi.to(torch.float32)

        def mix(h: Tensor) -> Tensor:
            layer = self.temporal[key] if (key := str(next(position))) in self.temporal else None
            return h if layer is None else layer(h, t, layer.bias(fi32, allowed))

        fc = self.frame_cond(cond, b, t)
        u._check_inputs(x[:, :, 0], c_noise, {k: v[::t] for k, v in fc.items()})  # the image net's checks, per clip
        e = u.embed(c_noise.repeat_interleave(t), fc)
        context = fc.get("context") if cfg.context_dim > 0 else None
        h = x.transpose(1, 2).flatten(0, 1)                                    # (B*T, C, H, W)
        if cfg.concat_channels > 0:
            h = torch.cat([h, fc["concat"].to(h.dtype)], dim=1)
        if cfg.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        h = u.conv_in(h)
        hs = [h]
        for level, layers in enumerate(u.down):
            for lay in layers:
                h = mix(lay(h, e, context))
                hs.append(h)
            if level < len(u.downsample):
                h = u.downsample[level](h)
                hs.append(h)
        h = mix(u.mid2(u.mid(h, e, context), e))
        for level, layers in enumerate(u.up):
            for lay in layers:
                h = mix(lay(torch.cat([h, hs.pop()], dim=1), e, context))
            if level < len(u.upsample):
                h = u.upsample[level](h)
        out = u.conv_out(F.silu(u.norm_out(h)))                                 # (B*T, C_out, H, W)
        return out.unflatten(0, (b, t)).transpose(1, 2).contiguous()

"""Non-leaking augmentation: augmented training images with their augmentation parameters as a condition.

Karras et al. 2020 (ADA, "Training generative adversarial networks with limited data") augment every image the
discriminator sees; Karras et al. 2022 (EDM, Appendix F.2) carry the idea to diffusion models: the denoiser is
trained on augmented images *and told how each was augmented* (the parameters are a condition). Augmentations
then do not leak into the samples: at sampling the condition is zero (no augmentation), and the model draws
from the clean distribution, while it has learned from many more distinct images than the data hold.

Operations, each applied to a sample with probability p * (its multiplier), in this order:
    xflip       mirror left-right
    translate   integer translation, up to translate_max of the size in each axis (uniform)
    rotate90    rotation by k * 90 degrees, k uniform in {1, 2, 3}
    scale       isotropic scaling by 2^N(0, scale_std)
    aniso       anisotropic scaling: x by 2^N(0, aniso_std), y by its inverse
    rotate      rotation by an angle uniform in [-rotate_max, rotate_max] x 180 degrees
    brightness  x + N(0, brightness_std)
    contrast    x * 2^N(0, contrast_std) (about mid-grey, 0 in model range)
    saturation  colour away from the luma axis by 2^N(0, saturation_std) (a no-op on 1-channel images)
    cutout      a square of side cutout_size set to mid-grey, centre uniform
The geometric part is one affine map per sample, applied with bilinear sampling and reflection padding
(pixel-exact for flips, integer translations and 90-degree rotations of square images).

The augmentation vector of a sample, AUG_DIM floats, all zero when nothing was applied (LAYOUT names them):
    0 xflip (1)  1-2 translation (pixels / size)  3-4 rot90 (cos - 1, sin)  5 log2 scale  6 log2 aniso
    7-8 rotation (cos - 1, sin)  9 brightness  10 log2 contrast  11 log2 saturation  12-14 cutout (1, cx - 1/2,
    cy - 1/2). `apply_augment(x, vector)` applies a vector, so the vector is the whole description.

Determinism (RELIABILITY 1, 2, 7): the parameters of the sample at global batch row g of global step k come
from a generator seeded by seeding.mix_seed(seed, k, g, tag=b"augment"); process r of W holds rows r, r + W, ...
(data.order), so a resumed run, or one on W processes, augments every image exactly as an uninterrupted run on
one process does, whatever the batch split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from torchdiffusion.errors import ConfigError
from torchdiffusion.seeding import mix_seed

__all__ = ["AUG_DIM", "LAYOUT", "OPS", "AugmentConfig", "AugmentPipe", "apply_augment", "augment_params",
           "augment_seed"]

LAYOUT = ("xflip", "translate_x", "translate_y", "rot90_cos", "rot90_sin", "scale", "aniso", "rotate_cos",
          "rotate_sin", "brightness", "contrast", "saturation", "cutout", "cutout_x", "cutout_y")
AUG_DIM = len(LAYOUT)
OPS = ("xflip", "translate", "rotate90", "scale", "aniso", "rotate", "brightness", "contrast", "saturation",
       "cutout")
_DRAWS = 16  # uniform values per sample besides the op decisions (fixed, so parameters never shift)


@dataclass(frozen=True)
class AugmentConfig:
    """p: overall probability; each op's multiplier in [0, 1] (its probability is p * multiplier). Defaults: the
    geometric operations of EDM's CIFAR-10 setting at its p = 0.12, colour and cutout off."""
    p: float = 0.12
    xflip: float = 1.0
    translate: float = 1.0
    rotate90: float = 1.0
    scale: float = 1.0
    aniso: float = 1.0
    rotate: float = 1.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    cutout: float = 0.0
    translate_max: float = 0.125  # ADA
    scale_std: float = 0.2  # ADA
    aniso_std: float = 0.2  # ADA
    rotate_max: float = 1.0  # of 180 degrees: 1 = any angle (ADA)
    brightness_std: float = 0.2  # ADA
    contrast_std: float = 0.5  # ADA
    saturation_std: float = 1.0  # ADA
    cutout_size: float = 0.5  # ADA

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"augment.{f.name} must be a finite number, got {v!r}")
        for name in ("p",) + OPS:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"augment.{name} must be in [0, 1] (a probability"
                                  f"{'' if name == 'p' else ' multiplier'}), got {getattr(self, name)}")
        for name in ("scale_std", "aniso_std", "brightness_std", "contrast_std", "saturation_std"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.translate_max <= 0.5:
            raise ConfigError(f"augment.translate_max must be in [0, 0.5] (of the image size), got {self.translate_max}")
        if not 0.0 <= self.rotate_max <= 1.0:
            raise ConfigError(f"augment.rotate_max must be in [0, 1] (of 180 degrees), got {self.rotate_max}")
        if not 0.0 < self.cutout_size <= 1.0:
            raise ConfigError(f"augment.cutout_size must be in (0, 1], got {self.cutout_size}")


def augment_seed(seed: int, step: int, position: int) -> int:
    """63-bit generator seed of the sample at global batch row `position` of global step `step`."""
    return mix_seed(seed, step, position, tag=b"augment")


def _sample_params(cfg: AugmentConfig, g: torch.Generator, size: tuple[int, int], channels: int) -> list[float]:
    u = torch.rand(len(OPS), generator=g, dtype=torch.float64).tolist()
    v = torch.rand(_DRAWS, generator=g, dtype=torch.float64).tolist()
    z = torch.randn(_DRAWS, generator=g, dtype=torch.float64).tolist()
    on = {op: u[i] < cfg.p * getattr(cfg, op) for i, op in enumerate(OPS)}
    out = [0.0] * AUG_DIM
    h, w = size
    if on["xflip"]:
        out[0] = 1.0
    if on["translate"]:
        tx = round((v[0] * 2 - 1) * cfg.translate_max * w)
        ty = round((v[1] * 2 - 1) * cfg.translate_max * h)
        out[1], out[2] = tx / w, ty / h
    if on["rotate90"]:
        k = 1 + min(int(v[2] * 3), 2)
        out[3], out[4] = float(round(math.cos(k * math.pi / 2))) - 1.0, float(round(math.sin(k * math.pi / 2)))
    if on["scale"]:
        out[5] = z[0] * cfg.scale_std
    if on["aniso"]:
        out[6] = z[1] * cfg.aniso_std
    if on["rotate"]:
        theta = (v[3] * 2 - 1) * math.pi * cfg.rotate_max
        out[7], out[8] = math.cos(theta) - 1.0, math.sin(theta)
    if on["brightness"]:
        out[9] = z[2] * cfg.brightness_std
    if on["contrast"]:
        out[10] = z[3] * cfg.contrast_std
    if on["saturation"] and channels == 3:
        out[11] = z[4] * cfg.saturation_std
    if on["cutout"]:
        out[12], out[13], out[14] = 1.0, v[4] - 0.5, v[5] - 0.5
    return out


def augment_params(cfg: AugmentConfig, seed: int, step: int, positions: Sequence[int], size: tuple[int, int],
                   channels: int) -> Tensor:
    """float32 (len(positions), AUG_DIM): the augmentation vectors of the given global batch rows of `step`."""
    rows = [_sample_params(cfg, torch.Generator().manual_seed(augment_seed(seed, step, int(p))), size, channels)
            for p in positions]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), AUG_DIM)


def _geometry(vec: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, 2, 3) sampling matrices (output -> input, normalised coordinates) of the vectors' geometric part."""
    b = vec.shape[0]
    h, w = size
    v = vec.to(torch.float64)
    eye = torch.eye(3, dtype=torch.float64).expand(b, 3, 3)

    def mat(a, bb, c, d, tx=None, ty=None):
        m = eye.clone()
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = a, bb, c, d
        if tx is not None:
            m[:, 0, 2], m[:, 1, 2] = tx, ty
        return m

    one, zero = torch.ones(b, dtype=torch.float64), torch.zeros(b, dtype=torch.float64)
    flip = 1.0 - 2.0 * v[:, 0]
    ms = [mat(flip, zero, zero, one),
          mat(one, zero, zero, one, -2.0 * v[:, 1], -2.0 * v[:, 2]),  # translate by t: sample at p - t
          ]
    c90, s90 = v[:, 3] + 1.0, v[:, 4]
    ms.append(mat(c90, s90, -s90, c90))  # image rotated by +k*90 degrees: sample at R(-angle) p
    s = torch.exp2(-v[:, 5])
    ms.append(mat(s, zero, zero, s))
    a = torch.exp2(v[:, 6])
    ms.append(mat(1.0 / a, zero, zero, a))
    c, sn = v[:, 7] + 1.0, v[:, 8]
    ms.append(mat(c, sn, -sn, c))
    # rotations in normalised coordinates are rotations of the pixel grid only for square images: conjugate by
    # the aspect ratio so that non-square images rotate as pictures do
    asp = mat(one * (w / max(h, w)), zero, zero, one * (h / max(h, w)))
    asp_inv = mat(one * (max(h, w) / w), zero, zero, one * (max(h, w) / h))
    m = eye.clone()
    for i, mi in enumerate(ms):
        m = m @ (asp_inv @ mi @ asp if i in (2, 5) else mi)
    return m[:, :2, :].to(torch.float32)


def apply_augment(x: Tensor, vec: Tensor, cutout_size: float = 0.5) -> Tensor:
    """x float (B, C, H, W) in model range, vec (B, AUG_DIM) -> the augmented images (a new tensor). Rows whose
    vector is zero come back unchanged (bit-exact)."""
    if x.dim() != 4 or vec.shape != (x.shape[0], AUG_DIM):
        raise ValueError(f"apply_augment needs x (B, C, H, W) and vec (B, {AUG_DIM}), got {tuple(x.shape)} and "
                         f"{tuple(vec.shape)}")
    out = x.clone()
    vec = vec.to(device=x.device, dtype=torch.float32)
    size = tuple(x.shape[2:])
    geo = vec[:, :9].abs().sum(1) > 0
    if geo.any():
        theta = _geometry(vec[geo].cpu(), size).to(x.device, x.dtype)
        grid = F.affine_grid(theta, list(x[geo].shape), align_corners=False)
        out[geo] = F.grid_sample(x[geo], grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    col = vec[:, 9:12].abs().sum(1) > 0
    if col.any():
        y = out[col]
        y = y + vec[col, 9].view(-1, 1, 1, 1)
        y = y * torch.exp2(vec[col, 10]).view(-1, 1, 1, 1)
        if x.shape[1] == 3:
            luma = y.mean(1, keepdim=True)
            y = luma + (y - luma) * torch.exp2(vec[col, 11]).view(-1, 1, 1, 1)
        out[col] = y
    cut = vec[:, 12] > 0
    if cut.any():
        h, w = size
        ys = (torch.arange(h, device=x.device, dtype=torch.float32) + 0.5) / h - 0.5
        xs = (torch.arange(w, device=x.device, dtype=torch.float32) + 0.5) / w - 0.5
        cy, cx = vec[cut, 14].view(-1, 1, 1), vec[cut, 13].view(-1, 1, 1)
        inside = ((ys.view(1, -1, 1) - cy).abs() < cutout_size / 2) & ((xs.view(1, 1, -1) - cx).abs() < cutout_size / 2)
        out[cut] = out[cut] * (~inside).unsqueeze(1).to(x.dtype)
    return out


class AugmentPipe:
    """The training data path's augmentation: pipe(x0, step) -> (augmented x0, vectors (B, AUG_DIM)) for this
    process's rows (global rows rank, rank + W, ...) of global step `step`."""

    def __init__(self, cfg: AugmentConfig, seed: int, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.cfg, self.seed, self.rank, self.world_size = cfg, int(seed), int(rank), int(world_size)

    def positions(self, batch: int) -> list[int]:
        return [self.rank + j * self.world_size for j in range(batch)]

    def params(self, step: int, batch: int, size: tuple[int, int], channels: int) -> Tensor:
        return augment_params(self.cfg, self.seed, step, self.positions(batch), size, channels)

    def __call__(self, x0: Tensor, step: int) -> tuple[Tensor, Tensor]:
        vec = self.params(step, x0.shape[0], tuple(x0.shape[2:]), x0.shape[1])
        if self.cfg.p == 0:
            return x0, vec.to(x0.device)
        return apply_augment(x0, vec, self.cfg.cutout_size), vec.to(x0.device)

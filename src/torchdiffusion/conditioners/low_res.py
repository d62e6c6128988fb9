"""The super-resolution conditioner: the low-resolution image, augmented, up-sampled and concatenated to the input.

Notation (the project's frame, x = x0 + sigma n): x the (B, C, H, W) image in [-1, 1]; x_lr = down(x, f) its
low-resolution version (data.resize: area averaging, at rest as uint8, the same images a base stage trains on);
the augmentation level is a time t in [0, 1] of a variance-preserving cosine process with

    sigma(t) = tan(pi t / 2),  alpha(t) = cos(pi t / 2) = 1 / sqrt(1 + sigma^2),  SNR(t) = 1 / sigma^2,

so t = 0 is the clean image, t = 1/3 is SNR 3, and t = 1 is pure noise. The conditioner fills
    cond["concat"]    (B, C, H, W) = up(alpha(t) (blur_b(x_lr) + sigma(t) n)), n ~ N(0, I) at low resolution
    cond["aug_level"] (B,)         = 1000 t (the level, embedded by the backbone like the noise level)
The noisy low-res image blur(x_lr) + sigma n is exactly the base stage's diffusion variable at sigma(t) in this
frame, whatever the base's process, so *truncated* conditioning augmentation hands the base stage's z_s over
unchanged (`LowResInput(noisy=True)`), and *non-truncated* augmentation re-noises the base's output: both feed the
network the same distribution (Ho et al. 2021, "Cascaded Diffusion Models", sec. 3.2; the amortised training
over random levels is theirs too).

Training (from_batch): a level per row, uniform in t on [0, max_time] or uniform in log-SNR on
[log_snr_min, log_snr_max] (noise: time | log_snr; none trains on clean conditioning), and with probability
blur_prob a Gaussian blur of std uniform in blur_sigma (kernel blur_size; CDM use k = 3, std in [0.4, 0.6]).
The draws of global step k come from one generator seeded by (seed, k) for the whole global batch, process r of
W keeping rows r, r + W, ... (as guidance.dropout), so a resumed run or a run on W processes augments the same
images the same way. Validation (step None) uses the sampling level with a fixed-seed generator.
Sampling (for_sampling): a fixed level (sample_time, or sample_snr: CDM use SNR 3 or 5) and blur (sample_blur,
0 = none); the noise of each seed from its own generator, so a seed's output does not depend on the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..core.augmentation import LowResInput, level_text, parse_level, sigma_of_time, time_of_sigma, time_of_snr
from ..data.convert import to_model_range
from ..data.resize import check_factor, downsample_uint8, gaussian_blur, upsample
from ..errors import ConfigError
from ..seeding import mix_seed
from .base import CondSpec

CONCAT_KEY, LEVEL_KEY = "concat", "aug_level"
LEVEL_SCALE = 1000.0  # cond["aug_level"] = 1000 t: the DDPM step-index range the positional embedding expects


# --------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class LowResConfig:
    factor: int = 2  # x_lr = down(x, factor); the low-res size must divide the target
    noise: str = "time"  # training levels: time (t ~ U[0, max_time]) | log_snr (uniform in log-SNR) | none
    max_time: float = 1.0  # Saharia et al. 2022 (Imagen) sample the level in [0, 1]
    log_snr_min: float = -4.0  # noise: log_snr bounds of lambda = log SNR = -2 log sigma
    log_snr_max: float = 8.0
    blur_prob: float = 0.0  # share of training rows blurred (Ho et al. 2021 blur 50% of the 128 -> 256 inputs)
    blur_sigma: tuple[float, float] = (0.4, 0.6)  # Ho et al. 2021: std uniform in [0.4, 0.6] (low-res pixels)
    blur_size: int = 3  # Ho et al. 2021: k = 3
    sample_time: float = 0.0  # inference level as a time in [0, 1] (0: clean conditioning) ...
    sample_snr: Optional[float] = None  # ... or as an SNR (Ho et al. 2021 use 3 or 5); overrides sample_time
    sample_blur: float = 0.0  # fixed blur std at inference (0: none)
    source: str = "x"  # the batch key of the full-resolution images (uint8)
    channels: int = 0  # set from the data when training starts
    image_size: tuple[int, ...] = ()  # (H, W) of the target, set from the data when training starts

    def __post_init__(self):
        object.__setattr__(self, "blur_sigma", tuple(float(v) for v in self.blur_sigma))
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        check_factor(self.factor, where="cond low_res: factor")
        if self.noise not in ("time", "log_snr", "none"):
            raise ConfigError(f"cond low_res: noise {self.noise!r} is not valid; valid: time, log_snr, none")
        if not 0.0 <= self.max_time <= 1.0:
            raise ConfigError(f"cond low_res: max_time must be in [0, 1], got {self.max_time}")
        if not self.log_snr_min < self.log_snr_max:
            raise ConfigError(f"cond low_res: need log_snr_min < log_snr_max, got {self.log_snr_min}, "
                              f"{self.log_snr_max}")
        if not 0.0 <= self.blur_prob <= 1.0:
            raise ConfigError(f"cond low_res: blur_prob must be in [0, 1], got {self.blur_prob}")
        lo_hi = self.blur_sigma
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1]:
            raise ConfigError(f"cond low_res: blur_sigma must be [lo, hi] with 0 <= lo <= hi, got {list(lo_hi)}")
        if self.blur_size < 1 or self.blur_size % 2 == 0:
            raise ConfigError(f"cond low_res: blur_size must be odd and >= 1, got {self.blur_size}")
        if not 0.0 <= self.sample_time <= 1.0:
            raise ConfigError(f"cond low_res: sample_time must be in [0, 1], got {self.sample_time}")
        if self.sample_snr is not None:
            time_of_snr(self.sample_snr)
        if self.sample_blur < 0:
            raise ConfigError(f"cond low_res: sample_blur must be >= 0, got {self.sample_blur}")

    @property
    def sample_level(self) -> float:
        return time_of_snr(self.sample_snr) if self.sample_snr is not None else self.sample_time

    def for_data(self, channels: int, size: Sequence[int], where: str = "cond low_res") -> "LowResConfig":
        """The config with channels and image_size from the data (checked: the factor must divide the size)."""
        from dataclasses import replace
        check_factor(self.factor, tuple(size), where=f"{where}: factor")
        return replace(self, channels=int(channels), image_size=tuple(int(s) for s in size))


def _level_noise_seed(seed: int, stream: int) -> int:
    return mix_seed(int(seed), int(stream), tag=b"low-res-aug-sample")


class LowResConditioner:
    def __init__(self, name: str, cfg: LowResConfig, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        if cfg.channels < 1 or not cfg.image_size:
            raise ConfigError(f"cond.{name}: channels and image_size are set from the data when training starts "
                              f"(this config has not seen data)")
        self.name, self.cfg, self.factor = name, cfg, cfg.factor
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.low_size = tuple(s // cfg.factor for s in cfg.image_size)

    @property
    def specs(self) -> tuple[CondSpec, ...]:
        return (CondSpec(CONCAT_KEY, "concat", self.cfg.channels), CondSpec(LEVEL_KEY, "scalar", 1))

    # ----------------------------------------------------------------------------------------- the augmentation
    def augment(self, x_lr: Tensor, t: Tensor, blur: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """x_lr (B, C, h, w) in [-1, 1], t (B,) levels, blur (B,) stds (0: none), noise (B, C, h, w) ->
        the cond entries. t == 0 and blur == 0 give up(x_lr) exactly."""
        x = x_lr.to(torch.float32)
        if bool((blur > 0).any()):
            blurred = gaussian_blur(x, blur.to(torch.float32), self.cfg.blur_size)
            x = torch.where((blur > 0).view(-1, 1, 1, 1).to(x.device), blurred, x)
        return self._assemble(x, t, noise)

    def _assemble(self, x: Tensor, t: Tensor, noise: Optional[Tensor], noisy: bool = False) -> dict[str, Tensor]:
        """alpha(t) (x + sigma(t) noise), or alpha(t) x when x is already noisy; up-sampled to the target."""
        t = t.to(torch.float64)
        angle = (0.5 * math.pi) * t.clamp(0, 1)
        alpha = torch.cos(angle).to(torch.float32).view(-1, 1, 1, 1)
        if noisy:
            z = alpha * x
        else:
            s_vp = torch.sin(angle).to(torch.float32).view(-1, 1, 1, 1)
            z = torch.where(t.view(-1, 1, 1, 1) > 0, alpha * x + s_vp * noise, x)  # t = 0: the clean image
        return {CONCAT_KEY: upsample(z, self.factor), LEVEL_KEY: (LEVEL_SCALE * t).to(torch.float32)}

    def _draw(self, g: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
        """n training levels t and blur stds from generator g (float64)."""
        c = self.cfg
        u = torch.rand(n, generator=g, dtype=torch.float64)
        if c.noise == "time":
            t = c.max_time * u
        elif c.noise == "log_snr":
            lam = c.log_snr_min + (c.log_snr_max - c.log_snr_min) * u
            t = time_of_sigma(torch.exp(-0.5 * lam))
        else:
            t = torch.zeros(n, dtype=torch.float64)
        use = torch.rand(n, generator=g, dtype=torch.float64) < c.blur_prob
        width = c.blur_sigma[0] + (c.blur_sigma[1] - c.blur_sigma[0]) * torch.rand(n, generator=g, dtype=torch.float64)
        return t, torch.where(use, width, torch.zeros_like(width))

    def low_res_of(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The batch's low-resolution images in [-1, 1]: exactly the base stage's training images."""
        if self.cfg.source not in batch:
            raise ConfigError(f"cond.{self.name}: the batch has no {self.cfg.source!r} images")
        x = batch[self.cfg.source]
        if x.dtype != torch.uint8:
            raise ConfigError(f"cond.{self.name}: batch[{self.cfg.source!r}] must be uint8 images, got {x.dtype}")
        return to_model_range(downsample_uint8(x, self.factor))

    def from_batch(self, batch: Mapping[str, Tensor], step: Optional[int]) -> dict[str, Tensor]:
        x_lr = self.low_res_of(batch)
        b = x_lr.shape[0]
        if step is None:  # validation: the sampling level and blur, fixed-seed noise
            g = torch.Generator().manual_seed(mix_seed(self.seed, tag=b"low-res-aug-val"))
            t = torch.full((b,), self.cfg.sample_level, dtype=torch.float64)
            blur = torch.full((b,), self.cfg.sample_blur, dtype=torch.float64)
            noise = torch.randn(x_lr.shape, generator=g)
            return self.augment(x_lr, t, blur, noise)
        g = torch.Generator().manual_seed(mix_seed(self.seed, step, tag=b"low-res-aug"))
        w, r = self.world_size, self.rank
        t, blur = self._draw(g, b * w)
        noise = torch.randn((b * w, *x_lr.shape[1:]), generator=g)
        return self.augment(x_lr, t[r::w], blur[r::w], noise[r::w])

    # ----------------------------------------------------------------------------------------- sampling
    def for_sampling(self, seeds: Sequence[int], values: Any = None) -> dict[str, Tensor]:
        if values is None:
            raise ConfigError(f"cond.{self.name}: this is a super-resolution model; it needs a low-resolution input "
                              f"(sample it inside `torchdiffusion cascade sample` after a base stage, or give the "
                              f"low-resolution images)")
        inp = values if isinstance(values, LowResInput) else LowResInput(torch.as_tensor(values))
        image = inp.image
        if image.dtype == torch.uint8:
            image = to_model_range(image)
        c, want = self.cfg.channels, (len(seeds), self.cfg.channels, *self.low_size)
        if image.dim() != 4 or tuple(image.shape[1:]) != want[1:]:
            got = "x".join(map(str, image.shape[-2:])) + f" with {image.shape[1] if image.dim() == 4 else '?'} " \
                                                           f"channel(s)"
            raise ConfigError(f"cond.{self.name}: low-resolution input is {got}, but this stage takes "
                              f"{'x'.join(map(str, self.low_size))} with {c} channel(s) (the target "
                              f"{'x'.join(map(str, self.cfg.image_size))} / factor {self.factor})")
        if image.shape[0] != len(seeds):
            raise ConfigError(f"cond.{self.name}: {image.shape[0]} low-resolution images for {len(seeds)} seeds")
        t = self.cfg.sample_level if inp.time is None else inp.time
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(len(seeds)).clone()
        if bool(((t < 0) | (t > 1)).any()):
            raise ConfigError(f"cond.{self.name}: augmentation times must be in [0, 1]")
        blur = self.cfg.sample_blur if inp.blur is None else float(inp.blur)
        if inp.noisy:
            if blur > 0:
                raise ConfigError(f"cond.{self.name}: a truncated hand-off (already noisy) cannot be blurred; "
                                  f"use blur 0 or the non-truncated hand-off")
            return self._assemble(image.to(torch.float32).cpu(), t, None, noisy=True)
        noise = torch.cat([torch.randn((1, *image.shape[1:]),
                                       generator=torch.Generator().manual_seed(_level_noise_seed(s, inp.stream)))
                           for s in seeds]) if len(seeds) else torch.empty_like(image)
        return self.augment(image.cpu(), t, torch.full((len(seeds),), blur, dtype=torch.float64), noise)

    def null(self, cond: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """No low-resolution information: zeros at the pure-noise level t = 1."""
        return {CONCAT_KEY: torch.zeros_like(cond[CONCAT_KEY]),
                LEVEL_KEY: torch.full_like(cond[LEVEL_KEY], LEVEL_SCALE)}


__all__ = ["LowResConfig", "LowResConditioner", "LowResInput", "parse_level", "level_text", "sigma_of_time",
           "time_of_sigma", "time_of_snr", "CONCAT_KEY", "LEVEL_KEY"]

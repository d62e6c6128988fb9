"""The augmentation process of cascaded diffusion's conditioning augmentation, and what an SR stage takes.

Notation (the project's frame, x = x0 + sigma n): the augmentation level is a time t in [0, 1] of a
variance-preserving cosine process with

    sigma(t) = tan(pi t / 2),  alpha(t) = cos(pi t / 2) = 1 / sqrt(1 + sigma^2),  SNR(t) = 1 / sigma^2,

so t = 0 is the clean image, t = 1/3 is SNR 3 and t = 1 pure noise. Users write a level as t=0.3, snr=3,
sigma=0.5 or none (`parse_level`). Used by conditioners.low_res (the augmentation) and pipelines.cascade (the
hand-offs between stages); no I/O, no network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from ..errors import ConfigError


def sigma_of_time(t) -> Tensor:
    """sigma(t) = tan(pi t / 2), float64; t = 1 gives inf."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.where(t >= 1, torch.full_like(t, math.inf), torch.tan(0.5 * math.pi * t.clamp(0, 1)))


def time_of_sigma(sigma) -> Tensor:
    """The inverse: t = (2 / pi) atan(sigma)."""
    return torch.atan(torch.as_tensor(sigma, dtype=torch.float64)) * (2 / math.pi)


def time_of_snr(snr: float) -> float:
    """SNR = 1 / sigma^2 -> t (SNR 3 -> 1/3, SNR 5 -> 0.268; inf -> 0)."""
    if not snr > 0:
        raise ConfigError(f"the augmentation SNR must be > 0, got {snr}")
    return 0.0 if math.isinf(snr) else float(time_of_sigma(1.0 / math.sqrt(snr)))


def parse_level(text: Union[str, float, int]) -> float:
    """An augmentation level as written by users -> t in [0, 1]: 't=0.3' (or a bare number) is the time,
    'snr=3' an SNR, 'sigma=0.5' the frame's noise level, 'none' (or 0) clean conditioning."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = f"t={text}"
    s = str(text).strip().lower()
    if s in ("none", "clean", "0", "t=0"):
        return 0.0
    kind, _, value = s.partition("=") if "=" in s else ("t", "", s)
    try:
        v = float(value)
    except ValueError:
        raise ConfigError(f"augmentation level {text!r} is not valid; use t=0.3 (time in [0, 1]), snr=3, "
                          f"sigma=0.5 or none") from None
    if kind in ("t", "time"):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"augmentation time must be in [0, 1], got {v:g}")
        return v
    if kind == "snr":
        return time_of_snr(v)
    if kind == "sigma":
        if not v >= 0:
            raise ConfigError(f"augmentation sigma must be >= 0, got {v:g}")
        return float(time_of_sigma(v))
    raise ConfigError(f"augmentation level {text!r}: unknown kind {kind!r}; use t=, snr= or sigma=")


def level_text(t: float) -> str:
    """t -> 't=0.333 (SNR 3)' for tables."""
    if t <= 0:
        return "t=0 (clean)"
    s = float(sigma_of_time(t))
    return f"t={t:.3g} (SNR {1 / s ** 2:.3g})" if math.isfinite(s) else f"t={t:.3g} (pure noise)"


@dataclass
class LowResInput:
    """What an SR stage is conditioned on at sampling time.

    image: (N, C, h, w) low-resolution images, float in [-1, 1] or uint8; with noisy=True it is already the noisy
    z = x_lr + sigma(time) n of a truncated base stage (nothing is added). time: the level (float or (N,)),
    None: the config's sample level. blur: a fixed blur std (None: the config's sample_blur). stream: an integer
    that separates the noise of several SR stages of one cascade."""

    image: Tensor
    time: Union[None, float, Tensor] = None
    blur: Optional[float] = None
    noisy: bool = False
    stream: int = 0


__all__ = ["sigma_of_time", "time_of_sigma", "time_of_snr", "parse_level", "level_text", "LowResInput"]

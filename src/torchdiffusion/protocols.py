"""The one contract every sampler, guidance wrapper and solver relies on.

Notation: x = x0 + sigma * n with n ~ N(0, I); x has shape (B, ...) (images (B, C, H, W),
video (B, C, T, H, W), vectors (B, D)); sigma has shape (B,).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Optional, Protocol, Union

import torch
from torch import Tensor

#: Conditioning: None (unconditional) or a mapping of named tensors, e.g. {"label": (B,) int64}.
Cond = Optional[Mapping[str, Tensor]]

#: A generator, or one generator per batch row (so a seed's sample does not depend on the batch).
Generators = Union[None, torch.Generator, "list[torch.Generator]"]


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        """x: (B, ...) noisy input; sigma: (B,) noise level; returns the (B, ...) estimate of E[x0 | x]."""
        ...


#: Called by samplers once per step: callback({"i": step, "x": x, "sigma": sigma, "denoised": x0_hat}).
Callback = Optional[Callable[[Mapping[str, Any]], None]]


#: The kinds of condition a backbone embeds (conditioners/base.py describes each).
COND_KINDS = ("class", "scalar", "vector", "concat", "context", "frames")


@dataclass(frozen=True)
class CondSpec:
    """What a backbone must embed for one cond key: kind (one of COND_KINDS) and size (number of classes, vector
    width, concatenated channels or context width; 1 for a scalar)."""

    key: str
    kind: Literal["class", "scalar", "vector", "concat", "context", "frames"]
    size: int = 1

    def __post_init__(self):
        from .errors import ConfigError
        if self.kind not in COND_KINDS:
            raise ConfigError(f"condition {self.key!r}: kind {self.kind!r} is not valid; valid: {', '.join(COND_KINDS)}")
        if self.size < 1:
            raise ConfigError(f"condition {self.key!r}: size must be >= 1, got {self.size}")


@dataclass(frozen=True)
class BackboneIO:
    """What a backbone is built for: the diffusion-space input shape (C, *S) (from the data and the codec), the
    output channels (C, or 2C with learned variance) and the declared conditions."""

    shape: tuple[int, ...]
    out_channels: int
    conds: tuple[CondSpec, ...] = ()

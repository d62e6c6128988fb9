"""The one contract every sampler, guidance wrapper and solver relies on.

Notation: x = x0 + sigma * n with n ~ N(0, I); x has shape (B, ...) (images (B, C, H, W),
video (B, C, T, H, W), vectors (B, D)); sigma has shape (B,).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol, Union

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

"""Standard normal noise whose rows do not depend on the batch they are drawn in.

A sample is reproducible from its seed alone when row b of every draw comes from its own generator:
pass a list of B generators (one per batch row, e.g. torch.Generator().manual_seed(seed_b)). Noise is
drawn on each generator's device and then moved to the target device, so CPU generators give the same
numbers whatever device the sampler runs on.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from torchdiffusion.errors import ConfigError
from torchdiffusion.protocols import Generators


class NoiseError(ConfigError, ValueError):
    """A generator argument is invalid (also a ValueError)."""


def check_generators(generator: Generators, batch: int) -> None:
    """Raise NoiseError unless generator is None, a torch.Generator, or a list of `batch` generators."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise NoiseError(f"got {len(generator)} generators for a batch of {batch}; pass one per batch row "
                             f"(or a single torch.Generator, or None)")
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise NoiseError("every entry of the generator list must be a torch.Generator")
        return
    raise NoiseError(f"generator must be None, a torch.Generator or a list of them, got {type(generator).__name__}")


def randn(shape: Sequence[int], generator: Generators = None, *, dtype: torch.dtype = torch.float32,
          device: Optional[torch.device] = None) -> Tensor:
    """Standard normal tensor of `shape` = (B, ...); with a list of B generators, row b comes from generator[b]."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1:
        raise NoiseError("noise needs a batch dimension: shape (B, ...)")
    check_generators(generator, shape[0])
    if generator is None:
        return torch.randn(shape, dtype=dtype, device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device).to(device)
    if shape[0] == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    rows = [torch.randn((1, *shape[1:]), generator=g, dtype=dtype, device=g.device).to(device) for g in generator]
    return torch.cat(rows, dim=0)  # (B, ...)


def randn_like(x: Tensor, generator: Generators = None) -> Tensor:
    """Standard normal tensor shaped like x (B, ...), in x's dtype and on x's device; see `randn`."""
    return randn(x.shape, generator, dtype=x.dtype, device=x.device)

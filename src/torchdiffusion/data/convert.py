"""Pixel conversions between storage (uint8) and the model's range.

Notation: x_u8 in {0, ..., 255} is how images rest in memory and on disk; x in [-1, 1] is what a
denoiser sees (the EDM convention, Karras et al. 2022, x = x_u8 / 127.5 - 1). Both have shape
(..., C, H, W); every function here is pure and returns a new tensor.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["to_model_range", "to_uint8", "pad_to"]


def to_model_range(x_u8: Tensor) -> Tensor:
    """uint8 (..., C, H, W) in 0..255 -> float32 in [-1, 1]: x_u8 / 127.5 - 1 (0 -> -1, 255 -> 1)."""
    if x_u8.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects a uint8 tensor, got {x_u8.dtype}; "
                        "float images are already in model range, use them as they are")
    return x_u8.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """float (..., C, H, W), nominally in [-1, 1] -> uint8: round((x + 1) * 127.5), clamped to 0..255.

    Inverse of `to_model_range`: to_uint8(to_model_range(x_u8)) == x_u8 exactly, because the
    float32 error of the round trip is far below the 0.5 rounding margin. Out-of-range values
    (a sampler's overshoot) are clamped; NaN becomes 0.
    """
    if not x.is_floating_point():
        raise TypeError(f"to_uint8 expects a floating-point tensor in [-1, 1], got {x.dtype}")
    y = ((x.to(torch.float32) + 1.0) * 127.5).round()
    y = torch.nan_to_num(y, nan=0.0).clamp(0.0, 255.0)
    return y.to(torch.uint8)


def pad_to(x: Tensor, size: int, value: int = 0) -> Tensor:
    """Pad (..., H, W) with `value` (the background; 0 for MNIST) to (..., size, size), centred.

    The extra rows go (size - H) // 2 on top and the rest below (same for columns), so 28 -> 32
    adds two on every side. Used to give U-Nets that halve the size several times a power of two.
    """
    h, w = x.shape[-2], x.shape[-1]
    if size < h or size < w:
        raise ValueError(f"pad_to: cannot pad {h}x{w} down to {size}x{size}; size must be >= {max(h, w)}")
    top, left = (size - h) // 2, (size - w) // 2
    pad = (left, size - w - left, top, size - h - top)  # torch order: last dim first
    return torch.nn.functional.pad(x, pad, mode="constant", value=value)

"""The one down-sampler of cascaded diffusion, its up-sampler, and the blur of blur augmentation.

Notation: x (..., C, H, W) an image in model range [-1, 1] (float) or at rest (uint8); f an integer factor;
y = down(x, f) has shape (..., C, H / f, W / f). Every function is pure and returns a new tensor.

- `downsample(x, f)`: area (box) averaging over non-overlapping f x f blocks, the anti-aliasing filter of
  integrating each low-resolution pixel over its footprint (OpenCV's INTER_AREA; the operator
  inverse.operators.AvgPoolDown measures with). It is linear and commutes with the affine uint8 <-> [-1, 1] map.
- `upsample(y, f)`: nearest-neighbour replication, so down(up(y)) == y exactly (up is A^+ of the box average).
- `downsample_uint8(x_u8, f)`: the low-resolution images at rest: to_uint8(down(to_model_range(x_u8))). A base
  stage trains on these (data.downsample) and a super-resolution stage conditions on exactly the same images
  (conditioners.low_res), so the two stages of a cascade never see different down-samplers.
- `gaussian_blur(x, sigma, size)`: a separable normalised Gaussian of std sigma (pixels, one per batch row) and
  odd kernel size, with replicate padding (zero padding would pull the border toward the value 0, mid-gray).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .convert import to_model_range, to_uint8


def check_factor(factor, size: tuple[int, ...] | None = None, where: str = "down-sampling factor") -> int:
    """The factor as an int >= 1, or a one-line ConfigError; with `size` (H, W), also that f divides both."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ConfigError(f"{where} must be an integer >= 1, got {factor!r}")
    if size is not None and any(int(s) % factor for s in size):
        hw = "x".join(str(int(s)) for s in size)
        raise ConfigError(f"{where} {factor} does not divide the image size {hw}; the low-resolution size must "
                          f"divide the target (use a factor that divides both sides)")
    return factor


def _flat(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    return x.reshape(-1, 1, x.shape[-2], x.shape[-1]), tuple(x.shape[:-2])


def downsample(x: Tensor, factor: int) -> Tensor:
    """float (..., H, W) -> (..., H / f, W / f): the mean of each f x f block (area averaging)."""
    f = check_factor(factor, tuple(x.shape[-2:]))
    if not x.is_floating_point():
        raise TypeError(f"downsample takes float images in model range; got {x.dtype} (use downsample_uint8)")
    if f == 1:
        return x.clone()
    z, lead = _flat(x)
    y = F.avg_pool2d(z, f)
    return y.reshape(*lead, *y.shape[-2:])


def upsample(y: Tensor, factor: int) -> Tensor:
    """float (..., h, w) -> (..., h f, w f): nearest-neighbour replication (down(up(y)) == y)."""
    f = check_factor(factor)
    if f == 1:
        return y.clone()
    z, lead = _flat(y)
    x = F.interpolate(z, scale_factor=f, mode="nearest")
    return x.reshape(*lead, *x.shape[-2:])


def downsample_uint8(x_u8: Tensor, factor: int) -> Tensor:
    """uint8 (..., H, W) -> uint8 (..., H / f, W / f): the low-resolution images at rest (see the module note)."""
    return to_uint8(downsample(to_model_range(x_u8), factor))


def gaussian_kernel(sigma: Tensor, size: int) -> Tensor:
    """(B,) stds in pixels -> (B, size) normalised 1-d Gaussian kernels; sigma 0 gives the identity kernel."""
    if size < 1 or size % 2 == 0:
        raise ConfigError(f"the blur kernel size must be odd and >= 1, got {size}")
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    s = sigma.to(torch.float64).reshape(-1, 1)
    logits = -0.5 * (t[None] / s.clamp_min(1e-12)) ** 2
    k = torch.softmax(logits, dim=1)  # normalised; a tiny sigma puts all weight on the centre tap
    return torch.where(s > 0, k, (t[None] == 0).to(torch.float64))


def gaussian_blur(x: Tensor, sigma: Tensor, size: int = 3) -> Tensor:
    """float (B, C, H, W) blurred row by row with Gaussian std sigma[b] (pixels): separable, replicate padding."""
    b, c, h, w = x.shape
    k = gaussian_kernel(torch.as_tensor(sigma).reshape(-1).expand(b), size).to(x.dtype).to(x.device)  # (B, K)
    p = size // 2
    z = x.reshape(1, b * c, h, w)
    weight = k.repeat_interleave(c, dim=0)  # (B C, K): one kernel per channel of each row
    z = F.conv2d(F.pad(z, (p, p, 0, 0), mode="replicate"), weight.view(b * c, 1, 1, size), groups=b * c)
    z = F.conv2d(F.pad(z, (0, 0, p, p), mode="replicate"), weight.view(b * c, 1, size, 1), groups=b * c)
    return z.reshape(b, c, h, w)


__all__ = ["check_factor", "downsample", "upsample", "downsample_uint8", "gaussian_kernel", "gaussian_blur"]

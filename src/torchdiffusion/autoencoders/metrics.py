"""Reconstruction metrics of a first stage: PSNR, SSIM (Wang et al. 2004) and codebook usage.

Images are float tensors (B, C, H, W) in [0, 1] (data_range 1) unless stated; every function returns one value per
image (B,) so callers average over a held-out set themselves.

    PSNR = 10 log10(data_range^2 / MSE),  MSE the mean over C, H, W
    SSIM = mean over C and valid window positions of
           ((2 mu_x mu_y + C1)(2 sigma_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),
           local statistics under an 11x11 Gaussian window of std 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2, L the data
           range (Wang et al. 2004, Sec. III-C), computed per channel on the 'valid' positions as the paper's code.
Code usage over a window (an epoch, a validation set): the fraction of codes chosen at least once, and the
perplexity exp(H(p)) of the window's code histogram p (not an average of per-batch perplexities).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """(B,) peak signal-to-noise ratio in dB; +inf where the images are equal."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(data_range ** 2 / mse)).to(x.dtype if x.is_floating_point() else torch.float32)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """(size, size) Gaussian window summing to 1 (float64)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """(B,) mean SSIM of Wang et al. 2004 (see the module docstring). Images smaller than the window use a window
    of their smaller side (odd)."""
    x, y = x.double(), y.double()
    c = x.shape[1]
    size = min(window, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2
    w = gaussian_window(size, sigma).to(x.device)[None, None].expand(c, 1, size, size)

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x ** 2
    syy = filt(y * y) - mu_y ** 2
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


def code_usage(counts: Tensor) -> dict[str, float]:
    """counts (K,) of a window -> {"code_usage": fraction of codes used, "code_perplexity": exp(entropy)}."""
    counts = counts.double()
    total = float(counts.sum())
    if total <= 0:
        return {"code_usage": 0.0, "code_perplexity": 0.0}
    p = counts / total
    nz = p[p > 0]
    return {"code_usage": float((counts > 0).double().mean()),
            "code_perplexity": float(math.exp(float(-(nz * nz.log()).sum())))}


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1) / 2).clamp(0, 1)

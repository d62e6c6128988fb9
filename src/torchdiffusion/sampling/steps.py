"""The walk over a sigma grid and the one-step updates that samplers share.

Notation: x = x0 + sigma * n; s = sigmas[i], s' = sigmas[i + 1] < s; D = D(x, s) the denoiser's estimate of
E[x0 | x]; d = (x - D) / s, the probability-flow ODE direction dx/dsigma (Karras et al. 2022, eq. 3 with
sigma(t) = t, s(t) = 1). Step coefficients are computed in float64 (Python floats) from the float64 grid and
applied to x in x's dtype; the denoiser receives sigma as a (B,) tensor in x's dtype.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from torchdiffusion.errors import ConfigError
from torchdiffusion.protocols import Callback, Cond, Denoiser, Generators
from torchdiffusion.sampling.noise import check_generators, randn_like

#: denoise(x, sigma) -> D: the denoiser with its conditioning bound and sigma given as a float.
BoundDenoiser = Callable[[Tensor, float], Tensor]
#: step(x, D, s, s', denoise) -> x at s'; may call denoise for extra evaluations (Heun).
Step = Callable[[Tensor, Tensor, float, float, BoundDenoiser], Tensor]


class SamplerError(ConfigError, ValueError):
    """A sampler argument is invalid (also a ValueError)."""


def check_sigmas(sigmas: Tensor) -> list[float]:
    """Validate a grid and return it as Python floats (float64): 1-D, >= 2 entries, finite, strictly descending,
    all but the last > 0, the last >= 0 (normally 0)."""
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2 or not sigmas.is_floating_point():
        desc = f"shape {tuple(sigmas.shape)} dtype {sigmas.dtype}" if isinstance(sigmas, Tensor) else type(sigmas).__name__
        raise SamplerError(f"sigmas must be a 1-D float tensor (n + 1,) with n >= 1 steps, got {desc}; "
                           f"build one with torchdiffusion.core.grids")
    sig = sigmas.detach().to("cpu", torch.float64)
    if not torch.isfinite(sig).all():
        raise SamplerError("sigmas must be finite")
    if not (sig[1:] < sig[:-1]).all():
        raise SamplerError("sigmas must be strictly descending (sigma_max first, 0 last)")
    if sig[-1] < 0:
        raise SamplerError(f"sigmas must be > 0 except the last entry, which must be >= 0 (normally 0), got {sig[-1].item()}")
    return sig.tolist()


def check_noise(noise: Tensor) -> None:
    if not isinstance(noise, Tensor) or noise.ndim < 1 or not noise.is_floating_point():
        raise SamplerError("noise must be a float tensor of shape (B, ...) holding standard normal values")


def bind(denoiser: Denoiser, cond: Cond) -> BoundDenoiser:
    """Fix cond and present sigma to the denoiser as a (B,) tensor in x's dtype and device."""

    def denoise(x_: Tensor, sigma: float) -> Tensor:
        out = denoiser(x_, x_.new_full((x_.shape[0],), sigma), cond)
        if out.shape != x_.shape:
            raise SamplerError(f"the denoiser returned shape {tuple(out.shape)} for an input of shape "
                               f"{tuple(x_.shape)}; it must return an x0 estimate of the input's shape")
        return out

    return denoise


def walk(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, cond: Cond, generator: Generators,
         callback: Callback, step: Step) -> Tensor:
    """The loop every single-step sampler shares: x = noise * sigmas[0]; for each step i, D = denoise(x, s),
    callback, x = step(x, D, s, s', denoise). One denoiser call per step plus whatever `step` adds.
    Returns x at sigmas[-1]; the caller's `noise` is never modified."""
    sig, x = start(noise, sigmas, generator)
    denoise = bind(denoiser, cond)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoise(x, s)
        report(callback, i, x, s, s_next, denoised)
        x = step(x, denoised, s, s_next, denoise)
    return x


def start(noise: Tensor, sigmas: Tensor, generator: Generators) -> tuple[list[float], Tensor]:
    """What every sampler checks first: noise, grid and generators; returns the grid as floats and x = noise * s_0."""
    check_noise(noise)
    sig = check_sigmas(sigmas)
    check_generators(generator, noise.shape[0])
    return sig, noise * sig[0]


def report(callback: Callback, i: int, x: Tensor, s: float, s_next: float, denoised: Tensor, **extra) -> None:
    """The per-step callback record every sampler emits (extra keys for sampler-specific state)."""
    if callback is not None:
        callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised, **extra})


def euler_step(x: Tensor, denoised: Tensor, s: float, s_next: float) -> Tensor:
    """One Euler step of the probability-flow ODE: x + (s' - s) d with d = (x - D) / s (EDM Alg. 1, line 4-5)."""
    d = (x - denoised) / s
    return x + d * (s_next - s)


def gaussian_step(x: Tensor, denoised: Tensor, c_x: float, std: float, generator: Generators) -> Tensor:
    """x' = D + c_x (x - D) + std * z, z ~ N(0, I) drawn from `generator` (no draw when std == 0).

    Every ancestral/DDIM-type update in this frame has this form: D plus a shrunk copy of the current
    noise estimate x - D = s * eps_hat plus fresh noise."""
    x_next = denoised + c_x * (x - denoised)
    if std > 0:
        x_next = x_next + std * randn_like(x, generator)
    return x_next


def posterior_variance(s: float, s_next: float) -> float:
    """Variance of q(x_{s'} | x_s, x0) in this frame: s'^2 (s^2 - s'^2) / s^2 (DDPM's beta-tilde / abar_{t-1},
    Ho et al. 2020, eq. 7, with abar = 1 / (1 + sigma^2))."""
    return s_next * s_next * (s * s - s_next * s_next) / (s * s)


def sqrt_nonneg(v: float) -> float:
    """sqrt that treats float round-off below zero as zero."""
    return math.sqrt(max(v, 0.0))

"""Inverse-problem solvers: restore x0 from a measurement y = A x0 + sigma_y e with an unconditional denoiser.

Notation: x = x0 + sigma * n; D = D(x, sigma); s = sigmas[i] > s' = sigmas[i + 1]; every walk below takes DDPM's
ancestral step (Ho et al. 2020; sampling.ancestral, "small" variance), x' = D + (s'^2 / s^2)(x - D) + std z,
and then applies its measurement correction. All share the sampler signature

    restore_NAME(denoiser, measurement, noise, sigmas, *, cond=None, generator=None, callback=None, **options)

noise: (B, ...) standard normal of the measured images' shape; sigmas: the float64 (n + 1,) grid ending in 0.

| method         | correction                                                         | walk                  | NFE (backward) |
|----------------|--------------------------------------------------------------------|-----------------------|-----------|
| replacement    | projection of x onto A x = y_s' after every step (Score SDE, POCS)  | DDPM                  | n (0)     |
| ilvr           | low-pass projection while s' >= sigma_stop (Choi et al. 2021)      | DDPM                  | n (0)     |
| ccdf           | projection; starts at A^+ y + sigma_0 n, sigma_0 < sigma_max        | DDPM on a short grid  | n (0)     |
| mcg            | likelihood gradient (gradients.dps) + projection (Chung et al. 2022) | DDPM                 | n (n)     |
| dps            | likelihood gradient only (Chung et al. 2023)                       | DDPM (sample_ddpm)    | n (n)     |
| repaint        | projection; resampling with jumps (Lugmayr et al. 2022)            | down j, up j, r times | see repaint_nfe |
| reconstruction | replacement + constant-weight gradient (Ho et al. 2022, eq. 7)     | DDPM                  | n (n)     |

Measurement consistency: the projection methods end with s' = 0, where the projection sets A x = y exactly
(with noisy y this keeps the noise). DPS only pulls A x towards y (||A x - y|| of the order of sigma_y);
ILVR with sigma_stop > 0 deliberately leaves the last steps free.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from torch import Tensor

from ..protocols import Callback, Cond, Denoiser, Generators
from ..sampling.ancestral import ddpm_variance, sample_ddpm
from ..sampling.noise import check_generators, randn_like
from ..sampling.steps import bind, check_noise, check_sigmas, gaussian_step
from .gradients import dps, reconstruction_guidance
from .measurement import Measurement
from .operators import AvgPoolDown, BicubicDown, GaussianBlur, OperatorError


def _ddpm_step(x: Tensor, denoised: Tensor, s: float, s_next: float, generator: Generators) -> Tensor:
    return gaussian_step(x, denoised, (s_next * s_next) / (s * s), math.sqrt(ddpm_variance(s, s_next, "small")),
                         generator)


def _prepare(measurement: Measurement, noise: Tensor, sigmas: Tensor, generator: Generators) -> list[float]:
    check_noise(noise)
    measurement.check(noise)
    sig = check_sigmas(sigmas)
    check_generators(generator, noise.shape[0])
    return sig


def projected_walk(denoiser: Denoiser, measurement: Measurement, x: Tensor, sig: list[float], cond: Cond,
                   generator: Generators, callback: Callback,
                   project_at: Callable[[float], bool] = lambda s: True) -> Tensor:
    """From x at sig[0]: DDPM steps, each followed by the projection x <- x + A^+(y_s' - A x) when project_at(s')."""
    denoise = bind(denoiser, cond)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoise(x, s)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised})
        x = _ddpm_step(x, denoised, s, s_next, generator)
        if project_at(s_next):
            x = measurement.project(x, s_next, generator)
    return x


def restore_replacement(denoiser: Denoiser, measurement: Measurement, noise: Tensor, sigmas: Tensor, *,
                        cond: Cond = None, generator: Generators = None, callback: Callback = None) -> Tensor:
    """Replacement / POCS (Song et al. 2021, app. I.2; Chung et al. 2022): project after every DDPM step. NFE n."""
    sig = _prepare(measurement, noise, sigmas, generator)
    return projected_walk(denoiser, measurement, noise * sig[0], sig, cond, generator, callback)


LOW_PASS = (AvgPoolDown, BicubicDown, GaussianBlur)


def restore_ilvr(denoiser: Denoiser, measurement: Measurement, noise: Tensor, sigmas: Tensor, *,
                 cond: Cond = None, generator: Generators = None, callback: Callback = None,
                 sigma_stop: float = 0.0) -> Tensor:
    """ILVR (Choi et al. 2021, Alg. 1): x <- x - phi(x) + phi(y_s') with the low-pass filter phi = A^+ A of a
    down-sampling or blur operator, applied while s' >= sigma_stop (their conditioning range: a larger
    sigma_stop keeps only the coarse structure of the reference and frees the details). NFE n."""
    if not isinstance(measurement.op, LOW_PASS):
        raise OperatorError(f"ILVR refines low frequencies: it needs a down-sampling or blur operator "
                            f"(avgpool, bicubic, blur), got {measurement.op.name}")
    if not sigma_stop >= 0:
        raise OperatorError(f"ILVR sigma_stop must be >= 0, got {sigma_stop}")
    sig = _prepare(measurement, noise, sigmas, generator)
    return projected_walk(denoiser, measurement, noise * sig[0], sig, cond, generator, callback,
                          project_at=lambda s: s >= sigma_stop)


def restore_ccdf(denoiser: Denoiser, measurement: Measurement, noise: Tensor, sigmas: Tensor, *,
                 cond: Cond = None, generator: Generators = None, callback: Callback = None,
                 init: Optional[Tensor] = None) -> Tensor:
    """Come-closer-diffuse-faster (Chung, Sim & Ye 2022): start from an estimate x_init (default A^+ y) diffused
    forward to sigma_0 = sigmas[0], x = x_init + sigma_0 n, and run the projected walk from there. Give a grid
    that starts well below the model's sigma_max (e.g. karras(n, sigma_min, 2.0)): a good estimate needs
    few steps (their Theorem 1: the error contracts along the reverse walk). NFE n."""
    sig = _prepare(measurement, noise, sigmas, generator)
    x_init = measurement.pinv_estimate() if init is None else init
    if tuple(x_init.shape) != tuple(noise.shape):
        raise OperatorError(f"CCDF init of shape {tuple(x_init.shape)} does not match images of shape "
                            f"{tuple(noise.shape)}")
    x = x_init.to(noise.dtype) + noise * sig[0]
    return projected_walk(denoiser, measurement, x, sig, cond, generator, callback)


def restore_mcg(denoiser: Denoiser, measurement: Measurement, noise: Tensor, sigmas: Tensor, *,
                cond: Cond = None, generator: Generators = None, callback: Callback = None,
                scale: float = 1.0, prior_std: float = 0.5) -> Tensor:
    """Manifold-constrained gradient (Chung et al. 2022, "Improving diffusion models for inverse problems using
    manifold constraints", Alg. 1): the likelihood gradient through the denoiser (gradients.dps) followed by the
    projection onto the measurement after every step. NFE n forward + n backward."""
    sig = _prepare(measurement, noise, sigmas, generator)
    guided = dps(denoiser, measurement, scale, prior_std)
    return projected_walk(guided, measurement, noise * sig[0], sig, cond, generator, callback)


def restore_dps(denoiser: Denoiser, measurement: Measurement, noise: Tensor, sigmas: Tensor, *,
                cond: Cond = None, generator: Generators = None, callback: Callback = None,
                scale: float = 1.0, prior_std: float = 0.5) -> Tensor:
    """Diffusion posterior sampling (Chung et al. 2023): the DDPM sampler of this project run on the posterior
    denoiser gradients.dps(denoiser, ...). No projection, so it handles noisy measurements and operators
    without a pseudo-inverse. NFE n forward + n backward."""
    _prepare(measurement, noise, sigmas, generator)
    guided = dps(denoiser, measurement, scale, prior_std)
    return sample_ddpm(guided, noise, sigmas, cond=cond, generator=generator, callback=callback)


def restore_reconstruction(denoiser: Denoiser, measurement: Measurement, noise: Tensor, sigmas: Tensor, *,
                           cond: Cond = None, generator: Generators = None, callback: Callback = None,
                           weight: float = 1.0) -> Tensor:
    """Reconstruction-guided sampling (Ho et al. 2022, "Video diffusion models", sec. 3.1): replacement of the
    measured part plus the constant-weight gradient correction of the estimate (gradients.reconstruction_guidance).
    NFE n forward + n backward."""
    sig = _prepare(measurement, noise, sigmas, generator)
    guided = reconstruction_guidance(denoiser, measurement, weight)
    return projected_walk(guided, measurement, noise * sig[0], sig, cond, generator, callback)


# --------------------------------------------------------------------------------------------- RePaint
def repaint_schedule(n: int, jump: int = 10, resample: int = 10) -> list[int]:
    """Positions on an n-step grid (0 = sigmas[0], n = the final sigma) visited by RePaint (Lugmayr et al. 2022,
    sec. 4.2, "resampling with jumps"): walk down; at every position i = jump, 2 jump, ... < n go back up `jump`
    positions and down again, `resample - 1` times. resample = 1 is the plain walk 0, 1, ..., n."""
    if n < 1 or jump < 1 or resample < 1:
        raise OperatorError(f"RePaint needs n >= 1 steps, jump >= 1 and resample >= 1, got n={n}, jump={jump}, "
                            f"resample={resample}")
    left = {k: resample - 1 for k in range(jump, n, jump)}
    path, i = [0], 0
    while i < n:
        i += 1
        path.append(i)
        if left.get(i, 0) > 0:
            left[i] -= 1
            for _ in range(min(jump, i)):
                i -= 1
                path.append(i)
    return path


def repaint_nfe(n: int, jump: int = 10, resample: int = 10) -> int:
    """Denoiser calls of restore_repaint: one per downward move of the schedule."""
    path = repaint_schedule(n, jump, resample)
    return sum(1 for a, b in zip(path, path[1:]) if b > a)


def restore_repaint(denoiser: Denoiser, measurement: Measurement, noise: Tensor, sigmas: Tensor, *,
                    cond: Cond = None, generator: Generators = None, callback: Callback = None,
                    jump: int = 10, resample: int = 10) -> Tensor:
    """RePaint (Lugmayr et al. 2022, Alg. 1): a downward move s -> s' is a DDPM step followed by the projection
    at s' (for inpainting: known pixels := y + s' n); an upward move s' -> s re-noises with the forward process,
    x <- x + sqrt(s^2 - s'^2) z (their eq. 8 in this frame), so the unknown part is harmonised with the known
    part over `resample` passes. Lugmayr et al. use n = 250, jump = 10, resample = 10. NFE repaint_nfe(n, ...)."""
    sig = _prepare(measurement, noise, sigmas, generator)
    path = repaint_schedule(len(sig) - 1, jump, resample)
    denoise = bind(denoiser, cond)
    x = noise * sig[0]
    k = 0
    for a, b in zip(path, path[1:]):
        s, s_next = sig[a], sig[b]
        if b > a:
            denoised = denoise(x, s)
            if callback is not None:
                callback({"i": k, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised})
            k += 1
            x = measurement.project(_ddpm_step(x, denoised, s, s_next, generator), s_next, generator)
        else:
            x = x + math.sqrt(s_next * s_next - s * s) * randn_like(x, generator)
    return x


#: methods that run a backward pass through the denoiser at every step
GRADIENT_METHODS = ("mcg", "dps", "reconstruction")

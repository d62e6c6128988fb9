"""Deterministic samplers: solvers of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma.

Notation: x = x0 + sigma * n, D(x, sigma) ~ E[x0 | x] (Karras et al. 2022, "EDM", eq. 3 with sigma(t) = t).
All samplers share the signature

    sample_NAME(denoiser, noise, sigmas, *, cond=None, generator=None, callback=None, correct=None) -> x at sigmas[-1]

noise: (B, ...) standard normal; the walk starts at x = noise * sigmas[0]. sigmas: float64 (n + 1,), strictly
descending, normally ending in 0 (core.grids). correct(x, sigma_next, i) -> x: an optional measurement-consistency
hook applied after every step (steps.walk; inverse.corrections). Denoiser calls (NFE) for an n-step grid:
euler n; heun 2n - 1 when the grid ends in 0 (the last step is an Euler step), else 2n.
"""
from __future__ import annotations

from torch import Tensor

from torchdiffusion.protocols import Callback, Cond, Denoiser, Generators
from torchdiffusion.sampling.steps import BoundDenoiser, Correct, euler_step, walk


def sample_euler(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                 generator: Generators = None, callback: Callback = None, correct: Correct | None = None) -> Tensor:
    """Euler's method on the probability-flow ODE (EDM Alg. 1 without the correction). NFE = n.
    Deterministic: `generator` is accepted for the common signature and unused."""

    def step(x: Tensor, denoised: Tensor, s: float, s_next: float, denoise: BoundDenoiser) -> Tensor:
        return euler_step(x, denoised, s, s_next)

    return walk(denoiser, noise, sigmas, step, cond=cond, generator=generator, callback=callback, correct=correct)


def sample_heun(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                generator: Generators = None, callback: Callback = None, correct: Correct | None = None) -> Tensor:
    """Heun's 2nd-order method (EDM Alg. 1, deterministic, no churn): an Euler predictor to s', then the
    trapezoidal corrector with the slope at s'. A step to sigma = 0 stays a plain Euler step because the
    slope (x - D) / sigma is undefined there (EDM Alg. 1, line 6). NFE = 2n - 1 on a grid ending in 0."""

    def step(x: Tensor, denoised: Tensor, s: float, s_next: float, denoise: BoundDenoiser) -> Tensor:
        x_pred = euler_step(x, denoised, s, s_next)
        if s_next == 0:
            return x_pred
        d = (x - denoised) / s
        d_next = (x_pred - denoise(x_pred, s_next)) / s_next
        return x + (d + d_next) * (0.5 * (s_next - s))

    return walk(denoiser, noise, sigmas, step, cond=cond, generator=generator, callback=callback, correct=correct)

"""DDIM and ancestral DDPM, written in the one frame x = x0 + sigma * n.

A VP model (x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps) sits in this frame as x = x_t / sqrt(abar_t),
sigma_t = sqrt((1 - abar_t) / abar_t), i.e. abar = 1 / (1 + sigma^2). With s = sigma_t, s' = sigma_{t-1} < s,
D = D(x, s) and eps_hat = (x - D) / s, both updates are x' = D + c_x (x - D) + std * z (steps.gaussian_step):

- DDIM (Song et al. 2021a, eqs. 12 and 16, divided by sqrt(abar_{t-1})):
      x' = D + sqrt(s'^2 - v_eta) eps_hat + sqrt(v_eta) z,   v_eta = eta^2 s'^2 (s^2 - s'^2) / s^2.
  eta = 0 is deterministic: x' = D + (s'/s)(x - D) = x + (s' - s)(x - D)/s, exactly an Euler step of the
  probability-flow ODE, so deterministic DDIM *is* `sample_euler` in this frame (Karras et al. 2022,
  sec. 3; tested). eta = 1 is DDPM's "small" step, and k-diffusion's `euler_ancestral(eta)` is DDIM(eta).
- DDPM (Ho et al. 2020, eqs. 6-7): sample the Gaussian posterior q(x_{s'} | x_s, x0 = D):
      mean D + (s'^2/s^2)(x - D),
      variance "small" = s'^2 (s^2 - s'^2) / s^2                       (beta-tilde_t / abar_{t-1}),
               "large" = (s^2 - s'^2)(1 + s'^2) / (1 + s^2)            (beta_t / abar_{t-1}),
  with beta_t = 1 - abar_t / abar_{t-1} read off the same two sigmas (on a respaced grid, the respaced beta
  of Nichol & Dhariwal 2021, sec. 4). "large" is DDPM's other choice translated to the frame; it never
  exceeds this frame's forward variance s^2 - s'^2, and it makes the walk exact for N(0, I) data on any grid
  down to the grid's last positive sigma (a unit-variance VP marginal's true reverse step has variance beta_t;
  tested). The step to sigma = 0 draws no noise under either choice: "small" is 0 there, and for "large" we
  follow Ho et al. (Alg. 2, z = 0 at t = 1), so every walk ends on D. (diffusers' fixed_large skips the draw
  only at t = 0, so on a "trailing" grid it adds noise of variance 1 - abar_t at its last step.)

- DDPM with a learned variance (Nichol & Dhariwal 2021, sec. 3.1 and Appendix B): variance="learned" asks the
  denoiser for (D, v) through the contract's keyword `return_variance=True` (core.precond.denoise_with_variance;
  CFG and classifier guidance forward it), in the same call that gives D (LearnedVarianceStep), and uses
  log Sigma = v log(large) + (1 - v) log(small) with small and large of the step actually taken, i.e. the betas recomputed for a respaced grid (core.precond
  .reverse_step_variances); v is elementwise. The step to sigma = 0 draws no noise, as above.

NFE: n for an n-step grid, for both samplers. One standard-normal draw of x's shape per step with std > 0,
from `generator` (a list of B generators makes each row depend on its own seed only; sampling.noise).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from torchdiffusion.core.precond import interpolated_log_variance, provides_variance, reverse_step_variances
from torchdiffusion.protocols import Callback, Cond, Denoiser, Generators
from torchdiffusion.sampling.noise import randn_like
from torchdiffusion.sampling.steps import (BoundDenoiser, Correct, SamplerError, Step, gaussian_step,
                                           posterior_variance, sqrt_nonneg, walk)

VARIANCES = ("small", "large", "learned")


def sample_ddim(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                generator: Generators = None, callback: Callback = None, correct: Correct | None = None,
                eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021a) on any sigma grid; eta in [0, 1] scales the fresh noise (0: deterministic,
    equal to `sample_euler`; 1: DDPM's "small" ancestral step). NFE = n."""
    eta = float(eta)
    if not (math.isfinite(eta) and 0.0 <= eta <= 1.0):
        raise SamplerError(f"DDIM eta must be in [0, 1] (0 deterministic, 1 ancestral), got {eta!r}")

    def step(x: Tensor, denoised: Tensor, s: float, s_next: float, denoise: BoundDenoiser) -> Tensor:
        v_eta = eta * eta * posterior_variance(s, s_next)
        return gaussian_step(x, denoised, sqrt_nonneg(s_next * s_next - v_eta) / s, math.sqrt(v_eta), generator)

    return walk(denoiser, noise, sigmas, step, cond=cond, generator=generator, callback=callback, correct=correct)


def ddpm_variance(s: float, s_next: float, variance: str) -> float:
    """Variance of the DDPM reverse step from s to s' in this frame ("small" or "large", see module notes)."""
    if s_next == 0:
        return 0.0  # the step to the data draws no noise (Ho et al. 2020, Alg. 2)
    if variance == "small":
        return posterior_variance(s, s_next)
    return (s * s - s_next * s_next) * (1 + s_next * s_next) / (1 + s * s)


def sample_ddpm(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                generator: Generators = None, callback: Callback = None, correct: Correct | None = None,
                variance: str = "small") -> Tensor:
    """Ancestral DDPM (Ho et al. 2020, Alg. 2) on any sigma grid: sample q(x_{s'} | x_s, x0 = D(x_s, s)).
    variance: "small" (posterior, beta-tilde), "large" (beta_t) or "learned" (the model's interpolation v between
    the two, Nichol & Dhariwal 2021; needs a denoiser that answers return_variance=True), see the module notes.
    correct: the walk's per-step correction hook (inverse.corrections). NFE = n."""
    if variance not in VARIANCES:
        raise SamplerError(f"unknown DDPM variance {variance!r}; valid: {', '.join(VARIANCES)}")
    if variance == "learned":
        if not provides_variance(denoiser):
            raise SamplerError(f"DDPM variance 'learned' needs a model with a learned variance (model.variance "
                               f"learned), or a guidance wrapper around one; {type(denoiser).__name__} gives none: "
                               f"use 'small' or 'large' for this model")
        return walk(denoiser, noise, sigmas, LearnedVarianceStep(generator), cond=cond, generator=generator,
                    callback=callback, correct=correct)

    return walk(denoiser, noise, sigmas, ddpm_step(variance, generator), cond=cond, generator=generator,
                callback=callback, correct=correct)


def ddpm_step(variance: str, generator: Generators):
    """DDPM's fixed-variance ancestral step ("small" or "large") as a walk step function (also RePaint's)."""

    def step(x: Tensor, denoised: Tensor, s: float, s_next: float, denoise: BoundDenoiser) -> Tensor:
        c_x = (s_next * s_next) / (s * s)
        return gaussian_step(x, denoised, c_x, math.sqrt(ddpm_variance(s, s_next, variance)), generator)

    return step


class LearnedVarianceStep(Step):
    """DDPM's step with the model's variance interpolation v (Nichol & Dhariwal 2021, eq. 15): `evaluate` asks
    the denoiser for (D, v) in one call; `update` uses that v for the step taken from the same x."""

    def __init__(self, generator: Generators):
        self.generator = generator
        self.v: Tensor | None = None

    def evaluate(self, denoise, x, s, i):
        denoised, self.v = denoise.with_variance(x, s)
        return x, s, denoised

    def update(self, x, denoised, s, s_next, denoise, i):
        c_x = (s_next * s_next) / (s * s)
        if s_next == 0:
            return gaussian_step(x, denoised, c_x, 0.0, self.generator)
        small, large = reverse_step_variances(s, s_next)
        log_var = interpolated_log_variance(self.v.to(x.dtype), math.log(small), math.log(large))
        return denoised + c_x * (x - denoised) + torch.exp(0.5 * log_var) * randn_like(x, self.generator)

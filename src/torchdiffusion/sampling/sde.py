"""Predictor-corrector samplers of the reverse-time Score SDE (Song et al. 2021, sec. 4.2, Alg. 1-5).

Notation: x = x0 + sigma * n; D = D(x, sigma) ~ E[x0 | x]; the score of the noisy marginal is
grad log p_sigma(x) = (D - x) / sigma^2 (Tweedie / Vincent 2011). s = sigmas[i], s' = sigmas[i + 1] < s.

In this frame VE, VP and sub-VP are one SDE, dx = sqrt(d sigma^2/dt) dw (core.processes), whose reverse in the
noise level is dx = -(d sigma^2) grad log p_sigma(x) + sqrt(|d sigma^2|) dw (Song et al. 2021, eq. 6; Karras et
al. 2022, eq. 6 with beta = sigma'/sigma). So one set of predictors serves every Score SDE:

- reverse diffusion (Song et al. 2021, App. E, the VE form, exact in sigma^2):
      x' = x + (s^2 - s'^2) score + sqrt(s^2 - s'^2) z  =  D + (s'^2 / s^2) (x - D) + sqrt(s^2 - s'^2) z;
- Euler-Maruyama in sigma:  x' = x + 2 s (s - s') score + sqrt(2 s (s - s')) z.
  (For a VP model this is the VP reverse SDE in the scaled frame; it differs from Song et al.'s VP
  discretisation of the original variable at second order in the step.)

Corrector: Langevin MCMC at the new level s' (Song et al. 2021, Alg. 4 (VE) and 5 (VP)):
      g = score(x, s'),  eps = 2 alpha (snr ||z|| / ||g||)^2,  x <- x + eps g + sqrt(2 eps) z,
repeated n_corrector times. The step rule is invariant under x -> x / s(t), so the frame changes nothing; alpha = 1
is Alg. 4, and Alg. 5's alpha_i = 1 - beta_i tends to 1 as the grid refines. The step is set per batch row, so a
row's walk depends on its own seed only, and ||z||^2 is replaced by its mean D (elements per row): Song et al.'s code
averages both norms over the batch, and with a per-row ||z|| the step grows with the very noise it injects, which
inflates the stationary variance by a factor 1 + 2/D (12% at D = 16, measured; negligible for images). With
||z||^2 = D the corrector's fixed point for Gaussian data N(mu, V I) is V / (1 - alpha snr^2), the unadjusted
Langevin bias of step eps = 2 alpha snr^2 V (tested).

The step to sigma = 0 (a grid ending in 0) is the denoising step x' = D(x, s) with no noise and no correction
(the final denoising step of Song et al. 2021's samplers and of Jolicoeur-Martineau et al. 2021). Order of operations as in
Alg. 2/3: predictor s -> s', then corrector at s'; no correction at the starting level.

NFE for an n-step grid ending in 0: n + n_corrector (n - 1) (pc: 2n - 1 with the default n_corrector = 1).
Noise draws come from `generator` (a list of B generators: one per row; sampling.noise).
"""
from __future__ import annotations

import math
from typing import Callable

from torch import Tensor

from torchdiffusion.protocols import Callback, Cond, Denoiser, Generators
from torchdiffusion.sampling.noise import randn_like
from torchdiffusion.sampling.steps import BoundDenoiser, Correct, SamplerError, walk

PREDICTORS = ("reverse_diffusion", "euler_maruyama")

#: predictor(x, D, s, s', generator) -> x at s'
Predictor = Callable[[Tensor, Tensor, float, float, Generators], Tensor]


def reverse_diffusion_step(x: Tensor, denoised: Tensor, s: float, s_next: float, generator: Generators) -> Tensor:
    """x' = D + (s'^2/s^2)(x - D) + sqrt(s^2 - s'^2) z (Song et al. 2021, App. E, in this frame)."""
    ratio = (s_next * s_next) / (s * s)
    return denoised + ratio * (x - denoised) + math.sqrt(s * s - s_next * s_next) * randn_like(x, generator)


def euler_maruyama_step(x: Tensor, denoised: Tensor, s: float, s_next: float, generator: Generators) -> Tensor:
    """x' = x + 2 s (s - s') score + sqrt(2 s (s - s')) z, score = (D - x) / s^2: Euler-Maruyama on the reverse SDE
    with sigma as the time variable (Song et al. 2021, Alg. 1 with t -> sigma)."""
    ds = s - s_next
    return x + (2 * ds / s) * (denoised - x) + math.sqrt(2 * s * ds) * randn_like(x, generator)


def langevin_correct(x: Tensor, sigma: float, denoise: BoundDenoiser, generator: Generators, snr: float,
                     n_corrector: int, alpha: float = 1.0) -> Tensor:
    """n_corrector Langevin steps at noise level sigma with the signal-to-noise step rule
    eps = 2 alpha (snr ||z|| / ||score||)^2 (Song et al. 2021, Alg. 4/5), per row, with ||z||^2 = D."""
    for _ in range(n_corrector):
        score = (denoise(x, sigma) - x) / (sigma * sigma)
        z = randn_like(x, generator)
        g_sq = score.flatten(1).pow(2).sum(1).clamp(min=1e-30)  # ||score||^2 per row, (B,)
        eps = 2 * alpha * snr * snr * (z[0].numel() / g_sq)  # ||z||^2 -> its mean D (see module notes)
        eps = eps.reshape((-1,) + (1,) * (x.ndim - 1))
        x = x + eps * score + (2 * eps).sqrt() * z
    return x


def _check_options(snr: float, n_corrector: int, alpha: float) -> None:
    if not (isinstance(snr, (int, float)) and math.isfinite(snr) and snr > 0):
        raise SamplerError(f"snr must be a finite number > 0 (Song et al. use 0.16 on CIFAR-10), got {snr!r}")
    if isinstance(n_corrector, bool) or not isinstance(n_corrector, int) or n_corrector < 0:
        raise SamplerError(f"n_corrector must be an integer >= 0, got {n_corrector!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0 < alpha <= 1):
        raise SamplerError(f"alpha must be in (0, 1] (1: Song et al. Alg. 4), got {alpha!r}")


def sample_pc(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
              generator: Generators = None, callback: Callback = None, correct: Correct | None = None,
              predictor: str = "reverse_diffusion", snr: float = 0.16, n_corrector: int = 1,
              alpha: float = 1.0) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 2/3) on any sigma grid.

    predictor: "reverse_diffusion" or "euler_maruyama"; snr: the Langevin signal-to-noise ratio (0.16: Song et al.
    2021, CIFAR-10 VE); n_corrector: Langevin steps per level (0: predictor only); alpha: Alg. 5's step factor.
    NFE = n + n_corrector (n - 1) on a grid ending in 0, else n (1 + n_corrector)."""
    if predictor not in PREDICTORS:
        raise SamplerError(f"unknown predictor {predictor!r}; valid: {', '.join(PREDICTORS)}")
    _check_options(snr, n_corrector, alpha)
    predict: Predictor = reverse_diffusion_step if predictor == "reverse_diffusion" else euler_maruyama_step

    def step(x: Tensor, denoised: Tensor, s: float, s_next: float, denoise: BoundDenoiser) -> Tensor:
        if s_next == 0:
            return denoised  # noise removal: the last step returns the denoiser's mean
        x = predict(x, denoised, s, s_next, generator)
        return langevin_correct(x, s_next, denoise, generator, snr, n_corrector, alpha)

    return walk(denoiser, noise, sigmas, step, cond=cond, generator=generator, callback=callback, correct=correct)


def sample_pc_em(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                 generator: Generators = None, callback: Callback = None, correct: Correct | None = None,
                 snr: float = 0.16, n_corrector: int = 1, alpha: float = 1.0) -> Tensor:
    """`sample_pc` with the Euler-Maruyama predictor."""
    return sample_pc(denoiser, noise, sigmas, cond=cond, generator=generator, callback=callback, correct=correct,
                     predictor="euler_maruyama", snr=snr, n_corrector=n_corrector, alpha=alpha)


def pc_nfe(n: int, n_corrector: int = 1) -> int:
    """Denoiser calls of `sample_pc` on an n-step grid ending in 0."""
    return n + n_corrector * (n - 1)

"""Samplers: pure functions of a denoiser, standard normal noise and a float64 sigma grid.

    sample_NAME(denoiser, noise, sigmas, *, cond=None, generator=None, callback=None, correct=None, **options)

All grid samplers run on one walk (steps.walk) with an optional per-step correction correct(x, sigma_next, i).

Denoiser calls for an n-step grid (sigmas of shape (n + 1,) ending in 0): euler n, heun 2n - 1, ddim n, ddpm n.
"""
from torchdiffusion.sampling.ancestral import sample_ddim, sample_ddpm
from torchdiffusion.sampling.noise import NoiseError, randn, randn_like
from torchdiffusion.sampling.ode import sample_euler, sample_heun
from torchdiffusion.sampling.steps import SamplerError

__all__ = ["sample_euler", "sample_heun", "sample_ddim", "sample_ddpm", "randn", "randn_like",
           "SamplerError", "NoiseError"]

"""Analytic-bench adapter: torchdiffusion's samplers driven by the bench's exact denoiser.

The bench's oracle.denoise(x, sigma) is already a denoiser in torchdiffusion's frame (x = x0 + sigma * n,
returns E[x0 | x]), so each sampler gets it unchanged and is called through the library's one signature
sample_NAME(denoiser, noise, sigmas, *, generator, ...). Grids, chosen to line up with the peers' rows:

- euler, heun, euler_ancestral: Karras et al. 2022 grid, sigma in [0.002, 80], rho = 7 (k-diffusion's
  get_sigmas_karras defaults). Heun takes (nfe + 1) // 2 steps, i.e. 2 * steps - 1 <= nfe evaluations.
  euler_ancestral is DDIM with eta = 1, which in this frame is k-diffusion's euler_ancestral update.
- ddim, ddim_trailing, ddpm, ddpm_large: the DDPM training schedule (T = 1000, linear betas 1e-4 .. 0.02,
  Ho et al. 2020), sigma_t = sqrt((1 - abar_t) / abar_t), respaced to nfe timesteps with diffusers' default
  "leading" spacing (or "trailing"), as diffusers' DDIMScheduler / DDPMScheduler rows use.

Initial noise: randn(n, dim) from the bench's generator, then scaled by sigmas[0] inside the sampler; the
ancestral samplers draw their step noise from the same generator.
"""
from __future__ import annotations

import torch

import torchdiffusion
from torchdiffusion.core import grids
from torchdiffusion.sampling import randn, sample_ddim, sample_ddpm, sample_euler, sample_heun

FRAMEWORK = "torchdiffusion"
EXTRA_NFE = {"ddpm": [1000]}
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def framework_version():
    return torchdiffusion.__version__


def ddpm_sigmas(T: int = 1000) -> torch.Tensor:
    """(T,) float64 frame sigmas of DDPM's linear schedule, ascending in t."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, dim=0)
    return ((1.0 - abar) / abar).sqrt()


TABLE = ddpm_sigmas()


def _karras(steps: int) -> torch.Tensor:
    return grids.karras(steps, SIGMA_MIN, SIGMA_MAX, RHO)


def _make(sampler, make_grid, evals_per_step: int = 1, **options):
    def run(oracle, n, nfe, generator):
        steps = nfe if evals_per_step == 1 else (nfe + 1) // 2
        if steps < 1 or (make_grid is not _karras and steps > TABLE.numel()):
            return None
        denoiser = lambda x, sigma, cond=None: oracle.denoise(x, sigma)  # noqa: E731
        noise = randn((n, oracle.dim), generator)  # (n, d) float32
        return sampler(denoiser, noise, make_grid(steps), generator=generator, **options)

    return run


def get_samplers():
    leading = lambda steps: grids.discrete(TABLE, steps, "leading")  # noqa: E731
    trailing = lambda steps: grids.discrete(TABLE, steps, "trailing")  # noqa: E731
    return {
        "euler": _make(sample_euler, _karras),
        "heun": _make(sample_heun, _karras, evals_per_step=2),
        "euler_ancestral": _make(sample_ddim, _karras, eta=1.0),
        "ddim": _make(sample_ddim, leading),
        "ddim_trailing": _make(sample_ddim, trailing),
        "ddpm": _make(sample_ddpm, leading),
        "ddpm_large": _make(sample_ddpm, leading, variance="large"),
    }

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

- unipc, unipc_bh1, unipc_2, ipndm, plms, deis, deis_x0: the multistep samplers (sampling/multistep.py) on
  the same Karras grid; unipc_diffusers is UniPC-2 (bh2) on diffusers' default "linspace" timesteps of the
  DDPM schedule, i.e. the configuration of the diffusers/unipc row.
- every other sampler in the registry (config/registry.py) that has no row above: the Karras grid with the
  most steps whose NFE does not exceed the target.
- NAME_opt: sampler NAME on the grid optimised for this model and this sampler by sampling/gridopt.py
  (a pilot teacher trajectory of 128 pilot seeds, a dynamic programme over 48 candidate sigmas, then a
  pattern search on the pilot end-point error). The grids are computed once per model beforehand by
  bench/analytic_grids.py and read from bench/results/grids/ (a file per model, sampler and NFE, with the
  pilot's cost); the model is identified by its dimension and sigma_data. Rows exist for NFE <= 20.

Initial noise: randn(n, dim) from the bench's generator, then scaled by sigmas[0] inside the sampler; the
ancestral samplers draw their step noise from the same generator.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch

import torchdiffusion
from torchdiffusion.config.registry import SAMPLERS
from torchdiffusion.core import grids
from torchdiffusion.sampling import randn, sample_ddim, sample_ddpm, sample_euler, sample_heun
from torchdiffusion.sampling.multistep import sample_deis, sample_ipndm, sample_plms, sample_unipc

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
        # evals_per_step 1: n calls; 2: 2n - 1 calls (Heun); 0: n + 1 calls (PLMS's two-call first step)
        steps = {1: nfe, 2: (nfe + 1) // 2, 0: nfe - 1 if nfe > 1 else 1}[evals_per_step]
        if steps < 1 or (make_grid is not _karras and steps > TABLE.numel()):
            return None
        denoiser = lambda x, sigma, cond=None: oracle.denoise(x, sigma)  # noqa: E731
        noise = randn((n, oracle.dim), generator)  # (n, d) float32
        return sampler(denoiser, noise, make_grid(steps), generator=generator, **options)

    return run


def diffusers_linspace(steps: int) -> torch.Tensor:
    """diffusers' multistep default (timestep_spacing="linspace", final sigma 0): timesteps
    round(linspace(0, T - 1, steps + 1)) reversed without the last, then sigma = 0."""
    t = np.linspace(0, TABLE.numel() - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    return torch.cat([TABLE[torch.from_numpy(t)], TABLE.new_zeros(1)])


# Samplers that get an optimised grid (the same functions the grid search optimised for).
OPT_SAMPLERS = {
    "unipc": functools.partial(sample_unipc, order=3, variant="bh2"),
    "euler": sample_euler,
}
if "dpmpp_2m" in SAMPLERS:
    OPT_SAMPLERS["dpmpp_2m"] = SAMPLERS["dpmpp_2m"][0]
OPT_NFE = (5, 10, 20)
GRID_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results", "grids"))


def model_key(dim: int, sigma_data: float) -> str:
    """How the grid cache names a model: its dimension and data standard deviation."""
    return f"d{dim}_sd{sigma_data:.6f}"


def grid_path(dim: int, sigma_data: float, sampler: str, steps: int) -> str:
    return os.path.join(GRID_DIR, model_key(dim, sigma_data), f"{sampler}_n{steps}.json")


def _optimized(name: str):
    fn = OPT_SAMPLERS[name]

    def run(oracle, n, nfe, generator):
        if nfe not in OPT_NFE:
            return None
        path = grid_path(oracle.dim, oracle.sigma_data, name, nfe)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no optimised grid {path}; compute it with bench/analytic_grids.py")
        sig, _ = grids.load_grid(path, nfe)
        denoiser = lambda x, sigma, cond=None: oracle.denoise(x, sigma)  # noqa: E731
        return fn(denoiser, randn((n, oracle.dim), generator), sig, generator=generator)

    return run


def _registry_row(name: str):
    fn, nfe_of = SAMPLERS[name]

    def run(oracle, n, nfe, generator):
        if nfe_of(1) is None:
            return None  # adaptive step size: no fixed NFE per grid
        steps = max((k for k in range(1, nfe + 1) if nfe_of(k) <= nfe), default=0)
        if steps < 1:
            return None
        denoiser = lambda x, sigma, cond=None: oracle.denoise(x, sigma)  # noqa: E731
        return fn(denoiser, randn((n, oracle.dim), generator), _karras(steps), generator=generator)

    return run


def get_samplers():
    leading = lambda steps: grids.discrete(TABLE, steps, "leading")  # noqa: E731
    trailing = lambda steps: grids.discrete(TABLE, steps, "trailing")  # noqa: E731
    rows = {
        "euler": _make(sample_euler, _karras),
        "heun": _make(sample_heun, _karras, evals_per_step=2),
        "euler_ancestral": _make(sample_ddim, _karras, eta=1.0),
        "ddim": _make(sample_ddim, leading),
        "ddim_trailing": _make(sample_ddim, trailing),
        "ddpm": _make(sample_ddpm, leading),
        "ddpm_large": _make(sample_ddpm, leading, variance="large"),
        "unipc": _make(sample_unipc, _karras, order=3),
        "unipc_bh1": _make(sample_unipc, _karras, order=3, variant="bh1"),
        "unipc_2": _make(sample_unipc, _karras, order=2),
        "unipc_diffusers": _make(sample_unipc, diffusers_linspace, order=2),
        "ipndm": _make(sample_ipndm, _karras),
        "plms": _make(sample_plms, _karras, evals_per_step=0),
        "deis": _make(sample_deis, _karras, order=3),
        "deis_x0": _make(sample_deis, _karras, order=3, target="x0"),
    }
    for name in SAMPLERS:
        if name not in rows:
            rows[name] = _registry_row(name)
    for name in OPT_SAMPLERS:
        rows[f"{name}_opt"] = _optimized(name)
    return rows

"""Training objectives: a density over noise levels times a weighting, in the one frame.

Notation: x = x0 + sigma n. With D = c_skip x + c_out F, the per-sample loss is (Karras et al. 2022, eq. 8)

    L(x0, sigma) = lambda(sigma) * c_out^2 * mean || F - (x0 - c_skip x) / c_out ||^2  =  lambda(sigma) * mean || D - x0 ||^2,

computed in the first form (the backbone's own target) for numerical stability. lambda is the weighting of the
x0 error, so each named weighting means the same thing whatever the output head:

| weighting | lambda(sigma)                 | source |
|-----------|-------------------------------|--------|
| eps       | 1 / sigma^2                   | DDPM "simple" loss (Ho et al. 2020): unit weight on the noise error |
| x0        | 1                             | |
| v         | (sigma^2 + 1) / sigma^2       | v-loss (Salimans & Ho 2022): unit weight on the v error (sigma_data = 1) |
| edm       | (sigma^2 + sd^2) / (sigma sd)^2 | Karras et al. 2022, eq. 8 and Table 1 |
| min_snr   | min(1 / sigma^2, gamma)       | Min-SNR-gamma (Hang et al. 2023), SNR = 1 / sigma^2, gamma = 5 |

Densities: "discrete" (t uniform on 0..T-1 of a VPDiscrete process, DDPM), "uniform_t" (t uniform on [t_min, 1] of a
continuous process, Song et al. 2021) and "lognormal" (ln sigma ~ N(P_mean, P_std^2), EDM).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..protocols import Cond
from .precond import Preconditioned
from .processes import SCORE_SDES, VPDiscrete, NoiseProcess

DENSITIES = ("discrete", "uniform_t", "lognormal")
WEIGHTINGS = ("eps", "x0", "v", "edm", "min_snr")


@dataclass(frozen=True)
class Objective:
    density: str = "discrete"
    weighting: str = "eps"
    P_mean: float = -1.2  # Karras et al. 2022, Table 1
    P_std: float = 1.2  # Karras et al. 2022, Table 1
    sigma_data: float = 0.5  # Karras et al. 2022
    min_snr_gamma: float = 5.0  # Hang et al. 2023
    t_min: float = 1e-5  # Song et al. 2021: smallest training time for continuous processes

    def __post_init__(self):
        if self.density not in DENSITIES:
            raise ValueError(f"unknown sigma density {self.density!r}; valid: {', '.join(DENSITIES)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.weighting!r}; valid: {', '.join(WEIGHTINGS)}")

    def sample_sigma(self, n: int, process: NoiseProcess, generator: torch.Generator | None = None) -> Tensor:
        """(n,) float32 training noise levels."""
        if self.density == "discrete":
            if not isinstance(process, VPDiscrete):
                raise ValueError("the 'discrete' sigma density needs a discrete VP process; "
                                 "use 'uniform_t' or 'lognormal' for continuous processes")
            t = torch.randint(0, process.T, (n,), generator=generator)
            return process.sigmas()[t].float()
        if self.density == "uniform_t":
            if not isinstance(process, SCORE_SDES):
                raise ValueError("the 'uniform_t' density needs a continuous Score SDE process "
                                 "(vp_continuous, sub_vp or ve)")
            t = self.t_min + (1 - self.t_min) * torch.rand(n, generator=generator, dtype=torch.float64)
            return process.sigma(t).float()
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return (self.P_mean + self.P_std * z).exp().float()

    def weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma), the weight of the squared x0 error, float64 (B,)."""
        s2 = sigma.double() ** 2
        sd2 = self.sigma_data**2
        if self.weighting == "eps":
            return 1 / s2
        if self.weighting == "x0":
            return torch.ones_like(s2)
        if self.weighting == "v":
            return (s2 + 1) / s2
        if self.weighting == "edm":
            return (s2 + sd2) / (s2 * sd2)
        return torch.clamp(1 / s2, max=self.min_snr_gamma)

    def loss(self, model: Preconditioned, x0: Tensor, cond: Cond = None, *, sigma: Tensor | None = None,
             noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample loss (B,). sigma and noise are drawn from `generator` unless given (fixed validation noise)."""
        if sigma is None:
            sigma = self.sample_sigma(x0.shape[0], model.process, generator).to(x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x = x0 + sigma.reshape(sigma.shape + (1,) * (x0.ndim - 1)) * noise
        F, c_skip, c_out = model.raw(x, sigma, cond)
        target = (x0 - c_skip * x) / c_out
        w = (self.weight(sigma).to(x0.device) * c_out.reshape(-1).double() ** 2).float()
        return w * (F - target).pow(2).flatten(1).mean(1)

"""Noise processes: how each model family's time variable maps into the one frame.

Notation (Karras et al. 2022, "EDM", Table 1): a process is x_t = s(t) * (x0 + sigma(t) * n), n ~ N(0, I).
All diffusion math in this project happens on x = x_t / s(t) = x0 + sigma * n; processes are used only at
the boundaries: to turn a sigma into what a backbone expects as its noise label (`c_noise`), to give the
sigma range, and to draw training noise levels.

- VPDiscrete: DDPM (Ho et al. 2020) with T steps and linear betas, the cosine schedule of Nichol & Dhariwal 2021,
  or "scaled_linear" (betas linear in sqrt(beta), Rombach et al. 2022's latent models; diffusers' name).
  abar_t = prod(1 - beta); s = sqrt(abar), sigma = sqrt((1 - abar) / abar).
- VPContinuous: the VP SDE of Song et al. 2021, beta(t) = beta_min + t (beta_max - beta_min), t in [eps_t, 1];
  sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM Table 1).
- VE: the VE SDE of Song et al. 2021, sigma(t) = sigma_min (sigma_max / sigma_min)^t, s = 1.
- SubVP: the sub-VP SDE of Song et al. 2021 (eq. 29): the VP drift with diffusion beta(t) (1 - exp(-2 B(t))),
  B(t) = int_0^t beta = beta_min t + beta_d t^2 / 2. Its marginal (Song et al. 2021, eq. 34) has mean
  exp(-B/2) x0 and variance (1 - exp(-B))^2, so s = exp(-B/2) and sigma(t) = (1 - exp(-B)) / exp(-B/2) = 2 sinh(B/2).
- EDM: sigma(t) = t, s = 1; noise label ln(sigma) / 4 (EDM Table 1).

The Score SDEs in one frame. VE, VP and sub-VP are linear SDEs dx_t = f(t) x_t dt + g(t) dw (`sde(t)` returns
f and g^2 in float64). Their marginals are x_t = s(t) (x0 + sigma(t) n) with s'(t) = f(t) s(t) and
g(t)^2 = s(t)^2 d sigma^2/dt, so the scaled variable x = x_t / s(t) obeys

    dx = sqrt(d sigma(t)^2 / dt) dw,

a pure diffusion with no drift: all three SDEs are the VE SDE run on a different clock sigma(t). Any sampler,
likelihood or denoiser written against the frame (x, sigma) therefore serves every one of them, and a model
trained in continuous time with any of them is a denoiser D(x, sigma) like any other (tested: Euler-Maruyama
simulations of the three forward SDEs in the original variable match s(t) and s(t)^2 sigma(t)^2).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _f64(x) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


@dataclass(frozen=True)
class VPDiscrete:
    """Discrete-time VP (DDPM). Timesteps t = 0 .. T-1; t = 0 is the least noisy."""

    T: int = 1000  # Ho et al. 2020
    schedule: str = "linear"  # "linear" (Ho et al. 2020), "cosine" (Nichol & Dhariwal 2021) or "scaled_linear"
    beta_start: float = 1e-4  # Ho et al. 2020
    beta_end: float = 0.02  # Ho et al. 2020
    cosine_s: float = 0.008  # Nichol & Dhariwal 2021, eq. 17
    max_beta: float = 0.999  # Nichol & Dhariwal 2021: clip betas so the end point stays finite

    def __post_init__(self):
        if self.T < 2:
            raise ValueError(f"VPDiscrete.T must be >= 2, got {self.T}")
        if self.schedule not in ("linear", "cosine", "scaled_linear"):
            raise ValueError(f"VPDiscrete.schedule must be 'linear', 'cosine' or 'scaled_linear', "
                             f"got {self.schedule!r}")

    def betas(self) -> Tensor:
        """(T,) float64."""
        if self.schedule == "linear":
            # Ho et al. scale the end points for T=1000; for other T keep the same end points
            # scaled by 1000/T so that abar_T stays comparable (as improved-diffusion does).
            scale = 1000.0 / self.T
            return torch.linspace(scale * self.beta_start, scale * self.beta_end, self.T, dtype=torch.float64)
        if self.schedule == "scaled_linear":  # sqrt(beta) linear between the end points' roots, scaled as above
            scale = 1000.0 / self.T
            return scale * torch.linspace(self.beta_start**0.5, self.beta_end**0.5, self.T, dtype=torch.float64) ** 2
        t = torch.arange(self.T + 1, dtype=torch.float64) / self.T
        f = torch.cos((t + self.cosine_s) / (1 + self.cosine_s) * math.pi / 2) ** 2
        abar = f / f[0]
        return (1 - abar[1:] / abar[:-1]).clamp(max=self.max_beta)

    def alphas_cumprod(self) -> Tensor:
        return torch.cumprod(1 - self.betas(), dim=0)

    def sigmas(self) -> Tensor:
        """(T,) float64 frame sigmas, ascending in t (a fresh copy; callers may modify it)."""
        return self._sigma_table().clone()

    @functools.cache  # the process is frozen and hashable; the table is read-only inside this class
    def _sigma_table(self) -> Tensor:
        abar = self.alphas_cumprod()
        return ((1 - abar) / abar).sqrt()

    @property
    def sigma_min(self) -> float:
        return float(self._sigma_table()[0])

    @property
    def sigma_max(self) -> float:
        return float(self._sigma_table()[-1])

    def scale(self, sigma: Tensor) -> Tensor:
        return 1 / (1 + sigma.double() ** 2).sqrt()

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        """Fractional timestep for any sigma: linear interpolation of t in log sigma (the inverse of the
        log-linear sigma interpolation k-diffusion and diffusers use); clamped to [0, T-1]."""
        log_table = self._sigma_table().log()
        log_s = sigma.double().clamp(min=1e-30).log().clamp(log_table[0], log_table[-1])
        idx = torch.searchsorted(log_table, log_s).clamp(1, self.T - 1)
        lo, hi = log_table[idx - 1], log_table[idx]
        w = ((log_s - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1).double() + w

    def c_noise(self, sigma: Tensor) -> Tensor:
        """The backbone's noise label: the (fractional) DDPM timestep, as trained."""
        return self.t_of_sigma(sigma)


@dataclass(frozen=True)
class VPContinuous:
    """Continuous-time VP SDE (Song et al. 2021), as in EDM Table 1."""

    beta_min: float = 0.1  # Song et al. 2021
    beta_max: float = 20.0  # Song et al. 2021
    eps_t: float = 1e-5  # Song et al. 2021: smallest training time
    M: int = 1000  # EDM: noise label (M - 1) t

    @property
    def beta_d(self) -> float:
        return self.beta_max - self.beta_min

    def sigma(self, t: Tensor) -> Tensor:
        t = _f64(t)
        return torch.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t).sqrt()

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        s = _f64(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * torch.log1p(s**2)).sqrt() - self.beta_min) / self.beta_d

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(self.eps_t))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(1.0))

    def scale(self, sigma: Tensor) -> Tensor:
        return 1 / (1 + _f64(sigma) ** 2).sqrt()

    def c_noise(self, sigma: Tensor) -> Tensor:
        return (self.M - 1) * self.t_of_sigma(sigma)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + self.beta_d * _f64(t)

    def sde(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(f(t), g(t)^2) of dx_t = f x_t dt + g dw: f = -beta / 2, g^2 = beta (Song et al. 2021, eq. 11)."""
        b = self.beta(t)
        return -0.5 * b, b


@dataclass(frozen=True)
class SubVP:
    """Continuous-time sub-VP SDE (Song et al. 2021, eq. 29): the VP drift, diffusion beta (1 - exp(-2 B(t))).

    B(t) = beta_min t + beta_d t^2 / 2; s(t) = exp(-B / 2); sigma(t) = 2 sinh(B / 2). Its variance
    s^2 sigma^2 = (1 - exp(-B))^2 stays below the VP variance 1 - exp(-B) at every t (hence "sub"). The noise
    label is (M - 1) t, as for VPContinuous."""

    beta_min: float = 0.1  # Song et al. 2021
    beta_max: float = 20.0  # Song et al. 2021
    eps_t: float = 1e-5  # Song et al. 2021: smallest training time
    M: int = 1000  # noise label (M - 1) t, as EDM's VP column

    def __post_init__(self):
        if not (0 <= self.beta_min < self.beta_max):
            raise ValueError(f"sub_vp needs 0 <= beta_min < beta_max, got {self.beta_min}, {self.beta_max}")

    @property
    def beta_d(self) -> float:
        return self.beta_max - self.beta_min

    def integral_beta(self, t: Tensor) -> Tensor:
        """B(t) = int_0^t beta(u) du."""
        t = _f64(t)
        return self.beta_min * t + 0.5 * self.beta_d * t**2

    def sigma(self, t: Tensor) -> Tensor:
        return 2 * torch.sinh(0.5 * self.integral_beta(t))

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        B = 2 * torch.asinh(0.5 * _f64(sigma))
        return ((self.beta_min**2 + 2 * self.beta_d * B).sqrt() - self.beta_min) / self.beta_d

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(self.eps_t))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(1.0))

    def scale(self, sigma: Tensor) -> Tensor:
        """s = exp(-B/2) = 1 / (sigma/2 + sqrt(1 + sigma^2/4)), the inverse of sigma = 2 sinh(B/2)."""
        s = _f64(sigma)
        return 1 / (0.5 * s + (1 + 0.25 * s**2).sqrt())

    def c_noise(self, sigma: Tensor) -> Tensor:
        return (self.M - 1) * self.t_of_sigma(sigma)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + self.beta_d * _f64(t)

    def sde(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(f(t), g(t)^2): f = -beta / 2, g^2 = beta (1 - exp(-2 B(t))) (Song et al. 2021, eq. 29)."""
        b = self.beta(t)
        return -0.5 * b, b * -torch.expm1(-2 * self.integral_beta(t))


@dataclass(frozen=True)
class VE:
    """Variance-exploding SDE (Song et al. 2021): s = 1, geometric sigma(t)."""

    sigma_min: float = 0.02  # Song et al. 2021 (CIFAR-10)
    sigma_max: float = 100.0  # Song et al. 2021 (CIFAR-10)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** _f64(t)

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        return torch.log(_f64(sigma) / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def scale(self, sigma: Tensor) -> Tensor:
        return torch.ones_like(_f64(sigma))

    def c_noise(self, sigma: Tensor) -> Tensor:
        return torch.log(0.5 * _f64(sigma))  # EDM Table 1 (VE column)

    def sde(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(f(t), g(t)^2): f = 0, g^2 = d sigma^2 / dt = 2 sigma(t)^2 ln(sigma_max / sigma_min) (Song et al. 2021,
        eq. 9 with this geometric sigma(t)). Started at t = 0, the marginal variance is sigma(t)^2 - sigma_min^2."""
        sig = self.sigma(t)
        return torch.zeros_like(sig), 2 * sig**2 * math.log(self.sigma_max / self.sigma_min)


@dataclass(frozen=True)
class EDM:
    """EDM (Karras et al. 2022): sigma(t) = t, s = 1."""

    sigma_min: float = 0.002  # Karras et al. 2022
    sigma_max: float = 80.0  # Karras et al. 2022

    def sigma(self, t: Tensor) -> Tensor:
        return _f64(t)

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        return _f64(sigma)

    def scale(self, sigma: Tensor) -> Tensor:
        return torch.ones_like(_f64(sigma))

    def c_noise(self, sigma: Tensor) -> Tensor:
        return 0.25 * torch.log(_f64(sigma))  # EDM Table 1


NoiseProcess = VPDiscrete | VPContinuous | SubVP | VE | EDM

#: the continuous-time Score SDEs (Song et al. 2021) that train with t uniform on [t_min, 1] (objective "uniform_t")
SCORE_SDES = (VPContinuous, SubVP, VE)

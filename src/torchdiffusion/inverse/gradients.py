"""Likelihood-gradient corrections as Denoiser -> Denoiser wrappers: DPS, MCG's gradient, reconstruction guidance.

Notation: x = x0 + sigma * n; D = D(x, sigma); y = A x0 + sigma_y e; r = y - A D; m = the number of entries of y.
Every wrapper returns

    D_y(x, sigma) = D - c(sigma) * grad_x (1/2) ||y - A D(x, sigma)||^2        (gradient through the denoiser)

which is Tweedie's formula for the posterior, E[x0 | x, y] = x + sigma^2 grad log p(x | y) = D + sigma^2 grad_x
log p(y | x), when p(y | x) = N(y; A D, (sigma^2 / c) I). Any sampler of this project then walks towards the
posterior instead of the prior, so these corrections compose with every sampler and with the projections of
measurement.py. Choices of c:

- likelihood (DPS, Chung et al. 2023, "Diffusion posterior sampling for general noisy inverse problems",
  eq. 11-12: p(y | x_t) ~ p(y | x0_hat)): c = zeta * sigma^2 / r^2(sigma) with
      r^2(sigma) = sigma_y^2 + lambda * gamma^2 sigma^2 / (sigma^2 + gamma^2).
  gamma = 0 is DPS's own likelihood (variance sigma_y^2 only; needs sigma_y > 0 and is very stiff at large
  sigma, which is why Chung et al. normalise their step). gamma > 0 adds A Cov[x0 | x] A^T for data of
  per-entry variance gamma^2 (Cov = gamma^2 sigma^2 / (sigma^2 + gamma^2) I, the Pi-GDM variance of Song et al.
  2023, "Pseudoinverse-guided diffusion models", with lambda from A A^T = lambda I): for Gaussian data
  N(mu, gamma^2 I) and such an A this makes D_y the exact posterior denoiser (tested), and at large sigma
  c -> zeta / lambda stays bounded.
- constant (reconstruction guidance, Ho et al. 2022, "Video diffusion models", eq. 7:
  x~ = x^ - (w_r alpha_t / 2) grad_{z_t} ||x^a - x^a_hat||^2; with z_t = alpha_t x in this frame,
  alpha_t grad_{z_t} = grad_x): c = w_r.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.precond import denoise_with_variance, provides_variance
from ..protocols import Cond, Denoiser
from .measurement import Measurement
from .operators import OperatorError


def _col(v: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) for broadcasting against x by rank."""
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


class MeasurementGradient:
    """D_y = D - c(sigma) grad_x (1/2) ||y - A D(x, sigma)||^2 (module notes). `weight(sigma) -> c` takes the
    (B,) float64 sigmas. One denoiser call plus one backward pass per evaluation."""

    def __init__(self, denoiser: Denoiser, measurement: Measurement, weight):
        self.denoiser = denoiser
        self.measurement = measurement
        self.weight = weight

    @property
    def learned_variance(self) -> bool:
        return provides_variance(self.denoiser)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None, *, return_variance: bool = False):
        """The corrected estimate; with return_variance=True also the inner model's learned variance v, which the
        correction of the mean leaves as it is."""
        v = None
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            if return_variance:
                d, v = denoise_with_variance(self.denoiser, xg, sigma, cond)
            else:
                d = self.denoiser(xg, sigma, cond)
            loss = 0.5 * self.measurement.residual(d).pow(2).sum()
            (g,) = torch.autograd.grad(loss, xg)
        c = self.weight(torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0]))
        d_y = (d - _col(c.to(device=x.device, dtype=d.dtype), d) * g.to(d.dtype)).detach()
        return (d_y, v.detach()) if return_variance else d_y


def likelihood_variance(sigma: Tensor, noise_std: float, prior_std: float, gram: float) -> Tensor:
    """r^2(sigma) = sigma_y^2 + lambda gamma^2 sigma^2 / (sigma^2 + gamma^2), float64 (B,)."""
    s2 = sigma.double() ** 2
    cov = (prior_std ** 2) * s2 / (s2 + prior_std ** 2) if prior_std > 0 else torch.zeros_like(s2)
    return noise_std ** 2 + gram * cov


def dps(denoiser: Denoiser, measurement: Measurement, scale: float = 1.0, prior_std: float = 0.5) -> MeasurementGradient:
    """Diffusion posterior sampling (Chung et al. 2023) in this frame: c = scale * sigma^2 / r^2(sigma).

    prior_std: gamma, the per-entry data std of the covariance term (0 = DPS's own likelihood; the default
    0.5 is the sigma_data of EDM-preconditioned image models in [-1, 1]). Operators without A A^T = lambda I
    (blur, bicubic) use lambda = 1, an upper bound of their spectrum."""
    if not (math.isfinite(scale) and scale >= 0):
        raise OperatorError(f"the DPS scale must be a finite number >= 0, got {scale!r}")
    if not (math.isfinite(prior_std) and prior_std >= 0):
        raise OperatorError(f"the DPS prior_std must be a finite number >= 0, got {prior_std!r}")
    if prior_std == 0 and measurement.noise_std == 0:
        raise OperatorError("DPS with prior_std 0 needs a noisy measurement (noise_std > 0): its likelihood "
                            "variance is noise_std^2; give noise_std > 0 or prior_std > 0")
    gram = measurement.op.gram if measurement.op.gram is not None else 1.0

    def weight(sigma: Tensor) -> Tensor:
        return scale * sigma ** 2 / likelihood_variance(sigma, measurement.noise_std, prior_std, gram)

    return MeasurementGradient(denoiser, measurement, weight)


def reconstruction_guidance(denoiser: Denoiser, measurement: Measurement, weight: float = 1.0) -> MeasurementGradient:
    """Reconstruction guidance of Ho et al. 2022 (eq. 7): c = w_r, constant in sigma. Used with the
    replacement projection (methods.restore_reconstruction)."""
    if not (math.isfinite(weight) and weight >= 0):
        raise OperatorError(f"the reconstruction-guidance weight w_r must be a finite number >= 0, got {weight!r}")
    return MeasurementGradient(denoiser, measurement, lambda sigma: torch.full_like(sigma, float(weight)))

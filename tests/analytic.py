"""Data distributions with an exact denoiser, for testing samplers without a network.

Notation: x = x0 + sigma * n, n ~ N(0, I); D(x, sigma) = E[x0 | x]. x: (B, d); sigma: (B,) or a float.

- GaussianData N(mu, diag(v)): D(x, s) = mu + v / (v + s^2) (x - mu). The probability-flow ODE
  dx/ds = (x - D) / s is linear per coordinate with solution x(s') = mu + sqrt((v + s'^2) / (v + s^2)) (x(s) - mu).
- GaussianMixture sum_k w_k N(m_k, diag(v_k)): x | k ~ N(m_k, diag(v_k + s^2)); with responsibilities
  r_k(x) = P(k | x) (a softmax of log w_k + log N(x; m_k, v_k + s^2), computed with logsumexp),
  D(x, s) = sum_k r_k (m_k + v_k / (v_k + s^2) (x - m_k)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _sigma_col(sigma, x: Tensor) -> Tensor:
    """sigma (float, 0-d or (B,)) -> (B, 1) in x's dtype."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return s.reshape(-1, 1) if s.ndim else s.expand(x.shape[0]).reshape(-1, 1)


@dataclass
class GaussianData:
    mu: Tensor  # (d,)
    v: Tensor  # (d,) variances

    def denoise(self, x: Tensor, sigma, cond=None) -> Tensor:
        s2 = _sigma_col(sigma, x) ** 2
        mu, v = self.mu.to(x.dtype), self.v.to(x.dtype)
        return mu + v / (v + s2) * (x - mu)

    __call__ = denoise

    def flow(self, x: Tensor, s_from: float, s_to: float) -> Tensor:
        """Exact probability-flow ODE map from sigma s_from to s_to."""
        mu, v = self.mu.to(x.dtype), self.v.to(x.dtype)
        return mu + torch.sqrt((v + s_to**2) / (v + s_from**2)) * (x - mu)

    def sample(self, n: int, generator=None, dtype=torch.float64) -> Tensor:
        z = torch.randn(n, self.mu.numel(), generator=generator, dtype=dtype)
        return self.mu.to(dtype) + self.v.to(dtype).sqrt() * z


@dataclass
class GaussianMixture:
    means: Tensor  # (K, d)
    variances: Tensor  # (K, d) diagonal variances
    weights: Tensor  # (K,) positive, summing to 1

    def denoise(self, x: Tensor, sigma, cond=None) -> Tensor:
        s2 = _sigma_col(sigma, x)[:, None, :] ** 2  # (B, 1, 1)
        m, v = self.means.to(x.dtype)[None], self.variances.to(x.dtype)[None]  # (1, K, d)
        var = v + s2  # (B, K, d)
        diff = x[:, None, :] - m  # (B, K, d)
        log_n = -0.5 * ((diff**2 / var) + torch.log(2 * math.pi * var)).sum(-1)  # (B, K)
        log_r = torch.log(self.weights.to(x.dtype)) + log_n
        r = torch.softmax(log_r, dim=1)  # responsibilities, logsumexp-stable
        x0_k = m + v / var * diff  # (B, K, d)
        return (r[..., None] * x0_k).sum(1)

    __call__ = denoise

    def sample(self, n: int, generator=None, dtype=torch.float64) -> Tensor:
        k = torch.multinomial(self.weights.double(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=dtype)
        return self.means.to(dtype)[k] + self.variances.to(dtype)[k].sqrt() * z


def gaussian_3d() -> GaussianData:
    """A small anisotropic Gaussian: variances from 0.04 to 4 (stiffness ratio 100)."""
    return GaussianData(mu=torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64),
                        v=torch.tensor([0.04, 1.0, 4.0], dtype=torch.float64))


def mixture_2d() -> GaussianMixture:
    """Four unequal modes in 2-d with diagonal covariances."""
    return GaussianMixture(
        means=torch.tensor([[-2.0, -1.0], [2.0, -1.0], [0.0, 2.0], [1.5, 1.5]], dtype=torch.float64),
        variances=torch.tensor([[0.3, 0.1], [0.1, 0.3], [0.2, 0.2], [0.05, 0.15]], dtype=torch.float64),
        weights=torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64),
    )

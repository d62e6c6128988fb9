"""A measurement y = A x0 + sigma_y e of an unknown x0, and the two ways methods use it.

Notation: x = x0 + sigma * n (the one frame); D(x, sigma) ~ E[x0 | x]; A linear (operators.py); sigma_y the
measurement noise std. Two corrections serve every method in this package:

- projection at a noise level s (Song et al. 2021, "Score-based generative modeling through SDEs", app. I.2;
  Chung et al. 2022, "Come-closer-diffuse-faster"): replace the measured part of x by a noised copy of y,
      x <- x + A^+ (y_s - A x),   y_s = y + s A n,  n ~ N(0, I),
  so that A x has the distribution A x0 + s A n of the forward process. For inpainting this is "replace the
  known pixels by y plus noise"; for an average-pool down-sampler it replaces the block means (ILVR's
  low-pass refinement, Choi et al. 2021, eq. 7, with phi = A^+ A).
- the likelihood gradient: with p(y | x) ~ N(y; A D(x, sigma), r^2 I), Tweedie's formula applied to the
  posterior gives the posterior denoiser
      D_y(x, sigma) = D(x, sigma) + sigma^2 grad_x log p(y | x) = D - c grad_x (1/2) ||y - A D(x, sigma)||^2
  with c = sigma^2 / r^2 (gradients.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..protocols import Generators
from ..sampling.noise import randn_like
from .operators import Operator, OperatorError


@dataclass
class Measurement:
    """y (B, *S_y) = A x0 (+ noise of std `noise_std`) for images x0 (B, *S); `shape` is x0's shape (B, *S)."""

    op: Operator
    y: Tensor
    shape: tuple[int, ...]
    noise_std: float = 0.0

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        self.op.check_measurement(self.y, self.shape)
        if not (self.noise_std >= 0):
            raise OperatorError(f"noise_std must be >= 0, got {self.noise_std}")

    def check(self, x: Tensor) -> None:
        if tuple(x.shape) != self.shape:
            raise OperatorError(f"the sampler's images of shape {tuple(x.shape)} do not match the measured images "
                                f"of shape {self.shape}")

    def residual(self, x0: Tensor) -> Tensor:
        """y - A x0, (B, *S_y)."""
        return self.y.to(x0.dtype) - self.op(x0)

    def error(self, x0: Tensor) -> Tensor:
        """Per-sample RMS measurement error ||y - A x0|| / sqrt(m), (B,); compare with noise_std."""
        r = self.residual(x0).flatten(1)
        return r.pow(2).mean(1).sqrt()

    def noised(self, s: float, like: Tensor, generator: Generators) -> Tensor:
        """y_s = y + s A n with n ~ N(0, I) of x's shape (the measurement of the forward process at level s)."""
        y = self.y.to(like.dtype)
        return y if s == 0 else y + s * self.op(randn_like(like, generator))

    def project(self, x: Tensor, s: float, generator: Generators) -> Tensor:
        """x <- x + A^+ (y_s - A x): x's measured part replaced by the measurement noised to level s."""
        return x + self.op.pinv(self.noised(s, x, generator) - self.op(x))

    def pinv_estimate(self) -> Tensor:
        """A^+ y: the minimum-norm image consistent with y (CCDF's default starting estimate)."""
        return self.op.pinv(self.y)

"""A pixel-space operator seen from a latent space: A(decode(z)), for posterior sampling of latent diffusion models.

Notation: z the diffusion model's latent, D the codec's decoder (images in [-1, 1]), A a linear operator of
operators.py, y = A x0 + sigma_y e measured in pixel space. The composite A o D is not linear: it has no adjoint
and no pseudo-inverse, so projection methods (replacement, ILVR, CCDF, MCG, RePaint, reconstruction guidance)
cannot use it; the likelihood gradient of DPS (gradients.dps) needs only the forward map and autograd:
    grad_z (1/2) ||y - A D(D_theta(z, sigma))||^2,
the latent DPS of Chung et al. 2023 run through the decoder (as in Rout et al. 2023, "Solving linear inverse
problems provably via posterior sampling with latent diffusion models", their basic "latent DPS" baseline).
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from .operators import Operator, OperatorError


class DecodedOperator(Operator):
    """A o decode on latents z (B, C', h, w) -> A's measurement of the decoded images. gram: None (A o D has no
    A A^T = lambda I; DPS then uses lambda = 1)."""

    exact_pinv = False
    gram = None

    def __init__(self, op: Operator, decode: Callable[[Tensor], Tensor]):
        self.op, self.decode = op, decode
        self.name = f"{op.name} o decoder"

    def _forward(self, z: Tensor) -> Tensor:
        return self.op(self.decode(z))

    def _adjoint(self, y: Tensor) -> Tensor:
        raise OperatorError(f"{self.name} is not linear (the codec's decoder): it has no adjoint; use method dps")

    def _pinv(self, y: Tensor) -> Tensor:
        raise OperatorError(f"{self.name} is not linear (the codec's decoder): it has no pseudo-inverse; "
                            f"use method dps")

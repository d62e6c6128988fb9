"""DDIM inversion: deterministic encoding of a data point to noise along the probability-flow ODE, and back.

Notation: x = x0 + sigma * n, eps(x, s) = (x - D(x, s)) / s, the ODE slope dx/dsigma. Deterministic DDIM is
Euler's method on this ODE in this frame (sampling/ancestral.py), so DDIM inversion (Song et al. 2021a,
sec. 4.3 and eq. 13; Dhariwal & Nichol 2021, App. F) is Euler's method run the other way, up the same grid:

    x_{k+1} = x_k + (s_{k+1} - s_k) eps(x_k, s_k),        s_0 = 0 < s_1 < ... < s_n = sigma_max.

At s_0 = 0 the slope is undefined; the first step uses eps(x0, s_1), the model's noise estimate for x0 seen
at the first positive level (the convention of DDIM-inversion code that evaluates the model at the next,
noisier timestep). `order=2` adds Heun's trapezoidal correction on every step after the first (one more
call per step), so the round-trip error falls as O(1/n^2) instead of O(1/n).

`ddim_invert(denoiser, x0, sigmas)` takes the sampling grid (descending, ending in 0) and returns standard
noise z with x(sigma_max) = sigma_max * z, so that `sample_ddim(denoiser, z, sigmas)` (or `sample_heun` for
order 2) decodes it. Both directions are deterministic; with the exact denoiser the round trip
x0 -> z -> x0' has an error that vanishes as the grid is refined (tested).
NFE: n (order 1), 2n - 1 (order 2).
"""
from __future__ import annotations

from torch import Tensor

from torchdiffusion.protocols import Callback, Cond, Denoiser
from torchdiffusion.sampling.steps import SamplerError, Step, bind, check_noise, check_sigmas, run


def ddim_invert(denoiser: Denoiser, x0: Tensor, sigmas: Tensor, *, cond: Cond = None, callback: Callback = None,
                order: int = 1) -> Tensor:
    """Encode x0 (B, ...) to standard noise z along `sigmas` walked upwards (see module notes); returns z with
    sigmas[0] * z the encoded state at sigma_max. order: 1 (DDIM / Euler) or 2 (Heun). Runs on the walk's loop
    (steps.run) over the reversed grid."""
    if order not in (1, 2) or isinstance(order, bool):
        raise SamplerError(f"DDIM inversion order must be 1 (Euler, DDIM) or 2 (Heun), got {order!r}")
    check_noise(x0)
    sig = check_sigmas(sigmas)
    if sig[-1] != 0:
        raise SamplerError("DDIM inversion needs a sampling grid that ends in 0 (it starts from the data)")
    up = sig[::-1]  # 0, s_1, ..., sigma_max
    x = run(bind(denoiser, cond), x0, up, _UpStep(order, up), None, callback)
    return x / up[-1]


class _UpStep(Step):
    """One step up the grid: D at s (at s_1 for the first step, where s = 0 has no slope), eps = (x - D) / s,
    x' = x + (s' - s) eps, with Heun's trapezoidal correction for order 2 (after the first step)."""

    def __init__(self, order: int, up: list[float]):
        self.order, self.up = order, up

    def evaluate(self, denoise, x, s, i):
        return x, s, denoise(x, self.up[i + 1] if s == 0 else s)

    def update(self, x, d, s, s_next, denoise, i):
        eps = (x - d) / (s_next if s == 0 else s)
        x_next = x + (s_next - s) * eps
        if self.order == 2 and s > 0:
            eps_next = (x_next - denoise(x_next, s_next)) / s_next
            x_next = x + (s_next - s) * 0.5 * (eps + eps_next)
        return x_next

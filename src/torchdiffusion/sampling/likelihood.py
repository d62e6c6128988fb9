"""Exact likelihood through the probability-flow ODE (Chen et al. 2018; Song et al. 2021, sec. 4.3 and App. D.2).

Notation: x = x0 + sigma * n; D(x, sigma) ~ E[x0 | x]; u = ln sigma; x has D_x = C*H*W elements per row. Along the
probability-flow ODE dx/du = x - D(x, e^u) =: g(x, u) (sampling.adaptive) the log-density of the noisy marginal
p_sigma changes by the instantaneous change of variables (Chen et al. 2018, Thm. 1):

    d log p_sigma(x(u)) / du = -div_x g = -(D_x - tr dD/dx),

so, integrating x and the divergence together from u_min = ln sigma_min up to u_max = ln sigma_max,

    log p_{sigma_min}(x) = log pi(x(u_max)) + int_{u_min}^{u_max} (D_x - tr dD/dx(x(u), e^u)) du,

with the prior pi = N(0, sigma_max^2 I) (the frame's marginal at sigma_max when sigma_max^2 dwarfs the data's
variance). The state (x, running integral) is solved with `sampling.adaptive.integrate` (one step size per row).

Divergence: "exact" takes tr dD/dx with one backward pass per dimension (fine for small D_x, e.g. 2-D or 64-D test
data); "hutchinson" uses E[e^T (dD/dx) e] = tr dD/dx with K probes e per row drawn once per row and kept fixed for
the whole solve (Hutchinson 1989; Grathwohl et al. 2019, FFJORD), Gaussian or Rademacher. The estimate of
log p is then unbiased per row; its spread over probes shows up in the standard error over images.

8-bit data (dequantisation; Theis et al. 2016, Ho et al. 2019). Images rest as u8 in {0..255} and the model sees
x = u8 / 127.5 - 1. We evaluate the density at x = (u8 + w - 1/2) / 127.5 - 1 with w ~ U[0, 1) per element, i.e.
y = u8 + w - 1/2 in a unit bin centred on the value the model was trained on. In the [0, 256) scaling of y
(equivalently [0, 1) scaling of y / 256 with D_x ln 256 added), the density is p_y = p_x / 127.5^{D_x}, and

    bits/dim = -log p_y(y) / (D_x ln 2) = (-log p_x(x) + D_x ln 127.5) / (D_x ln 2),

an upper bound (in expectation over w) on the discrete model's -log2 P(u8) / D_x. This is the number papers report
for CIFAR-10 / MNIST (Song et al. 2021, Table 2, whose [0, 1] scaling gives the same value). The density is taken
at sigma_min > 0, as Song et al. do (their eps = 1e-5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from torchdiffusion.protocols import Cond, Denoiser, Generators
from torchdiffusion.sampling.adaptive import select_cond, check_tolerances, integrate
from torchdiffusion.sampling.noise import check_generators, randn
from torchdiffusion.sampling.steps import SamplerError

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("gaussian", "rademacher")
#: model range x = u8 / U8_SCALE - 1 (data.convert.to_model_range)
U8_SCALE = 127.5


@dataclass
class OdeLikelihood:
    """Per-row results of `ode_log_likelihood` (float64 (B,) unless noted)."""

    log_p: Tensor  # log p_{sigma_min}(x), nats, in the model frame
    prior_log_p: Tensor  # log pi(x(u_max))
    delta: Tensor  # int (D_x - div) du
    nfe: Tensor  # int64 (B,): ODE right-hand-side evaluations per row (each: one forward + backward passes)
    dims: int  # D_x


def draw_probes(shape: tuple[int, ...], k: int, kind: str, generator: Generators,
                device: torch.device | None = None) -> Tensor:
    """(B, K, D_x) float64 probes with E[e e^T] = I: standard normal or Rademacher (+-1), row b from generator[b]."""
    if kind not in PROBES:
        raise SamplerError(f"unknown Hutchinson probe {kind!r}; valid: {', '.join(PROBES)}")
    B, dims = shape[0], math.prod(shape[1:])
    e = randn((B, k, dims), generator, dtype=torch.float64)
    if kind == "rademacher":
        e = torch.where(e >= 0, 1.0, -1.0).to(torch.float64)
    return e.to(device)


def _divergence(d: Tensor, x: Tensor, kind: str, probes: Optional[Tensor]) -> Tensor:
    """tr dD/dx per row. d: (A, ...) output of a graph from x: (A, D_x) with requires_grad. -> (A,) float64."""
    flat = d.reshape(d.shape[0], -1)
    if kind == "exact":
        tr = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for i in range(flat.shape[1]):
            # rows are independent, so the gradient of the column sum is each row's own row of the Jacobian
            (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
            tr = tr + g[:, i].double()
        return tr
    k = probes.shape[1]
    tr = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for j in range(k):
        e = probes[:, j]
        (g,) = torch.autograd.grad(flat, x, grad_outputs=e.to(flat.dtype), retain_graph=j < k - 1)
        tr = tr + (g.double() * e).sum(1)
    return tr / k


def ode_log_likelihood(denoiser: Denoiser, x: Tensor, *, sigma_min: float, sigma_max: float, cond: Cond = None,
                       divergence: str = "hutchinson", probes: int = 1, probe: str = "gaussian",
                       generator: Generators = None, rtol: float = 1e-5, atol: float = 1e-5,
                       method: str = "dopri5") -> OdeLikelihood:
    """log p_{sigma_min}(x) of each row of x (B, ...) under the model's probability-flow ODE (module notes).

    divergence: "exact" (D_x backward passes per evaluation) or "hutchinson" (`probes` backward passes, probes of
    kind `probe` drawn once per row from `generator`, a list of B generators for batch-independent results).
    rtol/atol: tolerances of the adaptive solver on (x, integral). The state is float64; the denoiser may compute
    in float32."""
    if divergence not in DIVERGENCES:
        raise SamplerError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    if not (0 < sigma_min < sigma_max and math.isfinite(sigma_max)):
        raise SamplerError(f"need 0 < sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}")
    if divergence == "hutchinson" and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 1):
        raise SamplerError(f"the number of Hutchinson probes must be an integer >= 1, got {probes!r}")
    check_tolerances(rtol, atol, method)
    if not isinstance(x, Tensor) or x.ndim < 2 or not x.is_floating_point():
        raise SamplerError("x must be a float tensor of shape (B, ...) in the model's range")
    check_generators(generator, x.shape[0])
    shape = x.shape
    B, dims = shape[0], math.prod(shape[1:])
    e = draw_probes(shape, probes, probe, generator, x.device) if divergence == "hutchinson" else None

    def f(u: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        with torch.enable_grad():
            xa = y[:, :dims].detach().requires_grad_(True)
            d = denoiser(xa.reshape((xa.shape[0],) + shape[1:]), u.exp().to(x.dtype), select_cond(cond, rows))
            tr = _divergence(d, xa, divergence, None if e is None else e[rows])
        dx = xa.detach() - d.detach().reshape(xa.shape[0], -1).to(y.dtype)
        return torch.cat([dx, (dims - tr).to(y.dtype)[:, None]], dim=1)

    y0 = torch.cat([x.reshape(B, -1).double(), x.new_zeros((B, 1), dtype=torch.float64)], dim=1)
    y, info = integrate(f, y0, math.log(sigma_min), math.log(sigma_max), rtol=rtol, atol=atol, method=method)
    z, delta = y[:, :dims], y[:, dims]
    prior = -0.5 * (z.pow(2).sum(1) / sigma_max**2 + dims * math.log(2 * math.pi * sigma_max**2))
    return OdeLikelihood(prior + delta, prior, delta, info.nfe, dims)


def dequantize(x_u8: Tensor, generator: Generators = None) -> Tensor:
    """uint8 (B, C, H, W) -> float64 model-range x = (u8 + w - 1/2) / 127.5 - 1, w ~ U[0, 1) per element from
    `generator` (row b from generator[b] when it is a list)."""
    if x_u8.dtype != torch.uint8:
        raise SamplerError(f"dequantize expects uint8 images, got {x_u8.dtype}")
    check_generators(generator, x_u8.shape[0])
    if isinstance(generator, (list, tuple)):
        w = torch.cat([torch.rand((1, *x_u8.shape[1:]), generator=g, dtype=torch.float64) for g in generator])
    else:
        w = torch.rand(x_u8.shape, generator=generator, dtype=torch.float64)
    return (x_u8.double() + w.to(x_u8.device) - 0.5) / U8_SCALE - 1.0


def bits_per_dim(log_p: Tensor, dims: int, scale: float = U8_SCALE) -> Tensor:
    """Model-frame log-densities (nats) of dequantised 8-bit data -> bits/dim in the [0, 256) scaling:
    (-log p_x + D_x ln scale) / (D_x ln 2), scale = 127.5 for x = u8 / 127.5 - 1 (module notes)."""
    return (-log_p.double() + dims * math.log(scale)) / (dims * math.log(2.0))


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n), 0 for one value) of a 1-D tensor."""
    v = values.double().reshape(-1)
    if v.numel() == 0:
        raise SamplerError("no values to average")
    se = float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else 0.0
    return float(v.mean()), se

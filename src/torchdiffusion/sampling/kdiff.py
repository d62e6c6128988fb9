"""The k-diffusion sampler family as pure functions on the denoiser contract.

Notation (sampling.steps): x = x0 + sigma n; s = sigmas[i] > s' = sigmas[i + 1]; D = D(x, s) ~ E[x0 | x];
d = (x - D) / s = dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 3); lambda = -log sigma
(the log-SNR / 2 of this frame) and h = lambda' - lambda = log(s / s') > 0. Step coefficients are Python
floats (float64) from the float64 grid. Every sampler has the signature

    sample_NAME(denoiser, noise, sigmas, *, cond=None, generator=None, callback=None, **options) -> x

and starts at x = noise * sigmas[0]. NFE for an n-step grid ending in 0 (the last step to sigma = 0 is always
one evaluation, x' = D):

| sampler            | NFE    | order (deterministic part)  | reference                                   |
|--------------------|--------|-----------------------------|---------------------------------------------|
| euler_ancestral    | n      | 1                           | Song et al. 2021a (DDIM eta); Ho et al. 2020 |
| dpm2               | 2n - 1 | 2                           | Lu et al. 2022a (DPM-Solver-2) + EDM churn  |
| dpm2_ancestral     | 2n - 1 | 2 (eta = 0)                 | k-diffusion's ancestral DPM-2               |
| lms                | n      | `order` (default 4)         | Adams-Bashforth on the sigma grid           |
| dpmpp_2s_ancestral | 2n - 1 | 2 (eta = 0)                 | Lu et al. 2022b (DPM-Solver++(2S))          |
| dpmpp_2m           | n      | 2                           | Lu et al. 2022b (DPM-Solver++(2M))          |
| dpmpp_2m_sde       | n      | 2 (eta = 0)                 | Lu et al. 2022b, sec. 5 (SDE-DPM-Solver++)  |
| dpmpp_3m_sde       | n      | 2 (3 with exact_third_order)| multistep DPM-Solver++ (3M)                 |
| edm                | 2n - 1 | 2 (S_churn = 0: heun)       | Karras et al. 2022, Alg. 2                  |

Noise: stochastic samplers draw z through a noise source `noise(sigma, sigma_next)` (sampling.brownian):
"gaussian" (fresh per-row draws from `generator`) or "brownian" (a per-row Brownian tree seeded from
`generator`). A caller may pass its own `noise_sampler` callable instead (e.g. to share noise with another
implementation). With a list of B generators every row depends on its own seed only.

Ancestral steps (k-diffusion's `get_ancestral_step`, the DDIM eta step in this frame): from s to s' go down
deterministically to s_down = sqrt(s'^2 - s_up^2), then add s_up z, with
    s_up = min(s', eta sqrt(s'^2 (s^2 - s'^2) / s^2)).
eta = 1 gives DDPM's posterior variance; eta = 0 is deterministic.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from torchdiffusion.protocols import Callback, Cond, Denoiser, Generators
from torchdiffusion.sampling.brownian import NOISE_KINDS, NoiseSampler, make_noise
from torchdiffusion.sampling.noise import randn_like
from torchdiffusion.sampling.steps import SamplerError, bind, report, start

SOLVER_TYPES = ("midpoint", "heun")


# --------------------------------------------------------------------------------------------- helpers
def check_nonneg(name: str, value, sampler: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (math.isfinite(v) and v >= 0):
        raise SamplerError(f"{sampler}: {name} must be a finite number >= 0, got {value!r}")
    return v


def _noise_source(name: str, eta: float, kind: str, noise_sampler: Optional[NoiseSampler], x: Tensor,
                  sig: list[float], generator: Generators) -> Optional[NoiseSampler]:
    """The sampler's noise source, or None when eta = 0 (deterministic: nothing is drawn)."""
    if kind not in NOISE_KINDS:
        raise SamplerError(f"{name}: unknown noise_kind {kind!r}; valid: {', '.join(NOISE_KINDS)}")
    if eta == 0:
        return None
    if noise_sampler is not None:
        if not callable(noise_sampler):
            raise SamplerError("noise_sampler must be a callable noise(sigma, sigma_next) -> standard normal tensor")
        return noise_sampler
    positive = [s for s in sig if s > 0]
    return make_noise(kind, x, min(positive), max(positive), generator)


def ancestral_step(s: float, s_next: float, eta: float) -> tuple[float, float]:
    """(s_down, s_up) of an ancestral step from s to s' (see the module notes); (s', 0) when eta = 0."""
    if eta == 0:
        return s_next, 0.0
    s_up = min(s_next, eta * math.sqrt(max(s_next * s_next * (s * s - s_next * s_next) / (s * s), 0.0)))
    return math.sqrt(max(s_next * s_next - s_up * s_up, 0.0)), s_up


def _churn(x: Tensor, s: float, gamma: float, s_noise: float, draw: bool, generator: Generators) -> tuple[Tensor, float]:
    """EDM's stochastic churn (Karras et al. 2022, Alg. 2, lines 4-6): raise the noise level from s to
    s_hat = (1 + gamma) s by adding fresh noise of variance s_hat^2 - s^2. `draw`: draw z (EDM's reference code
    draws it every step of a stochastic run, also where gamma = 0, which keeps the noise stream aligned)."""
    s_hat = s * (1.0 + gamma)
    if draw:
        z = randn_like(x, generator)
        if gamma > 0:
            x = x + z * (s_noise * math.sqrt(s_hat * s_hat - s * s))
    return x, s_hat


def _churn_gamma(S_churn: float, S_tmin: float, S_tmax: float, n: int, s: float) -> float:
    """gamma_i = min(S_churn / N, sqrt(2) - 1) for s in [S_tmin, S_tmax], else 0 (EDM Alg. 2, line 3)."""
    return min(S_churn / n, math.sqrt(2.0) - 1.0) if S_tmin <= s <= S_tmax else 0.0


def _churn_options(name: str, S_churn, S_tmin, S_tmax, S_noise) -> tuple[float, float, float, float]:
    S_churn = check_nonneg("S_churn", S_churn, name)
    S_noise = check_nonneg("S_noise", S_noise, name)
    try:
        S_tmin, S_tmax = float(S_tmin), float(S_tmax)
    except (TypeError, ValueError):
        raise SamplerError(f"{name}: S_tmin and S_tmax must be numbers, got {S_tmin!r}, {S_tmax!r}") from None
    if math.isnan(S_tmin) or math.isnan(S_tmax) or S_tmin > S_tmax or S_tmin < 0:
        raise SamplerError(f"{name}: need 0 <= S_tmin <= S_tmax (S_tmax may be inf), got {S_tmin}, {S_tmax}")
    return S_churn, S_tmin, S_tmax, S_noise


# --------------------------------------------------------------------------------------------- samplers
def sample_euler_ancestral(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                           generator: Generators = None, callback: Callback = None, eta: float = 1.0,
                           s_noise: float = 1.0, noise_kind: str = "gaussian",
                           noise_sampler: Optional[NoiseSampler] = None) -> Tensor:
    """Ancestral Euler: an Euler step to s_down, then s_noise * s_up * z (no noise on the step to 0).
    For eta <= 1 and s_noise = 1 this is DDIM(eta) (Song et al. 2021a) in this frame; eta = 1 is ancestral
    DDPM with the posterior variance. eta > 1 is allowed (s_up is capped at s'). NFE = n."""
    eta, s_noise = check_nonneg("eta", eta, "euler_ancestral"), check_nonneg("s_noise", s_noise, "euler_ancestral")
    sig, x = start(noise, sigmas, generator)
    denoise = bind(denoiser, cond)
    z = _noise_source("euler_ancestral", eta, noise_kind, noise_sampler, x, sig, generator)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoise(x, s)
        report(callback, i, x, s, s_next, denoised)
        s_down, s_up = ancestral_step(s, s_next, eta)
        x = x + (x - denoised) * ((s_down - s) / s)
        if s_next > 0 and z is not None:
            x = x + z(s, s_next) * (s_noise * s_up)
    return x


def sample_dpm2(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                generator: Generators = None, callback: Callback = None, S_churn: float = 0.0,
                S_tmin: float = 0.0, S_tmax: float = math.inf, S_noise: float = 1.0) -> Tensor:
    """DPM-Solver-2 in sigma (Lu et al. 2022a, Alg. 1 with r1 = 1/2, written as k-diffusion's "DPM2"): an Euler
    step to the geometric midpoint s_mid = sqrt(s_hat s'), then the full step with the slope there:
        x_mid = x + (s_mid - s_hat) d,   x' = x + (s' - s_hat) d(x_mid, s_mid).
    With S_churn > 0, EDM's churn (Alg. 2) first raises s to s_hat. The step to 0 is Euler (x' = D).
    NFE = 2n - 1."""
    S_churn, S_tmin, S_tmax, S_noise = _churn_options("dpm2", S_churn, S_tmin, S_tmax, S_noise)
    sig, x = start(noise, sigmas, generator)
    denoise = bind(denoiser, cond)
    n = len(sig) - 1
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        x, s_hat = _churn(x, s, _churn_gamma(S_churn, S_tmin, S_tmax, n, s), S_noise, S_churn > 0, generator)
        denoised = denoise(x, s_hat)
        report(callback, i, x, s_hat, s_next, denoised)
        d = (x - denoised) / s_hat
        if s_next == 0:
            x = x + d * (s_next - s_hat)
            continue
        s_mid = math.exp(0.5 * (math.log(s_hat) + math.log(s_next)))
        x_mid = x + d * (s_mid - s_hat)
        d_mid = (x_mid - denoise(x_mid, s_mid)) / s_mid
        x = x + d_mid * (s_next - s_hat)
    return x


def sample_dpm2_ancestral(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                          generator: Generators = None, callback: Callback = None, eta: float = 1.0,
                          s_noise: float = 1.0, noise_kind: str = "gaussian",
                          noise_sampler: Optional[NoiseSampler] = None) -> Tensor:
    """DPM-2 steps to s_down, then s_noise * s_up * z. NFE = 2n - 1 (eta <= 1).

    Noise is added on every step with s' > 0. (k-diffusion 0.1.1 adds none when s_down = 0 but s' > 0, which
    happens only for eta > 1, where s_up is capped at s': its walk then ends a step early on D; ours keeps
    the noise level s' that the grid asks for.)"""
    eta, s_noise = check_nonneg("eta", eta, "dpm2_ancestral"), check_nonneg("s_noise", s_noise, "dpm2_ancestral")
    sig, x = start(noise, sigmas, generator)
    denoise = bind(denoiser, cond)
    z = _noise_source("dpm2_ancestral", eta, noise_kind, noise_sampler, x, sig, generator)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoise(x, s)
        report(callback, i, x, s, s_next, denoised)
        s_down, s_up = ancestral_step(s, s_next, eta)
        d = (x - denoised) / s
        if s_down == 0:
            x = x + d * (s_down - s)
        else:
            s_mid = math.exp(0.5 * (math.log(s) + math.log(s_down)))
            x_mid = x + d * (s_mid - s)
            x = x + (x_mid - denoise(x_mid, s_mid)) * ((s_down - s) / s_mid)
        if s_next > 0 and z is not None:
            x = x + z(s, s_next) * (s_noise * s_up)
    return x


def lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """Adams-Bashforth weights c_j, j = 0..order-1, for the step sigmas[i] -> sigmas[i + 1] from the slopes at
    sigmas[i - j]: c_j = integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node
    sigma_{i-j} through nodes sigma_i, ..., sigma_{i-order+1}. Exact (Gauss-Legendre with enough points for
    the degree order - 1), in float64, in the scaled variable u = (sigma - sigma_i) / (sigma_{i+1} - sigma_i)."""
    if order - 1 > i:
        raise SamplerError(f"lms: order {order} needs {order} past slopes, only {i + 1} at step {i}")
    h = sigmas[i + 1] - sigmas[i]
    nodes = [(sigmas[i - k] - sigmas[i]) / h for k in range(order)]
    u, w = _gauss_legendre01(order // 2 + 1)
    coeffs = []
    for j in range(order):
        basis = [1.0] * len(u)
        for k in range(order):
            if k != j:
                den = nodes[j] - nodes[k]
                basis = [b * (uq - nodes[k]) / den for b, uq in zip(basis, u)]
        coeffs.append(h * sum(wq * b for wq, b in zip(w, basis)))
    return coeffs


@functools.lru_cache(maxsize=None)
def _gauss_legendre01(points: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Gauss-Legendre nodes and weights on [0, 1] (exact for polynomials of degree <= 2 points - 1)."""
    u, w = np.polynomial.legendre.leggauss(points)
    return tuple(float(v) for v in 0.5 * (u + 1.0)), tuple(float(v) for v in 0.5 * w)


def sample_lms(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
               generator: Generators = None, callback: Callback = None, order: int = 4) -> Tensor:
    """Linear multistep (Adams-Bashforth) on the probability-flow ODE in sigma, on the grid's own (variable)
    steps: x' = x + sum_j c_j d_{i-j} with `lms_coefficients`; the first steps use the slopes available
    (order min(i + 1, order)). Deterministic; NFE = n."""
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not 1 <= int(order) <= 8:
        raise SamplerError(f"lms: order must be an integer from 1 to 8, got {order!r}")
    order = int(order)
    sig, x = start(noise, sigmas, generator)
    denoise = bind(denoiser, cond)
    ds: list[Tensor] = []
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoise(x, s)
        report(callback, i, x, s, s_next, denoised)
        ds.append((x - denoised) / s)
        if len(ds) > order:
            ds.pop(0)
        coeffs = lms_coefficients(sig, i, min(i + 1, order))
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def sample_dpmpp_2s_ancestral(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                              generator: Generators = None, callback: Callback = None, eta: float = 1.0,
                              s_noise: float = 1.0, noise_kind: str = "gaussian",
                              noise_sampler: Optional[NoiseSampler] = None) -> Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1, data prediction, r = 1/2) to s_down, then s_noise s_up z.
    With h = log(s / s_down) and the midpoint s_mid = sqrt(s s_down):
        x_mid = (s_mid / s) x - expm1(-h / 2) D,   x' = (s_down / s) x - expm1(-h) D(x_mid, s_mid).
    The step with s_down = 0 is Euler (x' = D). NFE = 2n - 1 (eta <= 1)."""
    eta = check_nonneg("eta", eta, "dpmpp_2s_ancestral")
    s_noise = check_nonneg("s_noise", s_noise, "dpmpp_2s_ancestral")
    sig, x = start(noise, sigmas, generator)
    denoise = bind(denoiser, cond)
    z = _noise_source("dpmpp_2s_ancestral", eta, noise_kind, noise_sampler, x, sig, generator)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoise(x, s)
        report(callback, i, x, s, s_next, denoised)
        s_down, s_up = ancestral_step(s, s_next, eta)
        if s_down == 0:
            x = x + (x - denoised) * ((s_down - s) / s)
        else:
            h = math.log(s / s_down)
            s_mid = math.sqrt(s * s_down)
            x_mid = (s_mid / s) * x - math.expm1(-0.5 * h) * denoised
            x = (s_down / s) * x - math.expm1(-h) * denoise(x_mid, s_mid)
        if s_next > 0 and z is not None:
            x = x + z(s, s_next) * (s_noise * s_up)
    return x


def sample_dpmpp_2m(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                    generator: Generators = None, callback: Callback = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) on any grid: with h = log(s / s'), r = h_prev / h,
        x' = (s' / s) x - expm1(-h) [(1 + 1/(2r)) D - 1/(2r) D_prev];
    the first step and the step to 0 are first order (x' = D on the last). Deterministic; NFE = n."""
    sig, x = start(noise, sigmas, generator)
    denoise = bind(denoiser, cond)
    old, h_last = None, None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoise(x, s)
        report(callback, i, x, s, s_next, denoised)
        if s_next == 0:
            x = denoised
            continue
        h = math.log(s / s_next)
        if old is None:
            x = (s_next / s) * x - math.expm1(-h) * denoised
        else:
            c = 1.0 / (2.0 * (h_last / h))
            x = (s_next / s) * x - math.expm1(-h) * ((1.0 + c) * denoised - c * old)
        old, h_last = denoised, h
    return x


def _sde_options(name: str, eta, s_noise) -> tuple[float, float]:
    return check_nonneg("eta", eta, name), check_nonneg("s_noise", s_noise, name)


def sample_dpmpp_2m_sde(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                        generator: Generators = None, callback: Callback = None, eta: float = 1.0,
                        s_noise: float = 1.0, solver_type: str = "midpoint", noise_kind: str = "brownian",
                        noise_sampler: Optional[NoiseSampler] = None) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, sec. 5) with eta scaling the Langevin part. In lambda = -log sigma
    the sampled SDE is dx = (1 + eta)(D - x) dlambda + noise, whose exact step for D linear in lambda is, with
    H = (1 + eta) h and D' h ~ (D - D_prev) / r:
        x' = e^{-H} x + (1 - e^{-H}) D + c(H) (D - D_prev) / r + s' sqrt(1 - e^{-2 eta h}) s_noise z,
    c = 1 - (1 - e^{-H}) / H ("heun": the exact integral of the linear term) or (1 - e^{-H}) / 2
    ("midpoint": DPM-Solver++(2M)'s form). eta = 0 is deterministic (dpmpp_2m up to the midpoint/heun
    form), eta = 1 gives the DDPM posterior variance on the first-order part. z from a per-row Brownian
    tree by default. The step to 0 is x' = D. NFE = n."""
    eta, s_noise = _sde_options("dpmpp_2m_sde", eta, s_noise)
    if solver_type not in SOLVER_TYPES:
        raise SamplerError(f"dpmpp_2m_sde: unknown solver_type {solver_type!r}; valid: {', '.join(SOLVER_TYPES)}")
    sig, x = start(noise, sigmas, generator)
    denoise = bind(denoiser, cond)
    z = _noise_source("dpmpp_2m_sde", eta, noise_kind, noise_sampler, x, sig, generator)
    old, h_last = None, None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoise(x, s)
        report(callback, i, x, s, s_next, denoised)
        if s_next == 0:
            x = denoised
            continue
        h = math.log(s / s_next)
        big_h = (1.0 + eta) * h
        one_minus = -math.expm1(-big_h)  # 1 - e^{-H}
        x = (s_next / s) * math.exp(-eta * h) * x + one_minus * denoised
        if old is not None:
            r = h_last / h
            c = one_minus / 2.0 if solver_type == "midpoint" else 1.0 - one_minus / big_h
            x = x + (c / r) * (denoised - old)
        if z is not None:
            x = x + z(s, s_next) * (s_next * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise)
        old, h_last = denoised, h
    return x


def sample_dpmpp_3m_sde(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                        generator: Generators = None, callback: Callback = None, eta: float = 1.0,
                        s_noise: float = 1.0, exact_third_order: bool = False, noise_kind: str = "brownian",
                        noise_sampler: Optional[NoiseSampler] = None) -> Tensor:
    """Third-order multistep DPM-Solver++ with the SDE part of `sample_dpmpp_2m_sde`. With D(tau), tau the
    lambda offset in units of h, fitted through the last three evaluations (tau = 0, -r0, -(r0 + r1)) by
    backward divided differences, D1 = h D' and S = (D1_0 - D1_1) / (r0 + r1) = h^2 D'' / 2, and H = (1 + eta) h:
        x' = e^{-H} x + (1 - e^{-H}) D + phi2 D1 - phi3 c S + s' sqrt(1 - e^{-2 eta h}) s_noise z,
        phi2 = 1 - (1 - e^{-H}) / H,   phi3 = phi2 / H - 1/2,
    where phi2 and -phi3 are the exact integrals of e^{-(H - rho)} against the first and second Taylor terms,
    so the Taylor-exact weight of S is c = 2 (`exact_third_order=True`: third order, measured 3.3 on the
    Gaussian flow). The DPM-Solver reference code and k-diffusion use c = 1 (half the second-derivative term:
    formally second order, measured 2.0). We keep c = 1 as the default because it is the more accurate one
    at the step counts people use: on Karras grids (rho = 7, sigma 0.002-80) with 10-40 steps its error is
    1.6-8x smaller on the exact Gaussian and Gaussian-mixture flows and its SDE samples are closer to the data;
    the Taylor-exact form wins only beyond about 100 steps (tests/test_peer_parity.py, docs/samplers.md).
    First steps fall back to 2nd then 1st order; the step to 0 is x' = D. NFE = n."""
    eta, s_noise = _sde_options("dpmpp_3m_sde", eta, s_noise)
    if not isinstance(exact_third_order, bool):
        raise SamplerError(f"dpmpp_3m_sde: exact_third_order must be true or false, got {exact_third_order!r}")
    c_second = 2.0 if exact_third_order else 1.0
    sig, x = start(noise, sigmas, generator)
    denoise = bind(denoiser, cond)
    z = _noise_source("dpmpp_3m_sde", eta, noise_kind, noise_sampler, x, sig, generator)
    d_1 = d_2 = None
    h_1 = h_2 = None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoise(x, s)
        report(callback, i, x, s, s_next, denoised)
        if s_next == 0:
            x = denoised
            continue
        h = math.log(s / s_next)
        big_h = (1.0 + eta) * h
        one_minus = -math.expm1(-big_h)
        phi2 = 1.0 - one_minus / big_h
        x = math.exp(-big_h) * x + one_minus * denoised
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - d_1) / r0
            d1_1 = (d_1 - d_2) / r1
            second = (d1_0 - d1_1) / (r0 + r1)  # = h^2 D'' / 2 for a quadratic D
            d1 = d1_0 + second * r0
            phi3 = phi2 / big_h - 0.5
            x = x + phi2 * d1 - (phi3 * c_second) * second
        elif h_1 is not None:
            x = x + (phi2 / (h_1 / h)) * (denoised - d_1)
        if z is not None:
            x = x + z(s, s_next) * (s_next * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise)
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
    return x


def sample_edm(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
               generator: Generators = None, callback: Callback = None, S_churn: float = 0.0,
               S_tmin: float = 0.0, S_tmax: float = math.inf, S_noise: float = 1.0) -> Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2): at each step, for s in [S_tmin, S_tmax], raise the
    noise to s_hat = (1 + gamma) s with gamma = min(S_churn / n, sqrt(2) - 1) by adding noise of variance
    (s_hat^2 - s^2) S_noise^2, then a Heun step from s_hat to s' (Euler on the step to 0). With S_churn = 0
    it is exactly `sample_heun`. Like EDM's reference code, a stochastic run (S_churn > 0) draws one z per
    step, also where gamma = 0. The callback's "sigma" is s_hat. NFE = 2n - 1."""
    S_churn, S_tmin, S_tmax, S_noise = _churn_options("edm", S_churn, S_tmin, S_tmax, S_noise)
    sig, x = start(noise, sigmas, generator)
    denoise = bind(denoiser, cond)
    n = len(sig) - 1
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        x, s_hat = _churn(x, s, _churn_gamma(S_churn, S_tmin, S_tmax, n, s), S_noise, S_churn > 0, generator)
        denoised = denoise(x, s_hat)
        report(callback, i, x, s_hat, s_next, denoised)
        d = (x - denoised) / s_hat
        x_pred = x + d * (s_next - s_hat)
        if s_next == 0:
            x = x_pred
            continue
        d_next = (x_pred - denoise(x_pred, s_next)) / s_next
        x = x + (d + d_next) * (0.5 * (s_next - s_hat))
    return x

"""Multistep samplers: UniPC, iPNDM, PLMS and DEIS, written in the one frame x = x0 + sigma * n.

Notation: s = sigmas[i], s' = sigmas[i + 1]; D_i = D(x_i, s_i) the denoiser's x0 estimate at node i;
eps_i = (x_i - D_i) / s_i, the probability-flow ODE slope dx/dsigma (Karras et al. 2022, eq. 3 with
sigma(t) = t); lambda = -log sigma (the half log-SNR of the VP model x_t = x / sqrt(1 + sigma^2));
h = lambda' - lambda = log(s / s') > 0. Exact solution of the probability-flow ODE over one step, in the two
forms every exponential integrator starts from (Lu et al. 2022b, eq. 8, with alpha = 1 in this frame):

    x(s') = x(s) + int_s^s' eps(sigma) dsigma                                   (noise form)
          = e^{-h} x(s) + int_0^h e^{-(h - tau)} D(lambda + tau) dtau            (data form)

A multistep sampler replaces eps or D under the integral by a polynomial through the last few nodes and
integrates it; each step costs one denoiser call, the earlier ones are reused.

- UniPC (Zhao et al. 2023, "UniPC: A unified predictor-corrector framework for fast sampling of diffusion
  models", Algorithms 2-3, data prediction): predictor UniP-p uses D_i, ..., D_{i-p+1}; after the next
  denoiser call, the corrector UniC re-takes the last step with D_{i+1} added (order p + 1, no extra call).
  B(h) = h ("bh1") or e^h - 1 ("bh2"). Orders 1-3. UniP-2 with bh2 is DPM-Solver++(2M).
- iPNDM (Zhang & Chen 2023, "Fast sampling of diffusion models with exponential integrator", DEIS paper,
  sec. 5 / App. "improved PNDM"): the Adams-Bashforth formulas of PNDM's pseudo linear multistep applied to
  eps along sigma with a lower-order warm start (AB1, AB2, AB3, then AB4), coefficients for equal steps
  (as in Zhou et al. 2024, "Fast ODE-based sampling for diffusion models in around 5 steps", whose EDM-frame
  iPNDM this is). NFE = n.
- PLMS (Liu et al. 2022, "Pseudo numerical methods for diffusion models on manifolds"): in this frame PNDM's
  transfer phi(x, eps, s, s') of DDIM is x + (s' - s) eps, so PLMS is AB4 on eps along sigma. The first
  step is the pseudo improved Euler step (S-PNDM's warm start; the same one diffusers' PNDMScheduler
  uses with skip_prk_steps), then AB2, AB3, AB4. NFE = n + 1.
- DEIS (Zhang & Chen 2023, tAB-DEIS, eq. 15): Lagrange polynomial through the last r + 1 estimates, in a
  time variable u, integrated exactly against the exponential integrator's weight. target "eps" uses the
  noise form with u = sigma ("sigma": tAB-DEIS in the EDM time t = sigma, also called rhoAB-DEIS) or
  u = log sigma ("log_sigma", the variant diffusers' DEISMultistepScheduler uses); target "x0" uses the
  data form with u = lambda. Orders 1-3 (1 is DDIM). Coefficients from 24-point Gauss-Legendre quadrature
  in float64 (exact for the polynomial cases, ~1e-15 relative otherwise).

Step to sigma = 0: every sampler here ends with x = D (the final step's polynomial would have to be
evaluated at lambda = infinity); with `lower_order_final` (default) the last steps also drop to the orders
that the remaining steps can use (diffusers' choice for fewer than 15 steps). All step coefficients are
Python/NumPy float64; x stays in the noise's dtype.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from torch import Tensor

from torchdiffusion.protocols import Callback, Cond, Denoiser, Generators
from torchdiffusion.sampling.steps import Correct, SamplerError, Step, walk

UNIPC_VARIANTS = ("bh1", "bh2")
DEIS_TARGETS = ("eps", "x0")
DEIS_VARIABLES = ("sigma", "log_sigma")

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(24)

# Adams-Bashforth coefficients for equal steps, newest first (Liu et al. 2022, eq. 12; Zhang & Chen 2023).
_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SamplerError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _combine(terms: Sequence[tuple[float, Tensor]]) -> Tensor:
    """sum_k c_k * t_k for a short list of (float64 coefficient, tensor)."""
    out = terms[0][1] * terms[0][0]
    for c, t in terms[1:]:
        out = out + c * t
    return out


def _step_order(order: int, i: int, n: int, lower_order_final: bool, warm: int = 0) -> int:
    """Order of step i of n: at most i + 1 - warm values are in the history; with lower_order_final the
    last steps use at most n - i (diffusers' rule)."""
    p = min(order, i + 1 - warm)
    if lower_order_final:
        p = min(p, n - i)
    return max(p, 1)


# ---------------------------------------------------------------------------------------------------------
# UniPC


def unipc_coefficients(h: float, rks: Sequence[float], variant: str) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The UniPC linear system (Zhao et al. 2023, Alg. 2-3, data prediction): with hh = -h,
    phi_1 = e^{hh} - 1, phi_{k+1} = phi_k / hh - 1/(k+1)!, rows R_k = r^(k-1) over r = (rks..., 1) and
    b_k = phi_{k+1} k! / B(h) for k = 1..p. Returns (R, b, h_phi_1, B_h) in float64."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = hh if variant == "bh1" else math.expm1(hh)
    r = np.array(list(rks) + [1.0], dtype=np.float64)
    p = r.size
    rows, b = [], []
    fact = 1.0
    for k in range(1, p + 1):
        rows.append(r ** (k - 1))
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return np.stack(rows), np.array(b, dtype=np.float64), h_phi_1, b_h


def _unipc_update(x: Tensor, s: float, s_next: float, hist: list[tuple[float, Tensor]], order: int,
                  variant: str, d_next: Tensor | None) -> Tensor:
    """UniP (d_next None) or UniC (d_next = D at s_next) step from (x, s) to s_next with history
    hist = [(sigma, D), ...] oldest first, whose last entry is the node s."""
    lam = -math.log(s)
    h = -math.log(s_next) - lam
    m0 = hist[-1][1]
    rks, d1s = [], []
    for k in range(1, order):
        s_k, m_k = hist[-(k + 1)]
        rk = (-math.log(s_k) - lam) / h
        rks.append(rk)
        d1s.append((rk, m_k))
    R, b, h_phi_1, b_h = unipc_coefficients(h, rks, variant)
    base = _combine([(s_next / s, x), (-h_phi_1, m0)])
    terms: list[tuple[float, Tensor]] = []
    if d_next is None:
        if order == 2:
            rhos = np.array([0.5])  # the paper's simplified order-2 predictor (diffusers does the same)
        elif order >= 3:
            rhos = np.linalg.solve(R[:-1, :-1], b[:-1])
        else:
            rhos = np.zeros(0)
        for rho, (rk, m_k) in zip(rhos, d1s):
            terms.append((-b_h * float(rho) / rk, m_k - m0))
    else:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
        for rho, (rk, m_k) in zip(rhos[:-1], d1s):
            terms.append((-b_h * float(rho) / rk, m_k - m0))
        terms.append((-b_h * float(rhos[-1]), d_next - m0))
    return base if not terms else base + _combine(terms)


def sample_unipc(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                 generator: Generators = None, callback: Callback = None, correct: Correct | None = None,
                 order: int = 2, variant: str = "bh2", corrector: bool = True,
                 lower_order_final: bool = True) -> Tensor:
    """UniPC (Zhao et al. 2023) with data prediction: UniP-`order` predictor (warm start at lower orders)
    and, unless corrector=False, the UniC corrector after every denoiser call but the last. variant: "bh1"
    (B(h) = h) or "bh2" (B(h) = e^h - 1). Order 1-3. NFE = n. Deterministic.

    The default order is 2 (as diffusers' UniPCMultistepScheduler): with a trained network at 8 steps, order 3
    amplified the network's error into visible background noise on the default MNIST model, while order 2 and
    DPM-Solver++(2M) gave clean images; order 3 is more accurate with exact denoisers (bench/README_analytic.md
    rows unipc vs unipc_2) and stays available as `order=3`."""
    order = _check_int("UniPC order", order, 1, 3)
    if variant not in UNIPC_VARIANTS:
        raise SamplerError(f"unknown UniPC variant {variant!r}; valid: {', '.join(UNIPC_VARIANTS)}")
    step = UniPCStep(order, variant, corrector, lower_order_final)
    return walk(denoiser, noise, sigmas, step, cond=cond, generator=generator, callback=callback, correct=correct)


class UniPCStep(Step):
    """UniP predictor steps with the UniC corrector applied once the next D is known. With a measurement
    correction between steps, the corrector adds its change to the corrected x (x + UniC - UniP) instead of
    replacing it, so the correction is kept; without one it is exactly UniC."""

    def __init__(self, order: int, variant: str, corrector: bool, lower_order_final: bool):
        self.order, self.variant, self.corrector, self.lower_order_final = order, variant, corrector, lower_order_final
        self.hist: list[tuple[float, Tensor]] = []
        self.x_last, self.s_last, self.order_last, self.x_pred = None, None, 1, None
        self.n = 0

    def begin(self, x, sig, generator):
        self.n = len(sig) - 1

    def update(self, x, d, s, s_next, denoise, i):
        if self.corrector and self.x_last is not None:
            x_c = _unipc_update(self.x_last, self.s_last, s, self.hist, self.order_last, self.variant, d)
            x = x_c if x is self.x_pred else x + (x_c - self.x_pred)
        self.hist = (self.hist + [(s, d)])[-self.order:]
        p = _step_order(self.order, i, self.n, self.lower_order_final)
        self.x_last, self.s_last, self.order_last = x, s, p
        self.x_pred = d if s_next == 0 else _unipc_update(x, s, s_next, self.hist, p, self.variant, None)
        return self.x_pred


# ---------------------------------------------------------------------------------------------------------
# iPNDM and PLMS: Adams-Bashforth on eps along sigma with equal-step coefficients


def sample_ipndm(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                 generator: Generators = None, callback: Callback = None, correct: Correct | None = None,
                 order: int = 4, lower_order_final: bool = True) -> Tensor:
    """iPNDM (Zhang & Chen 2023): x' = x + (s' - s) sum_k a_k eps_{i-k} with the equal-step Adams-Bashforth
    coefficients of order min(order, i + 1) (lower-order warm start). Order 1-4. NFE = n."""
    order = _check_int("iPNDM order", order, 1, 4)
    step = AdamsBashforthStep(order, lower_order_final)
    return walk(denoiser, noise, sigmas, step, cond=cond, generator=generator, callback=callback, correct=correct)


class AdamsBashforthStep(Step):
    """iPNDM's and PLMS's update: x' = x + (s' - s) sum_k a_k eps_{i-k} with equal-step Adams-Bashforth
    coefficients; keeps the last `order` eps. pseudo_first: PLMS's pseudo improved Euler first step (two calls;
    its second slope is not kept); PLMS's order rule min(history, 4), capped only with lower_order_final."""

    def __init__(self, order: int, lower_order_final: bool, pseudo_first: bool = False):
        self.order, self.lower_order_final, self.pseudo_first = order, lower_order_final, pseudo_first
        self.eps_hist: list[Tensor] = []
        self.n = 0

    def begin(self, x, sig, generator):
        self.n = len(sig) - 1

    def update(self, x, d, s, s_next, denoise, i):
        eps = (x - d) / s
        self.eps_hist = (self.eps_hist + [eps])[-self.order:]
        if s_next == 0:
            return d
        if self.pseudo_first:
            if i == 0:
                # pseudo improved Euler: average the slope here and at the Euler-predicted point (PNDM's warm
                # start without the Runge-Kutta steps); the second slope is not kept in the history
                x_pred = x + (s_next - s) * eps
                eps_pred = (x_pred - denoise(x_pred, s_next)) / s_next
                return x + (s_next - s) * (0.5 * (eps + eps_pred))
            p = min(len(self.eps_hist), 4)
            if self.lower_order_final:
                p = max(1, min(p, self.n - i))
        else:
            p = _step_order(self.order, i, self.n, self.lower_order_final)
        coef = _AB[p]
        return x + (s_next - s) * _combine([(c, e) for c, e in zip(coef, reversed(self.eps_hist))])


def sample_plms(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                generator: Generators = None, callback: Callback = None, correct: Correct | None = None,
                lower_order_final: bool = False) -> Tensor:
    """PLMS (Liu et al. 2022): a pseudo improved Euler first step (two calls), then AB2, AB3 and AB4 on eps
    along sigma. NFE = n + 1 (n when n == 1). lower_order_final (off by default, as in PNDM) caps the
    last steps' order like `sample_ipndm`."""
    step = AdamsBashforthStep(4, lower_order_final, pseudo_first=True)
    return walk(denoiser, noise, sigmas, step, cond=cond, generator=generator, callback=callback, correct=correct)


# ---------------------------------------------------------------------------------------------------------
# DEIS


def _lagrange(u_nodes: Sequence[float], j: int, u: np.ndarray) -> np.ndarray:
    out = np.ones_like(u)
    for k, uk in enumerate(u_nodes):
        if k != j:
            out = out * (u - uk) / (u_nodes[j] - uk)
    return out


def deis_coefficients(sig_nodes: Sequence[float], s_next: float, target: str, variable: str) -> np.ndarray:
    """Weights c_j (float64, newest node first as given) of one DEIS step from sig_nodes[0] to s_next > 0.

    target "eps": x' = x + sum_j c_j eps_j, c_j = int_s^s' L_j(u(sigma)) dsigma with u = sigma or log sigma.
    target "x0":  x' = (s'/s) x + sum_j c_j D_j, c_j = int_0^h e^{-(h - tau)} L_j(lambda + tau) dtau,
                  polynomial in lambda = -log sigma.
    L_j: the Lagrange basis polynomial of node j."""
    s = sig_nodes[0]
    if target == "eps":
        if variable == "sigma":
            u_nodes = list(sig_nodes)
            to_u = lambda v: v  # noqa: E731
        else:
            u_nodes = [math.log(v) for v in sig_nodes]
            to_u = np.log
        # Gauss-Legendre on [s', s] in sigma; the integral runs from s to s' < s, hence the minus sign.
        half = 0.5 * (s - s_next)
        pts = s_next + half * (_GL_NODES + 1.0)
        return np.array([-half * float(np.sum(_GL_WEIGHTS * _lagrange(u_nodes, j, to_u(pts))))
                         for j in range(len(sig_nodes))])
    lam = -math.log(s)
    h = -math.log(s_next) - lam
    u_nodes = [-math.log(v) for v in sig_nodes]
    tau = 0.5 * h * (_GL_NODES + 1.0)
    w = 0.5 * h * _GL_WEIGHTS * np.exp(-(h - tau))
    return np.array([float(np.sum(w * _lagrange(u_nodes, j, lam + tau))) for j in range(len(sig_nodes))])


def sample_deis(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                generator: Generators = None, callback: Callback = None, correct: Correct | None = None,
                order: int = 3, target: str = "eps", variable: str = "log_sigma",
                lower_order_final: bool = True) -> Tensor:
    """DEIS (Zhang & Chen 2023), the multistep tAB form: integrate a Lagrange polynomial through the last
    min(order, i + 1) estimates (eps or x0, see module notes) exactly against the exponential integrator's
    weight. Order 1-3; order 1 is DDIM. NFE = n. Deterministic."""
    order = _check_int("DEIS order", order, 1, 3)
    if target not in DEIS_TARGETS:
        raise SamplerError(f"unknown DEIS target {target!r}; valid: {', '.join(DEIS_TARGETS)}")
    if variable not in DEIS_VARIABLES:
        raise SamplerError(f"unknown DEIS variable {variable!r}; valid: {', '.join(DEIS_VARIABLES)}")
    step = DeisStep(order, target, variable, lower_order_final)
    return walk(denoiser, noise, sigmas, step, cond=cond, generator=generator, callback=callback, correct=correct)


class DeisStep(Step):
    """tAB-DEIS: keeps the last `order` (sigma, eps or D) nodes."""

    def __init__(self, order: int, target: str, variable: str, lower_order_final: bool):
        self.order, self.target, self.variable, self.lower_order_final = order, target, variable, lower_order_final
        self.hist: list[tuple[float, Tensor]] = []  # (sigma, eps or D), newest last
        self.n = 0

    def begin(self, x, sig, generator):
        self.n = len(sig) - 1

    def update(self, x, d, s, s_next, denoise, i):
        self.hist = (self.hist + [(s, (x - d) / s if self.target == "eps" else d)])[-self.order:]
        if s_next == 0:
            return d
        p = _step_order(self.order, i, self.n, self.lower_order_final)
        nodes = list(reversed(self.hist[-p:]))
        c = deis_coefficients([v for v, _ in nodes], s_next, self.target, self.variable)
        terms = [(float(cj), val) for cj, (_, val) in zip(c, nodes)]
        return x + _combine(terms) if self.target == "eps" else (s_next / s) * x + _combine(terms)


def nfe_plms(n: int) -> int:
    """Denoiser calls of `sample_plms` on an n-step grid ending in 0."""
    return n + 1 if n >= 2 else n


__all__ = ["sample_unipc", "sample_ipndm", "sample_plms", "sample_deis", "unipc_coefficients",
           "deis_coefficients", "nfe_plms"]


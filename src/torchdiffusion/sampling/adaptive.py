"""Adaptive embedded Runge-Kutta integration, one step size per batch row, and the probability-flow ODE sampler.

Notation: x = x0 + sigma * n; D(x, sigma) ~ E[x0 | x]. The probability-flow ODE (Song et al. 2021, eq. 13, in the
frame of Karras et al. 2022, eq. 3 with sigma(t) = t) is dx/dsigma = (x - D) / sigma. In the log-noise variable
u = ln sigma it reads

    dx/du = x - D(x, e^u),

which is what `sample_pf_ode` integrates from u = ln sigmas[0] down to u = ln sigma_min (the grid's last positive
sigma): for Gaussian data the solution x - mu ~ sqrt(v + e^{2u}) is smooth in u at both ends, where in sigma
it bends sharply near 0.

`integrate` is a generic embedded-pair solver for a batch of independent ODEs dy/dt = f(t, y), y: (B, M):
- "dopri5": Dormand & Prince 1980, RK5(4)7M, FSAL (6 new evaluations per accepted step);
- "bosh3": Bogacki & Shampine 1989, RK3(2), FSAL (3 new evaluations per accepted step).
Each row b keeps its own time t_b and step h_b. A step is accepted for row b when its error estimate, the RMS over
the row of (y5 - y4) / (atol + rtol max(|y|, |y_new|)), is <= 1; the next step is
h * clamp(0.9 err^(-1/(q+1)), 0.2, 10) with q the lower order (Hairer, Norsett & Wanner, "Solving ODEs I",
II.4). The first step follows Hairer et al.'s starting-step algorithm (one extra evaluation). Because every row's
steps depend on that row alone, a row's result (and its NFE) do not depend on the batch it is solved in, up to
the floating-point behaviour of the function at different batch sizes.

NFE of `sample_pf_ode`: adaptive, reported per row through `info` (plus 1 for the final denoising step to
sigma = 0 when the grid ends in 0); the registry's formula returns None for it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from torchdiffusion.protocols import Callback, Cond, Denoiser, Generators
from torchdiffusion.sampling.steps import Correct, SamplerError, check_noise, check_sigmas

#: f(t, y, rows) -> dy/dt. t: (A,) float64 times of the A active rows; y: (A, M); rows: (A,) int64, their indices
#: in the full batch (to select per-row conditioning or probes).
OdeFunction = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Tableau:
    """An embedded explicit Runge-Kutta pair: c (s,), a (s, s) lower triangular, b (s,) of order p,
    b_err = b - b_hat (s,) the difference to the embedded order-q weights; fsal: b equals the last row of a."""

    name: str
    order: int  # p: the order of the solution that is kept (local extrapolation)
    error_order: int  # q: the order of the embedded solution
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_err: tuple[float, ...]
    fsal: bool


def _dopri5() -> Tableau:
    # Dormand & Prince 1980, Table 2 (RK5(4)7M); b_hat is the 4th-order embedded solution.
    c = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
    a = ((),
         (1 / 5,),
         (3 / 40, 9 / 40),
         (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
         (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
    b = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
    b_hat = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
    return Tableau("dopri5", 5, 4, c, a, b, tuple(x - y for x, y in zip(b, b_hat)), True)


def _bosh3() -> Tableau:
    # Bogacki & Shampine 1989: 3rd-order solution, 2nd-order embedded one, FSAL.
    c = (0.0, 1 / 2, 3 / 4, 1.0)
    a = ((), (1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9))
    b = (2 / 9, 1 / 3, 4 / 9, 0.0)
    b_hat = (7 / 24, 1 / 4, 1 / 3, 1 / 8)
    return Tableau("bosh3", 3, 2, c, a, b, tuple(x - y for x, y in zip(b, b_hat)), True)


TABLEAUS = {"dopri5": _dopri5(), "bosh3": _bosh3()}


@dataclass
class SolveInfo:
    """Per-row statistics of one `integrate` call: nfe, accepted and rejected steps, int64 (B,)."""

    nfe: Tensor
    accepted: Tensor
    rejected: Tensor


def check_tolerances(rtol: float, atol: float, method: str) -> Tableau:
    if method not in TABLEAUS:
        raise SamplerError(f"unknown adaptive method {method!r}; valid: {', '.join(TABLEAUS)}")
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise SamplerError(f"{name} must be a finite number > 0, got {v!r}")
    return TABLEAUS[method]


def _rms_error(err: Tensor, y: Tensor, y_new: Tensor, rtol: float, atol: float) -> Tensor:
    """(A, M) -> (A,) the RMS of err / (atol + rtol max(|y|, |y_new|)) per row."""
    scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
    return (err / scale).pow(2).mean(1).sqrt()


def _initial_step(f: OdeFunction, t0: Tensor, y0: Tensor, f0: Tensor, direction: float, order: int,
                  rtol: float, atol: float, rows: Tensor, length: float) -> Tensor:
    """Hairer, Norsett & Wanner (Solving ODEs I, II.4, p. 169): a starting step per row, one evaluation; never
    longer than the interval (`length`), so the trial evaluation stays inside it."""
    scale = atol + rtol * y0.abs()
    d0 = (y0 / scale).pow(2).mean(1).sqrt().double()
    d1 = (f0 / scale).pow(2).mean(1).sqrt().double()
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp(min=1e-30))
    h0 = h0.clamp(max=length)
    y1 = y0 + direction * h0.to(y0.dtype)[:, None] * f0
    f1 = f(t0 + direction * h0, y1, rows)
    d2 = ((f1 - f0) / scale).pow(2).mean(1).sqrt() / h0
    big = torch.maximum(d1, d2)
    h1 = torch.where(big <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
                     (0.01 / big.clamp(min=1e-30)) ** (1.0 / (order + 1)))
    return torch.minimum(100 * h0, h1).clamp(max=length)


def integrate(f: OdeFunction, y0: Tensor, t0: float, t1: float, *, rtol: float = 1e-5, atol: float = 1e-5,
              method: str = "dopri5", h0: Optional[float] = None, max_steps: int = 10_000
              ) -> tuple[Tensor, SolveInfo]:
    """Solve dy/dt = f(t, y) for each row of y0 (B, M) from t0 to t1 (either direction) with an embedded RK pair.

    Returns (y at t1 of shape (B, M) in y0's dtype, SolveInfo). Times are float64 (B,) inside. h0: the first step
    size |h| for every row (default: Hairer's estimate per row). Raises SamplerError if a row needs more than
    max_steps attempted steps (the ODE is too stiff for the tolerance)."""
    tab = check_tolerances(rtol, atol, method)
    if y0.ndim != 2:
        raise SamplerError(f"integrate expects a (B, M) state, got shape {tuple(y0.shape)}")
    B = y0.shape[0]
    dev = y0.device
    span = float(t1) - float(t0)
    nfe = torch.zeros(B, dtype=torch.int64)
    accepted = torch.zeros(B, dtype=torch.int64)
    rejected = torch.zeros(B, dtype=torch.int64)
    if span == 0 or B == 0:
        return y0.clone(), SolveInfo(nfe, accepted, rejected)
    direction = 1.0 if span > 0 else -1.0
    length = abs(span)
    rows = torch.arange(B, device=dev)
    tt = torch.full((B,), float(t0), dtype=torch.float64, device=dev)  # per-row time
    done = torch.zeros(B, dtype=torch.float64, device=dev)  # per-row distance travelled, in [0, length]
    y = y0.clone()
    k_first = f(tt, y, rows)
    nfe += 1
    if not bool(torch.isfinite(k_first).all()):
        raise SamplerError("the ODE's right-hand side is not finite at the start (NaN/inf from the denoiser?)")
    if h0 is None:
        h = _initial_step(f, tt, y, k_first, direction, tab.error_order, rtol, atol, rows, length)
        nfe += 1
    else:
        h = torch.full((B,), float(h0), dtype=torch.float64, device=dev)
    h = h.clamp(max=length)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    attempts = 0
    while bool(active.any()):
        attempts += 1
        if attempts > max_steps:
            raise SamplerError(f"the adaptive solver took more than {max_steps} steps; loosen rtol/atol "
                               f"(now {rtol:g}/{atol:g}) or raise max_steps")
        idx = active.nonzero().squeeze(1)
        ya, ka, ta = y[idx], k_first[idx], tt[idx]
        left = length - done[idx]
        ha = torch.minimum(h[idx], left)
        last = ha >= left  # this step reaches t1 exactly
        hs = (direction * ha)  # signed float64 (A,)
        hy = hs.to(y.dtype)[:, None]
        ks = [ka]
        for i in range(1, len(tab.c)):
            yi = ya + hy * sum(a * k for a, k in zip(tab.a[i], ks) if a != 0.0)
            ks.append(f(ta + tab.c[i] * hs, yi, idx))
        nfe[idx.cpu()] += len(tab.c) - 1
        y_new = ya + hy * sum(b * k for b, k in zip(tab.b, ks) if b != 0.0)
        err = hy * sum(e * k for e, k in zip(tab.b_err, ks) if e != 0.0)
        e = _rms_error(err, ya, y_new, rtol, atol).double()
        finite = torch.isfinite(e) & torch.isfinite(y_new).all(1) & torch.isfinite(ks[-1]).all(1)
        ok = (e <= 1.0) & finite
        factor = (0.9 * e.clamp(min=1e-10) ** (-1.0 / (tab.error_order + 1))).clamp(0.2, 10.0)
        factor = torch.where(ok, factor, factor.clamp(max=1.0))
        factor = torch.where(finite, factor, torch.full_like(factor, 0.2))  # a non-finite trial: shrink and retry
        h[idx] = ha * factor
        if bool((h[idx] < 1e-12 * length).any()):
            raise SamplerError(f"the adaptive solver's step fell below 1e-12 of the interval (a non-finite or stiff "
                               f"right-hand side); loosen rtol/atol (now {rtol:g}/{atol:g}) or check the denoiser")
        acc = idx[ok]
        y[acc] = y_new[ok]
        k_first[acc] = ks[-1][ok] if tab.fsal else f(tt[acc] + hs[ok], y_new[ok], acc)
        if not tab.fsal:
            nfe[acc.cpu()] += 1
        done[acc] = torch.where(last[ok], torch.full_like(left[ok], length), done[acc] + ha[ok])
        tt[acc] = torch.where(last[ok], torch.full_like(left[ok], float(t1)), tt[acc] + hs[ok])
        accepted[acc.cpu()] += 1
        rejected[idx[~ok].cpu()] += 1
        active[acc[last[ok]]] = False
    return y, SolveInfo(nfe, accepted, rejected)


def sample_pf_ode(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                  generator: Generators = None, callback: Callback = None, rtol: float = 1e-4, atol: float = 1e-4,
                  method: str = "dopri5", info: Optional[dict] = None, correct: Correct | None = None) -> Tensor:
    """The probability-flow ODE dx/du = x - D(x, e^u), u = ln sigma, solved adaptively from sigmas[0] to the last
    positive sigma of the grid; a grid ending in 0 then takes the step to 0 as x = D(x, sigma_min) (Euler's last
    step, as `sample_euler`). Only the grid's end points are used: the solver picks its own steps.

    rtol/atol: tolerances on x (model range); method: "dopri5" or "bosh3". info (optional dict) receives "nfe"
    (int64 (B,), denoiser evaluations per row including the final one), "accepted", "rejected". callback is called
    once, before the final denoising step, with the state at sigma_min. Deterministic: `generator` is unused.

    Not on the walk, and `correct` must stay None: the Dormand-Prince controller picks its own steps per row, and a
    correction between its stages would break the embedded error estimate; use a grid sampler (euler, heun,
    dpmpp_2m) for corrected deterministic sampling."""
    if correct is not None:
        raise SamplerError("pf_ode integrates adaptively and takes no per-step correction (correct=None); use a "
                           "grid sampler such as heun or dpmpp_2m with corrections")
    check_noise(noise)
    sig = check_sigmas(sigmas)
    tab = check_tolerances(rtol, atol, method)
    del tab
    positive = [s for s in sig if s > 0]
    s_max, s_min = positive[0], positive[-1]
    shape = noise.shape

    def f(u: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        x = y.reshape((y.shape[0],) + shape[1:])
        c = select_cond(cond, rows)
        d = denoiser(x, u.exp().to(x.dtype), c)
        return (x - d).reshape(y.shape[0], -1)

    y0 = (noise * s_max).reshape(shape[0], -1)
    y, stats = integrate(f, y0, math.log(s_max), math.log(s_min), rtol=rtol, atol=atol, method=method)
    x = y.reshape(shape)
    if sig[-1] == 0:
        denoised = denoiser(x, x.new_full((shape[0],), s_min), cond)
        if callback is not None:
            callback({"i": 0, "x": x, "sigma": s_min, "sigma_next": 0.0, "denoised": denoised})
        x = denoised
        stats.nfe += 1
    if info is not None:
        info.update(nfe=stats.nfe, accepted=stats.accepted, rejected=stats.rejected)
    return x


def select_cond(cond: Cond, rows: Tensor) -> Cond:
    """The conditioning of the active rows only (each value indexed along its batch dimension)."""
    if cond is None:
        return None
    return {k: v[rows.to(v.device)] for k, v in cond.items()}

"""DPM-Solver (Lu et al. 2022a, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in
Around 10 Steps"): exponential integrators of the probability-flow ODE in lambda = -log sigma.

In this frame (alpha = 1) the ODE in lambda is dx/dlambda = -sigma eps(x, sigma) with eps = (x - D) / sigma,
and its exact solution x' = x - sigma' integral_0^h e^{tau} eps dtau is approximated by Taylor expanding eps in
lambda (paper, eqs. 3.4-3.5 and Algs. 1-2). With h = lambda' - lambda = log(s / s') and eps = eps(x, s):

    DPM-Solver-1:  x' = x - s' expm1(h) eps                                             (= DDIM)
    DPM-Solver-2:  u = x - s_1 expm1(r1 h) eps,  s_1 = s e^{-r1 h}
                   x' = x - s' expm1(h) eps - s' / (2 r1) expm1(h) (eps(u, s_1) - eps)
    DPM-Solver-3:  (r1, r2) = (1/3, 2/3); u1 as above; u2 = x - s_2 expm1(r2 h) eps
                        - s_2 (r2 / r1) (expm1(r2 h) / (r2 h) - 1) (eps(u1, s_1) - eps)
                   x' = x - s' expm1(h) eps - s' / r2 (expm1(h) / h - 1) (eps(u2, s_2) - eps)

`sample_dpm_fast` is DPM-Solver-fast (paper, sec. 3.4): steps uniform in lambda, as many 3rd-order steps as
the NFE budget allows, then a 2nd/1st-order step for the remainder. `sample_dpm_adaptive` is
DPM-Solver-12/23 (paper, sec. 4.2 and Alg. 5): a lower- and a higher-order step share evaluations; their
difference, scaled by delta = max(atol, rtol max(|x_low|, |x_prev|)), is the error estimate
E = ||(x_high - x_low) / delta||_2 / sqrt(dim); a step is accepted and the next h chosen by a PID step-size
controller (Söderlind 2003; the I-controller h <- h E^{-1/order}, limited by 1 + atan(f - 1), is the default).

Only the end points of `sigmas` are used: sigma_max = sigmas[0] and sigma_min = the smallest positive entry.
If the grid ends in 0, one more evaluation finishes with x = D(x, sigma_min) (the grid's last step).

The adaptive solver takes its own steps **per row**: each row has its own h and controller (the denoiser is
called with a (B,) sigma that varies across rows), so a seed's sample and NFE do not depend on the batch.
(k-diffusion and the DPM-Solver reference code take one norm over the whole batch, so a sample there changes
with the other images in its batch.) It also keeps eps(x, s) across rejected attempts: a rejection costs
order - 1 evaluations, not order. Its measured NFE is reported through `stats` and the callback.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from torchdiffusion.protocols import Callback, Cond, Denoiser, Generators
from torchdiffusion.sampling.brownian import NOISE_KINDS, NoiseSampler, make_noise
from torchdiffusion.sampling.kdiff import AncestralNoise, ancestral_step, check_nonneg
from torchdiffusion.sampling.noise import check_generators
from torchdiffusion.sampling.steps import Correct, SamplerError, Step, bind, start, walk


def _end_points(sig: list[float]) -> tuple[float, float, bool]:
    positive = [s for s in sig if s > 0]
    return positive[0], positive[-1], sig[-1] == 0


def fast_orders(nfe: int) -> list[int]:
    """DPM-Solver-fast's order per step for a budget of `nfe` evaluations (Lu et al. 2022a, sec. 3.4):
    K = floor(nfe / 3) + 1 steps; nfe % 3 == 0: [3] * (K - 2) + [2, 1], else [3] * (K - 1) + [nfe % 3]."""
    k = nfe // 3 + 1
    if nfe % 3 == 0:
        return [3] * (k - 2) + [2, 1]
    return [3] * (k - 1) + [nfe % 3]


class _EpsSteps:
    """The three DPM-Solver updates on rows sharing one (float) step, or per-row steps as (B,) tensors.
    `eps_at(x, lam)` evaluates eps = (x - D(x, sigma)) / sigma at sigma = e^{-lam}."""

    def __init__(self, eps_at):
        self.eps_at = eps_at

    @staticmethod
    def _col(v, x: Tensor):
        """A float stays a float; a (B,) float64 tensor becomes (B, 1, ...) in x's dtype."""
        if isinstance(v, Tensor):
            return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return v

    def step1(self, x, lam, h, eps):
        return x - self._col(torch.exp(-(lam + h)) * torch.expm1(h), x) * eps

    def step2(self, x, lam, h, eps, cache, r1=0.5):
        s1 = lam + r1 * h
        if "e1" not in cache:
            u = x - self._col(torch.exp(-s1) * torch.expm1(r1 * h), x) * eps
            cache["e1"] = self.eps_at(u, s1)
        sn = torch.exp(-(lam + h))
        return x - self._col(sn * torch.expm1(h), x) * eps - self._col(sn / (2 * r1) * torch.expm1(h), x) * (cache["e1"] - eps)

    def step3(self, x, lam, h, eps, cache, r1=1 / 3, r2=2 / 3):
        s1, s2 = lam + r1 * h, lam + r2 * h
        if "e1" not in cache:
            u1 = x - self._col(torch.exp(-s1) * torch.expm1(r1 * h), x) * eps
            cache["e1"] = self.eps_at(u1, s1)
        sig2 = torch.exp(-s2)
        u2 = (x - self._col(sig2 * torch.expm1(r2 * h), x) * eps
              - self._col(sig2 * (r2 / r1) * (torch.expm1(r2 * h) / (r2 * h) - 1), x) * (cache["e1"] - eps))
        e2 = self.eps_at(u2, s2)
        sn = torch.exp(-(lam + h))
        return x - self._col(sn * torch.expm1(h), x) * eps - self._col(sn / r2 * (torch.expm1(h) / h - 1), x) * (e2 - eps)


def _f64(v: float) -> Tensor:
    return torch.tensor(v, dtype=torch.float64)


class DpmFastStep(Step):
    """DPM-Solver-fast's steps on its own lambda grid `lams` with orders `orders`; the walk's grid has the same
    steps (sigma_max, e^{-lams[1]}, ..., sigma_min, then 0 if the grid ends in 0), and each evaluation is taken at
    e^{-lams[i]} (sigma_min for the final x = D). eta > 0: ancestral steps (AncestralNoise)."""

    def __init__(self, lams: list[float], orders: list[int], s_min: float, noise: AncestralNoise):
        self.lams, self.orders, self.s_min, self.noise = lams, orders, s_min, noise

    def begin(self, x, sig, generator):
        if self.orders:
            self.noise.begin(x, sig, generator)

    def evaluate(self, denoise, x, s, i):
        s_eval = math.exp(-self.lams[i]) if i < len(self.orders) else self.s_min
        return x, s_eval, denoise(x, s_eval)

    def record(self, i):
        return {"order": self.orders[i]} if i < len(self.orders) else {}

    def update(self, x, denoised, s, s_next, denoise, i):
        if i == len(self.orders):  # the grid's last step to 0
            return denoised
        lam, lam_next, order = self.lams[i], self.lams[i + 1], self.orders[i]
        lam_end = -math.log(self.s_min)
        s_next = math.exp(-lam_next)
        if self.noise.eta > 0:
            s_down, s_up = self.noise.split(s, s_next)
            lam_to = min(lam_end, -math.log(s_down)) if s_down > 0 else lam_end
            s_up = math.sqrt(max(s_next * s_next - math.exp(-2 * lam_to), 0.0))
        else:
            lam_to, s_up = lam_next, 0.0
        eps = (x - denoised) / s
        steps = _EpsSteps(lambda u, lm: (u - denoise(u, math.exp(-float(lm)))) / math.exp(-float(lm)))
        h, lam_t, cache = _f64(lam_to - lam), _f64(lam), {}
        if order == 1:
            x = steps.step1(x, lam_t, h, eps)
        elif order == 2:
            x = steps.step2(x, lam_t, h, eps, cache)
        else:
            x = steps.step3(x, lam_t, h, eps, cache)
        return self.noise.add(x, s, s_next, s_up)


def sample_dpm_fast(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                    generator: Generators = None, callback: Callback = None, correct: Correct | None = None,
                    eta: float = 0.0, s_noise: float = 1.0, noise_kind: str = "gaussian",
                    noise_sampler: Optional[NoiseSampler] = None) -> Tensor:
    """DPM-Solver-fast from sigmas[0] to the smallest positive sigma with an NFE budget of n (an n-step grid
    ending above 0) or n - 1 plus the final x = D (a grid ending in 0): NFE = n either way. Steps are uniform
    in lambda = -log sigma; only the grid's end points are used. eta > 0 makes each step ancestral (to s_down,
    then s_noise s_up z, as `sample_euler_ancestral`). It runs on the walk over its own grid (DpmFastStep), so
    `correct` is applied after each of its steps (and after the final x = D)."""
    eta, s_noise = check_nonneg("eta", eta, "dpm_fast"), check_nonneg("s_noise", s_noise, "dpm_fast")
    sig, _ = start(noise, sigmas, generator)
    s_max, s_min, to_zero = _end_points(sig)
    budget = len(sig) - 1 - (1 if to_zero else 0)
    if noise_kind not in NOISE_KINDS:
        raise SamplerError(f"dpm_fast: unknown noise_kind {noise_kind!r}; valid: {', '.join(NOISE_KINDS)}")
    orders = fast_orders(budget) if budget > 0 else []
    lams = torch.linspace(-math.log(s_max), -math.log(s_min), len(orders) + 1, dtype=torch.float64).tolist()
    grid = [s_max] + [math.exp(-lm) for lm in lams[1:-1]] + ([s_min] if orders else []) + ([0.0] if to_zero else [])
    src = AncestralNoise("dpm_fast", eta, s_noise, noise_kind, noise_sampler, sigma_range=(s_min, s_max))
    step = DpmFastStep(lams, orders, s_min, src)
    return walk(denoiser, noise, torch.tensor(grid, dtype=torch.float64), step, cond=cond, generator=generator,
                callback=callback, correct=correct)


def sample_dpm_adaptive(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                        generator: Generators = None, callback: Callback = None, order: int = 3,
                        rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0,
                        icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81, eta: float = 0.0,
                        s_noise: float = 1.0, noise_kind: str = "brownian", stats: Optional[dict] = None,
                        correct: Correct | None = None) -> Tensor:
    """DPM-Solver-12 (order 2) or -23 (order 3) with error-controlled step sizes in lambda, per row, from
    sigmas[0] to the smallest positive sigma (then x = D if the grid ends in 0). Defaults for rtol, atol
    (0.0078 ~ 1/128 of the [-1, 1] pixel range), h_init and the controller follow Lu et al. 2022a, sec. 4.2,
    and k-diffusion. eta > 0: ancestral steps whose noise comes from a per-row Brownian tree by default, so
    rejected or refined steps see one consistent Brownian path per seed.

    Per-row scalars (lambda, h, controller state, counts) live in float64 numpy arrays; only x-shaped work is
    done in torch. NFE is not fixed in advance (the registry gives None): `stats`, if a dict, receives "nfe"
    (mean over rows), "nfe_per_row", "accepted", "rejected" (per-row lists) and "calls" (denoiser calls);
    the callback gets "i", "x", "sigma" (B,), "h" (B,), "rows" (the rows attempted), "error" and "accepted"
    (per attempted row) and the running "nfe" (B,) after each attempt.

    Not on the walk, and `correct` must stay None: the step sizes are chosen per row by the error controller,
    so there is no shared grid for a per-step correction to act on (a correction between attempts would also
    enter the error estimate and stall the controller); use a grid sampler for corrected sampling."""
    if correct is not None:
        raise SamplerError("dpm_adaptive chooses its own per-row steps and takes no per-step correction "
                           "(correct=None); use a grid sampler (e.g. dpm_fast, dpmpp_2m_sde, ddpm) with corrections")
    if isinstance(order, bool) or order not in (2, 3):
        raise SamplerError(f"dpm_adaptive: order must be 2 or 3, got {order!r}")
    name = "dpm_adaptive"
    rtol, atol = check_nonneg("rtol", rtol, name), check_nonneg("atol", atol, name)
    h_init, accept_safety = check_nonneg("h_init", h_init, name), check_nonneg("accept_safety", accept_safety, name)
    pcoeff, icoeff, dcoeff = (check_nonneg(k, v, name) for k, v in (("pcoeff", pcoeff), ("icoeff", icoeff), ("dcoeff", dcoeff)))
    eta, s_noise = check_nonneg("eta", eta, name), check_nonneg("s_noise", s_noise, name)
    if rtol == 0 and atol == 0:
        raise SamplerError("dpm_adaptive: rtol and atol cannot both be 0")
    if h_init == 0:
        raise SamplerError("dpm_adaptive: h_init must be > 0")
    if noise_kind not in NOISE_KINDS:
        raise SamplerError(f"dpm_adaptive: unknown noise_kind {noise_kind!r}; valid: {', '.join(NOISE_KINDS)}")
    sig, x = start(noise, sigmas, generator)
    s_max, s_min, to_zero = _end_points(sig)
    B = x.shape[0]
    ones = (1,) * (x.ndim - 1)
    lam_end = -math.log(s_min)
    lam = np.full(B, -math.log(s_max))
    h = np.full(B, h_init)
    ctrl_order = 1.5 if eta > 0 else float(order)
    b1, b2, b3 = (pcoeff + icoeff + dcoeff) / ctrl_order, -(pcoeff + 2 * dcoeff) / ctrl_order, dcoeff / ctrl_order
    errs = np.full((B, 3), np.nan)  # inverse errors of the PID controller (Soederlind 2003), per row
    nfe = np.zeros(B, dtype=np.int64)
    accepted, rejected = np.zeros(B, dtype=np.int64), np.zeros(B, dtype=np.int64)
    calls = 0

    def col(v: np.ndarray):
        """Per-row coefficients -> a float (one row) or a (b, 1, ...) column in x's dtype."""
        if v.shape[0] == 1:
            return float(v[0])
        return torch.from_numpy(v).to(device=x.device, dtype=x.dtype).reshape(-1, *ones)

    def eps_at(u: Tensor, lam_rows: np.ndarray, rows: np.ndarray, all_rows: bool) -> Tensor:
        nonlocal calls
        calls += 1
        nfe[rows] += 1
        sig_rows = np.exp(-lam_rows)
        c = cond if all_rows or cond is None else {k: v[torch.from_numpy(rows)] for k, v in cond.items()}
        sig_t = u.new_full((1,), float(sig_rows[0])) if len(sig_rows) == 1 else u.new_tensor(sig_rows)
        out = denoiser(u, sig_t, c)
        if out.shape != u.shape:
            raise SamplerError(f"the denoiser returned shape {tuple(out.shape)} for an input of shape "
                               f"{tuple(u.shape)}; it must return an x0 estimate of the input's shape")
        return (u - out) / col(sig_rows)

    sources = None
    if eta > 0:
        check_generators(generator, B)
        if isinstance(generator, (list, tuple)):
            row_gens = list(generator)
        else:  # one generator (or the global one) seeds a generator per row
            seeds = torch.randint(0, 2**62, (B,), generator=generator).tolist()
            row_gens = [torch.Generator().manual_seed(int(sd)) for sd in seeds]
        sources = [make_noise(noise_kind, x[b:b + 1], s_min, s_max, [row_gens[b]]) for b in range(B)]

    x_prev = x.clone()
    eps0 = torch.zeros_like(x)
    have_eps0 = np.zeros(B, dtype=bool)
    active = lam < lam_end - 1e-5
    step = 0
    while active.any():
        rows = np.nonzero(active)[0]
        all_rows = len(rows) == B
        index = slice(None) if all_rows else torch.from_numpy(rows)
        xa, la = x[index], lam[rows]
        t = np.minimum(lam_end, la + h[rows])
        if eta > 0:
            t_to, s_up = t.copy(), np.zeros_like(t)
            for k in range(len(rows)):
                s_a, s_b = math.exp(-la[k]), math.exp(-t[k])
                s_down, _ = ancestral_step(s_a, s_b, eta)
                t_to[k] = min(lam_end, -math.log(s_down)) if s_down > 0 else lam_end
                s_up[k] = math.sqrt(max(s_b * s_b - math.exp(-2 * t_to[k]), 0.0))
        else:
            t_to, s_up = t, None
        need = ~have_eps0[rows]
        if need.any():
            r_need = rows[need]
            if all_rows and need.all():
                eps0 = eps_at(x, lam, rows, True)
            else:
                eps0[torch.from_numpy(r_need)] = eps_at(x[torch.from_numpy(r_need)], lam[r_need], r_need,
                                                        len(r_need) == B)
            have_eps0[r_need] = True
        e0 = eps0[index]
        hh = t_to - la
        sn = np.exp(-(la + hh))
        em = np.expm1(hh)
        base = xa - col(sn * em) * e0  # DPM-Solver-1 to t_to
        if order == 2:
            s1 = la + 0.5 * hh
            e1 = eps_at(xa - col(np.exp(-s1) * np.expm1(0.5 * hh)) * e0, s1, rows, all_rows)
            x_low, x_high = base, base - col(sn * em) * (e1 - e0)  # r1 = 1/2: sn / (2 r1) = sn
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = la + r1 * hh, la + r2 * hh
            e1 = eps_at(xa - col(np.exp(-s1) * np.expm1(r1 * hh)) * e0, s1, rows, all_rows)
            d1 = e1 - e0
            x_low = base - col(sn / (2 * r1) * em) * d1  # DPM-Solver-2 with r1 = 1/3
            em2 = np.expm1(r2 * hh)
            u2 = xa - col(np.exp(-s2) * em2) * e0 - col(np.exp(-s2) * (r2 / r1) * (em2 / (r2 * hh) - 1)) * d1
            e2 = eps_at(u2, s2, rows, all_rows)
            x_high = base - col(sn / r2 * (em / hh - 1)) * (e2 - e0)
        delta = torch.clamp_min(rtol * torch.maximum(x_low.abs(), x_prev[index].abs()), atol)
        err_t = torch.linalg.vector_norm((x_low - x_high) / delta, dim=tuple(range(1, x.ndim)))
        error = np.asarray(err_t.tolist(), dtype=np.float64) / math.sqrt(x_low[0].numel())
        inv = 1.0 / (error + 1e-8)
        e = errs[rows]
        fresh = np.isnan(e[:, 0])
        e[fresh] = inv[fresh, None]
        e[:, 0] = inv
        factor = e[:, 0] ** b1
        if b2 != 0 or b3 != 0:
            factor = factor * e[:, 1] ** b2 * e[:, 2] ** b3
        factor = 1 + np.arctan(factor - 1)
        ok = factor >= accept_safety
        e[ok, 2], e[ok, 1] = e[ok, 1], e[ok, 0]
        errs[rows] = e
        h[rows] = h[rows] * factor
        if ok.any():
            r_ok = rows[ok]
            if sources is not None:
                for k in np.nonzero(ok)[0]:
                    if s_up[k] > 0:
                        z = sources[rows[k]](math.exp(-la[k]), math.exp(-t[k]))
                        x_high[k] = x_high[k] + z[0] * (s_up[k] * s_noise)
            if ok.all():
                x_prev[index], x[index] = x_low, x_high
            else:
                sel, dst = torch.from_numpy(np.nonzero(ok)[0]), torch.from_numpy(r_ok)
                x_prev[dst], x[dst] = x_low[sel], x_high[sel]
            lam[r_ok] = t[ok]
            have_eps0[r_ok] = False
            accepted[r_ok] += 1
        rejected[rows[~ok]] += 1
        if callback is not None:
            callback({"i": step, "x": x, "sigma": torch.from_numpy(np.exp(-lam)), "h": torch.from_numpy(h.copy()),
                      "rows": torch.from_numpy(rows), "error": torch.from_numpy(error), "accepted": torch.from_numpy(ok),
                      "nfe": torch.from_numpy(nfe.copy())})
        active = lam < lam_end - 1e-5
        step += 1
    if to_zero:
        x = bind(denoiser, cond)(x, s_min)
        calls += 1
        nfe += 1
    if stats is not None:
        stats.update({"nfe": float(nfe.mean()), "nfe_per_row": nfe.tolist(), "accepted": accepted.tolist(),
                      "rejected": rejected.tolist(), "calls": calls})
    return x

"""The walk over a sigma grid and the one-step updates that samplers share.

Notation: x = x0 + sigma * n; s = sigmas[i], s' = sigmas[i + 1] < s; D = D(x, s) the denoiser's estimate of
E[x0 | x]; d = (x - D) / s, the probability-flow ODE direction dx/dsigma (Karras et al. 2022, eq. 3 with
sigma(t) = t, s(t) = 1). Step coefficients are computed in float64 (Python floats) from the float64 grid and
applied to x in x's dtype; the denoiser receives sigma as a (B,) tensor in x's dtype.

The walk (`walk`, `run`) is the one loop of every grid sampler, single-step and multistep: per step i,

    x, s_eval, D = step.evaluate(denoise, x, s, i)     # D(x, s), or after a churn, or with a learned variance
    callback({"i", "x", "sigma": s_eval, "sigma_next": s', "denoised": D, ...step.record(i)})
    x = step.update(x, D, s_eval, s', denoise, i)      # may call denoise again (Heun, DPM-2, PLMS's first step)
    x = correct(x, s', i)                              # optional measurement consistency (inverse.corrections)

A `Step` is a small object that lives for one walk; multistep samplers keep their history in it (the x a step
sees, and the D it evaluates there, are the corrected ones). Samplers stay pure functions: each call builds
its step, and no state survives the call.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from torchdiffusion.core.precond import denoise_with_variance
from torchdiffusion.errors import ConfigError
from torchdiffusion.protocols import Callback, Cond, Denoiser, Generators
from torchdiffusion.sampling.noise import check_generators, randn_like

#: denoise(x, sigma) -> D: the denoiser with its conditioning bound and sigma given as a float.
BoundDenoiser = Callable[[Tensor, float], Tensor]
#: a plain step function: step(x, D, s, s', denoise) -> x at s'; may call denoise for extra evaluations (Heun).
StepFunction = Callable[[Tensor, Tensor, float, float, BoundDenoiser], Tensor]
#: correct(x_next, sigma_next, i) -> x_next: a per-step measurement-consistency hook (inverse.corrections), applied
#: after step i; the corrected x is what step i + 1 (and a multistep sampler's history) sees.
Correct = Callable[[Tensor, float, int], Tensor]


class SamplerError(ConfigError, ValueError):
    """A sampler argument is invalid (also a ValueError)."""


class Step:
    """One update of the walk from s = sig[i] to s' = sig[i + 1]. Single-step samplers override `update`;
    multistep samplers keep their history (past D or eps and sigmas) in the object, which lives for one walk.

    The walk calls, per step i: x, s_eval, D = evaluate(denoise, x, s, i); the callback; x = update(x, D, s_eval,
    s', denoise, i); then correct(x, s', i). `evaluate` is where a step changes the point it evaluates at
    (EDM's churn raises s to s_hat) or asks for more than D (a learned variance); `begin` sees the starting state
    once (to build a noise source of x's shape); `record` adds sampler-specific keys to the callback record."""

    def begin(self, x: Tensor, sig: list[float], generator: Generators) -> None:
        pass

    def evaluate(self, denoise: BoundDenoiser, x: Tensor, s: float, i: int) -> tuple[Tensor, float, Tensor]:
        return x, s, denoise(x, s)

    def record(self, i: int) -> dict:
        return {}

    def update(self, x: Tensor, denoised: Tensor, s: float, s_next: float, denoise: BoundDenoiser,
               i: int) -> Tensor:
        raise NotImplementedError


class FunctionStep(Step):
    """A plain step function (StepFunction) as a Step."""

    def __init__(self, fn: StepFunction):
        self.fn = fn

    def update(self, x, denoised, s, s_next, denoise, i):
        return self.fn(x, denoised, s, s_next, denoise)


def check_sigmas(sigmas: Tensor) -> list[float]:
    """Validate a grid and return it as Python floats (float64): 1-D, >= 2 entries, finite, strictly descending,
    all but the last > 0, the last >= 0 (normally 0)."""
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2 or not sigmas.is_floating_point():
        desc = f"shape {tuple(sigmas.shape)} dtype {sigmas.dtype}" if isinstance(sigmas, Tensor) else type(sigmas).__name__
        raise SamplerError(f"sigmas must be a 1-D float tensor (n + 1,) with n >= 1 steps, got {desc}; "
                           f"build one with torchdiffusion.core.grids")
    sig = sigmas.detach().to("cpu", torch.float64)
    if not torch.isfinite(sig).all():
        raise SamplerError("sigmas must be finite")
    if not (sig[1:] < sig[:-1]).all():
        raise SamplerError("sigmas must be strictly descending (sigma_max first, 0 last)")
    if sig[-1] < 0:
        raise SamplerError(f"sigmas must be > 0 except the last entry, which must be >= 0 (normally 0), got {sig[-1].item()}")
    return sig.tolist()


def check_noise(noise: Tensor) -> None:
    if not isinstance(noise, Tensor) or noise.ndim < 1 or not noise.is_floating_point():
        raise SamplerError("noise must be a float tensor of shape (B, ...) holding standard normal values")


class Bound:
    """The denoiser with cond fixed and sigma presented as a (B,) tensor in x's dtype and device:
    denoise(x, sigma_float) -> D; denoise.with_variance(x, sigma_float) -> (D, v) for a learned-variance model
    (core.precond.denoise_with_variance: a ConfigError for a denoiser that gives none)."""

    def __init__(self, denoiser: Denoiser, cond: Cond):
        self.denoiser, self.cond = denoiser, cond

    def _check(self, out: Tensor, x_: Tensor) -> Tensor:
        if out.shape != x_.shape:
            raise SamplerError(f"the denoiser returned shape {tuple(out.shape)} for an input of shape "
                               f"{tuple(x_.shape)}; it must return an x0 estimate of the input's shape")
        return out

    def __call__(self, x_: Tensor, sigma: float) -> Tensor:
        return self._check(self.denoiser(x_, x_.new_full((x_.shape[0],), sigma), self.cond), x_)

    def with_variance(self, x_: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
        denoised, v = denoise_with_variance(self.denoiser, x_, x_.new_full((x_.shape[0],), sigma), self.cond)
        return self._check(denoised, x_), v


def bind(denoiser: Denoiser, cond: Cond) -> Bound:
    """Fix cond and present sigma to the denoiser as a (B,) tensor in x's dtype and device."""
    return Bound(denoiser, cond)


def as_step(step) -> Step:
    if isinstance(step, Step):
        return step
    if callable(step):
        return FunctionStep(step)
    raise SamplerError(f"a walk needs a Step or a step function, got {type(step).__name__}")


def check_correct(correct) -> None:
    if correct is not None and not callable(correct):
        raise SamplerError(f"correct must be None or a callable correct(x_next, sigma_next, i) -> x_next, "
                           f"got {type(correct).__name__}")


def walk(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, step, *, cond: Cond = None,
         generator: Generators = None, callback: Callback = None, correct: Correct | None = None) -> Tensor:
    """The loop every grid sampler shares, single-step and multistep: x = noise * sigmas[0]; for each step i,
    D = denoise(x, s) (Step.evaluate), callback, x = step.update(...), x = correct(x, s', i) if given.
    `step`: a Step or a plain step function. One denoiser call per step plus whatever the step adds.
    Returns x at sigmas[-1]; the caller's `noise` is never modified."""
    sig, x = start(noise, sigmas, generator)
    check_correct(correct)
    return run(bind(denoiser, cond), x, sig, as_step(step), generator, callback, correct)


def run(denoise: BoundDenoiser, x: Tensor, sig: list[float], step: Step, generator: Generators,
        callback: Callback, correct: Correct | None = None, offset: int = 0) -> Tensor:
    """The walk's loop from a given state x at sig[0] over the float grid `sig` (any direction: DDIM inversion
    walks up). `offset` shifts the step index seen by the callback and `correct` (RePaint's passes)."""
    step.begin(x, sig, generator)
    for k in range(len(sig) - 1):
        i = k + offset
        s_next = sig[k + 1]
        x, s, denoised = step.evaluate(denoise, x, sig[k], k)
        report(callback, i, x, s, s_next, denoised, **step.record(k))
        x = step.update(x, denoised, s, s_next, denoise, k)
        if correct is not None:
            x = correct(x, s_next, i)
    return x


def start(noise: Tensor, sigmas: Tensor, generator: Generators) -> tuple[list[float], Tensor]:
    """What every sampler checks first: noise, grid and generators; returns the grid as floats and x = noise * s_0."""
    check_noise(noise)
    sig = check_sigmas(sigmas)
    check_generators(generator, noise.shape[0])
    return sig, noise * sig[0]


def report(callback: Callback, i: int, x: Tensor, s: float, s_next: float, denoised: Tensor, **extra) -> None:
    """The per-step callback record every sampler emits (extra keys for sampler-specific state)."""
    if callback is not None:
        callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised, **extra})


def euler_step(x: Tensor, denoised: Tensor, s: float, s_next: float) -> Tensor:
    """One Euler step of the probability-flow ODE: x + (s' - s) d with d = (x - D) / s (EDM Alg. 1, line 4-5)."""
    d = (x - denoised) / s
    return x + d * (s_next - s)


def gaussian_step(x: Tensor, denoised: Tensor, c_x: float, std: float, generator: Generators) -> Tensor:
    """x' = D + c_x (x - D) + std * z, z ~ N(0, I) drawn from `generator` (no draw when std == 0).

    Every ancestral/DDIM-type update in this frame has this form: D plus a shrunk copy of the current
    noise estimate x - D = s * eps_hat plus fresh noise."""
    x_next = denoised + c_x * (x - denoised)
    if std > 0:
        x_next = x_next + std * randn_like(x, generator)
    return x_next


def posterior_variance(s: float, s_next: float) -> float:
    """Variance of q(x_{s'} | x_s, x0) in this frame: s'^2 (s^2 - s'^2) / s^2 (DDPM's beta-tilde / abar_{t-1},
    Ho et al. 2020, eq. 7, with abar = 1 / (1 + sigma^2))."""
    return s_next * s_next * (s * s - s_next * s_next) / (s * s)


def sqrt_nonneg(v: float) -> float:
    """sqrt that treats float round-off below zero as zero."""
    return math.sqrt(max(v, 0.0))

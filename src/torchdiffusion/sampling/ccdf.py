"""Sampling from an estimate: start any grid sampler at x = x_init + sigma_0 n instead of sigma_0 n (CCDF, Chung, Sim
& Ye 2022, "Come-closer-diffuse-faster"; SDEdit, Meng et al. 2022).

Notation: x = x0 + sigma * n. Every sampler of this project is equivariant under a shift of the frame: its updates
are affine combinations of x and D with weights summing to one, plus noise (e.g. Euler: x' = (s'/s) x + (1 - s'/s) D;
DDPM, DPM-Solver++, the Adams-Bashforth family alike). So running a sampler on the shifted variable
u = x - x_init, with the shifted denoiser D_u(u, s) = D(u + x_init, s) - x_init and the shifted correction,
from u = sigma_0 n, is the same walk started from x_init + sigma_0 n, for any sampler and its options. The
callback sees x and D in the original frame. Exact in exact arithmetic; in float32 the shift adds round-off of
the order of eps |x_init| per step. DDPM with a fixed variance (the default) needs no shift: its walk starts
directly at x_init + sigma_0 n (steps.run), bit-identical to CCDF's original DDPM walk.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from torchdiffusion.core.precond import denoise_with_variance, provides_variance
from torchdiffusion.protocols import Callback, Cond, Denoiser, Generators
from torchdiffusion.sampling.ancestral import ddpm_step, sample_ddpm
from torchdiffusion.sampling.steps import (Correct, FunctionStep, SamplerError, bind, check_correct, check_noise,
                                           run, start)


def sample_from(sampler: Callable, denoiser: Denoiser, x_init: Tensor, noise: Tensor, sigmas: Tensor, *,
                cond: Cond = None, generator: Generators = None, callback: Callback = None,
                correct: Correct | None = None, **options) -> Tensor:
    """`sampler` (any sample_NAME function) started from x_init (B, ...) + sigmas[0] * noise; see module notes."""
    check_noise(noise)
    check_correct(correct)
    if not callable(sampler):
        raise SamplerError(f"sampler must be a sampler function, got {type(sampler).__name__}")
    if not isinstance(x_init, Tensor) or tuple(x_init.shape) != tuple(noise.shape):
        shape = tuple(x_init.shape) if isinstance(x_init, Tensor) else type(x_init).__name__
        raise SamplerError(f"the starting estimate of shape {shape} does not match the noise of shape "
                           f"{tuple(noise.shape)}")
    x_init = x_init.to(noise.dtype)
    fixed_ddpm = sampler is sample_ddpm and set(options) <= {"variance"}
    if fixed_ddpm and options.get("variance", "small") in ("small", "large"):
        sig, _ = start(noise, sigmas, generator)
        step = FunctionStep(ddpm_step(options.get("variance", "small"), generator))
        return run(bind(denoiser, cond), x_init + noise * sig[0], sig, step, generator, callback, correct)

    def shifted(u: Tensor, sigma: Tensor, cond_: Cond = None, *, return_variance: bool = False):
        if return_variance:  # the shift moves the mean only; a learned variance passes through
            d, v = denoise_with_variance(denoiser, u + x_init, sigma, cond_)
            return d - x_init, v
        return denoiser(u + x_init, sigma, cond_) - x_init

    shifted.learned_variance = provides_variance(denoiser)

    shifted_correct = None if correct is None else (lambda u, s, i: correct(u + x_init, s, i) - x_init)
    shifted_callback = None if callback is None else (
        lambda rec: callback({**rec, "x": rec["x"] + x_init, "denoised": rec["denoised"] + x_init}))
    u = sampler(shifted, noise, sigmas, cond=cond, generator=generator, callback=shifted_callback,
                correct=shifted_correct, **options)
    return u + x_init


def sample_ccdf(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, init: Tensor, cond: Cond = None,
                generator: Generators = None, callback: Callback = None, correct: Correct | None = None,
                sampler: Optional[Callable] = None, sampler_options: Optional[dict] = None) -> Tensor:
    """CCDF: from an estimate `init` (e.g. A^+ y) diffused to sigma_0 = sigmas[0], x = init + sigma_0 n, walk a
    short grid (sigma_0 well below the model's sigma_max, e.g. karras(n, sigma_min, 2.0)) with `sampler`
    (default DDPM) and the correction `correct` (the projection onto the measurement). A good estimate needs few
    steps (Chung et al. 2022, Theorem 1: the error contracts along the reverse walk). NFE: the sampler's."""
    return sample_from(sample_ddpm if sampler is None else sampler, denoiser, init, noise, sigmas, cond=cond,
                       generator=generator, callback=callback, correct=correct, **(sampler_options or {}))

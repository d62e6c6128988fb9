"""Inverse-problem solvers: restore x0 from a measurement y = A x0 + sigma_y e with an unconditional denoiser.

Notation: x = x0 + sigma * n; D = D(x, sigma); s = sigmas[i] > s' = sigmas[i + 1]. Each solver is a correction
(corrections.py: a denoiser wrapper and/or the walk's per-step hook) run on a sampler, by default DDPM's ancestral
step (Ho et al. 2020; sampling.ancestral, "small" variance), x' = D + (s'^2 / s^2)(x - D) + std z. All share

    restore_NAME(denoiser, measurement, noise, sigmas, *, cond=None, generator=None, callback=None,
                 sampler=sample_ddpm, sampler_options=None, **options)

noise: (B, ...) standard normal of the measured images' shape; sigmas: the float64 (n + 1,) grid ending in 0;
sampler: any grid sampler function of this project (names resolve through config.registry.SAMPLERS at the
command line), with its options in `sampler_options` (e.g. {"eta": 1.0} for ddim).

| method         | correction                                                         | walk (default)        | NFE (backward) |
|----------------|--------------------------------------------------------------------|-----------------------|-----------|
| replacement    | projection of x onto A x = y_s' after every step (Score SDE, POCS)  | any sampler (DDPM)    | n (0)     |
| ilvr           | low-pass projection while s' >= sigma_stop (Choi et al. 2021)      | any sampler (DDPM)    | n (0)     |
| ccdf           | projection; starts at A^+ y + sigma_0 n, sigma_0 < sigma_max        | any sampler on a short grid (sampling.ccdf) | n (0) |
| mcg            | likelihood gradient (gradients.dps) + projection (Chung et al. 2022) | any sampler (DDPM)   | n (n)     |
| dps            | likelihood gradient only (Chung et al. 2023)                       | any sampler (DDPM)    | n (n)     |
| repaint        | projection; resampling with jumps (Lugmayr et al. 2022)            | sampling.repaint (DDPM steps) | see repaint_nfe |
| reconstruction | replacement + constant-weight gradient (Ho et al. 2022, eq. 7)     | any sampler (DDPM)    | n (n)     |

NFE is the sampler's (e.g. heun 2n - 1). The adaptive samplers (dpm_adaptive, pf_ode) take no per-step correction,
so only dps runs on them.

Measurement consistency: the projection methods end with s' = 0, where the projection sets A x = y exactly
(with noisy y this keeps the noise), whatever the sampler. DPS only pulls A x towards y (||A x - y|| of the
order of sigma_y); ILVR with sigma_stop > 0 deliberately leaves the last steps free.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from ..protocols import Callback, Cond, Denoiser, Generators
from ..sampling.ancestral import sample_ddpm
from ..sampling.ccdf import sample_ccdf
from ..sampling.noise import check_generators
from ..sampling.repaint import repaint_nfe, repaint_schedule, sample_repaint
from ..sampling.steps import check_noise, check_sigmas
from .corrections import ILVR, LOW_PASS, MCG, Correction, ReconstructionGuidance, Replacement, solve
from .gradients import dps
from .measurement import Measurement
from .operators import OperatorError

__all__ = ["restore_replacement", "restore_ilvr", "restore_ccdf", "restore_mcg", "restore_dps",
           "restore_reconstruction", "restore_repaint", "repaint_schedule", "repaint_nfe", "LOW_PASS",
           "GRADIENT_METHODS", "SAMPLER_METHODS"]


def _prepare(measurement: Measurement, noise: Tensor, sigmas: Tensor, generator: Generators,
             sampler: Callable, sampler_options: Optional[dict]) -> list[float]:
    check_noise(noise)
    measurement.check(noise)
    sig = check_sigmas(sigmas)
    check_generators(generator, noise.shape[0])
    if not callable(sampler):
        raise OperatorError(f"sampler must be a sampler function (e.g. torchdiffusion.sampling.sample_heun; names "
                            f"resolve through config.registry.SAMPLERS), got {type(sampler).__name__}")
    if sampler_options is not None and not isinstance(sampler_options, dict):
        raise OperatorError(f"sampler_options must be a dict of the sampler's options, got "
                            f"{type(sampler_options).__name__}")
    return sig


def _corrected(correction: Correction, denoiser, measurement, noise, sigmas, cond, generator, callback, sampler,
               sampler_options) -> Tensor:
    return solve(correction, sampler, denoiser, noise, sigmas, cond=cond, generator=generator, callback=callback,
                 **(sampler_options or {}))


def restore_replacement(denoiser: Denoiser, measurement: Measurement, noise: Tensor, sigmas: Tensor, *,
                        cond: Cond = None, generator: Generators = None, callback: Callback = None,
                        sampler: Callable = sample_ddpm, sampler_options: Optional[dict] = None) -> Tensor:
    """Replacement / POCS (Song et al. 2021, app. I.2; Chung et al. 2022): project after every step of `sampler`
    (corrections.Replacement). NFE: the sampler's (DDPM: n)."""
    _prepare(measurement, noise, sigmas, generator, sampler, sampler_options)
    return _corrected(Replacement(measurement, generator), denoiser, measurement, noise, sigmas, cond, generator,
                      callback, sampler, sampler_options)


def restore_ilvr(denoiser: Denoiser, measurement: Measurement, noise: Tensor, sigmas: Tensor, *,
                 cond: Cond = None, generator: Generators = None, callback: Callback = None,
                 sigma_stop: float = 0.0, sampler: Callable = sample_ddpm,
                 sampler_options: Optional[dict] = None) -> Tensor:
    """ILVR (Choi et al. 2021, Alg. 1): x <- x - phi(x) + phi(y_s') with the low-pass filter phi = A^+ A of a
    down-sampling or blur operator, applied while s' >= sigma_stop (corrections.ILVR). NFE: the sampler's."""
    correction = ILVR(measurement, generator, sigma_stop)
    _prepare(measurement, noise, sigmas, generator, sampler, sampler_options)
    return _corrected(correction, denoiser, measurement, noise, sigmas, cond, generator, callback, sampler,
                      sampler_options)


def restore_ccdf(denoiser: Denoiser, measurement: Measurement, noise: Tensor, sigmas: Tensor, *,
                 cond: Cond = None, generator: Generators = None, callback: Callback = None,
                 init: Optional[Tensor] = None, sampler: Callable = sample_ddpm,
                 sampler_options: Optional[dict] = None) -> Tensor:
    """Come-closer-diffuse-faster (Chung, Sim & Ye 2022): start from an estimate x_init (default A^+ y) diffused
    forward to sigma_0 = sigmas[0], x = x_init + sigma_0 n, and walk from there with `sampler` and the projection
    (sampling.ccdf.sample_ccdf). Give a grid that starts well below the model's sigma_max (e.g.
    karras(n, sigma_min, 2.0)): a good estimate needs few steps. NFE: the sampler's."""
    _prepare(measurement, noise, sigmas, generator, sampler, sampler_options)
    x_init = measurement.pinv_estimate() if init is None else init
    if tuple(x_init.shape) != tuple(noise.shape):
        raise OperatorError(f"CCDF init of shape {tuple(x_init.shape)} does not match images of shape "
                            f"{tuple(noise.shape)}")
    return sample_ccdf(denoiser, noise, sigmas, init=x_init, cond=cond, generator=generator, callback=callback,
                       correct=Replacement(measurement, generator), sampler=sampler, sampler_options=sampler_options)


def restore_mcg(denoiser: Denoiser, measurement: Measurement, noise: Tensor, sigmas: Tensor, *,
                cond: Cond = None, generator: Generators = None, callback: Callback = None,
                scale: float = 1.0, prior_std: float = 0.5, sampler: Callable = sample_ddpm,
                sampler_options: Optional[dict] = None) -> Tensor:
    """Manifold-constrained gradient (Chung et al. 2022, "Improving diffusion models for inverse problems using
    manifold constraints", Alg. 1): the likelihood gradient through the denoiser (gradients.dps) followed by the
    projection onto the measurement after every step (corrections.MCG). NFE: the sampler's forward + backward."""
    _prepare(measurement, noise, sigmas, generator, sampler, sampler_options)
    return _corrected(MCG(measurement, generator, scale, prior_std), denoiser, measurement, noise, sigmas, cond,
                      generator, callback, sampler, sampler_options)


def restore_dps(denoiser: Denoiser, measurement: Measurement, noise: Tensor, sigmas: Tensor, *,
                cond: Cond = None, generator: Generators = None, callback: Callback = None,
                scale: float = 1.0, prior_std: float = 0.5, sampler: Callable = sample_ddpm,
                sampler_options: Optional[dict] = None) -> Tensor:
    """Diffusion posterior sampling (Chung et al. 2023): `sampler` (default DDPM) run on the posterior denoiser
    gradients.dps(denoiser, ...). No projection, so it handles noisy measurements and operators without a
    pseudo-inverse, and it runs on every sampler, the adaptive ones included. NFE: the sampler's forward + backward."""
    _prepare(measurement, noise, sigmas, generator, sampler, sampler_options)
    guided = dps(denoiser, measurement, scale, prior_std)
    return sampler(guided, noise, sigmas, cond=cond, generator=generator, callback=callback,
                   **(sampler_options or {}))


def restore_reconstruction(denoiser: Denoiser, measurement: Measurement, noise: Tensor, sigmas: Tensor, *,
                           cond: Cond = None, generator: Generators = None, callback: Callback = None,
                           weight: float = 1.0, sampler: Callable = sample_ddpm,
                           sampler_options: Optional[dict] = None) -> Tensor:
    """Reconstruction-guided sampling (Ho et al. 2022, "Video diffusion models", sec. 3.1): replacement of the
    measured part plus the constant-weight gradient correction of the estimate (corrections.ReconstructionGuidance).
    NFE: the sampler's forward + backward."""
    _prepare(measurement, noise, sigmas, generator, sampler, sampler_options)
    return _corrected(ReconstructionGuidance(measurement, generator, weight), denoiser, measurement, noise, sigmas,
                      cond, generator, callback, sampler, sampler_options)


def restore_repaint(denoiser: Denoiser, measurement: Measurement, noise: Tensor, sigmas: Tensor, *,
                    cond: Cond = None, generator: Generators = None, callback: Callback = None,
                    jump: int = 10, resample: int = 10) -> Tensor:
    """RePaint (Lugmayr et al. 2022, Alg. 1): sampling.repaint.sample_repaint with the projection onto the
    measurement as its correction (for inpainting: known pixels := y + s' n after every downward move). RePaint
    has its own schedule of DDPM steps and re-noising moves, so it takes no other sampler. Lugmayr et al. use
    n = 250, jump = 10, resample = 10. NFE repaint_nfe(n, ...)."""
    _prepare(measurement, noise, sigmas, generator, sample_ddpm, None)
    return sample_repaint(denoiser, noise, sigmas, cond=cond, generator=generator, callback=callback,
                          correct=Replacement(measurement, generator), jump=jump, resample=resample)


#: methods that run a backward pass through the denoiser at every step
GRADIENT_METHODS = ("mcg", "dps", "reconstruction")
#: methods that run on any grid sampler (restore_*(..., sampler=...)); repaint has its own schedule
SAMPLER_METHODS = ("replacement", "ilvr", "ccdf", "mcg", "dps", "reconstruction")

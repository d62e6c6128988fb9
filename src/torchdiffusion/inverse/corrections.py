"""Measurement corrections as objects that work with any grid sampler of this project.

Notation: x = x0 + sigma * n; y = A x0 + sigma_y e (measurement.py); s' = the noise level a step just reached.
A correction has two parts, either of which may be the identity:

    wrap(denoiser) -> denoiser      a Denoiser -> Denoiser change of the estimate (a likelihood gradient, gradients.py)
    correction(x, s', i) -> x       the walk's per-step hook `correct` (sampling.steps.walk), after every step

and is used as

    sampler(correction.wrap(denoiser), noise, sigmas, correct=correction, ...)      (`solve` below)

| correction              | wrap                                 | per-step hook                            |
|-------------------------|--------------------------------------|------------------------------------------|
| Replacement (POCS)      | -                                    | x <- x + A^+(y_s' - A x) (Song et al. 2021, app. I.2) |
| ILVR                    | -                                    | the same with a low-pass A, while s' >= sigma_stop (Choi et al. 2021) |
| MCG                     | DPS gradient (gradients.dps)         | projection (Chung et al. 2022, Alg. 1)   |
| ReconstructionGuidance  | constant-weight gradient (Ho et al. 2022, eq. 7) | projection                   |

The projection draws y_s' = y + s' A n from the correction's `generator` (the sampler's, so one seed fixes the
run). At s' = 0 it sets A x = y exactly, so every projection method ends measurement-consistent, on any sampler.
For a multistep sampler the corrected x is what the next step and its history see (sampling.steps.Step).
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from ..protocols import Callback, Cond, Denoiser, Generators
from .gradients import dps, reconstruction_guidance
from .measurement import Measurement
from .operators import AvgPoolDown, BicubicDown, GaussianBlur, OperatorError

LOW_PASS = (AvgPoolDown, BicubicDown, GaussianBlur)


class Correction:
    """The identity correction; subclasses override `wrap` and/or `__call__` (module notes)."""

    def wrap(self, denoiser: Denoiser) -> Denoiser:
        return denoiser

    def __call__(self, x: Tensor, sigma_next: float, i: int) -> Tensor:
        return x


class Replacement(Correction):
    """Replacement / POCS: after every step with s' >= sigma_stop, x <- x + A^+(y_s' - A x), y_s' = y + s' A n."""

    def __init__(self, measurement: Measurement, generator: Generators = None, sigma_stop: float = 0.0):
        try:
            sigma_stop = float(sigma_stop)
        except (TypeError, ValueError):
            sigma_stop = float("nan")
        if not sigma_stop >= 0:
            raise OperatorError(f"{self.name} sigma_stop must be a number >= 0, got {sigma_stop}")
        self.measurement, self.generator, self.sigma_stop = measurement, generator, sigma_stop

    name = "replacement"

    def __call__(self, x: Tensor, sigma_next: float, i: int) -> Tensor:
        if sigma_next >= self.sigma_stop:
            return self.measurement.project(x, sigma_next, self.generator)
        return x


POCS = Replacement


class ILVR(Replacement):
    """ILVR (Choi et al. 2021, Alg. 1): x <- x - phi(x) + phi(y_s') with the low-pass filter phi = A^+ A of a
    down-sampling or blur operator, while s' >= sigma_stop (a larger sigma_stop keeps only the coarse structure
    of the reference and frees the details)."""

    name = "ILVR"

    def __init__(self, measurement: Measurement, generator: Generators = None, sigma_stop: float = 0.0):
        if not isinstance(measurement.op, LOW_PASS):
            raise OperatorError(f"ILVR refines low frequencies: it needs a down-sampling or blur operator "
                                f"(avgpool, bicubic, blur), got {measurement.op.name}")
        super().__init__(measurement, generator, sigma_stop)


class MCG(Replacement):
    """Manifold-constrained gradient (Chung et al. 2022, Alg. 1): the DPS likelihood gradient through the denoiser
    (gradients.dps, scale zeta and prior_std gamma) and the projection after every step."""

    name = "MCG"

    def __init__(self, measurement: Measurement, generator: Generators = None, scale: float = 1.0,
                 prior_std: float = 0.5):
        super().__init__(measurement, generator)
        self.scale, self.prior_std = scale, prior_std

    def wrap(self, denoiser: Denoiser) -> Denoiser:
        return dps(denoiser, self.measurement, self.scale, self.prior_std)


class ReconstructionGuidance(Replacement):
    """Reconstruction-guided sampling (Ho et al. 2022, sec. 3.1): the constant-weight gradient correction w_r of
    the estimate (gradients.reconstruction_guidance) plus replacement of the measured part."""

    name = "reconstruction guidance"

    def __init__(self, measurement: Measurement, generator: Generators = None, weight: float = 1.0):
        super().__init__(measurement, generator)
        self.weight = weight

    def wrap(self, denoiser: Denoiser) -> Denoiser:
        return reconstruction_guidance(denoiser, self.measurement, self.weight)


def solve(correction: Correction, sampler: Callable, denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *,
          cond: Cond = None, generator: Generators = None, callback: Callback = None, **options) -> Tensor:
    """sampler(correction.wrap(denoiser), noise, sigmas, correct=correction, ...) for any grid sampler."""
    return sampler(correction.wrap(denoiser), noise, sigmas, cond=cond, generator=generator, callback=callback,
                   correct=correction, **options)

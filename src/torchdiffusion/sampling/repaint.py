"""RePaint (Lugmayr et al. 2022, "RePaint: Inpainting using denoising diffusion probabilistic models"): the DDPM
walk with "resampling with jumps", as a sampler on the walk machinery.

Notation: x = x0 + sigma * n; sig = the float64 grid (n + 1,) ending in 0, positions 0..n. The sampler follows
`repaint_schedule`: a downward move s -> s' is DDPM's ancestral step ("small" variance; sampling.ancestral)
followed by the walk's correction hook `correct(x, s', i)` (for RePaint: the projection onto the measurement,
inverse.corrections.Replacement, i.e. known pixels := y + s' n); an upward move s' -> s re-noises with the forward
process, x <- x + sqrt(s^2 - s'^2) z (their eq. 8 in this frame), so the unknown part is harmonised with the
known part over `resample` passes. Each maximal run of downward moves is one walk (steps.run) over that part of
the grid; the callback's "i" counts downward moves. Lugmayr et al. use n = 250, jump = 10, resample = 10.
NFE = repaint_nfe(n, jump, resample); resample = 1 is the plain DDPM walk.
"""
from __future__ import annotations

import math

from torch import Tensor

from torchdiffusion.protocols import Callback, Cond, Denoiser, Generators
from torchdiffusion.sampling.ancestral import ddpm_step
from torchdiffusion.sampling.noise import randn_like
from torchdiffusion.sampling.steps import Correct, FunctionStep, SamplerError, bind, check_correct, run, start


def repaint_schedule(n: int, jump: int = 10, resample: int = 10) -> list[int]:
    """Positions on an n-step grid (0 = sigmas[0], n = the final sigma) visited by RePaint (Lugmayr et al. 2022,
    sec. 4.2, "resampling with jumps"): walk down; at every position i = jump, 2 jump, ... < n go back up `jump`
    positions and down again, `resample - 1` times. resample = 1 is the plain walk 0, 1, ..., n."""
    if n < 1 or jump < 1 or resample < 1:
        raise SamplerError(f"RePaint needs n >= 1 steps, jump >= 1 and resample >= 1, got n={n}, jump={jump}, "
                           f"resample={resample}")
    left = {k: resample - 1 for k in range(jump, n, jump)}
    path, i = [0], 0
    while i < n:
        i += 1
        path.append(i)
        if left.get(i, 0) > 0:
            left[i] -= 1
            for _ in range(min(jump, i)):
                i -= 1
                path.append(i)
    return path


def repaint_nfe(n: int, jump: int = 10, resample: int = 10) -> int:
    """Denoiser calls of sample_repaint: one per downward move of the schedule."""
    path = repaint_schedule(n, jump, resample)
    return sum(1 for a, b in zip(path, path[1:]) if b > a)


def sample_repaint(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *, cond: Cond = None,
                   generator: Generators = None, callback: Callback = None, correct: Correct | None = None,
                   jump: int = 10, resample: int = 10) -> Tensor:
    """RePaint's schedule of DDPM steps (each followed by `correct`) and forward re-noising moves (module notes).
    Without `correct` it samples the prior (the re-noising moves keep the marginals). NFE repaint_nfe(n, ...)."""
    sig, x = start(noise, sigmas, generator)
    check_correct(correct)
    path = repaint_schedule(len(sig) - 1, jump, resample)
    denoise = bind(denoiser, cond)
    step = FunctionStep(ddpm_step("small", generator))
    k, j = 0, 0
    while j < len(path) - 1:
        if path[j + 1] > path[j]:  # a run of downward moves: one walk over sig[path[j]] ... sig[path[e]]
            e = j
            while e < len(path) - 1 and path[e + 1] > path[e]:
                e += 1
            x = run(denoise, x, sig[path[j]:path[e] + 1], step, generator, callback, correct, offset=k)
            k += e - j
            j = e
        else:  # re-noise one position up
            s, s_up = sig[path[j]], sig[path[j + 1]]
            x = x + math.sqrt(s_up * s_up - s * s) * randn_like(x, generator)
            j += 1
    return x

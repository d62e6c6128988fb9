"""A sigma grid optimised for one model and one sampler: the n steps that minimise the discretisation error
measured against a high-accuracy pilot trajectory of the same model.

Idea (Chen et al. 2024, "On the trajectory regularity of ODE-based diffusion sampling", GITS; Sabour et al.
2024, "Align your steps"; Xue et al. 2024, "Accelerating diffusion sampling with optimized time steps"):
the probability-flow ODE trajectories of one model share their shape, so a grid fitted to a few pilot
trajectories carries to every other seed. Only the model (the denoiser) and pilot seeds are used, never
data. Three stages:

1. Teacher. Pilot noise z_b (one generator per seed, as in sampling) is integrated from sigma_max down a fine
   log-linear candidate grid c_0 = sigma_max > ... > c_{M-1} = sigma_min with Heun's method and `substeps`
   sub-steps per interval (2 * substeps calls per interval), then further to sigma_min / 100, where one
   denoiser call gives the endpoint x*(0). Stored: x*_k, D*_k = D(x*_k, c_k) at every candidate.
2. Dynamic programme (GITS, generalised to a two-step history). The local error of a step from node i to
   node j is measured on the teacher: e(i, j) = mean_b ||step(x*_i; D*_i, D*_h) - x*_j||, with the
   exponential-integrator step in data form (DDIM for the first step, DPM-Solver++(2M) afterwards; the
   history node h is the previous grid node, so the state of the programme is the pair (h, i)); the last
   step to sigma = 0 costs ||D*_i - x*(0)||. The programme finds the path c_0 -> ... -> 0 of exactly n steps
   with the least summed local error (O(n M^3) additions; M = 48 by default).
3. Refinement (optional, on by default). Pattern search on the log sigmas of the interior nodes, minimising
   the actual end-point error of the chosen sampler on the pilot seeds,
   E(grid) = mean_b ||sampler(z_b, grid) - x*(0)_b||^2. Each evaluation costs n calls on the pilot batch.
   Since the exact flow maps the noise law onto the data law, E^(1/2) bounds the 2-Wasserstein distance
   between the sampler's output law and the model's (coupling by the shared noise).

The result is deterministic for fixed arguments and is saved as JSON by `core.grids.save_grid` (with the
settings and the pilot error) so that it is computed once per model, sampler and n.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from torchdiffusion.core import grids
from torchdiffusion.errors import ConfigError
from torchdiffusion.protocols import Cond, Denoiser
from torchdiffusion.sampling.noise import randn
from torchdiffusion.sampling.steps import bind


@dataclass(frozen=True)
class GridSearchConfig:
    """Settings of `optimize_grid` (see the module notes)."""

    candidates: int = 48  # M, log-linear candidate nodes from sigma_max to sigma_min
    substeps: int = 4  # Heun sub-steps per candidate interval for the teacher
    pilot_seeds: tuple[int, ...] = tuple(range(1_000_000, 1_000_128))  # far from the usual sampling seeds
    refine_sweeps: int = 3  # pattern-search sweeps over the interior nodes (0: the programme's grid)
    refine_steps: tuple[float, ...] = (0.3, 0.1, 0.03)  # log-sigma moves tried per sweep (one per sweep)
    history: int = 2  # 1: DDIM local error (GITS); 2: DPM-Solver++(2M) local error with the pair state
    refine_max_steps: int = 25  # refine only grids of at most this many steps (the cost grows as n^2)


@dataclass
class GridSearchResult:
    sigmas: Tensor  # (n + 1,) float64, descending, ending in 0
    dp_sigmas: Tensor  # the dynamic programme's grid before refinement
    pilot_error: float  # E(grid)^(1/2): RMS end-point error of the sampler on the pilot seeds
    dp_error: float  # the same for the programme's grid
    teacher_calls: int
    search_calls: int
    info: dict = field(default_factory=dict)


class GridSearchError(ConfigError, ValueError):
    """A grid-search argument is invalid (also a ValueError)."""


def _heun_segment(denoise, x: Tensor, s: float, t: float, substeps: int) -> Tensor:
    """Heun (EDM Alg. 1) from s to t > 0 with `substeps` log-spaced sub-steps."""
    ratio = (t / s) ** (1.0 / substeps)
    a = s
    for _ in range(substeps):
        b = a * ratio
        d = (x - denoise(x, a)) / a
        x_e = x + (b - a) * d
        d2 = (x_e - denoise(x_e, b)) / b
        x = x + (b - a) * 0.5 * (d + d2)
        a = b
    return x


def pilot_noise(shape: Sequence[int], seeds: Sequence[int], dtype=torch.float64, device=None) -> Tensor:
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return randn((len(gens), *shape), gens, dtype=dtype, device=device)


def teacher(denoiser: Denoiser, noise: Tensor, candidates: Tensor, cond: Cond = None, substeps: int = 4):
    """Fine Heun trajectory through the candidate nodes: (xs (M, B, ...), ds (M, B, ...), x_end, calls)."""
    denoise = bind(denoiser, cond)
    calls = [0]

    def counted(x, s):
        calls[0] += 1
        return denoise(x, s)

    c = candidates.tolist()
    x = noise * c[0]
    xs, ds = [], []
    for k, s in enumerate(c):
        if k > 0:
            x = _heun_segment(counted, x, c[k - 1], s, substeps)
        xs.append(x)
        ds.append(counted(x, s))
    x_tiny = _heun_segment(counted, x, c[-1], c[-1] / 100.0, 2 * substeps)
    x_end = counted(x_tiny, c[-1] / 100.0)
    return torch.stack(xs), torch.stack(ds), x_end, calls[0]


def _per_sample_norm(v: Tensor, batch_dims: int) -> Tensor:
    """L2 norm over the trailing sample dimensions, then the mean over the batch axis (axis `batch_dims`)."""
    flat = v.reshape(*v.shape[:batch_dims + 1], -1)
    return flat.norm(dim=-1).mean(dim=-1)


def local_costs(c: Sequence[float], xs: Tensor, ds: Tensor, x_end: Tensor, history: int):
    """Local errors on the teacher. Returns (first (M,), c1 (M, M), c2 (M, M, M) or None, last (M,)):
    c1[i, j]: DDIM step i -> j (first step of a grid), c2[h, i, j]: DPM-Solver++(2M) step i -> j after h,
    last[i]: the step i -> 0, i.e. ||D*_i - x*(0)||."""
    M = len(c)
    lam = torch.tensor([-math.log(v) for v in c], dtype=torch.float64)
    inf = float("inf")
    c1 = torch.full((M, M), inf, dtype=torch.float64)
    c2 = torch.full((M, M, M), inf, dtype=torch.float64) if history >= 2 else None
    for i in range(M - 1):
        j = torch.arange(i + 1, M)
        h = (lam[j] - lam[i])  # (J,)
        shape = (-1,) + (1,) * (xs.ndim - 1)
        e = torch.exp(-h).to(xs.dtype).reshape(shape)
        base = e * xs[i] + (1 - e) * ds[i]  # (J, B, ...)
        c1[i, j] = _per_sample_norm(base - xs[j], 1).double()
        if c2 is not None:
            for hh in range(i):
                r = ((lam[i] - lam[hh]) / h).to(xs.dtype).reshape(shape)
                corr = (1 - e) * (0.5 / r) * (ds[i] - ds[hh])
                c2[hh, i, j] = _per_sample_norm(base + corr - xs[j], 1).double()
    last = _per_sample_norm(ds - x_end[None], 1).double()
    return c1, c2, last


def dp_path(c1: Tensor, c2: Optional[Tensor], last: Tensor, n: int) -> list[int]:
    """Least summed local error over paths 0 -> ... -> i_{n-1} -> zero with exactly n steps (node indices)."""
    M = c1.shape[0]
    inf = float("inf")
    if n == 1:
        return [0]
    idx = torch.arange(M)
    up = idx[:, None] < idx[None, :]  # only steps to smaller sigmas (larger node index)
    c1 = torch.where(up, c1, torch.full_like(c1, inf))
    if c2 is not None:
        c2 = torch.where(up[:, :, None] & up[None, :, :], c2, torch.full_like(c2, inf))
    if c2 is None:
        # state: current node; cost[k][i]: best cost of reaching i after k steps
        cost = torch.full((M,), inf, dtype=torch.float64)
        cost[0] = 0.0
        back = []
        for _ in range(n - 1):
            tot = cost[:, None] + c1  # (from, to)
            best, arg = tot.min(dim=0)
            back.append(arg)
            cost = best
        total = cost + last
        i = int(total.argmin())
        path = [i]
        for arg in reversed(back):
            i = int(arg[i])
            path.append(i)
        return path[::-1]
    # state (h, i): previous and current node; the first step (0 -> i) is a DDIM step
    cost = torch.full((M, M), inf, dtype=torch.float64)
    cost[0, 1:] = c1[0, 1:]
    back = []
    for _ in range(n - 2):
        # new[i, j] = min_h cost[h, i] + c2[h, i, j]
        tot = cost[:, :, None] + c2  # (h, i, j)
        best, arg = tot.min(dim=0)  # (i, j)
        back.append(arg)
        cost = best
    total = cost + last[None, :]  # (h, i)
    flat = int(total.argmin())
    h, i = divmod(flat, M)
    path = [h, i]
    for arg in reversed(back):
        h_prev = int(arg[path[0], path[1]])
        path.insert(0, h_prev)
    return path


def endpoint_error(sampler: Callable, denoiser: Denoiser, noise: Tensor, sigmas: Tensor, x_end: Tensor,
                   cond: Cond = None) -> float:
    """RMS over the pilot batch of ||sampler(noise, sigmas) - x*(0)||."""
    out = sampler(denoiser, noise, sigmas, cond=cond)
    return float(((out - x_end) ** 2).reshape(out.shape[0], -1).sum(1).mean().sqrt())


def optimize_grid(denoiser: Denoiser, shape: Sequence[int], n: int, sampler: Callable, *, sigma_min: float,
                  sigma_max: float, cond: Cond = None, config: GridSearchConfig = GridSearchConfig(),
                  dtype: torch.dtype = torch.float64, device=None, log: Callable[[str], None] | None = None,
                  baseline: Optional[Tensor] = None) -> GridSearchResult:
    """The n-step grid (n + 1 sigmas ending in 0) for `sampler` (a function with the library's sampler
    signature, options bound) that minimises the pilot end-point error; see the module notes.

    shape: one sample's shape (no batch axis). sigma_min, sigma_max: the model's range; the grid starts at
    sigma_max and its last positive sigma is >= sigma_min. baseline: another n-step grid whose pilot error
    is reported in result.info["baseline_error"] for comparison."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise GridSearchError(f"the number of steps n must be an integer >= 1, got {n!r}")
    lo, hi = float(sigma_min), float(sigma_max)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise GridSearchError(f"need finite 0 < sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}")
    M = max(int(config.candidates), 2 * n)  # enough candidates for n steps
    if M > 400:
        raise GridSearchError(f"at most 400 candidate nodes (2 n for n steps), got {M}; use n <= 200")
    if len(config.pilot_seeds) < 1:
        raise GridSearchError("need at least one pilot seed")
    if config.history not in (1, 2):
        raise GridSearchError(f"history must be 1 or 2, got {config.history!r}")
    say = log or (lambda msg: None)
    cand = grids.loglinear(M, lo, hi)[:-1]  # (M,) descending, c_0 = sigma_max, c_{M-1} = sigma_min
    noise = pilot_noise(shape, config.pilot_seeds, dtype=dtype, device=device)
    with torch.no_grad():
        xs, ds, x_end, t_calls = teacher(denoiser, noise, cand, cond, config.substeps)
        say(f"teacher: {t_calls} calls on {noise.shape[0]} pilot seeds")
        c = cand.tolist()
        c1, c2, last = local_costs(c, xs, ds, x_end, config.history if n > 2 else 1)
        path = dp_path(c1, c2 if n > 2 else None, last, n)
        dp_sig = torch.tensor([c[k] for k in path] + [0.0], dtype=torch.float64)
        calls = [0]

        def counted(x, s, cnd=None):
            calls[0] += 1
            return denoiser(x, s, cnd)

        def err(sig: Tensor) -> float:
            return endpoint_error(sampler, counted, noise, sig, x_end, cond)

        base_err = err(baseline) if baseline is not None else None
        best_sig, best = dp_sig.clone(), err(dp_sig)
        dp_err = best
        say(f"dynamic programme: {[round(v, 4) for v in dp_sig.tolist()]} pilot RMS error {best:.4g}")
        if 2 <= n <= config.refine_max_steps:
            for sweep in range(config.refine_sweeps):
                step = config.refine_steps[min(sweep, len(config.refine_steps) - 1)]
                for k in range(1, n):
                    for direction in (1.0, -1.0):
                        while True:
                            trial = best_sig.clone()
                            trial[k] = trial[k] * math.exp(direction * step)
                            upper = trial[k - 1]
                            lower = trial[k + 1] if k + 1 < n else lo
                            if not (lower < trial[k] < upper) or (k + 1 == n and trial[k] < lo):
                                break
                            e = err(trial)
                            if e < best:
                                best, best_sig = e, trial
                            else:
                                break
                say(f"refinement sweep {sweep + 1} (step {step}): {[round(v, 4) for v in best_sig.tolist()]} "
                    f"pilot RMS error {best:.4g}")
    return GridSearchResult(sigmas=best_sig, dp_sigmas=dp_sig, pilot_error=best, dp_error=dp_err,
                            teacher_calls=t_calls * noise.shape[0], search_calls=calls[0] * noise.shape[0],
                            info={"candidates": M, "pilot_seeds": len(config.pilot_seeds), "baseline_error": base_err})

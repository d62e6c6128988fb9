"""Sigma grids: where a sampler evaluates the denoiser.

Notation: x = x0 + sigma * n. A grid for an n-step sampler is a float64 tensor of shape (n + 1,),
strictly descending, whose first n entries are positive and whose last entry is 0. Step i goes from
sigmas[i] to sigmas[i + 1]. Grids are pure functions of their arguments; they are built in float64
because the small sigmas at the end of a grid lose most of their digits in float32.

- karras: Karras et al. 2022 ("EDM"), eq. 5, uniform in sigma^(1/rho).
- loglinear: uniform in log sigma (rho -> infinity in eq. 5).
- continuous_uniform_t: uniform in t for a continuous process given as sigma(t) (Song et al. 2021).
- uniform_t: uniform in the time variable of a `core.processes` process (its t_of_sigma / sigma(t); for the
  discrete VP the fractional timestep, log-linear in sigma between table entries).
- discrete: n of the T timesteps of a discrete model (DDPM, Ho et al. 2020), picked the way DDIM
  (Song et al. 2021a) and its common re-implementations do ("leading", "trailing", "linspace"; the
  names follow Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed").
- saved grids (`save_grid` / `load_grid`): any grid, typically one optimised for a model and a sampler
  (`sampling.gridopt`), kept as JSON with the settings that produced it.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from torchdiffusion.errors import ConfigError

SPACINGS = ("leading", "trailing", "linspace")


class GridError(ConfigError, ValueError):
    """A sigma-grid argument is invalid (also a ValueError)."""


def _check_steps(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise GridError(f"the number of steps n must be an integer >= 1, got {n!r}")
    return n


def _check_range(sigma_min, sigma_max) -> tuple[float, float]:
    lo, hi = float(sigma_min), float(sigma_max)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise GridError(f"need finite 0 < sigma_min < sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
    return lo, hi


def _ramp(n: int) -> Tensor:
    """(n,) float64 ramp from 0 to 1 (a single 0 when n == 1, i.e. the grid starts at its top)."""
    return torch.linspace(0.0, 1.0, n, dtype=torch.float64)


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _pin_ends(sigmas: Tensor, lo: float, hi: float) -> Tensor:
    """Make the end points exact: (x^(1/rho))^rho and exp(log x) can be off by a few ulp."""
    sigmas[0] = hi
    if sigmas.numel() > 1:
        sigmas[-1] = lo
    return sigmas


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM grid (Karras et al. 2022, eq. 5): sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho.

    Returns (n + 1,) float64: sigma_max, ..., sigma_min, 0. rho = 7 is the paper's choice; rho = 1 is
    uniform in sigma and rho -> infinity tends to `loglinear`.
    """
    n = _check_steps(n)
    lo, hi = _check_range(sigma_min, sigma_max)
    if not (math.isfinite(float(rho)) and rho > 0):
        raise GridError(f"rho must be a finite number > 0, got {rho!r}")
    inv_hi, inv_lo = hi ** (1.0 / rho), lo ** (1.0 / rho)
    sigmas = (inv_hi + _ramp(n) * (inv_lo - inv_hi)) ** rho
    return _append_zero(_pin_ends(sigmas, lo, hi))


def loglinear(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Uniform in log sigma: (n + 1,) float64, sigma_max, ..., sigma_min, 0 (constant ratio between steps)."""
    n = _check_steps(n)
    lo, hi = _check_range(sigma_min, sigma_max)
    log_sigmas = math.log(hi) + _ramp(n) * (math.log(lo) - math.log(hi))
    return _append_zero(_pin_ends(log_sigmas.exp(), lo, hi))


def continuous_uniform_t(n: int, sigma_of_t: Callable[[Tensor], Tensor], t_min: float, t_max: float) -> Tensor:
    """Uniform in t for a continuous process: sigma(t_max), ..., sigma(t_min), 0, as (n + 1,) float64.

    sigma_of_t maps a (n,) float64 tensor of times to sigmas and must be increasing in t (e.g. the VP SDE of
    Song et al. 2021 with t in [1e-3, 1]).
    """
    n = _check_steps(n)
    t_lo, t_hi = float(t_min), float(t_max)
    if not (math.isfinite(t_lo) and math.isfinite(t_hi) and t_lo < t_hi):
        raise GridError(f"need finite t_min < t_max, got t_min={t_min!r}, t_max={t_max!r}")
    t = t_hi + _ramp(n) * (t_lo - t_hi)
    sigmas = torch.as_tensor(sigma_of_t(t)).to(torch.float64).reshape(-1)
    if sigmas.shape != (n,):
        raise GridError(f"sigma_of_t must map a ({n},) tensor of times to ({n},) sigmas, got shape {tuple(sigmas.shape)}")
    if not (torch.isfinite(sigmas).all() and (sigmas > 0).all()):
        raise GridError(f"sigma_of_t must give finite sigmas > 0 on [t_min, t_max] = [{t_lo}, {t_hi}]")
    if n > 1 and not (sigmas[1:] < sigmas[:-1]).all():
        raise GridError("sigma_of_t must be strictly increasing in t on [t_min, t_max]")
    return _append_zero(sigmas)


def uniform_t(n: int, process, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None) -> Tensor:
    """Uniform in the process's own time t between t(sigma_max) and t(sigma_min) (default: the process's
    range), then 0: (n + 1,) float64. VE gives the log-linear grid, EDM (sigma = t) rho = 1, the VP SDE the
    grid of Song et al. 2021; the discrete VP uses fractional timesteps (`VPDiscrete.t_of_sigma`)."""
    n = _check_steps(n)
    if not hasattr(process, "t_of_sigma"):
        raise GridError(f"uniform_t needs a process with t_of_sigma, got {type(process).__name__}")
    lo, hi = _check_range(process.sigma_min if sigma_min is None else sigma_min,
                          process.sigma_max if sigma_max is None else sigma_max)
    t_lo, t_hi = (float(v) for v in process.t_of_sigma(torch.tensor([lo, hi], dtype=torch.float64)))
    t = t_hi + _ramp(n) * (t_lo - t_hi)
    if hasattr(process, "sigma"):
        sigmas = torch.as_tensor(process.sigma(t), dtype=torch.float64)
    else:  # a discrete table: log-linear interpolation between integer timesteps, the inverse of t_of_sigma
        log_table = process.sigmas().log()
        i0 = t.floor().clamp(0, log_table.numel() - 2).long()
        w = t - i0
        sigmas = torch.exp((1 - w) * log_table[i0] + w * log_table[i0 + 1])
    return _append_zero(_pin_ends(sigmas.clone(), lo, hi))


def discrete_timesteps(T: int, n: int, spacing: str = "leading", offset: int = 0) -> Tensor:
    """The n integer timesteps (int64, descending) an n-step sampler visits on a T-step discrete model.

    Conventions (those of DDIM's reference code and of diffusers' `timestep_spacing`):
    - "leading":  k = T // n; t_j = j * k + offset for j = 0 .. n-1 (DDIM's "uniform" skip; Stable Diffusion
      uses offset=1). Never visits the noisiest timesteps when k * n < T.
    - "trailing": t_j = round(T - j * T / n) - 1 for j = 0 .. n-1; always starts at T - 1 (Lin et al. 2024).
    - "linspace": t_j = round(linspace(0, T - 1, n)), rounding half to even (as numpy and torch do);
      visits both 0 and T - 1.
    Example, T = 10, n = 5: leading [8, 6, 4, 2, 0], trailing [9, 7, 5, 3, 1], linspace [9, 7, 4, 2, 0].
    """
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise GridError(f"the number of training timesteps T must be an integer >= 1, got {T!r}")
    n = _check_steps(n)
    if n > T:
        raise GridError(f"cannot pick n={n} distinct timesteps from T={T}; use n <= {T}")
    if spacing == "leading":
        k = T // n
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= T - 1 - (n - 1) * k:
            raise GridError(f"leading offset must be an integer in [0, {T - 1 - (n - 1) * k}] for T={T}, n={n}, "
                            f"got {offset!r}")
        t = torch.arange(n, dtype=torch.int64) * k + offset
    else:
        if offset != 0:
            raise GridError(f"offset applies to spacing='leading' only, got offset={offset!r} with {spacing!r}")
        if spacing == "trailing":
            j = torch.arange(n, dtype=torch.float64)
            t = (torch.round(T - j * (T / n)) - 1).to(torch.int64).flip(0)
        elif spacing == "linspace":
            t = torch.round(torch.linspace(0, T - 1, n, dtype=torch.float64)).to(torch.int64)
        else:
            raise GridError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    return t.flip(0)


def discrete(sigmas_table: Tensor, n: int, spacing: str = "leading", offset: int = 0) -> Tensor:
    """Respaced grid of a discrete-time model: its sigmas at `discrete_timesteps(T, n, spacing, offset)`, then 0.

    sigmas_table: (T,) float64 sigma_t for t = 0 .. T-1, strictly increasing in t (for DDPM,
    sigma_t = sqrt((1 - abar_t) / abar_t)). Returns (n + 1,) float64, descending, ending in 0. The last
    step goes from the smallest visited sigma to 0, as DDIM does with alpha_bar_prev = 1 at the end.
    """
    table = torch.as_tensor(sigmas_table)
    if table.ndim != 1 or table.numel() < 1 or not table.is_floating_point():
        raise GridError(f"sigmas_table must be a 1-D float tensor of sigma_t for t = 0 .. T-1, got "
                        f"shape {tuple(table.shape)} dtype {table.dtype}")
    table = table.to(torch.float64)
    if not (torch.isfinite(table).all() and (table > 0).all() and (table[1:] > table[:-1]).all()):
        raise GridError("sigmas_table must be finite, > 0 and strictly increasing in t (t = 0 is the least noisy)")
    t = discrete_timesteps(table.numel(), n, spacing, offset)
    return _append_zero(table[t])


GRID_FORMAT = "torchdiffusion-sigma-grid/1"


def check_grid(sigmas: Tensor, where: str = "grid") -> Tensor:
    """Validate a saved or user-given grid: 1-D float, >= 2 entries, finite, strictly descending, positive
    except the last entry, which must be 0. Returns it as float64."""
    sig = torch.as_tensor(sigmas)
    if sig.ndim != 1 or sig.numel() < 2 or not sig.is_floating_point():
        raise GridError(f"{where}: sigmas must be a list of at least 2 numbers (sigma_max, ..., 0)")
    sig = sig.to(torch.float64)
    if not torch.isfinite(sig).all() or not (sig[1:] < sig[:-1]).all() or sig[-1] != 0 or not (sig[:-1] > 0).all():
        raise GridError(f"{where}: sigmas must be finite, strictly descending, positive and end in 0")
    return sig


def save_grid(path: Union[str, Path], sigmas: Tensor, meta: Optional[dict[str, Any]] = None) -> Path:
    """Write a grid as JSON {"format", "steps", "sigmas", "meta"} (atomically: temporary file + rename)."""
    sig = check_grid(sigmas)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": GRID_FORMAT, "steps": sig.numel() - 1, "sigmas": sig.tolist(), "meta": dict(meta or {})}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load_grid(path: Union[str, Path], n: Optional[int] = None) -> tuple[Tensor, dict[str, Any]]:
    """Read a grid written by `save_grid`: (sigmas (n + 1,) float64, meta). With n given, the file must hold
    an n-step grid."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise GridError(f"grid file {path} does not exist; compute it with `torchdiffusion grid optimize`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GridError(f"grid file {path} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != GRID_FORMAT or not isinstance(doc.get("sigmas"), list):
        raise GridError(f"grid file {path} is not a torchdiffusion sigma grid (format {GRID_FORMAT!r})")
    try:
        sig = check_grid(torch.tensor(doc["sigmas"], dtype=torch.float64), f"grid file {path}")
    except (TypeError, ValueError) as e:
        if isinstance(e, GridError):
            raise
        raise GridError(f"grid file {path}: sigmas must be numbers") from None
    if n is not None and sig.numel() - 1 != n:
        raise GridError(f"grid file {path} holds a {sig.numel() - 1}-step grid, but {n} steps were asked for")
    meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
    return sig, meta


# ------------------------------------------------------------------ the sample.grid kinds (config.registry.GRIDS)
# grid(process, n, sigma_min, sigma_max, opts) -> float64 (n + 1,); opts carries rho, spacing, grid_file (a
# SampleConfig or anything with those attributes).
def grid_karras(process, n: int, smin: float, smax: float, opts) -> Tensor:
    return karras(n, smin, smax, opts.rho)


def grid_loglinear(process, n: int, smin: float, smax: float, opts) -> Tensor:
    return loglinear(n, smin, smax)


def grid_optimized(process, n: int, smin: float, smax: float, opts) -> Tensor:
    if not opts.grid_file:
        raise ConfigError("sample.grid 'optimized' needs sample.grid_file (a grid written by "
                          "`torchdiffusion grid optimize`)")
    return load_grid(opts.grid_file, n)[0]


def grid_discrete(process, n: int, smin: float, smax: float, opts) -> Tensor:
    if not (hasattr(process, "sigmas") and hasattr(process, "T")):  # a discrete-time process (VPDiscrete)
        raise ConfigError("sample.grid 'discrete' needs a discrete-time model (model.process.kind vp_discrete); "
                          "use 'karras' or 'loglinear'")
    return discrete(process.sigmas(), n, opts.spacing)


def grid_uniform_t(process, n: int, smin: float, smax: float, opts) -> Tensor:
    """Uniform in the process's own time: VDM's learned schedule when the process carries one (a VDM model's
    process), else t_of_sigma on [t(sigma_min), t(sigma_max)] mapped back through sigma(t)."""
    if isinstance(getattr(process, "schedule", None), torch.nn.Module):  # VDM's learned schedule (not a name)
        return process.uniform_t_grid(n)
    if not (hasattr(process, "sigma") and hasattr(process, "t_of_sigma")):
        raise ConfigError(f"sample.grid 'uniform_t' needs a process with a time variable; "
                          f"{type(process).__name__} has none, use 'karras' or 'loglinear'")
    lo, hi = (float(process.t_of_sigma(torch.tensor(s, dtype=torch.float64))) for s in (smin, smax))
    return continuous_uniform_t(n, process.sigma, lo, hi)

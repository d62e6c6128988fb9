"""Classifier-free guidance (Ho & Salimans 2022) as a Denoiser -> Denoiser wrapper.

Notation: x = x0 + sigma * n; D_c = D(x, sigma, c) the conditional and D_u = D(x, sigma, null) the unconditional
estimate of E[x0 | x] from one network trained with condition dropout (guidance.dropout); w the guidance scale.

    D_w(x, sigma, c) = D_u + w (D_c - D_u)

so w = 1 is the conditional model, w = 0 the unconditional one and w > 1 extrapolates away from D_u. Since
D = x + sigma^2 grad log p_sigma (Tweedie), D_w corresponds to the score grad log p(x) + w grad log p(c | x) of
the "sharpened" density p(x) p(c | x)^w: w trades diversity (FID) for class fidelity (Ho & Salimans 2022, Fig. 1).
The same linear form holds for the eps and v parametrisations, so guiding in the x0 frame is the usual CFG.

Guidance interval (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves sample and
distribution quality in diffusion models"): guidance is applied only for sigma in (sigma_lo, sigma_hi]; outside
the interval the wrapper returns D_c (w = 1), which costs one network call instead of two.

Learned variance (Nichol & Dhariwal 2021): when the wrapped model has one, the wrapper does too
(`learned_variance`), and `guided(x, sigma, cond, return_variance=True)` returns (D_w, v_c): the variance
interpolation is taken from the conditional branch, as guided-diffusion / GLIDE do (they guide eps and keep the
conditional half's variance channels), so at w = 1 it is exactly the conditional model's (D_c, v_c).

Batching: the conditional and unconditional halves go through the network as one batch of 2B rows
(x, sigma and every tensor of cond concatenated along the batch), an optimisation only: the result equals two
separate calls up to floating-point reassociation inside the network.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from ..core.precond import denoise_with_variance, provides_variance
from ..errors import ConfigError
from ..protocols import Cond, Denoiser

#: uncond(cond) -> the null condition of the same batch (e.g. every label replaced by the null label).
NullCond = Callable[[Cond], Cond]


def null_label(num_classes: int, key: str = "label") -> NullCond:
    """The null condition of a class-conditional model: cond[key] replaced by num_classes (nn.unet's null label);
    other keys are kept."""

    def uncond(cond: Cond) -> Cond:
        if cond is None or key not in cond:
            raise ConfigError(f"classifier-free guidance needs cond[{key!r}] (the class labels), got "
                              f"{'nothing' if cond is None else sorted(cond)}")
        return {**cond, key: torch.full_like(cond[key], num_classes)}

    return uncond


def check_interval(interval: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
    if interval is None:
        return None
    lo, hi = (float(v) for v in interval)
    if not 0 <= lo < hi:
        raise ConfigError(f"guidance interval must be (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi, got "
                          f"({lo:g}, {hi:g})")
    return lo, hi


def in_interval(sigma: Tensor, interval: Optional[tuple[float, float]]) -> Tensor:
    """bool (B,): rows whose noise level lies in (lo, hi] (all rows without an interval)."""
    if interval is None:
        return torch.ones(sigma.shape, dtype=torch.bool, device=sigma.device)
    lo, hi = interval
    return (sigma > lo) & (sigma <= hi)


def _cat_cond(a: Cond, b: Cond) -> Cond:
    if a is None and b is None:
        return None
    if a is None or b is None or set(a) != set(b):
        raise ConfigError("the conditional and null conditions must have the same keys to be batched")
    return {k: torch.cat([a[k], b[k]]) for k in a}


class ClassifierFreeGuidance:
    """Denoiser wrapper: D_u + scale * (D_c - D_u), optionally only for sigma in `interval` (see module docstring).

    denoiser: the conditional model; uncond: cond -> null cond (e.g. null_label(K)); batched: one network call
    of 2B rows instead of two calls of B rows."""

    def __init__(self, denoiser: Denoiser, scale: float, uncond: NullCond, *,
                 interval: Optional[tuple[float, float]] = None, batched: bool = True):
        self.denoiser, self.scale, self.uncond = denoiser, float(scale), uncond
        self.interval, self.batched = check_interval(interval), batched

    @property
    def learned_variance(self) -> bool:
        """Whether return_variance=True is answered: exactly when the wrapped model answers it."""
        return bool(getattr(self.denoiser, "learned_variance", False))

    def _call(self, x: Tensor, sigma: Tensor, cond: Cond, return_variance: bool):
        if return_variance:
            return self.denoiser(x, sigma, cond, return_variance=True)
        return self.denoiser(x, sigma, cond)

    def pair(self, x: Tensor, sigma: Tensor, cond: Cond, return_variance: bool = False):
        """(D_c, D_u), from one batched call or two calls; with return_variance ((D_c, v_c), (D_u, v_u))."""
        ucond = self.uncond(cond)
        if not self.batched:
            return self._call(x, sigma, cond, return_variance), self._call(x, sigma, ucond, return_variance)
        b = x.shape[0]
        out = self._call(torch.cat([x, x]), torch.cat([sigma, sigma]), _cat_cond(cond, ucond), return_variance)
        if return_variance:
            d, v = out
            return (d[:b], v[:b]), (d[b:], v[b:])
        return out[:b], out[b:]

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None, *, return_variance: bool = False):
        if return_variance and not self.learned_variance:
            raise ConfigError(f"classifier-free guidance was asked for a learned variance, but the guided model "
                              f"{type(self.denoiser).__name__} has none; use DDPM variance 'small' or 'large'")
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        if self.scale == 1.0:  # exactly the conditional model (no unconditional call)
            return self._call(x, sigma, cond, return_variance)
        inside = in_interval(sigma, self.interval)
        if not bool(inside.any()):
            return self._call(x, sigma, cond, return_variance)
        if self.scale == 0.0 and bool(inside.all()) and not return_variance:  # exactly the unconditional model
            return self.denoiser(x, sigma, self.uncond(cond))
        (d_c, v_c), (d_u, _) = self._unpack(self.pair(x, sigma, cond, return_variance), return_variance)
        guided = d_u + self.scale * (d_c - d_u)
        if not bool(inside.all()):
            keep = inside.reshape((-1,) + (1,) * (x.ndim - 1))
            guided = torch.where(keep, guided, d_c)
        return (guided, v_c) if return_variance else guided

    @staticmethod
    def _unpack(pair, return_variance: bool):
        if return_variance:
            return pair
        (d_c, d_u) = pair
        return (d_c, None), (d_u, None)


def with_cond(denoiser: Denoiser, fixed: Mapping[str, Tensor] | Callable[[Cond], Cond] | None) -> Denoiser:
    """A denoiser that ignores the caller's cond and uses `fixed` (a mapping, a function of the caller's cond, or
    None): e.g. an unconditional model inside classifier guidance, which takes the labels for the classifier."""

    def wrapped(x: Tensor, sigma: Tensor, cond: Cond = None, *, return_variance: bool = False):
        c = fixed(cond) if callable(fixed) else fixed
        return denoise_with_variance(denoiser, x, sigma, c) if return_variance else denoiser(x, sigma, c)

    wrapped.learned_variance = provides_variance(denoiser)
    return wrapped

"""Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself") as a
Denoiser -> Denoiser wrapper.

Notation: x = x0 + sigma * n; D_1 = D_good(x, sigma, c) the main model's x0 estimate and D_0 = D_bad(x, sigma, c)
that of a weaker model of the same task, data and condition (a smaller one or an earlier checkpoint of the same
run); w the guidance scale.

    D_w = D_0 + w (D_1 - D_0)

is classifier-free guidance's linear form (guidance.cfg) with the unconditional branch replaced by the bad model,
so it applies to unconditional models too. By Tweedie (D = x + sigma^2 grad log p_sigma) D_w is the denoiser of the
density proportional to p_1^w p_0^(1 - w): for w > 1 it pushes samples away from where the weak model puts mass the
strong one does not, the regions a briefly trained model gets wrong (Karras et al. 2024, section 3). w = 1 is
exactly the main model (the bad one is not called), w = 0 exactly the bad one. An optional sigma interval limits
the guidance as in guidance.cfg (outside it: D_1, one network call).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..protocols import Cond, Denoiser
from .cfg import check_interval, in_interval


class AutoGuidance:
    """Denoiser wrapper D_bad + scale (D_good - D_bad), optionally only for sigma in `interval`."""

    def __init__(self, good: Denoiser, bad: Denoiser, scale: float, *,
                 interval: Optional[tuple[float, float]] = None):
        self.good, self.bad, self.scale = good, bad, float(scale)
        self.interval = check_interval(interval)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        if self.scale == 1.0:
            return self.good(x, sigma, cond)
        inside = in_interval(sigma, self.interval)
        if not bool(inside.any()):
            return self.good(x, sigma, cond)
        if self.scale == 0.0 and bool(inside.all()):
            return self.bad(x, sigma, cond)
        d_1 = self.good(x, sigma, cond)
        d_0 = self.bad(x, sigma, cond)
        guided = d_0 + self.scale * (d_1 - d_0)
        if not bool(inside.all()):
            guided = torch.where(inside.reshape((-1,) + (1,) * (x.ndim - 1)), guided, d_1)
        return guided

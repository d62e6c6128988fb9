"""Classifier-free guidance for token denoisers (Ho & Salimans 2022 on logits; VQ-Diffusion's "discrete
classifier-free guidance", Tang et al. 2022, sec. 3.2).

Notation: l_c = log p(x0 | x_t, c) and l_u = log p(x0 | x_t, null), the log-softmax of one network's logits with
the condition and with the null condition (trained with condition dropout, guidance.dropout). The guided logits

    l_w = l_u + w (l_c - l_u)

give the distribution softmax(l_w) proportional to p(x0 | x_t) p(c | x0, x_t)^w per token: w = 0 is the
unconditional model and w = 1 the conditional one exactly (both tested through the samplers), w > 1 sharpens.
The two halves go through the network as one batch of 2B rows (an optimisation only).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..errors import ConfigError
from ..protocols import Cond

NullCond = Callable[[Cond], Cond]


class TokenCFG:
    """TokenDenoiser -> TokenDenoiser: net(x_t, t, cond) -> guided log-probabilities (B, ..., K)."""

    def __init__(self, net, scale: float, uncond: NullCond):
        if not isinstance(scale, (int, float)) or scale != scale:
            raise ConfigError(f"guidance scale must be a number, got {scale!r}")
        self.net, self.scale, self.uncond = net, float(scale), uncond

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        if cond is None:
            raise ConfigError("classifier-free guidance needs a condition (e.g. class labels)")
        null = self.uncond(cond)
        B = x_t.shape[0]
        both = {k: torch.cat([cond[k], null[k]]) for k in cond}
        logits = self.net(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        logp = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32).log_softmax(-1)
        l_c, l_u = logp[:B], logp[B:]
        if self.scale == 1.0:
            return l_c
        if self.scale == 0.0:
            return l_u
        return l_u + self.scale * (l_c - l_u)

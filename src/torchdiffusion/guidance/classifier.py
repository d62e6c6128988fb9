"""Classifier guidance (Dhariwal & Nichol 2021) in the x0 frame, as a Denoiser -> Denoiser wrapper.

Notation: x = x0 + sigma * n, p_sigma the density of x, D(x, sigma) = E[x0 | x]; a noisy classifier gives
log p(y | x, sigma) for the same frame (nn.classifier trained with --noisy); s the guidance scale.

Derivation. Tweedie's formula in this frame is E[x0 | x] = x + sigma^2 grad_x log p_sigma(x). Conditioning on y
and using Bayes, grad_x log p_sigma(x | y) = grad_x log p_sigma(x) + grad_x log p_sigma(y | x), so

    E[x0 | x, y] = D(x, sigma) + sigma^2 grad_x log p(y | x, sigma),

and the guided denoiser with scale s is

    D_s(x, sigma, y) = D(x, sigma) + s sigma^2 grad_x log p(y | x, sigma).

s = 1 is the exact class-conditional denoiser when D and the classifier are exact (tested on a Gaussian mixture);
s > 1 samples the sharpened p(x) p(y | x)^s. Relation to Dhariwal & Nichol 2021 (Alg. 2, eps form): with the VP
variables x_t = sqrt(abar) x, sigma = sqrt((1 - abar) / abar), they use eps' = eps - sqrt(1 - abar) s grad_{x_t}
log p(y | x_t). In this frame D = x - sigma eps and grad_x = sqrt(abar) grad_{x_t}, so D' = D + sigma sqrt(1 - abar)
s grad_{x_t} log p = D + s sigma^2 grad_x log p: the same scale s means the same guidance. (Their Alg. 1, the
ancestral mean shift s Sigma grad, is the same first-order correction for the DDPM sampler.)

Learned variance: the wrapper forwards `return_variance=True` to the wrapped model and returns (D_s, v) with the
model's own v (Dhariwal & Nichol shift only the mean); `learned_variance` says whether the wrapped model has one.

Cost: one classifier forward and backward per denoiser call; the denoiser itself runs without gradients.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import ConfigError
from ..protocols import Cond, Denoiser
from .cfg import check_interval, in_interval

#: classifier(x, sigma) -> logits (B, K): x in the frame, sigma (B,).
LogitsFn = Callable[[Tensor, Tensor], Tensor]


def log_prob_grad(classifier: LogitsFn, x: Tensor, sigma: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_x log p(y | x, sigma), log p(y | x, sigma)): shapes (B, ...) and (B,). Works under torch.no_grad."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logits = classifier(xg, sigma)
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)
        logp_y = logp.gather(1, y.reshape(-1, 1).long().to(logp.device)).squeeze(1)
        grad, = torch.autograd.grad(logp_y.sum(), xg)  # rows are independent: the sum's gradient is per row
    return grad.to(x.dtype), logp_y.detach()


class ClassifierGuidance:
    """Denoiser wrapper: D + scale * sigma^2 * grad_x log p(y | x, sigma), y = cond[label_key].

    denoiser_cond: what the wrapped denoiser receives: "same" (the caller's cond, e.g. a class-conditional or
    CFG-guided model), "none" (an unconditional model), or a function cond -> cond (e.g. the null label).
    interval: guide only for sigma in (lo, hi] (as guidance.cfg)."""

    def __init__(self, denoiser: Denoiser, classifier: LogitsFn, scale: float, *, label_key: str = "label",
                 denoiser_cond: str | Callable[[Cond], Cond] = "same",
                 interval: Optional[tuple[float, float]] = None):
        if not (callable(denoiser_cond) or denoiser_cond in ("same", "none")):
            raise ConfigError(f"denoiser_cond must be 'same', 'none' or a function, got {denoiser_cond!r}")
        self.denoiser, self.classifier, self.scale = denoiser, classifier, float(scale)
        self.label_key, self.denoiser_cond = label_key, denoiser_cond
        self.interval = check_interval(interval)

    def _inner_cond(self, cond: Cond) -> Cond:
        if callable(self.denoiser_cond):
            return self.denoiser_cond(cond)
        return None if self.denoiser_cond == "none" else cond

    @property
    def learned_variance(self) -> bool:
        return bool(getattr(self.denoiser, "learned_variance", False))

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None, *, return_variance: bool = False):
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        v = None
        if return_variance:
            if not self.learned_variance:
                raise ConfigError(f"classifier guidance was asked for a learned variance, but the guided model "
                                  f"{type(self.denoiser).__name__} has none; use DDPM variance 'small' or 'large'")
            d, v = self.denoiser(x, sigma, self._inner_cond(cond), return_variance=True)
        else:
            d = self.denoiser(x, sigma, self._inner_cond(cond))
        inside = in_interval(sigma, self.interval)
        if self.scale == 0.0 or not bool(inside.any()):
            return (d, v) if return_variance else d
        if cond is None or self.label_key not in cond:
            raise ConfigError(f"classifier guidance needs the target labels in cond[{self.label_key!r}] "
                              f"(sample --labels ...)")
        grad, _ = log_prob_grad(self.classifier, x, sigma, cond[self.label_key])
        w = (self.scale * sigma.double() ** 2 * inside.double()).to(x.dtype)
        d = d + w.reshape((-1,) + (1,) * (x.ndim - 1)) * grad
        return (d, v) if return_variance else d

"""Discrete (token) diffusion processes: D3PM absorbing, D3PM uniform and VQ-Diffusion's mask-and-replace.

Notation (Austin et al. 2021, "Structured Denoising Diffusion Models in Discrete State-Spaces", D3PM, sec. 2-3;
Gu et al. 2022, "Vector Quantized Diffusion Model for Text-to-Image Synthesis", VQ-Diffusion, sec. 3.2):
K data classes 0..K-1; a process with a mask state adds the state m = K, so there are S = K (+ 1) states.
Times t = 0..T, x_0 the data. A one-step transition q(x_t | x_{t-1}) = Cat(x_{t-1} Q_t) with row-stochastic
(S, S) matrices Q_t.

All three processes are one family: from a data token i, one step keeps i with probability a_t, sends the token
to the mask with probability c_t, and otherwise (r_t = 1 - a_t - c_t) redraws it uniformly among the K data
classes (which may give i again); the mask is absorbing. So

    Q_t[i, j] = a_t [i = j] + r_t / K   (i, j data),   Q_t[i, m] = c_t,   Q_t[m, m] = 1.

The family is closed under products (tested against explicit matrices): the cumulative matrix
Qbar_t = Q_1 ... Q_t has abar_t = prod_s a_s, 1 - cbar_t = prod_s (1 - c_s), rbar_t = 1 - abar_t - cbar_t, and the
s -> t transition Q_{s+1} ... Q_t has a = abar_t / abar_s, 1 - c = (1 - cbar_t) / (1 - cbar_s). Nothing of size
K x K is ever built: every quantity below is O(S) per token.

- absorbing (D3PM sec. 3, "absorbing state"): r = 0, c_t = 1 / (T - t + 1), so cbar_t = t / T: at t = T every
  token is masked.
- uniform (D3PM sec. 3, "uniform"; Hoogeboom et al. 2021's multinomial diffusion): c = 0, no mask state,
  abar_t = f(t) / f(0) with the cosine f(t) = cos^2((t / T + s) / (1 + s) * pi / 2) of Nichol & Dhariwal 2021.
- mask_replace (VQ-Diffusion sec. 3.2 and its appendix): abar linear from 0.99999 (t = 1) to 0.000009 (t = T),
  cbar linear from 0.000009 to 0.99999 (the released configuration; diffusers' VQDiffusionScheduler defaults).

Posterior q(x_s | x_t, x_0) (s < t) = q(x_t | x_s) q(x_s | x_0) / q(x_t | x_0) (D3PM eq. 3). The x0-parameterised
reverse step (D3PM sec. 3.3) with a network's x0 distribution p(x0 | x_t) is

    p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p(x0 | x_t)
                 = q(x_t | x_s) * sum_x0 q(x_s | x0) w(x0),   w(x0) = p(x0 | x_t) / q(x_t | x0),

one O(S) product per token. Classes x0 with q(x_t | x0) = 0 (an unmasked token of the absorbing process can only
come from itself) cannot have produced x_t; their mass is dropped and the rest renormalised, which is the
"carry-over unmasking" of MaskGIT and leaves an exact posterior network unchanged. With the exact posterior
q(x0 | x_t) as the network this is the exact reverse marginal q(x_s | x_t) of one token. (D3PM's code uses
sum_x0 q(x_s, x_t | x0) p(x0 | x_t) instead, which differs from the above by the weight q(x_t | x0) whenever that
depends on x0, i.e. for the uniform and mask-and-replace processes.)

Token tensors are int64 (B, ...) (any token layout: (B, N) sequences or (B, h, w) grids); probabilities carry
one more trailing axis of S (or K) states. Times t are int64 (B,) or Python ints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
from torch import Tensor

from ..errors import ConfigError
from ..protocols import Generators

DISCRETE_KINDS = ("absorbing", "uniform", "mask_replace")
TimeLike = Union[int, Tensor]


@dataclass(frozen=True)
class DiscreteProcessConfig:
    """A token process: kind (absorbing | uniform | mask_replace), steps T, and the schedule's constants."""

    kind: Literal["absorbing", "uniform", "mask_replace"] = "absorbing"
    steps: int = 100  # T; VQ-Diffusion trains with T = 100, D3PM with T = 1000
    cosine_s: float = 0.008  # uniform: Nichol & Dhariwal 2021's offset
    abar_first: float = 0.99999  # mask_replace: abar at t = 1 (VQ-Diffusion)
    abar_last: float = 0.000009  # mask_replace: abar at t = T
    cbar_first: float = 0.000009  # mask_replace: cbar at t = 1
    cbar_last: float = 0.99999  # mask_replace: cbar at t = T

    def build(self, num_classes: int) -> "DiscreteProcess":
        if self.kind not in DISCRETE_KINDS:
            raise ConfigError(f"discrete process kind {self.kind!r} is not valid; valid: {', '.join(DISCRETE_KINDS)}")
        T = int(self.steps)
        if T < 1:
            raise ConfigError(f"a discrete process needs steps >= 1, got {self.steps}")
        t = torch.arange(T + 1, dtype=torch.float64)
        if self.kind == "absorbing":
            cbar = t / T
            abar = 1 - cbar
        elif self.kind == "uniform":
            s = float(self.cosine_s)
            f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
            abar = (f / f[0]).clamp(0, 1)
            abar[-1] = 0.0  # cos(pi / 2) is 0 up to rounding
            cbar = torch.zeros_like(abar)
        else:
            lin = (t[1:] - 1) / max(T - 1, 1)
            abar = torch.cat([torch.ones(1, dtype=torch.float64),
                              self.abar_first + lin * (self.abar_last - self.abar_first)])
            cbar = torch.cat([torch.zeros(1, dtype=torch.float64),
                              self.cbar_first + lin * (self.cbar_last - self.cbar_first)])
        return DiscreteProcess(num_classes, abar, cbar, has_mask=self.kind != "uniform", kind=self.kind)


def absorbing(num_classes: int, steps: int) -> "DiscreteProcess":
    return DiscreteProcessConfig("absorbing", steps).build(num_classes)


def uniform(num_classes: int, steps: int) -> "DiscreteProcess":
    return DiscreteProcessConfig("uniform", steps).build(num_classes)


def mask_replace(num_classes: int, steps: int, **schedule) -> "DiscreteProcess":
    return DiscreteProcessConfig("mask_replace", steps, **schedule).build(num_classes)


class DiscreteProcess:
    """A process of the keep / mask / uniform-redraw family from its cumulative schedule.

    abar, cbar: float64 (T + 1,) with abar[0] = 1, cbar[0] = 0 (cbar = 0 throughout without a mask state).
    """

    def __init__(self, num_classes: int, abar: Tensor, cbar: Tensor, *, has_mask: bool, kind: str = "custom"):
        K = int(num_classes)
        if K < 2:
            raise ConfigError(f"a discrete process needs at least 2 classes, got {num_classes}")
        abar, cbar = abar.to(torch.float64), cbar.to(torch.float64)
        if abar.shape != cbar.shape or abar.ndim != 1 or abar.numel() < 2:
            raise ConfigError("abar and cbar must both be float (T + 1,) schedules")
        if abar[0] != 1 or cbar[0] != 0:
            raise ConfigError("a discrete schedule starts at abar = 1, cbar = 0 (t = 0 is the data)")
        if not has_mask and bool((cbar != 0).any()):
            raise ConfigError("a process without a mask state needs cbar = 0")
        keep = 1 - cbar
        if bool((keep[:-1] <= 0).any()):
            raise ConfigError("cbar reaches 1 before t = T; the schedule must mask everything only at the end")
        # a valid step needs r_t = 1 - a_t - c_t >= 0, i.e. abar / (1 - cbar) non-increasing
        ratio = abar / keep.clamp_min(1e-300)
        if bool((ratio[1:] > ratio[:-1] * (1 + 1e-9) + 1e-15).any()) or bool((abar[1:] > abar[:-1] + 1e-15).any()):
            raise ConfigError("invalid discrete schedule: abar / (1 - cbar) and abar must be non-increasing in t")
        self.num_classes, self.has_mask, self.kind = K, bool(has_mask), kind
        self.abar, self.cbar = abar, cbar
        self.rbar = (1 - abar - cbar).clamp_min(0)

    # ---- sizes -------------------------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return self.abar.numel() - 1

    @property
    def num_states(self) -> int:
        """S: K data classes plus the mask state when there is one."""
        return self.num_classes + int(self.has_mask)

    @property
    def mask_index(self) -> Optional[int]:
        return self.num_classes if self.has_mask else None

    # ---- coefficients ------------------------------------------------------------------------------------------
    def _t(self, t: TimeLike, like: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.long, device=like.device)
        if bool(((t < 0) | (t > self.steps)).any()):
            raise ConfigError(f"time must be in 0..{self.steps}, got {t.min().item()}..{t.max().item()}")
        return t

    def _coef(self, table: Tensor, t: Tensor, x: Tensor, dtype) -> Tensor:
        """table[t] broadcast against token tensor x (B, ...) -> (B, 1, ..., 1) (or a scalar for 0-d t)."""
        v = table.to(x.device)[t].to(dtype)
        return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v

    def marginal_coeffs(self, t: Tensor):
        """(abar_t, rbar_t, cbar_t) float64 for integer times t."""
        t = torch.as_tensor(t).cpu()
        return self.abar[t], self.rbar[t], self.cbar[t]

    def transition_coeffs(self, s: Tensor, t: Tensor):
        """(a, r, c) of the s -> t transition Q_{s+1} ... Q_t (s < t) as float64 CPU tensors shaped like t."""
        s, t = torch.as_tensor(s).cpu(), torch.as_tensor(t).cpu()
        abar_s, abar_t = self.abar[s], self.abar[t]
        a = torch.where(abar_s > 0, abar_t / abar_s.clamp_min(1e-300), torch.zeros_like(abar_t))
        c = 1 - (1 - self.cbar[t]) / (1 - self.cbar[s])
        r = (1 - a - c).clamp_min(0)
        return a, r, c

    # ---- explicit matrices (small K; for tests and documentation) ----------------------------------------------
    def matrix(self, a: float, r: float, c: float) -> Tensor:
        """The explicit (S, S) float64 matrix of a step with keep a, redraw r, mask c."""
        K, S = self.num_classes, self.num_states
        Q = torch.zeros(S, S, dtype=torch.float64)
        Q[:K, :K] = a * torch.eye(K, dtype=torch.float64) + r / K
        if self.has_mask:
            Q[:K, K] = c
            Q[K, K] = 1.0
        return Q

    def one_step_matrix(self, t: int) -> Tensor:
        """Q_t, (S, S), rows sum to 1."""
        a, r, c = self.transition_coeffs(torch.tensor(t - 1), torch.tensor(t))
        return self.matrix(float(a), float(r), float(c))

    def marginal_matrix(self, t: int) -> Tensor:
        """Qbar_t = Q_1 ... Q_t from the closed form, (S, S)."""
        a, r, c = self.marginal_coeffs(torch.tensor(t))
        return self.matrix(float(a), float(r), float(c))

    # ---- forward process ---------------------------------------------------------------------------------------
    def check_tokens(self, x: Tensor, *, allow_mask: bool = False) -> None:
        """Raise ConfigError unless x holds integer tokens in 0..K-1 (0..K with the mask when allow_mask)."""
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise ConfigError(f"tokens must be an integer tensor, got {x.dtype}")
        hi = self.num_classes - 1 + int(allow_mask and self.has_mask)
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > hi):
            raise ConfigError(f"tokens out of range: found {int(x.min())}..{int(x.max())}, valid 0..{hi} "
                              f"(K = {self.num_classes} classes{' + the mask' if hi == self.num_classes else ''})")

    def q_probs(self, x0: Tensor, t: TimeLike, dtype=torch.float64) -> Tensor:
        """q(x_t | x_0): x0 int (B, ...) data tokens -> (B, ..., S) probabilities."""
        t = self._t(t, x0)
        abar, rbar, cbar = (self._coef(tab, t, x0, dtype) for tab in (self.abar, self.rbar, self.cbar))
        K = self.num_classes
        data = abar[..., None] * torch.nn.functional.one_hot(x0, K).to(dtype) + (rbar / K)[..., None]
        if not self.has_mask:
            return data
        return torch.cat([data, cbar[..., None].expand(*x0.shape, 1)], dim=-1)

    def q_sample(self, x0: Tensor, t: TimeLike, generator: Generators = None) -> Tensor:
        """x_t ~ q(x_t | x_0), int64 (B, ...); with a list of B generators row b draws from generator[b]."""
        return categorical(self.q_probs(x0, t), generator)

    def likelihood(self, x_t: Tensor, t: TimeLike, dtype=torch.float64) -> Tensor:
        """q(x_t | x_0 = i) for every data class i: x_t int (B, ...) -> (B, ..., K)."""
        t = self._t(t, x_t)
        abar, rbar, cbar = (self._coef(tab, t, x_t, dtype) for tab in (self.abar, self.rbar, self.cbar))
        K = self.num_classes
        is_mask = (x_t == K) if self.has_mask else torch.zeros_like(x_t, dtype=torch.bool)
        hot = torch.nn.functional.one_hot(x_t.clamp_max(K - 1), K).to(dtype)
        data = abar[..., None] * hot + (rbar / K)[..., None]
        return torch.where(is_mask[..., None], cbar[..., None].expand_as(data), data)

    def prior_probs(self, shape, dtype=torch.float64) -> Tensor:
        """p(x_T): the stationary end of the chain, (*shape, S): cbar_T on the mask, (1 - cbar_T) / K per class."""
        K, cT = self.num_classes, float(self.cbar[-1])
        row = torch.full((self.num_states,), (1 - cT) / K, dtype=dtype)
        if self.has_mask:
            row[K] = cT
        return row.expand(*shape, self.num_states)

    # ---- reverse process ---------------------------------------------------------------------------------------
    def reverse_probs(self, x_t: Tensor, t: TimeLike, s: TimeLike, x0_probs: Tensor) -> Tensor:
        """p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p(x0 | x_t) for 0 <= s < t (see the module notes).

        x_t: int (B, ...); x0_probs: (B, ..., K) a distribution over the data classes (a network's softmax, or a
        one-hot x_0 for the posterior q(x_s | x_t, x_0)); returns (B, ..., S) in x0_probs' dtype (float32 at least).
        """
        dtype = x0_probs.dtype if x0_probs.dtype in (torch.float32, torch.float64) else torch.float32
        p0 = x0_probs.to(dtype)
        t, s = self._t(t, x_t), self._t(s, x_t)
        if bool((s >= t).any()):
            raise ConfigError("a reverse step needs s < t")
        K = self.num_classes
        lik = self.likelihood(x_t, t, dtype)  # (B, ..., K) q(x_t | x0 = i)
        w = torch.where(lik > 0, p0 / lik.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(p0))
        # sum_x0 q(x_s = k | x0) w(x0): abar_s w_k + rbar_s / K sum(w) (k data), cbar_s sum(w) (k = mask)
        abar_s, rbar_s, cbar_s = (self._coef(tab, s, x_t, dtype) for tab in (self.abar, self.rbar, self.cbar))
        w_sum = w.sum(-1, keepdim=True)
        mix = abar_s[..., None] * w + (rbar_s / K)[..., None] * w_sum
        # q(x_t | x_s = k) as a function of k: a [k = x_t] + r / K (x_t data, k data), 0 (x_t data, k = mask);
        # c (x_t = mask, k data), 1 (x_t = mask, k = mask)
        a, r, c = (v.to(x_t.device) for v in self.transition_coeffs(s, t))
        a, r, c = (v.to(dtype).reshape(v.shape + (1,) * (x_t.ndim - v.ndim)) if v.ndim else v.to(dtype)
                   for v in (a, r, c))
        hot = torch.nn.functional.one_hot(x_t.clamp_max(K - 1), K).to(dtype)
        col_data = a[..., None] * hot + (r / K)[..., None]
        if not self.has_mask:
            out = col_data * mix
        else:
            is_mask = (x_t == K)[..., None]
            col_data = torch.where(is_mask, c[..., None].expand_as(col_data), col_data)
            mix_m = cbar_s[..., None] * w_sum
            col_m = is_mask.to(dtype)
            out = torch.cat([col_data * mix, col_m * mix_m], dim=-1)
        z = out.sum(-1, keepdim=True)
        return out / z.clamp_min(torch.finfo(dtype).tiny)

    def q_posterior(self, x_t: Tensor, t: TimeLike, s: TimeLike, x0: Tensor, dtype=torch.float64) -> Tensor:
        """q(x_s | x_t, x_0) for data tokens x0 (B, ...) that can have produced x_t: (B, ..., S)."""
        return self.reverse_probs(x_t, t, s, torch.nn.functional.one_hot(x0, self.num_classes).to(dtype))


# ---- per-row randomness -----------------------------------------------------------------------------------------
def rand_rows(shape, generator: Generators = None, *, dtype=torch.float64, device=None) -> Tensor:
    """Uniform [0, 1) of `shape` = (B, ...); with a list of B generators row b comes from generator[b], so a
    seed's draws do not depend on the batch it is drawn in (as sampling.noise.randn)."""
    shape = tuple(int(v) for v in shape)
    if generator is None:
        return torch.rand(shape, dtype=dtype, device=device)
    if isinstance(generator, torch.Generator):
        return torch.rand(shape, generator=generator, dtype=dtype, device=generator.device).to(device)
    if len(generator) != shape[0]:
        raise ConfigError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per batch row")
    if shape[0] == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.cat([torch.rand((1, *shape[1:]), generator=g, dtype=dtype, device=g.device).to(device)
                      for g in generator], dim=0)


def categorical(probs: Tensor, generator: Generators = None) -> Tensor:
    """One draw per row of probs (B, ..., S) (rows need not be normalised) by inverting the CDF with per-row
    uniforms: int64 (B, ...)."""
    p = probs.to(torch.float64)
    cdf = p.cumsum(-1)
    u = rand_rows(p.shape[:-1], generator, device=p.device)[..., None] * cdf[..., -1:]
    idx = (cdf <= u).sum(-1)
    return idx.clamp_max(p.shape[-1] - 1)

"""Objectives of token diffusion: the variational bound, D3PM's hybrid loss and MaskGIT's masked cross-entropy.

Notation as in core.discrete: K data classes, S states (K + the mask), times 0..T. A token denoiser is

    net(x_t, t, cond) -> logits (B, ..., K) of p(x0 | x_t)      x_t int64 (B, ...), t int64 (B,)

(the discrete family's contract, docs/DESIGN.md section 2c). Every loss is per sample (B,): a sum over the
tokens of one sample, in nats; `bits_per_token` and `bits_per_dim` turn nats into bits.

Variational bound (D3PM eq. 1; Sohl-Dickstein et al. 2015):
    -log p(x0) <= L = KL(q(x_T | x0) || p(x_T)) + sum_{t=2}^T E_q KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
                      - E_q log p(x0 | x_1),
estimated without bias by one t ~ U{1..T} per sample: L_hat = L_T + T * L_{t-1}(x_t) with x_t ~ q(x_t | x0).
Hybrid (D3PM eq. 5): L_hat + lambda * (-log p(x0 | x_t)) with lambda = 0.001.
MaskGIT (Chang et al. 2022, sec. 3.1-3.2): a mask ratio gamma(u) = cos(pi u / 2), u ~ U(0, 1); ceil(gamma N)
random tokens of each sample are masked and the loss is the mean cross-entropy of x0 on the masked tokens. The
network is asked at the absorbing process's time t = ceil(gamma T), so one network serves both objectives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from ..errors import ConfigError
from ..protocols import Cond, Generators
from .discrete import DiscreteProcess, rand_rows

#: net(x_t (B, ...) int64, t (B,) int64, cond) -> (B, ..., K) logits of x0.
TokenDenoiser = Callable[[Tensor, Tensor, Cond], Tensor]

LOSS_KINDS = ("hybrid", "vlb", "ce", "maskgit")


class TokenModel(torch.nn.Module):
    """A backbone forward(x, c_noise, cond) -> (B, ..., K) as a TokenDenoiser: c_noise = t as a float (the step
    index, as DDPM's discrete-time labels; sin-cos features resolve integer steps); the backbone knows no process."""

    def __init__(self, backbone: torch.nn.Module, steps: int):
        super().__init__()
        self.backbone, self.steps = backbone, int(steps)

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        return self.backbone(x_t, t.to(torch.float32), cond)


def _per_sample(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).sum(1)


def kl_categorical(q: Tensor, p: Tensor) -> Tensor:
    """KL(q || p) over the last axis, with 0 log 0 = 0: (..., S) x 2 -> (...)."""
    tiny = torch.finfo(p.dtype).tiny
    terms = torch.where(q > 0, q * (q.clamp_min(tiny).log() - p.clamp_min(tiny).log()), torch.zeros_like(q))
    return terms.sum(-1)


def bits_per_token(nats: Tensor, tokens: int) -> Tensor:
    """Per-sample nats -> bits per token."""
    return nats / (tokens * math.log(2))


def bits_per_dim(nats: Tensor, dims: int) -> Tensor:
    """Per-sample nats -> bits per pixel-equivalent dimension (dims = C * H * W of the image the tokens encode)."""
    return nats / (dims * math.log(2))


def prior_term(process: DiscreteProcess, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x0) || p(x_T)) per sample (B,), nats (0 for the absorbing process)."""
    q = process.q_probs(x0, process.steps)
    return _per_sample(kl_categorical(q, process.prior_probs(x0.shape)))


def step_term(process: DiscreteProcess, logits: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """L_{t-1} per sample (B,), nats: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t >= 2 and
    -log p(x0 | x_1) for t = 1. logits (B, ..., K) of the network at (x_t, t); x0, x_t int (B, ...); t (B,)."""
    t = torch.as_tensor(t, dtype=torch.long, device=x0.device)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    p0 = logits.to(dtype).softmax(-1)
    p_prev = process.reverse_probs(x_t, t, t - 1, p0)  # (B, ..., S)
    q_prev = process.q_posterior(x_t, t, t - 1, x0, dtype=dtype)
    kl = kl_categorical(q_prev, p_prev)
    tiny = torch.finfo(dtype).tiny
    nll = -p_prev.gather(-1, x0[..., None]).squeeze(-1).clamp_min(tiny).log()
    first = (t == 1).reshape(t.shape + (1,) * (x0.ndim - 1))
    return _per_sample(torch.where(first, nll, kl))


def x0_cross_entropy(logits: Tensor, x0: Tensor) -> Tensor:
    """-log p(x0 | x_t) summed over the tokens, per sample (B,)."""
    logp = logits.float().log_softmax(-1) if logits.dtype != torch.float64 else logits.log_softmax(-1)
    return -_per_sample(logp.gather(-1, x0[..., None]).squeeze(-1))


@dataclass(frozen=True)
class DiscreteLossConfig:
    """kind: hybrid (D3PM: bound + lambda CE), vlb, ce (cross-entropy on x0 only) or maskgit (masked CE)."""

    kind: Literal["hybrid", "vlb", "ce", "maskgit"] = "hybrid"
    hybrid_lambda: float = 0.001  # D3PM sec. 4 / eq. 5

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise ConfigError(f"token loss kind {self.kind!r} is not valid; valid: {', '.join(LOSS_KINDS)}")


@dataclass(frozen=True)
class DiscreteLoss:
    """Per-sample (B,) terms, nats: loss (what is minimised), vlb (the bound estimate; nan for maskgit) and ce."""

    loss: Tensor
    vlb: Tensor
    ce: Tensor


def sample_times(process: DiscreteProcess, batch: int, generator: Generators = None, device=None) -> Tensor:
    """t ~ U{1..T}, int64 (B,), one uniform per row."""
    u = rand_rows((batch,), generator, device=device)
    return (u * process.steps).long().clamp_max(process.steps - 1) + 1


def maskgit_corrupt(x0: Tensor, mask_index: int, generator: Generators = None):
    """MaskGIT's training corruption: per sample u ~ U(0, 1), gamma = cos(pi u / 2), ceil(gamma N) random tokens
    (at least one) replaced by the mask. Returns (x_t, masked bool (B, ...), gamma float64 (B,))."""
    B = x0.shape[0]
    flat = x0.reshape(B, -1)
    N = flat.shape[1]
    u = rand_rows((B, N + 1), generator, device=x0.device)
    gamma = torch.cos(math.pi / 2 * u[:, 0])
    n_mask = torch.ceil(gamma * N).long().clamp(1, N)  # (B,)
    rank = u[:, 1:].argsort(1).argsort(1)  # a uniformly random permutation's ranks
    masked = rank < n_mask[:, None]
    x_t = torch.where(masked, torch.full_like(flat, mask_index), flat)
    return x_t.reshape(x0.shape), masked.reshape(x0.shape), gamma


def discrete_loss(process: DiscreteProcess, net: TokenDenoiser, x0: Tensor, cond: Cond = None, *,
                  config: DiscreteLossConfig = DiscreteLossConfig(), generator: Generators = None,
                  t: Optional[Tensor] = None) -> DiscreteLoss:
    """One Monte-Carlo estimate of the chosen objective for data tokens x0 (B, ...); see the module notes."""
    process.check_tokens(x0)
    B = x0.shape[0]
    if config.kind == "maskgit":
        if process.mask_index is None:
            raise ConfigError("the maskgit loss needs a process with a mask token (absorbing or mask_replace)")
        x_t, masked, gamma = maskgit_corrupt(x0, process.mask_index, generator)
        t_net = torch.ceil(gamma * process.steps).long().clamp(1, process.steps).to(x0.device)
        logits = net(x_t, t_net, cond)
        logp = logits.float().log_softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
        m = masked.to(logp.dtype)
        ce = -_per_sample(logp * m) / _per_sample(m)
        nan = torch.full_like(ce, float("nan"))
        return DiscreteLoss(loss=ce, vlb=nan, ce=ce)
    if t is None:
        t = sample_times(process, B, generator, device=x0.device)
    x_t = process.q_sample(x0, t, generator)
    logits = net(x_t, t, cond)
    ce = x0_cross_entropy(logits, x0)
    if config.kind == "ce":
        return DiscreteLoss(loss=ce, vlb=torch.full_like(ce, float("nan")), ce=ce)
    vlb = prior_term(process, x0).to(ce.dtype) + process.steps * step_term(process, logits, x0, x_t, t).to(ce.dtype)
    loss = vlb if config.kind == "vlb" else vlb + config.hybrid_lambda * ce
    return DiscreteLoss(loss=loss, vlb=vlb, ce=ce)


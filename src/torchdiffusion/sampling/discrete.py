"""Samplers of token diffusion: ancestral (respaced) and MaskGIT confidence re-masking, with top-p truncation.

Notation as in core.discrete. A token denoiser net(x_t, t, cond) returns (B, ..., K) logits of p(x0 | x_t);
samplers are pure functions of it, a process, a token shape and generators. Every random draw of row b comes from
generator[b] when a list of B generators is given (core.discrete.rand_rows), so a seed's tokens do not depend on
the batch they are drawn in.

- `sample_ancestral`: x_T ~ p(x_T) (all masks for the absorbing process), then x_s ~ p(x_s | x_t) of
  core.discrete (the exact s -> t transition, so a respaced grid T = t_0 > t_1 > ... > t_n = 0 needs no
  re-training; D3PM sec. 3.3 with skipped steps as in Nichol & Dhariwal 2021's respacing).
- `sample_maskgit` (Chang et al. 2022, "MaskGIT", sec. 3.2): starting from all masks, at iteration i of n the
  masked tokens get a draw from p(x0 | x_t) (with the sampling temperature), each with the confidence log p of
  its draw; of the masked tokens, the floor(gamma((i + 1) / n) N) with the lowest confidence plus Gumbel noise
  scaled by choice_temperature * (1 - (i + 1) / n) are masked again (gamma(r) = cos(pi r / 2)), the others keep
  their draw. order="random" keeps a uniformly random subset instead (the limit choice_temperature -> inf): with
  one token unmasked per step and an exact posterior network it samples the data distribution exactly (any-order
  autoregression); confidence ordering is deliberately mode-seeking and does not.
- `top_p` (Holtzman et al. 2020, nucleus truncation) acts on p(x0 | x_t) before each step.

Classifier-free guidance on logits lives in guidance.token_cfg (a TokenDenoiser -> TokenDenoiser wrapper).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..core.discrete import DiscreteProcess, categorical, rand_rows
from ..errors import ConfigError
from ..protocols import Callback, Cond, Generators


def respaced_times(steps: int, n: int) -> list[int]:
    """n + 1 integer times from `steps` (T) down to 0, evenly spaced and strictly decreasing (n <= T)."""
    if not 1 <= int(n) <= int(steps):
        raise ConfigError(f"sampling steps must be in 1..{steps} (the process's T), got {n}")
    return [int(round(steps * (n - i) / n)) for i in range(n + 1)]


def top_p(probs: Tensor, p: Optional[float]) -> Tensor:
    """Nucleus truncation over the last axis: keep the most probable classes whose cumulative mass first reaches
    p (at least one), renormalise. p = None or 1 returns probs unchanged."""
    if p is None or p >= 1:
        return probs
    if not 0 < p < 1:
        raise ConfigError(f"top_p must be in (0, 1], got {p}")
    sorted_p, order = probs.sort(-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each class in the sorted order
    keep_sorted = before < p * probs.sum(-1, keepdim=True)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    out = torch.where(keep, probs, torch.zeros_like(probs))
    return out / out.sum(-1, keepdim=True)


def _x0_probs(net, x_t: Tensor, t: Tensor, cond: Cond, temperature: float, p: Optional[float]) -> Tensor:
    logits = net(x_t, t, cond).to(torch.float64)
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    return top_p((logits / temperature).softmax(-1), p)


def sample_ancestral(net, process: DiscreteProcess, shape: Sequence[int], *, steps: Optional[int] = None,
                     cond: Cond = None, generator: Generators = None, temperature: float = 1.0,
                     top_p_mass: Optional[float] = None, device=None, callback: Callback = None) -> Tensor:
    """Ancestral sampling over a respaced grid of `steps` (default T) steps; shape = (B, ...) tokens.
    Returns int64 data tokens (B, ...) in 0..K-1. Network calls: steps."""
    shape = tuple(int(v) for v in shape)
    times = respaced_times(process.steps, steps or process.steps)
    x = categorical(process.prior_probs(shape).to(device), generator)
    B = shape[0]
    for i, (t, s) in enumerate(zip(times[:-1], times[1:])):
        tt = torch.full((B,), t, dtype=torch.long, device=x.device)
        p0 = _x0_probs(net, x, tt, cond, temperature, top_p_mass)
        x = categorical(process.reverse_probs(x, tt, torch.full_like(tt, s), p0), generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0_probs": p0})
    return x


def maskgit_schedule(tokens: int, steps: int) -> list[int]:
    """Number of tokens still masked after each of the `steps` iterations: floor(cos(pi/2 (i+1)/n) N), ending in
    0 and made strictly decreasing (at least one token unmasked per iteration) where N allows."""
    counts, prev = [], tokens
    for i in range(steps):
        m = int(math.floor(math.cos(math.pi / 2 * (i + 1) / steps) * tokens + 1e-9)) if i < steps - 1 else 0
        m = min(m, prev - 1) if prev > 0 else 0
        counts.append(max(m, 0))
        prev = counts[-1]
    return counts


def sample_maskgit(net, process: DiscreteProcess, shape: Sequence[int], *, steps: int = 8, cond: Cond = None,
                   generator: Generators = None, temperature: float = 1.0, choice_temperature: float = 4.5,
                   order: str = "confidence", top_p_mass: Optional[float] = None, device=None,
                   callback: Callback = None) -> Tensor:
    """MaskGIT decoding in `steps` iterations (default choice temperature 4.5, MaskGIT's released value); needs a
    process with a mask token. The network is asked at t = ceil(masked fraction * T). Returns (B, ...) tokens."""
    if process.mask_index is None:
        raise ConfigError("maskgit sampling needs a process with a mask token (absorbing); this one is "
                          f"{process.kind}")
    if order not in ("confidence", "random"):
        raise ConfigError(f"maskgit order must be confidence or random, got {order!r}")
    if steps < 1:
        raise ConfigError(f"maskgit steps must be >= 1, got {steps}")
    shape = tuple(int(v) for v in shape)
    B, m = shape[0], process.mask_index
    N = math.prod(shape[1:])
    x = torch.full((B, N), m, dtype=torch.long, device=device)
    for i, n_keep_masked in enumerate(maskgit_schedule(N, steps)):
        masked = x == m
        frac = masked.sum(1).to(torch.float64) / N
        tt = torch.ceil(frac * process.steps).long().clamp(1, process.steps)
        p0 = _x0_probs(net, x.reshape(shape), tt, cond, temperature, top_p_mass).reshape(B, N, -1)
        draw = categorical(p0, generator)  # (B, N)
        u = rand_rows((B, N), generator, device=x.device).clamp(1e-300, 1 - 1e-16)
        if order == "random":
            score = u
        else:
            gumbel = -torch.log(-torch.log(u))
            conf = p0.gather(-1, draw[..., None]).squeeze(-1).clamp_min(1e-300).log()
            score = conf + choice_temperature * (1 - (i + 1) / steps) * gumbel
        score = torch.where(masked, score, torch.full_like(score, math.inf))  # unmasked tokens stay
        rank = score.argsort(1).argsort(1)
        remask = rank < n_keep_masked
        x = torch.where(masked & ~remask, draw, x)
        if callback is not None:
            callback({"i": i, "t": None, "x": x.reshape(shape), "x0_probs": p0})
    return x.reshape(shape)

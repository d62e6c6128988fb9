"""Cascaded generation: a base stage, then super-resolution stages conditioned on the previous stage's output with
conditioning augmentation (Ho et al. 2021, "Cascaded Diffusion Models for High Fidelity Image Generation").

Notation: stage k samples x_k of shape (C, H_k, W_k) with its own sampler and sigma grid; an SR stage k >= 1 has a
low_res conditioner (conditioners.low_res) with H_k = f_k H_{k-1}, and is conditioned at augmentation time t_k
(sigma_k = tan(pi t_k / 2)) on
  - non-truncated hand-off ("full"): the previous stage runs to sigma = 0; its output, stored as uint8 (what the
    stage's PNGs show), is blurred (optional fixed blur) and re-noised to sigma_k by the conditioner;
  - truncated hand-off ("truncated"): the previous stage's grid stops at sigma_k and its diffusion variable
    z = x_lr + sigma_k n is handed over as it is (the SR stage was trained on exactly q(z | x_lr)).
Determinism: the noise of stage 0 for a seed comes from torch.Generator().manual_seed(seed) (so the base output
equals `sample` of the base run for the same seed, sampler and steps), that of stage k >= 1 from
mix_seed(seed, k, tag=b"cascade-stage"), and the augmentation noise from the conditioner's per-seed stream k; so a
seed's images do not depend on the batch or on the other seeds.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..core.augmentation import LowResInput, level_text, sigma_of_time
from ..data.convert import to_model_range, to_uint8
from ..errors import ConfigError
from ..protocols import Denoiser
from ..sampling.noise import randn
from ..seeding import mix_seed

HANDOFFS = ("full", "truncated")


@dataclass
class Stage:
    """One stage: denoiser (pixel space), shape (C, H, W), sampler(denoiser, noise, sigmas, cond=, generator=),
    its float64 sigma grid ending in 0, and the run's Conditioning (None or empty for an unconditional base)."""

    name: str
    denoiser: Denoiser
    shape: tuple[int, ...]
    sampler: Callable
    sigmas: Tensor
    conditioning: object = None
    low_res: Optional[str] = field(default=None)  # the name of its low_res conditioner (SR stages)

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        if self.conditioning:
            names = [n for n, c in self.conditioning.items.items() if hasattr(c, "low_res_of")]
            if len(names) > 1:
                raise ConfigError(f"stage {self.name}: {len(names)} low-resolution conditioners; a stage takes one")
            self.low_res = names[0] if names else None

    @property
    def conditioner(self):
        return self.conditioning[self.low_res] if self.low_res else None


def check_stages(stages: Sequence[Stage], low_res_shape: Optional[tuple[int, ...]] = None) -> None:
    """One line for a cascade that cannot work: an SR stage first (without low-res inputs), a base stage later,
    or a stage whose low-resolution size or channels differ from the previous stage's output."""
    if not stages:
        raise ConfigError("a cascade needs at least one stage (--stage RUN)")
    prev = low_res_shape
    for k, st in enumerate(stages):
        c = st.conditioner
        if k == 0 and prev is None and c is not None:
            raise ConfigError(f"stage 1 ({st.name}) is a super-resolution stage (cond.{st.low_res}); the first stage "
                              f"must be a base model, or give low-resolution inputs (--low-res DIR)")
        if prev is None:
            prev = st.shape
            continue
        if c is None:
            raise ConfigError(f"stage {k + 1} ({st.name}) has no low-resolution conditioner; every stage after the "
                              f"first must be a super-resolution stage (cond kind low_res)")
        want = (c.cfg.channels, *c.low_size)
        if tuple(prev) != want:
            raise ConfigError(f"stage {k + 1} ({st.name}) takes {'x'.join(map(str, want[1:]))} images with {want[0]} "
                              f"channel(s) ({'x'.join(map(str, st.shape[1:]))} / factor {c.factor}), but the previous "
                              f"stage gives {'x'.join(map(str, prev[1:]))} with {prev[0]} channel(s)")
        prev = st.shape


def truncate_grid(sigmas: Tensor, sigma_s: float) -> Tensor:
    """The grid of a truncated stage: the points above sigma_s, then sigma_s (float64); sigma_s = 0: unchanged."""
    sigmas = sigmas.to(torch.float64)
    if sigma_s <= 0:
        return sigmas
    if not sigma_s < float(sigmas[0]):
        raise ConfigError(f"truncated hand-off at sigma {sigma_s:.4g} is not below the previous stage's sigma_max "
                          f"{float(sigmas[0]):.4g}; use a lower level or the full (non-truncated) hand-off")
    keep = sigmas[sigmas > sigma_s]
    return torch.cat([keep, torch.tensor([sigma_s], dtype=torch.float64)])


def stage_generators(seeds: Sequence[int], k: int) -> list[torch.Generator]:
    if k == 0:
        return [torch.Generator().manual_seed(int(s)) for s in seeds]
    return [torch.Generator().manual_seed(mix_seed(int(s), k, tag=b"cascade-stage")) for s in seeds]


def _levels(levels, n_sr: int) -> list[float]:
    levels = [float(v) for v in ([levels] if isinstance(levels, (int, float)) else list(levels))]
    if len(levels) == 1:
        levels = levels * n_sr
    if len(levels) != n_sr:
        raise ConfigError(f"{len(levels)} augmentation levels for {n_sr} super-resolution stage(s); give one, or one "
                          f"per super-resolution stage")
    return levels


@torch.no_grad()
def cascade_generate(stages: Sequence[Stage], seeds: Sequence[int], *, levels=0.0, handoff: str = "full",
                     blur: Optional[float] = None, low_res: Optional[Tensor] = None, batch: int = 16,
                     device: torch.device = torch.device("cpu"), offset: int = 0,
                     on_batch: Optional[Callable[[int, Sequence[int], Tensor], None]] = None) -> dict:
    """Run the cascade for `seeds`. levels: the augmentation time t of each SR stage (one for all, or a list);
    handoff: full | truncated; blur: fixed inference blur std of the SR stages (None: each run's sample_blur);
    low_res: (N, C, h, w) uint8 or float inputs that replace the base stage (seed i takes row i).
    Returns {"images": [uint8 (N, C, H_k, W_k) per stage], "seconds": [per stage]}; for a truncated hand-off a
    stage's images are its noisy hand-off z (clamped). on_batch(k, seeds, images) after each stage of a batch.
    offset: the index of stages[0] in a longer cascade whose earlier stages ran before (their output is low_res),
    so its noise streams are those of the whole cascade."""
    if handoff not in HANDOFFS:
        raise ConfigError(f"hand-off {handoff!r} is not valid; valid: {', '.join(HANDOFFS)}")
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    lr_shape = None
    if low_res is not None:
        if low_res.dim() != 4 or low_res.shape[0] != len(seeds):
            raise ConfigError(f"low-resolution inputs must be (N, C, h, w) with N = {len(seeds)} seeds, got "
                              f"{tuple(low_res.shape)}")
        lr_shape = tuple(int(s) for s in low_res.shape[1:])
    check_stages(stages, lr_shape)
    first_sr = 0 if low_res is not None else 1
    ts = _levels(levels, len(stages) - first_sr) if len(stages) > first_sr else []
    level_of = {k: ts[i] for i, k in enumerate(range(first_sr, len(stages)))}
    if handoff == "truncated" and blur:
        raise ConfigError("a truncated hand-off cannot be blurred (the handed-over z is already noisy); use --blur 0 "
                          "or --handoff full")
    outs: list[list[Tensor]] = [[] for _ in stages]
    seconds = [0.0 for _ in stages]
    for start in range(0, len(seeds), batch):
        chunk = [int(s) for s in seeds[start:start + batch]]
        prev: Optional[LowResInput] = None
        if low_res is not None:
            prev = LowResInput(low_res[start:start + len(chunk)], time=level_of[0], blur=blur, stream=offset)
        for k, st in enumerate(stages):
            t0 = time.perf_counter()
            gens = stage_generators(chunk, k + offset)
            noise = randn((len(chunk), *st.shape), gens).to(device)
            values = {st.low_res: prev} if prev is not None else None
            cond = st.conditioning.for_sampling(chunk, values) if st.conditioning else None
            if cond is not None:
                cond = {key: v.to(device) for key, v in cond.items()}
            sigmas = st.sigmas
            nxt = k + 1 if k + 1 < len(stages) else None
            truncated = handoff == "truncated" and nxt is not None and level_of[nxt] > 0
            if truncated:
                sigmas = truncate_grid(sigmas, float(sigma_of_time(level_of[nxt])))
            x = st.sampler(st.denoiser, noise, sigmas, cond=cond, generator=gens).cpu()
            images = to_uint8(x)
            outs[k].append(images)
            seconds[k] += time.perf_counter() - t0
            if on_batch is not None:
                on_batch(k, chunk, images)
            if nxt is not None:
                if truncated:
                    prev = LowResInput(x, time=level_of[nxt], noisy=True, stream=nxt + offset)
                else:  # the stored output (uint8, as saved), re-noised by the next stage's conditioner
                    prev = LowResInput(to_model_range(images), time=level_of[nxt], blur=blur, stream=nxt + offset)
    images = [torch.cat(o) if o else torch.empty((0, *st.shape), dtype=torch.uint8) for o, st in zip(outs, stages)]
    return {"images": images, "seconds": seconds, "levels": [level_of.get(k) for k in range(len(stages))]}


def describe_levels(levels: Sequence[Optional[float]]) -> list[Optional[str]]:
    return [None if t is None else level_text(t) for t in levels]


def level_grid(values: Sequence[float]) -> list[float]:
    """Sorted unique times in [0, 1] of a sweep (finite; NaN refused)."""
    out = sorted({float(v) for v in values})
    if any(not math.isfinite(v) or not 0 <= v <= 1 for v in out):
        raise ConfigError(f"sweep levels must be times in [0, 1], got {out}")
    return out


__all__ = ["Stage", "HANDOFFS", "cascade_generate", "check_stages", "truncate_grid", "stage_generators",
           "describe_levels", "level_grid"]

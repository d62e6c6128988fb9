"""Restore: build the operator of a task, measure images, and run an inverse-problem solver per seed.

Shapes: images are float (N, C, H, W) in the model's range [-1, 1] (or uint8 for saving); the measurement y has
the operator's output shape. Each image i uses torch.Generator().manual_seed(seeds[i]) for its measurement
noise, then its sampler noise and every later draw, so a restoration depends on its seed and image only, not
on the batch it ran in.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..core.grids import karras
from ..errors import ConfigError
from ..inverse.decoded import DecodedOperator
from ..inverse.measurement import Measurement
from ..inverse.methods import SAMPLER_METHODS
from ..inverse.operators import (AvgPoolDown, BicubicDown, Colorize, GaussianBlur, GaussianNoise, Inpaint,
                                 Operator, box_mask, half_mask, random_mask)
from ..protocols import Denoiser
from ..sampling.noise import randn
from .generate import seed_generators

TASKS = ("inpaint", "superres", "deblur", "colorize")
MASKS = ("half", "box", "random")


@dataclass(frozen=True)
class TaskConfig:
    """What is measured. Defaults: the bottom half missing, 4x average pooling, blur std 2 px, no noise."""

    task: str = "inpaint"
    mask: str = "half"  # half | box | random
    half: str = "bottom"  # which half is missing
    missing: float = 0.5  # random masks: fraction of missing pixels
    mask_seed: int = 0
    scale: int = 4  # super-resolution factor
    down: str = "avgpool"  # avgpool | bicubic
    blur_sigma: float = 2.0  # pixels
    noise_std: float = 0.0  # in the model range [-1, 1]


def build_operator(cfg: TaskConfig, shape: Sequence[int]) -> Operator:
    """The task's operator for per-sample shape (C, H, W)."""
    c, h, w = (int(s) for s in shape[-3:])
    if cfg.task == "inpaint":
        if cfg.mask == "half":
            m = half_mask((h, w), cfg.half)
        elif cfg.mask == "box":
            m = box_mask((h, w))
        elif cfg.mask == "random":
            m = random_mask((h, w), cfg.missing, torch.Generator().manual_seed(cfg.mask_seed))
        else:
            raise ConfigError(f"unknown mask {cfg.mask!r}; valid: {', '.join(MASKS)}")
        return Inpaint(m)
    if cfg.task == "superres":
        if cfg.down == "avgpool":
            return AvgPoolDown(cfg.scale)
        if cfg.down == "bicubic":
            return BicubicDown(cfg.scale)
        raise ConfigError(f"unknown down-sampling {cfg.down!r}; valid: avgpool, bicubic")
    if cfg.task == "deblur":
        return GaussianBlur(cfg.blur_sigma)
    if cfg.task == "colorize":
        return Colorize(c)
    raise ConfigError(f"unknown task {cfg.task!r}; valid: {', '.join(TASKS)}")


@dataclass
class Restoration:
    restored: Tensor  # float (N, C, H, W), model range
    measurement: Tensor  # y (N, *S_y)
    error: Tensor  # (N,) RMS of y - A x_restored
    seconds: float
    extra: dict = field(default_factory=dict)


def restore_images(denoiser: Denoiser, images: Tensor, seeds: Sequence[int], op: Operator, noise_std: float,
                   method: Callable, sigmas: Tensor, *, batch: int = 16, options: dict | None = None,
                   device: torch.device = torch.device("cpu"),
                   on_batch: Callable[[Sequence[int], Tensor, Tensor], None] | None = None,
                   cond_for: Callable[[Sequence[int]], dict] | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   decode: Callable[[Tensor], Tensor] | None = None,
                   latent_shape: Sequence[int] | None = None) -> Restoration:
    """Measure `images` (N, C, H, W, model range) with op + Gaussian noise and restore them with `method`
    (an inverse.methods.restore_* function) on `sigmas`; one seed per image. cond_for(seeds): the denoiser's
    condition of a chunk (None: unconditional). progress(done, total): after each batch
    (pipelines.progress.Progress).

    A latent model (decode: its codec's decoder, latent_shape (C', h, w)): the solver walks in the latent space
    against the measurement operator A o decode (inverse.decoded; DPS only) and the restoration is decoded; y is
    measured from the pixels as for a pixel model."""
    if len(seeds) != len(images):
        raise ConfigError(f"{len(seeds)} seeds for {len(images)} images; give one seed per image")
    noise_model = GaussianNoise(noise_std)
    op(images[:1])  # bad shapes fail here, in one line, before any work
    outs, ys, errs = [], [], []
    t0 = time.perf_counter()
    for start in range(0, len(images), batch):
        chunk = list(seeds[start:start + batch])
        x0 = images[start:start + batch].to(device)
        gens = seed_generators(chunk)
        y = noise_model(op(x0), gens)
        if decode is None:
            meas, walk_shape = Measurement(op, y, tuple(x0.shape), noise_std), tuple(x0.shape)
        else:
            walk_shape = (len(chunk), *(int(s) for s in latent_shape))
            meas = Measurement(DecodedOperator(op, decode), y, walk_shape, noise_std)
        noise = randn(walk_shape, gens).to(device)
        cond = cond_for(chunk) if cond_for is not None else None
        x = method(denoiser, meas, noise, sigmas, cond=cond, generator=gens, **(options or {}))
        x = x.detach()
        if decode is not None:
            with torch.no_grad():
                x = decode(x).clamp(-1, 1)
        outs.append(x.cpu())
        ys.append(y.cpu())
        errs.append(Measurement(op, y, tuple(x0.shape), noise_std).error(x).cpu())
        if on_batch is not None:
            on_batch(chunk, x.cpu(), y.cpu())
        if progress is not None:
            progress(min(start + batch, len(images)), len(images))
    seconds = time.perf_counter() - t0
    return Restoration(torch.cat(outs), torch.cat(ys), torch.cat(errs), seconds)


def solver_options(method: str, options: dict, sampler_name: str | None, sampler: Callable | None,
                   sampler_nfe: Callable[[int], int | None] | None = None,
                   sampler_options: Mapping | None = None) -> dict:
    """The restore function's options with the sampler underneath added (`sampler`, `sampler_options`), or a
    one-line ConfigError for a combination that cannot run: a sampler for RePaint (its own DDPM schedule), or
    an adaptive sampler (sampler_nfe(n) is None: it picks its own steps, so no per-step correction) under a
    method that corrects every step (every one but dps)."""
    if sampler_name is None:
        if sampler_options:
            raise ConfigError("--sampler-opt needs --sampler NAME (the default sampler underneath is ddpm)")
        return dict(options)
    if method not in SAMPLER_METHODS:
        raise ConfigError(f"--sampler {sampler_name}: method '{method}' runs its own schedule of DDPM steps and takes "
                          f"no sampler; --sampler works with {', '.join(SAMPLER_METHODS)} (and pocs)")
    if method != "dps" and sampler_nfe is not None and sampler_nfe(2) is None:
        raise ConfigError(f"--sampler {sampler_name} chooses its own steps and takes no per-step correction, which "
                          f"method '{method}' needs; pick a grid sampler (e.g. ddpm, ddim, euler_ancestral, heun, "
                          f"dpmpp_2m, dpmpp_2m_sde, edm), or method dps")
    return {**options, "sampler": sampler, "sampler_options": dict(sampler_options or {})}


def restore_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The Karras grid (EDM, eq. 5) the restore command uses; CCDF passes its start sigma as sigma_max."""
    return karras(steps, sigma_min, sigma_max, rho)


def measurement_image(op: Operator, y: Tensor, shape: Sequence[int]) -> Tensor:
    """y shown at the image's size, for grids: A^+ y (the block means for down-sampling, the observed pixels
    with black holes for inpainting, the grey image for colourisation), clamped to [-1, 1]."""
    try:
        x = op.pinv(y)
    except ConfigError:
        x = op.adjoint(y)
    if isinstance(op, Inpaint):
        x = torch.where(op.mask.to(x.device).bool().expand_as(x), x, torch.full_like(x, -1.0))
    return x.reshape(-1, *tuple(shape)[-3:]).clamp(-1, 1)


def restore_condition(conditioning, num_classes: int, p_uncond: float, labels, n: int, device,
                      flag: str = "--labels"):
    """(condition, labels per image or None, cond_for of restore_images) of a model for n images.

    condition: "none" (an unconditional model), "labels" (one label for all images or one per image) or "null"
    (no labels: the null condition, valid where the class condition was trained with label dropout, p_uncond > 0).
    flag names the labels in messages (the command's --labels, the API's labels=)."""
    k = num_classes
    if labels is not None and not k:
        raise ConfigError(f"{flag} needs a class-conditional model; this model has no class condition")
    if not conditioning:
        return "none", None, None
    if labels is None:
        if k and not p_uncond > 0:
            raise ConfigError(f"this model is class-conditional ({k} classes) and was trained without label dropout "
                              f"(cond.label.p_uncond=0), so it has no null label; give {flag} (one label, e.g. 3, "
                              f"or one per image)")

        def null_cond(chunk):
            return {key: v.to(device) for key, v in conditioning.null(conditioning.for_sampling(chunk)).items()}
        return "null", None, null_cond
    bad = [v for v in labels if not 0 <= v < k]
    if bad:
        raise ConfigError(f"{flag} {bad[0]} is out of range; this model has {k} classes (valid: 0-{k - 1})")
    if len(labels) not in (1, n):
        raise ConfigError(f"{flag} gives {len(labels)} labels for {n} images; give one label or one per image")
    per_image = labels * n if len(labels) == 1 else list(labels)
    pos = [0]

    def label_cond(chunk):
        part = per_image[pos[0]:pos[0] + len(chunk)]
        pos[0] += len(chunk)
        return {key: v.to(device) for key, v in conditioning.for_sampling(chunk, {"label": part}).items()}
    return "labels", per_image, label_cond

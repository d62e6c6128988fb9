"""Video sampling: unconditional clips, temporal extension, frame interpolation and spatial super-resolution,
and writing clips as animated GIFs and frame grids.

Shapes: clips are (N, C, T, H, W), float in the model's range [-1, 1] while sampled, uint8 when saved.

Conditional generation with an unconditional video model (Ho et al. 2022, sec. 3.1) is an inverse problem on the
whole clip x = (x^a, x^b), with x^a what is given:

    extend       the first K frames given; x has K + new frames; A = the frame mask (inverse.operators.Inpaint with
                 a (T, 1, 1) mask)
    interpolate  every s-th frame given (frames 0, s, 2s, ...); x has s (K - 1) + 1 frames; A = the frame mask
    superres     every frame given at 1 / f of the size; A = f x f average pooling of every frame (AvgPoolDown)

and solved on any grid sampler by one of
    replacement     x^a of every step replaced by the noised given frames (the "replacement method"; corrections.
                    Replacement) -- known to leave x^b poorly coherent with x^a (Ho et al. 2022)
    reconstruction  replacement + the gradient term of eq. 7, x^b_hat <- x^b_hat - (w_r / 2) grad ||x^a - x^a_hat||^2
                    (inverse.gradients.reconstruction_guidance, weight w_r; corrections.ReconstructionGuidance)
    guidance        the gradient term alone, no replacement (w_r = 0 is exactly unconditional sampling)

The frame indices of the sampled clip are 0..T-1 (interpolation: the given frames keep their real positions
0, s, 2s, ... in the full clip), so the model's temporal relative positions see real time.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..inverse.gradients import reconstruction_guidance
from ..inverse.measurement import Measurement
from ..inverse.methods import restore_reconstruction, restore_replacement
from ..inverse.operators import AvgPoolDown, Inpaint, Operator
from ..protocols import Denoiser
from ..sampling.ancestral import sample_ddpm
from .clips import frame_grid, save_clips, save_gif, tile_clips  # noqa: F401  (re-exported)
from .restore import restore_images

VIDEO_TASKS = ("extend", "interpolate", "superres")
VIDEO_METHODS = ("replacement", "reconstruction", "guidance")


# ------------------------------------------------------------------ conditional tasks
def frame_mask(frames: int, known: Sequence[int]) -> Tensor:
    """float (T, 1, 1) mask, 1 at the known frames (the Inpaint operator's mask for clips (B, C, T, H, W))."""
    m = torch.zeros(frames, 1, 1)
    m[list(known)] = 1.0
    return m


def task_layout(task: str, given: Tensor, *, new_frames: int = 0, stride: int = 2, scale: int = 2
                ) -> tuple[Operator, Tensor]:
    """(operator, clips of the full size with the given frames in place) of a task for given clips (B, C, K, h, w)
    in the model range: the full clips are what `restore_images` measures (their unknown part is zero, and the
    operator never reads it)."""
    if given.ndim != 5:
        raise ConfigError(f"video tasks take clips (B, C, T, H, W), got shape {tuple(given.shape)}")
    b, c, k, h, w = given.shape
    if task == "extend":
        if new_frames < 1:
            raise ConfigError(f"extend needs new_frames >= 1 (frames to generate after the {k} given), got {new_frames}")
        full = torch.cat([given, given.new_zeros(b, c, new_frames, h, w)], dim=2)
        return Inpaint(frame_mask(k + new_frames, range(k))), full
    if task == "interpolate":
        if stride < 2 or k < 2:
            raise ConfigError(f"interpolate needs stride >= 2 and >= 2 given frames, got stride {stride}, {k} frames")
        t = stride * (k - 1) + 1
        full = given.new_zeros(b, c, t, h, w)
        full[:, :, ::stride] = given
        return Inpaint(frame_mask(t, range(0, t, stride))), full
    if task == "superres":
        if scale < 2:
            raise ConfigError(f"superres needs scale >= 2, got {scale}")
        full = given.repeat_interleave(scale, dim=3).repeat_interleave(scale, dim=4)  # A full = given exactly
        return AvgPoolDown(scale), full
    raise ConfigError(f"unknown video task {task!r}; valid: {', '.join(VIDEO_TASKS)}")


def restore_guidance_only(denoiser: Denoiser, measurement: Measurement, noise: Tensor, sigmas: Tensor, *,
                          cond=None, generator=None, callback=None, weight: float = 1.0,
                          sampler: Callable = sample_ddpm, sampler_options: dict | None = None) -> Tensor:
    """The gradient term of reconstruction guidance alone (no replacement): sampler on
    reconstruction_guidance(denoiser, measurement, w_r). w_r = 0 is unconditional sampling."""
    measurement.check(noise)
    guided = reconstruction_guidance(denoiser, measurement, weight)
    return sampler(guided, noise, sigmas, cond=cond, generator=generator, callback=callback, **(sampler_options or {}))


METHOD_FUNCTIONS = {"replacement": restore_replacement, "reconstruction": restore_reconstruction,
                    "guidance": restore_guidance_only}


def video_method(name: str) -> Callable:
    if name not in METHOD_FUNCTIONS:
        raise ConfigError(f"unknown video method {name!r}; valid: {', '.join(VIDEO_METHODS)}")
    return METHOD_FUNCTIONS[name]


def restore_video(denoiser: Denoiser, task: str, given: Tensor, seeds: Sequence[int], sigmas: Tensor, *,
                  method: str = "reconstruction", weight: float = 1.0, new_frames: int = 0, stride: int = 2,
                  scale: int = 2, sampler: Callable = sample_ddpm, sampler_options: dict | None = None,
                  batch: int = 8, cond_for=None, device: torch.device = torch.device("cpu")):
    """Run a video task (module notes) for given clips (B, C, K, h, w), model range; one seed per clip. Returns
    (restored clips (B, C, T, H, W), per-clip RMS conditioning error ||y - A x|| / sqrt(m), the operator)."""
    op, full = task_layout(task, given, new_frames=new_frames, stride=stride, scale=scale)
    options = {"sampler": sampler, "sampler_options": dict(sampler_options or {})}
    if method != "replacement":
        options["weight"] = float(weight)
    res = restore_images(denoiser, full, seeds, op, 0.0, video_method(method), sigmas, batch=batch,
                         options=options, device=device, cond_for=cond_for)
    return res.restored, res.error, op


__all__ = ["VIDEO_TASKS", "VIDEO_METHODS", "frame_grid", "tile_clips", "save_gif", "save_clips", "frame_mask",
           "task_layout", "restore_guidance_only", "restore_video", "video_method"]

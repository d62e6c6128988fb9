"""Clips written for people: animated GIFs (Pillow) and frame grids (PNG).

Shapes: clips uint8 (N, C, T, H, W), C in {1, 3}; one GIF frame is uint8 (C, H, W).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError


def save_frame_png(image: Tensor, path: Path) -> None:
    """uint8 (C, H, W) -> PNG, written atomically."""
    from .images import to_pil
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    to_pil(image).save(tmp, format="PNG")
    tmp.replace(path)


def frame_grid(clips: Tensor, padding: int = 2) -> Tensor:
    """uint8 (N, C, T, H, W) -> uint8 (C, N (H + p) + p, T (W + p) + p): one row per clip, its frames left to right."""
    if clips.ndim != 5 or clips.dtype != torch.uint8:
        raise ConfigError(f"frame_grid takes uint8 clips (N, C, T, H, W), got {clips.dtype} {tuple(clips.shape)}")
    n, c, t, h, w = clips.shape
    grid = torch.zeros((c, n * (h + padding) + padding, t * (w + padding) + padding), dtype=torch.uint8)
    for i in range(n):
        for j in range(t):
            y, x = padding + i * (h + padding), padding + j * (w + padding)
            grid[:, y:y + h, x:x + w] = clips[i, :, j]
    return grid


def tile_clips(clips: Tensor, nrow: int | None = None, padding: int = 2) -> Tensor:
    """uint8 (N, C, T, H, W) -> uint8 (T, C, H', W'): the clips side by side in a grid, frame by frame."""
    n, c, t, h, w = clips.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    out = torch.zeros((t, c, rows * (h + padding) + padding, nrow * (w + padding) + padding), dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        out[:, :, y:y + h, x:x + w] = clips[i].transpose(0, 1)
    return out


def save_gif(frames: Tensor, path: Path, fps: float = 8.0) -> None:
    """uint8 (T, C, H, W), C in {1, 3} -> an animated GIF looping forever, written atomically."""
    from .images import to_pil
    pils = [to_pil(f) for f in frames]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    pils[0].save(tmp, format="GIF", save_all=True, append_images=pils[1:], duration=int(round(1000 / fps)),
                 loop=0, optimize=False)
    tmp.replace(path)


def save_clips(clips: Tensor, out: Path, seeds: Sequence[int] | None = None, fps: float = 8.0) -> list[Path]:
    """uint8 (N, C, T, H, W) -> out/<seed>.gif per clip, out/grid.gif (all clips tiled) and out/frames.png (the
    frame grid: a clip per row). Returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(len(clips))) if seeds is None else list(seeds)
    files = []
    for s, clip in zip(seeds, clips):
        files.append(out / f"{int(s):06d}.gif")
        save_gif(clip.transpose(0, 1), files[-1], fps)
    save_gif(tile_clips(clips), out / "grid.gif", fps)
    save_frame_png(frame_grid(clips), out / "frames.png")
    return files + [out / "grid.gif", out / "frames.png"]



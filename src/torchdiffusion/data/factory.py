"""`build_dataset(kind, **options)`: one entry point from a config's data section to a data set.

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
from torchdiffusion.data.fashion_mnist import load_fashion_mnist
from torchdiffusion.data.folder import load_image_folder
from torchdiffusion.data.mnist import load_mnist
from torchdiffusion.errors import DataError

__all__ = ["build_dataset", "DATASET_KINDS", "DATASET_OPTIONS"]

_LOADERS: dict[str, Callable[..., ImageArrayDataset]] = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "folder": load_image_folder,
}
DATASET_KINDS = tuple(_LOADERS)
DATASET_OPTIONS: dict[str, tuple[str, ...]] = {
    "mnist": ("split", "channels", "resolution", "path", "cache_dir"),
    "fashion-mnist": ("split", "channels", "resolution", "path"),
    "folder": ("path", "channels", "resolution", "bad_files", "labels", "alpha_background",
               "min_size", "max_pixels", "max_bytes"),
}


def _did_you_mean(word: str, options: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_dataset(kind: str, **options: Any) -> ImageArrayDataset:
    """Build the data set of `kind` (see DATASET_KINDS) with keyword `options` (see DATASET_OPTIONS).

    An unknown kind or option raises DataError naming the valid ones; options equal to None are
    treated as not given (so a config can spell out every key).
    """
    if kind not in _LOADERS:
        raise DataError(f"unknown data set kind {kind!r}{_did_you_mean(kind, DATASET_KINDS)}; "
                        f"valid: {', '.join(DATASET_KINDS)}")
    valid = DATASET_OPTIONS[kind]
    for key in options:
        if key not in valid:
            raise DataError(f"unknown option {key!r} for data set kind {kind!r}{_did_you_mean(key, valid)}; "
                            f"valid: {', '.join(valid)}")
    given = {k: v for k, v in options.items() if v is not None}
    if kind == "folder":
        if "path" not in given:
            raise DataError("data set kind 'folder' needs option 'path' (a folder of images or a .zip of them)")
        return load_image_folder(given.pop("path"), **given)
    return _LOADERS[kind](**given)

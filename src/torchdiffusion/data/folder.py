"""An image folder or ZIP as an in-memory data set (decoded up front, uint8 at rest).

Layout: images anywhere under the root (recursive). With labels="folder", the first-level
subfolder names are the classes, sorted by name -> 0, 1, ...; the class list is taken from
every image-named file before any is skipped, so class indices do not change when a bad file is
removed. With labels="none" every label is -1.

Bad files (see image_decode for the categories): bad_files="error" stops at the first one in
path order, before anything is trained, naming it; "skip" leaves them out and records the
CheckReport in dataset.info["report"] (and a one-line summary in info["skipped"]). A set with
no usable image left is an error that gives the counts (RELIABILITY 22). info["files"] holds the
relative path of every decoded image, in the order of x (restore names its outputs after them).

Size: resolution=N centre-crops the largest square and resizes it to N x N (LANCZOS);
resolution=None keeps the files' size, which must then be the same for all.
"""
from __future__ import annotations

from collections import Counter
from os import PathLike
from typing import Optional

import numpy as np
import torch

from torchdiffusion.data.check import CheckReport, probe_entry
from torchdiffusion.data.dataset import ImageArrayDataset
from torchdiffusion.data.image_decode import (CHANNEL_POLICIES, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE,
                                              image_to_array)
from torchdiffusion.data.image_sources import DEFAULT_MAX_BYTES, open_image_source
from torchdiffusion.errors import DataError

__all__ = ["load_image_folder", "BAD_FILE_POLICIES", "LABEL_POLICIES"]

BAD_FILE_POLICIES = ("error", "skip")
LABEL_POLICIES = ("none", "folder")


def _classes(relpaths: list[str], root: str) -> tuple[str, ...]:
    top = [p for p in relpaths if "/" not in p]
    if top:
        raise DataError(f"{root}: labels='folder' needs every image inside a first-level class folder, "
                        f"but {len(top)} lie at the top level (e.g. {top[0]!r}); move them or use labels='none'")
    return tuple(sorted({p.split("/", 1)[0] for p in relpaths}))


def _unify_channels(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """channels='auto': 1 channel if every image is gray in content (R == G == B), else 3."""
    gray = all(a.shape[0] == 1 or (np.array_equal(a[0], a[1]) and np.array_equal(a[0], a[2])) for a in arrays)
    if gray:
        return [a[:1] for a in arrays]
    return [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]


def load_image_folder(path: str | PathLike, *, channels: str = "auto", resolution: Optional[int] = None,
                      bad_files: str = "error", labels: str = "none", alpha_background: int = 255,
                      min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS,
                      max_bytes: int = DEFAULT_MAX_BYTES) -> ImageArrayDataset:
    """Decode every usable image under `path` (folder or .zip) into uint8 (N, C, H, W).

    channels: auto | L | RGB | RGBA (see image_decode.CHANNEL_POLICIES); resolution: int or None;
    bad_files: error | skip; labels: none | folder; alpha_background: 0..255, the gray that alpha
    is composited onto (255 = white); min_size: shorter sides below it are 'tiny';
    max_pixels / max_bytes: decompression-bomb limits per file.
    """
    for name, value, valid in (("channels", channels, CHANNEL_POLICIES), ("bad_files", bad_files, BAD_FILE_POLICIES),
                               ("labels", labels, LABEL_POLICIES)):
        if value not in valid:
            raise DataError(f"folder: unknown {name} {value!r}; valid: {', '.join(valid)}")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise DataError(f"folder: resolution must be a positive integer or None, got {resolution!r}")
    if not (isinstance(alpha_background, int) and 0 <= alpha_background <= 255):
        raise DataError(f"folder: alpha_background must be an integer 0..255, got {alpha_background!r}")

    report = CheckReport(source=str(path))
    arrays: list[np.ndarray] = []
    label_list: list[int] = []
    kept: list[str] = []  # relative paths of the decoded images, in order
    with open_image_source(path, max_bytes=max_bytes) as listing:
        report.ignored = listing.ignored
        relpaths = [e.relpath for e in listing.entries]
        class_names = _classes(relpaths, listing.root) if labels == "folder" else ()
        class_index = {c: k for k, c in enumerate(class_names)}
        for entry in listing.entries:
            probe = probe_entry(entry, min_size=min_size, max_pixels=max_pixels, max_bytes=max_bytes)
            report.add(entry.relpath, probe)
            if probe.category is not None:
                if bad_files == "error":
                    raise DataError(f"{listing.root}: bad image file {entry.relpath!r} ({probe.category}: "
                                    f"{probe.detail}); remove or fix it, or set bad_files='skip' "
                                    "(`data check` lists every bad file)")
                continue
            arrays.append(image_to_array(probe.image, channels, resolution, alpha_background))
            kept.append(entry.relpath)
            label_list.append(class_index[entry.relpath.split("/", 1)[0]] if class_names else -1)
    if not arrays:
        raise DataError(f"{path}: no usable images left ({report.one_line()})")
    sizes = Counter(a.shape[1:] for a in arrays)
    if len(sizes) > 1:
        seen = ", ".join(f"{h}x{w}: {n}" for (h, w), n in sizes.most_common(4))
        raise DataError(f"{path}: images differ in size (HxW {seen}{' ...' if len(sizes) > 4 else ''}); "
                        "set resolution=N to centre-crop and resize them to N x N")
    if channels == "auto":
        arrays = _unify_channels(arrays)
    x = torch.from_numpy(np.stack(arrays))  # (N, C, H, W) uint8
    info = {"source": "folder", "path": str(path), "channels": channels, "resolution": resolution,
            "bad_files": bad_files, "labels": labels, "report": report, "skipped": report.one_line(),
            "files": kept}
    return ImageArrayDataset(x, torch.tensor(label_list, dtype=torch.int64), class_names=class_names, info=info)

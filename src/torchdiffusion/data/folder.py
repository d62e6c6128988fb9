"""An image folder or ZIP as an in-memory data set (decoded up front, uint8 at rest).

Layout: images anywhere under the root (recursive). With labels="folder", the first-level
subfolder names are the classes, sorted by name -> 0, 1, ...; the class list is taken from
every image-named file before any is skipped, so class indices do not change when a bad file is
removed. With labels="json", the labels are those of a `dataset.json` at the root, in the layout of EDM's
dataset_tool (Karras et al. 2022, github.com/NVlabs/edm): {"labels": [[relpath, int], ...]}, with
optional "class_names": [...] (what `torchdiffusion data prepare` writes). With labels="none" every
label is -1.

Splits: with val_fraction=f (0 < f < 1) a file is held out ("val") when the first 8 bytes of the
sha256 of its relative path, read as an integer, fall below f * 2**64; "train" is the rest and
"train+val" all of them. The choice depends on the path only, so adding or removing files never
moves any other file between the splits (the stable test set by a hash of each instance's
identifier of Géron, "Hands-On Machine Learning", ch. 2). Without val_fraction the folder is one split: "train" (= "train+val") is
every file, and "val" is an error.

Bad files (see image_decode for the categories): bad_files="error" stops at the first one in
path order, before anything is trained, naming it; "skip" leaves them out and records the
CheckReport in dataset.info["report"] (and a one-line summary in info["skipped"]). A set with
no usable image left is an error that gives the counts (RELIABILITY 22). info["files"] holds the
relative path of every decoded image, in the order of x (restore names its outputs after them).

Size: resolution=N centre-crops the largest square and resizes it to N x N (LANCZOS);
resolution=None keeps the files' size, which must then be the same for all.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from os import PathLike
from typing import Optional

import numpy as np
import torch

from torchdiffusion.data.check import CheckReport, probe_entry
from torchdiffusion.data.dataset import ImageArrayDataset
from torchdiffusion.data.image_decode import (CHANNEL_POLICIES, CROP_POLICIES, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE,
                                              image_to_array)
from torchdiffusion.data.image_sources import DEFAULT_MAX_BYTES, LABEL_FILE, open_image_source
from torchdiffusion.errors import DataError

__all__ = ["load_image_folder", "held_out", "read_label_json", "BAD_FILE_POLICIES", "LABEL_POLICIES",
           "FOLDER_SPLITS", "LABEL_FILE"]

BAD_FILE_POLICIES = ("error", "skip")
LABEL_POLICIES = ("none", "folder", "json")
FOLDER_SPLITS = ("train", "val", "train+val")


def held_out(relpath: str, fraction: float) -> bool:
    """Whether the file at '/'-separated `relpath` belongs to the held-out split of share `fraction`:
    sha256(relpath as UTF-8)[:8] as a big-endian integer < fraction * 2**64 (depends on this path only)."""
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2.0 ** 64


def _in_split(relpath: str, split: str, fraction: Optional[float]) -> bool:
    if split == "train+val" or not fraction:
        return True
    return held_out(relpath, fraction) == (split == "val")


def read_label_json(data: Optional[bytes], root: str, relpaths: list[str]) -> tuple[dict[str, int], tuple[str, ...]]:
    """dataset.json bytes (EDM's layout) -> ({relpath: label}, class names). Every image must have a label
    0..K-1; K is the largest label + 1, the names are "class_names" when given (K of them), else "0".."K-1"."""
    where = f"{root}/{LABEL_FILE}"
    if data is None:
        raise DataError(f"{root}: labels='json' needs a {LABEL_FILE} at the root ({{\"labels\": [[file, int], ...]}}, "
                        "as `torchdiffusion data prepare` and EDM's dataset_tool write); none found")
    try:
        meta = json.loads(data.decode("utf-8"))
        pairs = meta["labels"]
        if pairs is None:
            raise DataError(f"{where}: \"labels\" is null (an unlabelled set); use labels='none'")
        table = {str(name).replace("\\", "/"): lab for name, lab in pairs}
    except DataError:
        raise
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where}: not a label file of the form {{\"labels\": [[file, int], ...]}} "
                        f"({type(e).__name__}: {str(e)[:80]})") from None
    bad = [(n, v) for n, v in table.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise DataError(f"{where}: label {bad[0][1]!r} of {bad[0][0]!r} is not an integer >= 0")
    missing = [p for p in relpaths if p not in table]
    if missing:
        raise DataError(f"{where}: {len(missing)} image(s) have no label (e.g. {missing[0]!r}); every image "
                        "needs one")
    k = max((table[p] for p in relpaths), default=-1) + 1
    names = meta.get("class_names") if isinstance(meta, dict) else None
    if names is not None:
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)) or len(names) < k:
            raise DataError(f"{where}: \"class_names\" must be a list of at least {k} strings (one per label)")
        return table, tuple(names)
    return table, tuple(str(i) for i in range(k))


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
                      max_bytes: int = DEFAULT_MAX_BYTES, split: str = "train",
                      val_fraction: Optional[float] = None, crop: str = "center") -> ImageArrayDataset:
    """Decode every usable image of `split` under `path` (folder or .zip) into uint8 (N, C, H, W).

    channels: auto | L | RGB | RGBA (see image_decode.CHANNEL_POLICIES); resolution: int or None;
    bad_files: error | skip; labels: none | folder | json; alpha_background: 0..255, the gray that alpha
    is composited onto (255 = white); min_size: shorter sides below it are 'tiny';
    max_pixels / max_bytes: decompression-bomb limits per file; split: train | val | train+val, held
    out by a hash of each file's path with share val_fraction (None: no held-out files).
    Class names (labels folder/json) come from every file of the folder, so both splits agree.
    crop: center (the largest centred square) | none (the whole image, squeezed), with resolution.
    """
    for name, value, valid in (("channels", channels, CHANNEL_POLICIES), ("bad_files", bad_files, BAD_FILE_POLICIES),
                               ("labels", labels, LABEL_POLICIES), ("split", split, FOLDER_SPLITS),
                               ("crop", crop, CROP_POLICIES)):
        if value not in valid:
            raise DataError(f"folder: unknown {name} {value!r}; valid: {', '.join(valid)}")
    if val_fraction is not None and (isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float))
                                     or not 0 <= val_fraction < 1):
        raise DataError(f"folder: val_fraction must be a number in [0, 1) (the share of files held out), "
                        f"got {val_fraction!r}")
    if split == "val" and not val_fraction:
        raise DataError("folder: split 'val' needs val_fraction > 0 (the share of files held out, chosen by a hash "
                        "of each file's path), e.g. data.val_fraction=0.05")
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
        label_of: dict[str, int] = {}
        if labels == "folder":
            class_names = _classes(relpaths, listing.root)
            class_index = {c: k for k, c in enumerate(class_names)}
            label_of = {p: class_index[p.split("/", 1)[0]] for p in relpaths}
        elif labels == "json":
            label_of, class_names = read_label_json(listing.label_file, listing.root, relpaths)
        else:
            class_names = ()
        for entry in listing.entries:
            if not _in_split(entry.relpath, split, val_fraction):
                continue
            probe = probe_entry(entry, min_size=min_size, max_pixels=max_pixels, max_bytes=max_bytes)
            report.add(entry.relpath, probe)
            if probe.category is not None:
                if bad_files == "error":
                    raise DataError(f"{listing.root}: bad image file {entry.relpath!r} ({probe.category}: "
                                    f"{probe.detail}); remove or fix it, or set bad_files='skip' "
                                    "(`data check` lists every bad file)")
                continue
            arrays.append(image_to_array(probe.image, channels, resolution, alpha_background, crop))
            kept.append(entry.relpath)
            label_list.append(label_of[entry.relpath] if labels != "none" else -1)
    if not arrays:
        if val_fraction and split != "train+val" and report.files == 0:
            raise DataError(f"{path}: split {split!r} of val_fraction={val_fraction} holds none of the "
                            f"{len(relpaths)} image file(s) (files are held out by a hash of their path); "
                            f"{'raise' if split == 'val' else 'lower'} data.val_fraction"
                            + (", or set data.val_split=null" if split == "val" else ""))
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
            "bad_files": bad_files, "labels": labels, "split": split, "val_fraction": val_fraction,
            "report": report, "skipped": report.one_line(), "files": kept}
    return ImageArrayDataset(x, torch.tensor(label_list, dtype=torch.int64), class_names=class_names, info=info)

"""Folders or ZIPs of real clips: animated GIFs (Pillow) and MP4/WebM/AVI/MOV/MKV (PyAV), cut into clips.

Every file under the root (sorted by its relative path, the image folders' order: image_sources) is decoded
frame by frame; a file of F frames gives floor(F / L) non-overlapping clips, L = stride (frames - 1) + 1, of
the frames start + stride * t (t < frames) for the starts 0, L, 2L, ...; frame_index = start + stride * t (the real indices, for the temporal relative positions). Frames are gray (L) or
RGB (channels), resized to `resolution` after a centred square crop (None: kept, and all files must agree).

Bad files, counted and named by category (the image folders' policy, bad_files error | skip):
    undecodable  not a readable clip (or no frame could be decoded)
    short        fewer frames than one clip needs (frames, at frame_stride)
    mixed-size   frames of different sizes inside the file, or (resolution None) a size unlike the first file's
With bad_files=error any bad file stops loading with one line naming each category's count and first file; with
skip they are left out and the counts are in the data set's info["bad"].
A root-level grid.gif (the clips tiled, as `sample` writes it) is not read. PyAV is needed only for the non-GIF formats: without it those files fail in one line that says so.
"""
from __future__ import annotations

import io
from collections import Counter
from typing import Optional

import numpy as np
import torch

from torchdiffusion.data.image_sources import open_image_source
from torchdiffusion.data.video_dataset import VideoArrayDataset
from torchdiffusion.errors import DataError

__all__ = ["load_video_folder", "VIDEO_EXTENSIONS", "BAD_CLIP_CATEGORIES"]

GIF_EXTENSIONS = (".gif",)
AV_EXTENSIONS = (".mp4", ".webm", ".avi", ".mov", ".mkv")
VIDEO_EXTENSIONS = GIF_EXTENSIONS + AV_EXTENSIONS
BAD_CLIP_CATEGORIES = ("undecodable", "short", "mixed-size")
PYAV_HINT = "reading MP4/WebM/AVI/MOV/MKV clips needs PyAV (pip install av); animated GIFs need only Pillow"


class _Bad(Exception):
    def __init__(self, category: str, detail: str):
        super().__init__(detail)
        self.category, self.detail = category, detail


def _frames_gif(data: bytes) -> list[np.ndarray]:
    from PIL import Image, ImageSequence
    try:
        with Image.open(io.BytesIO(data)) as im:
            return [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    except Exception as e:  # Pillow raises many types on a broken file
        raise _Bad("undecodable", f"{type(e).__name__}: {e}") from None


def _frames_av(data: bytes) -> list[np.ndarray]:
    try:
        import av
    except ImportError:
        raise DataError(PYAV_HINT) from None
    try:
        with av.open(io.BytesIO(data)) as container:
            return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as e:
        raise _Bad("undecodable", f"{type(e).__name__}: {e}") from None


def _to_tensor(frames: list[np.ndarray], channels: str, resolution: Optional[int]) -> torch.Tensor:
    """list of (H, W, 3) uint8 -> uint8 (C, F, H', W')."""
    x = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)               # (3, F, H, W)
    if channels == "L":  # ITU-R 601-2 luma, as Pillow's convert("L")
        w = torch.tensor([299, 587, 114], dtype=torch.int32).view(3, 1, 1, 1)
        x = ((x.to(torch.int32) * w).sum(0, keepdim=True) + 500).div(1000, rounding_mode="floor").to(torch.uint8)
    if resolution is not None:
        h, wd = x.shape[-2:]
        s = min(h, wd)
        top, left = (h - s) // 2, (wd - s) // 2
        x = x[..., top:top + s, left:left + s]
        if s != resolution:
            x = torch.nn.functional.interpolate(x.float(), size=(resolution, resolution), mode="area"
                                                if s > resolution else "bilinear", align_corners=None)
            x = x.round().clamp(0, 255).to(torch.uint8)
    return x


def load_video_folder(path, *, split: str = "train", channels: str = "L", resolution: Optional[int] = None,
                      frames: int = 16, frame_stride: int = 1, image_frames: int = 0,
                      bad_files: str = "error") -> VideoArrayDataset:
    """Clips uint8 (N, C, frames, H, W) of every usable file under `path` (module notes)."""
    if split != "train":
        raise DataError(f"video-folder: split {split!r}; a folder of clips has one split, 'train'")
    if channels not in ("L", "RGB"):
        raise DataError(f"video-folder: channels must be L or RGB, got {channels!r}")
    if bad_files not in ("error", "skip"):
        raise DataError(f"video-folder: bad_files must be error or skip, got {bad_files!r}")
    for name, v in (("frames", frames), ("frame_stride", frame_stride)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DataError(f"video-folder: {name} must be an integer >= 1, got {v!r}")
    span = frame_stride * (frames - 1) + 1
    clips, index, bad, size0 = [], [], [], None
    with open_image_source(path, extensions=VIDEO_EXTENSIONS) as listing:
        for entry in listing.entries:
            if entry.relpath == "grid.gif":  # the tiled view `sample` writes beside the clips, never a clip
                continue
            try:
                data = entry.read()
                raw = _frames_gif(data) if entry.relpath.lower().endswith(GIF_EXTENSIONS) else _frames_av(data)
                if not raw:
                    raise _Bad("undecodable", "no frame decoded")
                sizes = {f.shape[:2] for f in raw}
                if len(sizes) > 1:
                    raise _Bad("mixed-size", f"frame sizes {sorted(sizes)}")
                if len(raw) < span:
                    raise _Bad("short", f"{len(raw)} frames, a clip needs {span}")
                x = _to_tensor(raw, channels, resolution)
                if size0 is None:
                    size0 = tuple(x.shape[-2:])
                elif tuple(x.shape[-2:]) != size0:
                    raise _Bad("mixed-size", f"{x.shape[-1]}x{x.shape[-2]}, the first clip is {size0[1]}x{size0[0]} "
                                             f"(set data.resolution to resize)")
            except _Bad as b:
                bad.append((entry.relpath, b.category, b.detail))
                continue
            except OSError as e:
                bad.append((entry.relpath, "undecodable", str(e)))
                continue
            for start in range(0, x.shape[1] - span + 1, span):
                clips.append(x[:, start:start + span:frame_stride])
                index.append(torch.arange(frames, dtype=torch.float32) * frame_stride + start)
    counts = Counter(cat for _, cat, _ in bad)
    if bad and bad_files == "error":
        first = {}
        for rel, cat, detail in bad:
            first.setdefault(cat, f"{rel}: {detail}")
        summary = "; ".join(f"{counts[c]} {c} (first: {first[c]})" for c in BAD_CLIP_CATEGORIES if counts[c])
        raise DataError(f"{path}: {len(bad)} bad clip file(s): {summary}; fix them or set data.bad_files=skip")
    if not clips:
        raise DataError(f"{path}: no usable clip of {frames} frames at stride {frame_stride}"
                        + (f" ({len(bad)} bad file(s) skipped)" if bad else ""))
    info = {"source": "video-folder", "path": str(path), "frames": frames, "frame_stride": frame_stride,
            "resolution": resolution, "bad": {c: counts[c] for c in BAD_CLIP_CATEGORIES},
            "bad_files": [f"{rel} ({cat})" for rel, cat, _ in bad]}
    return VideoArrayDataset(torch.stack(clips), frame_index=torch.stack(index), image_frames=image_frames, info=info)

"""The in-memory video data set: clips uint8 (N, C, T, H, W) at rest, batches (B, C, T [+ K], H, W).

Items and batches are dicts with fixed keys (DESIGN 2.11):
    "x"            uint8 (B, C, T + K, H, W): T frames of each clip, then K independent images (below)
    "label"        int64 (B,), -1 when unlabelled
    "frame_index"  float32 (B, T + K): each frame's real index in its source video (the clip's start + stride * t),
                   so relative temporal positions stay right for strided or extended clips; 0 for the images
    "independent"  bool (B, T + K): True for the K appended images

Joint video + image training (Ho et al. 2022, sec. 3; "concatenate frames of a video and independent images"):
with image_frames = K > 0 every clip of a batch is followed by K frames drawn from OTHER clips of the set, as
independent images. Which clip and frame is a pure function of (clip index, k), so a batch depends on its indices
only and a resumed run sees the same batches. The backbone's temporal attention mask keeps those images apart
(nn.unet3d); the frames conditioner hands "frame_index" / "independent" to it.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from torchdiffusion.errors import DataError

__all__ = ["VideoArrayDataset", "image_sources_for"]


def image_sources_for(index: Tensor, k: int, n: int, t: int) -> tuple[Tensor, Tensor]:
    """(clip, frame) int64 (B, k) of the k independent images of clips `index` (B,): a clip other than the row's
    own (for n > 1) and a frame, both fixed by (index, k) through an integer hash."""
    i = index.to(torch.int64)[:, None]
    j = torch.arange(k, dtype=torch.int64)[None, :]
    h = (i * 1_000_003 + (j + 1) * 7_919) % 2_147_483_647
    h = (h * 48_271) % 2_147_483_647
    clip = (i + 1 + h % max(n - 1, 1)) % n if n > 1 else torch.zeros_like(h)
    frame = (h // 7) % t
    return clip, frame


class VideoArrayDataset(Dataset):
    """x: uint8 (N, C, T, H, W); label int64 (N,) (-1 = unlabelled); frame_index float32 (N, T) (default
    0..T-1); extras: named per-clip tensors (N, ...) (Moving MNIST's digits and velocities); image_frames: K
    independent images appended to every clip of a batch (module notes)."""

    def __init__(self, x: Tensor | np.ndarray, label: Tensor | np.ndarray | None = None, *,
                 frame_index: Optional[Tensor] = None, class_names: Sequence[str] = (),
                 extras: Optional[Mapping[str, Tensor]] = None, image_frames: int = 0,
                 info: Optional[Mapping[str, Any]] = None):
        x = torch.as_tensor(x)
        if x.dtype != torch.uint8 or x.ndim != 5:
            raise ValueError(f"x must be uint8 (N, C, T, H, W), got {x.dtype} {tuple(x.shape)}")
        n, t = x.shape[0], x.shape[2]
        label = torch.full((n,), -1, dtype=torch.int64) if label is None else torch.as_tensor(label).to(torch.int64)
        if label.shape != (n,):
            raise ValueError(f"label must have shape ({n},), got {tuple(label.shape)}")
        if frame_index is None:
            frame_index = torch.arange(t, dtype=torch.float32).expand(n, t)
        frame_index = torch.as_tensor(frame_index, dtype=torch.float32)
        if frame_index.shape != (n, t):
            raise ValueError(f"frame_index must have shape ({n}, {t}), got {tuple(frame_index.shape)}")
        if isinstance(image_frames, bool) or not isinstance(image_frames, int) or image_frames < 0:
            raise DataError(f"data.image_frames must be an integer >= 0 (independent images per clip), "
                            f"got {image_frames!r}")
        self.x, self.label, self.frame_index = x, label, frame_index.contiguous()
        self.class_names = tuple(class_names)
        self.extras = {k: torch.as_tensor(v) for k, v in (extras or {}).items()}
        self.image_frames = image_frames
        self.info = {**dict(info or {}), "image_frames": image_frames}

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        b = self.batch(torch.tensor([int(i)]))
        return {k: v[0] for k, v in b.items()}

    def batch(self, indices: Tensor) -> dict[str, Tensor]:
        """indices int64 (B,) -> the batch of the module notes (new tensors)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        x, fi = self.x[indices], self.frame_index[indices]
        indep = torch.zeros(fi.shape, dtype=torch.bool)
        k = self.image_frames
        if k:
            clip, frame = image_sources_for(indices, k, len(self), self.frames)
            imgs = self.x[clip, :, frame]                                  # (B, k, C, H, W)
            x = torch.cat([x, imgs.permute(0, 2, 1, 3, 4)], dim=2)
            fi = torch.cat([fi, torch.zeros(len(indices), k)], dim=1)
            indep = torch.cat([indep, torch.ones(len(indices), k, dtype=torch.bool)], dim=1)
        return {"x": x, "label": self.label[indices], "frame_index": fi, "independent": indep}

    def subset(self, n: int) -> "VideoArrayDataset":
        """The first n clips (data.limit)."""
        return VideoArrayDataset(self.x[:n], self.label[:n], frame_index=self.frame_index[:n],
                                 class_names=self.class_names, extras={k: v[:n] for k, v in self.extras.items()},
                                 image_frames=self.image_frames, info=self.info)

    @property
    def channels(self) -> int:
        return self.x.shape[1]

    @property
    def frames(self) -> int:
        return self.x.shape[2]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.x.shape[3], self.x.shape[4])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, T, H, W) of one clip (without the appended images): the model's data shape."""
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labelled(self) -> bool:
        return bool(self.label.numel()) and bool((self.label >= 0).all())

    def frames_as_images(self) -> Tensor:
        """uint8 (N * T, C, H, W): every frame as an image (per-frame FID references)."""
        n, c, t, h, w = self.x.shape
        return self.x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)

    def __repr__(self) -> str:
        n, c, t, h, w = self.x.shape
        return (f"VideoArrayDataset(n={n}, channels={c}, frames={t}, size={h}x{w}, "
                f"image_frames={self.image_frames}, source={self.info.get('source', '?')!r})")


"""The frames conditioner: the real frame indices of a clip and which frames are independent images.

cond["frame_index"] (B, T) float32 and cond["independent"] (B, T) bool, from the batch keys of the same names
(data.video_dataset: the clip's frame indices, then the K appended images), for the video backbone (nn.unet3d):
its temporal attention uses the index differences as relative positions and masks the independent images
block-diagonally (Ho et al. 2022, joint video + image training).

mask: false hands the backbone no "independent" key, so the appended images attend to the clip's frames like
any frame (the ablation "images without the mask" of the joint-training benchmark).

At sampling time the values are a list of frame indices shared by every seed (e.g. [0, 2, 4, ...] for a clip at
stride 2); with none the backbone uses 0..T-1 and no image frames. No dropout: frame indices are not a condition
of classifier-free guidance, so null() keeps them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import CondSpec


@dataclass(frozen=True)
class FramesConditionerConfig:
    mask: bool = True  # block-diagonal temporal mask for the independent images (False: the no-mask ablation)


class FramesConditioner:
    def __init__(self, name: str, cfg: FramesConditionerConfig, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not isinstance(cfg.mask, bool):
            raise ConfigError(f"cond.{name}.mask must be true or false, got {cfg.mask!r}")
        self.name, self.cfg = name, cfg

    @property
    def specs(self) -> tuple[CondSpec, ...]:
        return (CondSpec("frame_index", "frames"), CondSpec("independent", "frames"))

    def from_batch(self, batch: Mapping[str, Tensor], step: Optional[int]) -> dict[str, Tensor]:
        if "frame_index" not in batch:
            raise ConfigError(f"cond.{self.name} (frames) needs video batches with 'frame_index' (a video data "
                              f"set, e.g. data.kind=moving-mnist)")
        out = {"frame_index": batch["frame_index"].to(torch.float32)}
        if self.cfg.mask and "independent" in batch:
            out["independent"] = batch["independent"].to(torch.bool)
        return out

    def for_sampling(self, seeds: Sequence[int], values: Any = None) -> dict[str, Tensor]:
        if values is None:
            return {}
        fi = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
        if not fi.numel() or not bool(torch.isfinite(fi).all()):
            raise ConfigError(f"cond.{self.name}: frame indices must be a non-empty list of numbers, got {values!r}")
        return {"frame_index": fi.expand(len(seeds), -1).clone()}

    def null(self, cond: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: cond[k] for k in ("frame_index", "independent") if k in cond}

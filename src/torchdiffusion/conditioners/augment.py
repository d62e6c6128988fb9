"""The augmentation conditioner: cond[NAME] = (B, AUG_DIM) float, the augmentation vector of each training image.

Non-leaking augmentation (Karras et al. 2020; Karras et al. 2022, Appendix F.2; data.augment): the training data
path augments each image (the diffusion step calls `augment_batch(x0, batch, step)` before it builds the cond) and
puts the vectors in the batch; `from_batch` hands them to the backbone as a `vector` condition. Validation
(step None), sampling and the null condition use the zero vector: no augmentation, the clean distribution.

Config: `cond: {augment: {kind: augment, p: 0.5, rotate: 0, ...}}`, the fields of data.augment.AugmentConfig.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..data.augment import AUG_DIM, AugmentConfig, AugmentPipe
from ..errors import ConfigError
from .base import CondSpec


class AugmentConditioner:
    def __init__(self, name: str, cfg: AugmentConfig, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.name = self.key = name
        self.batch_key = f"augment:{name}"  # where augment() leaves the vectors in the batch
        self.cfg = cfg
        self.pipe = AugmentPipe(cfg, seed, rank, world_size)

    @property
    def specs(self) -> tuple[CondSpec, ...]:
        return (CondSpec(self.key, "vector", AUG_DIM),)

    def augment_batch(self, x0: Tensor, batch: Mapping[str, Tensor], step: int) -> tuple[Tensor, dict]:
        """The training step's augmentation: (augmented x0, the batch with its vectors under batch_key)."""
        x, vec = self.pipe(x0, step)
        return x, {**batch, self.batch_key: vec}

    def from_batch(self, batch: Mapping[str, Tensor], step: Optional[int]) -> dict[str, Tensor]:
        if self.batch_key in batch:
            return {self.key: batch[self.batch_key].to(torch.float32)}
        if step is not None:  # a training batch that did not go through augment(): the vector would lie
            raise ConfigError(f"cond.{self.key} (augment): this training step does not apply the augmentation "
                              f"(only diffusion training does)")
        return {self.key: torch.zeros(len(next(iter(batch.values()))), AUG_DIM)}

    def for_sampling(self, seeds: Sequence[int], values: Any = None) -> dict[str, Tensor]:
        """Zero (no augmentation) by default; values: one vector of AUG_DIM floats for every seed, or one per
        seed (e.g. to look at what the model learned of an augmentation)."""
        n = len(seeds)
        if values is None:
            return {self.key: torch.zeros(n, AUG_DIM)}
        v = torch.as_tensor(values, dtype=torch.float32)
        if v.shape == (AUG_DIM,):
            v = v.expand(n, AUG_DIM).clone()
        if tuple(v.shape) != (n, AUG_DIM):
            raise ConfigError(f"cond.{self.key}: an augmentation vector has {AUG_DIM} values (one, or one per seed "
                              f"for {n} seeds), got shape {tuple(v.shape)}")
        return {self.key: v}

    def null(self, cond: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {self.key: torch.zeros_like(cond[self.key])}

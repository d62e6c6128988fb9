"""The class-label conditioner: cond[NAME] = (B,) int64 labels from the batch's "label", the null label K.

Training drops labels to the null label with probability p_uncond (classifier-free guidance, Ho & Salimans 2022,
who use 0.1 or 0.2), drawn per global step as guidance.dropout.drop_mask (so a run on W processes drops the same
rows as one on one process, and a resumed run the same rows as an uninterrupted one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..guidance.dropout import LabelDropout, class_labels_for_seeds
from .base import CondSpec


@dataclass(frozen=True)
class ClassConditionerConfig:
    num_classes: int = 0  # 0: set from the data's classes when training starts
    p_uncond: float = 0.1  # Ho & Salimans 2022
    source: str = "label"  # the batch key holding the labels

    def __post_init__(self):
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ConfigError(f"p_uncond must be in [0, 1], got {self.p_uncond}")
        if self.num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0 (0: from the data), got {self.num_classes}")


class ClassConditioner:
    def __init__(self, name: str, cfg: ClassConditionerConfig, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        if cfg.num_classes < 1:
            raise ConfigError(f"cond.{name}: num_classes is 0; it is set from the data when training starts "
                              f"(the data have no classes?)")
        self.name = self.key = name
        self.cfg, self.num_classes = cfg, cfg.num_classes
        self._dropout = LabelDropout(cfg.num_classes, cfg.p_uncond, seed, rank, world_size)

    @property
    def specs(self) -> tuple[CondSpec, ...]:
        return (CondSpec(self.key, "class", self.num_classes),)

    def from_batch(self, batch: Mapping[str, Tensor], step: Optional[int]) -> dict[str, Tensor]:
        if self.cfg.source not in batch:
            raise ConfigError(f"cond.{self.key}: the batch has no {self.cfg.source!r} (labelled data needed)")
        return {self.key: self._dropout({"label": batch[self.cfg.source]}, step)["label"]}

    def for_sampling(self, seeds: Sequence[int], values: Any = None) -> dict[str, Tensor]:
        return {self.key: self.labels(seeds, values)}

    def labels(self, seeds: Sequence[int], values: Any = None) -> Tensor:
        """values: None (labels seed % K), one int, or one label per seed."""
        if values is None:
            return class_labels_for_seeds(seeds, self.num_classes)
        labels = torch.as_tensor(values, dtype=torch.int64).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(len(seeds)).clone()
        if labels.numel() != len(seeds):
            raise ConfigError(f"cond.{self.key}: {labels.numel()} labels for {len(seeds)} seeds")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ConfigError(f"labels must be in [0, {self.num_classes - 1}], got [{int(labels.min())}, "
                              f"{int(labels.max())}]")
        return labels

    def null(self, cond: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {self.key: torch.full_like(cond[self.key], self.num_classes)}

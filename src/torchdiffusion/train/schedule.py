"""The learning-rate schedule of every training step: linear warm-up, then constant or cosine decay.

lr(k) = lr_max * w(k) * d(k) for optimiser step k (0-based), with w(k) = min(1, (k + 1) / max(warmup, 1)) and
d(k) = 1 (constant) or 0.5 (1 + cos(pi p)), p = min(1, max(0, k - warmup) / max(1, total - warmup)) (cosine,
reaching 0 at k = total; Loshchilov & Hutter 2017 without restarts). A pure function of the step: resuming needs
no scheduler state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

SHAPES = ("constant", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    warmup_steps: int = 0
    total_steps: int = 1
    shape: Literal["constant", "cosine"] = "constant"
    start_step: int = 0  # an optimiser that starts late (a discriminator) warms up from its own first step

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ConfigError(f"lr schedule shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        if not self.lr > 0 or self.warmup_steps < 0 or self.total_steps < 1 or self.start_step < 0:
            raise ConfigError(f"lr schedule needs lr > 0, warmup_steps >= 0, total_steps >= 1 and start_step >= 0, "
                              f"got lr={self.lr}, warmup_steps={self.warmup_steps}, total_steps={self.total_steps}, "
                              f"start_step={self.start_step}")

    def __call__(self, step: int) -> float:
        return lr_at_step(step - self.start_step, self.lr, self.warmup_steps, self.total_steps - self.start_step,
                          self.shape)


def lr_at_step(step: int, lr: float, warmup_steps: int, total_steps: int, shape: str = "constant") -> float:
    """The learning rate of optimiser step `step` (see the module docstring)."""
    warm = min(1.0, (step + 1) / max(warmup_steps, 1))
    if shape == "cosine":
        progress = min(1.0, max(0, step - warmup_steps) / max(1, total_steps - warmup_steps))
        return lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
    return lr * warm

"""Condition dropout for classifier-free guidance: a deterministic data step.

Ho & Salimans 2022 train one network both conditionally and unconditionally by replacing the condition with a
null condition with probability p_uncond (they use 0.1 or 0.2). Here the condition is a class label
y in [0, K) and the null label is K (nn.unet's convention).

Determinism (RELIABILITY 1, 2, 7): the drop decisions of global training step k are drawn for the whole global
batch (G rows) from one generator seeded by (seed, k); process r of W keeps rows r, r + W, r + 2W, ... exactly as
the data order hands it its images (data.order). So a resumed run, or a run on W processes, drops the same
labels of the same images as an uninterrupted run on one process.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..seeding import mix_seed


def dropout_seed(seed: int, step: int) -> int:
    """63-bit generator seed of step `step`'s drop decisions: sha256 over a tag and (seed, step)."""
    return mix_seed(seed, step, tag=b"cond-dropout")


def drop_mask(batch: int, p: float, seed: int, step: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """bool (batch,): True where this process's row drops its condition at global step `step`.

    batch is the per-process batch; the global batch is batch * world_size and row j of this process is
    global row rank + j * world_size."""
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"cond.p_uncond must be in [0, 1], got {p}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    g = torch.Generator().manual_seed(dropout_seed(seed, step))
    u = torch.rand(batch * world_size, generator=g, dtype=torch.float64)
    return u[rank::world_size] < p


def drop_labels(labels: Tensor, null_label: int, p: float, seed: int, step: int, rank: int = 0,
                world_size: int = 1) -> Tensor:
    """int64 (B,): labels with each row replaced by `null_label` with probability p (a new tensor)."""
    mask = drop_mask(labels.shape[0], p, seed, step, rank, world_size).to(labels.device)
    return torch.where(mask, torch.full_like(labels, null_label), labels)


class LabelDropout:
    """The trainer's make_cond hook for a class-conditional model: batch -> {"label": (B,) int64}.

    make_cond(batch, step): step is the global training step (labels dropped to the null label with probability
    p_uncond, drawn as in `drop_mask`), or None for validation (no dropout: the validation loss is the
    conditional model's)."""

    def __init__(self, num_classes: int, p_uncond: float, seed: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        if num_classes < 1:
            raise ConfigError(f"class conditioning needs num_classes >= 1, got {num_classes}")
        if not 0.0 <= p_uncond <= 1.0:
            raise ConfigError(f"cond.p_uncond must be in [0, 1], got {p_uncond}")
        self.num_classes, self.p_uncond, self.seed = num_classes, p_uncond, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)

    def __call__(self, batch: dict, step: int | None = None) -> dict[str, Tensor]:
        labels = batch["label"].to(torch.int64)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ConfigError(f"class conditioning: labels must be in [0, {self.num_classes}), got "
                              f"[{int(labels.min())}, {int(labels.max())}] (unlabelled images have -1)")
        if step is not None and self.p_uncond > 0:
            labels = drop_labels(labels, self.num_classes, self.p_uncond, self.seed, step, self.rank,
                                 self.world_size)
        return {"label": labels.to(self.device)}


def class_labels_for_seeds(seeds, num_classes: int) -> Tensor:
    """The label convention of class-conditional grids and evaluation without explicit labels: seed % K."""
    return torch.tensor([int(s) % num_classes for s in seeds], dtype=torch.int64)

"""Deterministic sample order: which samples a rank sees at each global step.

Notation: N samples, per-rank batch B, W ranks (world size), global batch G = B * W.
Epoch e uses the permutation perm_e = randperm(N) drawn from a torch.Generator seeded with
epoch_seed(seed, e) (below), so the order depends on (seed, epoch, position) only, never on
the global RNG, the number of loader workers or when the run was resumed.

Rank r's shard of epoch e is perm_e[r : N - N % W : W] (strided, as torch's DistributedSampler),
of length N // W, and its batch at position p within the epoch is shard[p*B : (p+1)*B]. The W
batches of one step are then exactly perm_e[p*G : (p+1)*G]: 2 ranks x B=8 see the same samples
as 1 rank x B=16. Each epoch has S = (N // W) // B steps; the N - S*G samples left at the end of
an epoch's permutation are dropped (drop_last), a different few each epoch. Global step k is
epoch k // S, position k % S, so resuming at step k replays the uninterrupted sequence exactly.
"""
from __future__ import annotations

from typing import Iterator, Protocol

import torch
from torch import Tensor

from torchdiffusion.errors import DataError
from torchdiffusion.seeding import mix_seed

__all__ = ["epoch_seed", "epoch_permutation", "epoch_shard", "steps_per_epoch",
           "batch_indices", "iterate_batches"]


class IndexableDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> dict[str, Tensor]: ...


def epoch_seed(seed: int, epoch: int) -> int:
    """Mix (seed, epoch) into one 63-bit generator seed: the first 8 bytes (little-endian) of
    sha256 over the two values as signed little-endian int64, top bit cleared.

    A hash rather than seed + epoch, so that run (seed=1, epoch=0) and run (seed=0, epoch=1) do
    not share a permutation.
    """
    return mix_seed(seed, epoch)


def epoch_permutation(seed: int, epoch: int, n: int) -> Tensor:
    """int64 (n,): the permutation of 0..n-1 used in `epoch` (CPU, its own generator)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n, generator=g, dtype=torch.int64)


def epoch_shard(seed: int, epoch: int, n: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """int64 (n // world_size,): rank's share of the epoch's permutation, perm[rank : n - n % W : W]."""
    _check_rank(rank, world_size)
    perm = epoch_permutation(seed, epoch, n)
    return perm[rank: n - n % world_size: world_size]


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Number of full global batches per epoch, (n // W) // B; the rest of the epoch is dropped."""
    return (n // world_size) // batch_size


def batch_indices(seed: int, step: int, n: int, batch_size: int,
                  rank: int = 0, world_size: int = 1) -> Tensor:
    """int64 (batch_size,): the sample indices rank `rank` consumes at global step `step`."""
    s = _checked_steps(n, batch_size, world_size)
    _check_rank(rank, world_size)
    epoch, pos = divmod(int(step), s)
    shard = epoch_shard(seed, epoch, n, rank, world_size)
    return shard[pos * batch_size: (pos + 1) * batch_size]


def iterate_batches(dataset: IndexableDataset, batch_size: int, seed: int, start_step: int = 0,
                    rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """Yield (step, batch) for step = start_step, start_step + 1, ... forever.

    batch: {"x": uint8 (B, C, H, W), "label": int64 (B,)} (whatever keys the items have, stacked).
    Resuming with start_step=k yields exactly what an uninterrupted run yields from step k on.
    """
    n = len(dataset)
    s = _checked_steps(n, batch_size, world_size)
    _check_rank(rank, world_size)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    gather = getattr(dataset, "batch", None)
    step = int(start_step)
    epoch, pos = divmod(step, s)
    while True:
        shard = epoch_shard(seed, epoch, n, rank, world_size)
        while pos < s:
            idx = shard[pos * batch_size: (pos + 1) * batch_size]
            yield step, (gather(idx) if gather is not None else _stack([dataset[int(i)] for i in idx]))
            step += 1
            pos += 1
        epoch, pos = epoch + 1, 0


def _stack(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _checked_steps(n: int, batch_size: int, world_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    s = steps_per_epoch(n, batch_size, world_size)
    if s == 0:
        raise DataError(f"the data set has {n} samples, fewer than one global batch "
                        f"({batch_size} per rank x {world_size} ranks = {batch_size * world_size}); "
                        "lower the batch size or add data")
    return s

"""torch.distributed set-up from the launcher's environment (torchrun, srun torchrun, accelerate launch).

RANK / WORLD_SIZE / LOCAL_RANK are read by the CLI and passed in; this module never reads the environment itself
except through torch.distributed's own env:// rendezvous (MASTER_ADDR / MASTER_PORT set by the launcher).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(info: DistInfo, device: torch.device) -> None:
    """Join the process group: gloo on CPU, nccl on CUDA."""
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean_across(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """All-reduce mean of a tensor (identity on one process)."""
    if not info.enabled:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()

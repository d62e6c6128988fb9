"""Fully sharded data parallel training (FSDP2, torch.distributed.fsdp.fully_shard) beside DDP: train.parallel=fsdp.

What is sharded: each process holds 1/W of every parameter, of its gradient and of the AdamW moments; a layer's
full parameters are all-gathered for its forward and backward and freed afterwards, gradients are
reduce-scattered (averaged over processes, as DDP's all-reduce). The maths is DDP's: the same global batch split
the same way, the same mean gradient, the same element-wise AdamW update and the same global gradient norm for
clipping, so the loss curve matches DDP's up to float reduction order (tests/test_fsdp.py).

Sharding units (shard()): every module (not itself a container) that is an element of an nn.ModuleList (the U-Net's levels and blocks, the
transformers' blocks), innermost first, then the root, which takes the remaining parameters (embeddings, the
input and output convolutions). One process group over all processes (a 1-D device mesh). Parameters are made
contiguous first (FSDP2 shards dimension 0 of contiguous tensors): a channels-last U-Net keeps channels-last
activations, its weights lose that layout (same maths).

What stays whole on every process: the EMA copy (the trainer updates it from the gathered parameters after each
step, train.fsdp.full_parameters), because sampling grids, validation and in-loop evaluation run it without
collectives. A model too large for one device's EMA copy is out of scope of this option.

Checkpoints are consolidated on save: the model and the optimiser state are gathered into full tensors (a
collective: every process calls the step's state_dict()) and the main process writes them in the same
safetensors layout as a DDP or single-process run, so a run may resume under either option, or on another
number of processes (the optimiser state is keyed by parameter position, as torch.optim's own state_dict).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def shard(module: nn.Module, device: torch.device) -> nn.Module:
    """Shard module in place with FSDP2 (units described in the module docstring) and return it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    with torch.no_grad():  # FSDP2 shards contiguous parameters only (the U-Net keeps channels-last weights)
        for p in module.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    units = [m for lst in module.modules() if isinstance(lst, nn.ModuleList) for m in lst
             if not isinstance(m, (nn.ModuleList, nn.ModuleDict)) and any(True for _ in m.parameters())]
    done: set[int] = set()
    for m in reversed(units):  # innermost first: a unit's parameters are not claimed by an enclosing unit
        if id(m) not in done:
            fully_shard(m, mesh=mesh)
            done.add(id(m))
    fully_shard(module, mesh=mesh)
    return module


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def full_parameters(module: nn.Module) -> list[Tensor]:
    """Every parameter of a (possibly sharded) module as a full tensor, in module.parameters() order (collective
    under FSDP2: every process must call it)."""
    return [_full(p.detach()) for p in module.parameters()]


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """module.state_dict() with sharded tensors gathered (collective), on the CPU, under the unsharded names."""
    return {k: _full(v.detach()).cpu() for k, v in module.state_dict().items()}


@torch.no_grad()
def load_full_state_dict(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full (consolidated) state dict into a sharded module: each process keeps its own shard."""
    from torch.distributed.tensor import distribute_tensor
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise KeyError(f"missing keys {missing[:5]}")
    for k, v in own.items():
        src = state[k].to(device=v.device, dtype=v.dtype)
        if hasattr(v, "device_mesh"):
            v.copy_(distribute_tensor(src, v.device_mesh, v.placements))
        else:
            v.copy_(src)


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """opt.state_dict() with sharded moment tensors gathered (collective): torch.optim's own layout."""
    sd = opt.state_dict()
    return {"state": {i: {k: _full(v).cpu() if isinstance(v, Tensor) else v for k, v in s.items()}
                      for i, s in sd["state"].items()},
            "param_groups": sd["param_groups"]}


@torch.no_grad()
def load_full_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a consolidated optimiser state into an optimiser over sharded parameters (each keeps its shard)."""
    from torch.distributed.tensor import distribute_tensor
    params = [p for g in opt.param_groups for p in g["params"]]
    local: dict = {"state": {}, "param_groups": state["param_groups"]}
    for i, s in state["state"].items():
        p = params[int(i)]
        local["state"][i] = {
            k: (distribute_tensor(v.to(p.device, v.dtype), p.device_mesh, p.placements)
                if isinstance(v, Tensor) and hasattr(p, "device_mesh") and v.shape == p.shape else v)
            for k, v in s.items()}
    opt.load_state_dict(local)

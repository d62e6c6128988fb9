"""What a training step is to the loop (train.trainer.Trainer): the TrainStep protocol and the loop's services.

Split of responsibilities (DESIGN 2b, "TrainStep"):
    the loop   iteration (data.order), cadence (log/val/sample/ckpt/eval), logging, checkpoints and resume,
               signals, time budget, NaN policy, EMA updates, and the machinery below (LoopContext): DDP
               wrapping, gradient accumulation over micro-batches, loss scaling for fp16;
    the step   its models, optimisers, lr schedules (train.schedule) and losses.
A step draws its randomness from generators seeded by (seed, global step) (seeding), never from the global
RNG, so a resumed run, or one on W processes, sees the same numbers as an uninterrupted run on one process.

Per global step k the loop calls step.train_step(batch, k) with this process's share of the global batch
(rows r, r + W, ... of it); the step returns its metrics ({name: float}) or None when a loss or gradient was
non-finite (the loop's NaN policy then stops or skips). After a successful step the loop updates every EMA
pair of step.ema_pairs(k). Checkpoint tensor groups are step.state_dict().tensors plus the loop's "rng".
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .distributed import DistInfo, mean_across


@dataclass
class StepState:
    """A step's share of a checkpoint: tensor groups (one safetensors file each: "model", "ema", "optim", ...)
    and JSON meta entries (e.g. the optimiser skeleton under "optim"; a "trainer" entry is merged into the
    loop's own)."""
    tensors: dict[str, dict[str, Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EMAPair:
    """An EMA copy of a model and its half-life (Karras et al. 2022, Appendix F.3; train.ema)."""
    ema: nn.Module
    model: nn.Module
    halflife_images: float
    rampup: Optional[float] = None


@runtime_checkable
class TrainStep(Protocol):
    """A model family's training step (train.diffusion_step, train.classifier, train.multi_step).

    Optional: `eval_model` (the module sample grids and in-loop evaluation use, e.g. the EMA); `set_total_steps(n)`
    (re-plan the lr schedules to end at step n; train.fit_minutes needs it, train.budget)."""

    #: extra metrics.csv columns this step reports (after the loop's step, images, loss, grad_norm, lr, ...)
    metric_columns: Sequence[str]

    def setup(self, ctx: "LoopContext") -> None:
        """Move models to ctx.device and wrap what computes a loss with ctx.wrap (DDP); called once by the loop."""

    def modules(self) -> dict[str, nn.Module]:
        """The trained models by name (parameter counts, train/eval mode)."""

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimisers by name, in update order."""

    def ema_pairs(self, step: int) -> Sequence[EMAPair]:
        """The EMA copies to update after a successful global step `step` (may depend on it)."""

    def train_step(self, batch: dict, step: int) -> Optional[dict[str, float]]:
        """One optimiser step (all optimisers due at `step`, in order); metrics or None if non-finite."""

    def nan_metrics(self, step: int) -> dict[str, float]:
        """The metrics row of a step skipped under nan_policy=skip (NaN losses, the scheduled lr)."""

    def validation(self) -> dict[str, float]:
        """Held-out metrics (run on the main process only), e.g. {"val_loss": ...}."""

    def weights(self) -> dict[str, dict[str, Tensor]]:
        """The weight groups (no optimiser state) of a best-so-far checkpoint (in-loop evaluation)."""

    def state_dict(self) -> StepState: ...

    def load_state_dict(self, state: StepState) -> None: ...


@dataclass
class LoopContext:
    """The loop's services to a step. batch_size is global; per_rank = batch_size / W; micro = per_rank / accum."""
    seed: int
    batch_size: int
    grad_accum: int
    precision: str = "fp32"
    dist: DistInfo = DistInfo()
    parallel: str = "ddp"  # ddp | fsdp (train.parallel): how wrap() spreads a model over the processes
    device: torch.device = torch.device("cpu")
    _scalers: dict = field(default_factory=dict)

    @property
    def per_rank(self) -> int:
        return self.batch_size // self.dist.world_size

    @property
    def micro(self) -> int:
        return self.per_rank // self.grad_accum

    def rows(self) -> slice:
        """This process's rows of a global-batch tensor drawn from a per-step generator (data.order's striding)."""
        return slice(self.dist.rank, None, self.dist.world_size)

    @property
    def sharded(self) -> bool:
        """True when wrap() shards parameters (FSDP2 on several processes): model state is then collective."""
        return self.parallel == "fsdp" and self.dist.enabled

    def wrap(self, module: nn.Module) -> nn.Module:
        """module under DistributedDataParallel when training on several processes, else module itself; with
        parallel=fsdp, module sharded in place by FSDP2 (train.fsdp.shard) and returned. Build optimisers after
        wrap: FSDP2 replaces the parameters."""
        if not self.dist.enabled:
            return module
        if self.parallel == "fsdp":
            from .fsdp import shard
            return shard(module, self.device)
        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def scaler(self, name: str) -> torch.amp.GradScaler:
        """The loss scaler of optimiser `name` (active for fp16 only; bf16 and fp32 need none)."""
        if name not in self._scalers:
            self._scalers[name] = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        return self._scalers[name]

    def accumulate(self, nets: Iterable[nn.Module], micro_loss: Callable[[slice], Tensor], scaler) -> float:
        """Backward of the mean loss over grad_accum micro-batches of this process's batch; gradients are
        synchronised across processes on the last micro-batch only. micro_loss(rows) -> scalar loss of those
        rows. Returns the loss averaged over micro-batches and processes."""
        from .fsdp import is_sharded
        sharded = [n for n in nets if is_sharded(n)]
        nets = [n for n in nets if isinstance(n, DistributedDataParallel)]
        loss_sum = torch.zeros((), device=self.device)
        for m in range(self.grad_accum):
            rows = slice(m * self.micro, (m + 1) * self.micro)
            last = m == self.grad_accum - 1
            for n in sharded:  # FSDP2: reduce-scatter gradients on the last micro-batch only
                n.set_requires_gradient_sync(last)
            with ExitStack() as stack:
                if not last:
                    for n in nets:
                        stack.enter_context(n.no_sync())
                loss = micro_loss(rows)
                scaler.scale(loss / self.grad_accum).backward()
            loss_sum += loss.detach()
        return float(mean_across(loss_sum / self.grad_accum, self.dist))

    @staticmethod
    def apply(optimizer: torch.optim.Optimizer, params: Iterable[Tensor], grad_clip: float, scaler,
              loss: float) -> Optional[float]:
        """Unscale, clip to grad_clip (0 = off) and step; the global gradient norm, or None (no update) when the
        loss or (without loss scaling) the gradient is non-finite. With fp16 an overflow skips the update and
        lowers the scale (the scaler's own policy)."""
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(list(params), grad_clip if grad_clip > 0 else float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP2
        if not math.isfinite(loss) or (not math.isfinite(grad_norm) and not scaler.is_enabled()):
            return None
        scaler.step(optimizer)
        scaler.update()
        return grad_norm


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def split_rows(batch: Any, rows: slice) -> Any:
    """rows of every tensor in a (nested) dict batch; None stays None."""
    if batch is None:
        return None
    if isinstance(batch, dict):
        return {k: split_rows(v, rows) for k, v in batch.items()}
    if isinstance(batch, Tensor):
        return batch[rows]
    return batch


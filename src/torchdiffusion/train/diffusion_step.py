"""The diffusion model's training step: one denoiser, one AdamW, one EMA, an objective's per-sample loss.

Notation: x0 the clean data in the model's space (encode(batch["x"]), by default data.convert.to_model_range:
uint8 pixels to [-1, 1]), sigma (B,) noise levels and n ~ N(0, I) from the objective; the loss is the objective's
per-sample loss of the denoiser D(x0 + sigma n; sigma, cond), averaged over the batch.

Determinism (RELIABILITY 1, 2, 7): the (sigma, n) of global step k are drawn for the whole global batch from a
generator seeded by seeding.linear_step_seed(seed, k); process r keeps rows r, r + W, ... like its data.
Checkpoint groups: "model", "ema", "optim" (+ its JSON skeleton), "objective" (importance sampling's history).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..core.objectives import Objective
from ..core.precond import Preconditioned
from ..data.convert import to_model_range
from ..protocols import Cond
from ..seeding import generator, linear_step_seed
from . import fsdp
from .schedule import LRSchedule
from .state import flatten_optimizer_state, unflatten_optimizer_state
from .step import EMAPair, LoopContext, StepState, set_lr, split_rows


class DiffusionStep:
    """TrainStep of a denoiser (core.precond.Preconditioned) trained with an objective (core.objectives).

    encode(pixels) -> x0 maps a batch's "x" to the diffusion space (default to_model_range; a codec's encode).
    encode_batch(batch, step) -> x0, when given, replaces it and sees the whole batch and the global step (None for
    validation): a latent codec's cached latents and per-step posterior samples (config.codecs.LatentEncoder).
    make_cond(batch, step) -> cond: step is the global training step (e.g. to seed condition dropout), None for
    validation (the validation loss is the conditional model's: no dropout). augment(x0, batch, step) -> (x0, batch),
    when given, augments the training images and leaves their parameters in the batch for make_cond
    (conditioners.augment); validation is never augmented."""

    metric_columns = ()

    def __init__(self, model: Preconditioned, objective: Objective, *, lr: float, schedule: LRSchedule,
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, grad_clip: float = 1.0,
                 ema_halflife_images: float = 50_000.0, ema_rampup: Optional[float] = 0.05,
                 make_cond: Callable[[dict, Optional[int]], Cond] | None = None,
                 encode: Callable[[Tensor], Tensor] = to_model_range, val_set=None, val_images: int = 512,
                 encode_batch: Callable[[dict, Optional[int]], Tensor] | None = None,
                 augment: Callable[[Tensor, dict, int], tuple[Tensor, dict]] | None = None):
        self.model, self.objective, self.schedule = model, objective, schedule
        self.lr, self.betas, self.eps, self.weight_decay, self.grad_clip = lr, betas, eps, weight_decay, grad_clip
        self.ema_halflife_images, self.ema_rampup = ema_halflife_images, ema_rampup
        self.make_cond = make_cond or (lambda batch, step: None)
        self.encode, self.val_set, self.val_images = encode, val_set, val_images
        self.encode_batch = encode_batch or (lambda batch, step: self.encode(batch["x"]))
        self.augment = augment  # (x0, batch, step) -> (x0, batch): non-leaking augmentation (data.augment)
        self.ctx: LoopContext | None = None

    @classmethod
    def from_config(cls, cfg, model: Preconditioned, objective: Objective, **kw) -> "DiffusionStep":
        """From a train.trainer.TrainConfig (lr, betas, eps, weight_decay, warm-up and schedule, clip, EMA)."""
        return cls(model, objective, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                   schedule=LRSchedule(cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_schedule),
                   grad_clip=cfg.grad_clip, ema_halflife_images=cfg.ema_halflife_images, ema_rampup=cfg.ema_rampup,
                   val_images=cfg.val_images, **kw)

    # ------------------------------------------------------------------ set-up
    def setup(self, ctx: LoopContext) -> None:
        self.ctx = ctx
        self.model = self.model.to(ctx.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)  # whole on every process (train.fsdp)
        self.objective_module = _ObjectiveModule(self.model, self.objective)
        self.net = ctx.wrap(self.objective_module)  # before the optimiser: FSDP2 replaces the parameters
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, betas=self.betas, eps=self.eps,
                                     weight_decay=self.weight_decay)
        self.scaler = ctx.scaler("model")

    def set_total_steps(self, steps: int) -> None:
        """Re-plan the lr schedule to end at `steps` (train.fit_minutes; train.budget)."""
        self.schedule = dataclasses.replace(self.schedule, total_steps=steps)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self.opt}

    @property
    def eval_model(self) -> nn.Module:
        """The model in-loop evaluation and sample grids use: the EMA."""
        return self.ema

    def ema_pairs(self, step: int) -> list[EMAPair]:
        return [EMAPair(self.ema, self.model, self.ema_halflife_images, self.ema_rampup)]

    # ------------------------------------------------------------------ one step
    def noise(self, step: int, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """The global batch's (sigma, n) for this step; each process takes its own rows, strided like its data
        (data.order gives rank r the global batch rows r, r + W, r + 2W, ...)."""
        ctx = self.ctx
        g = generator(linear_step_seed(ctx.seed, step))
        sigma = self.objective.sample_sigma(ctx.batch_size, self.model.process, g)
        noise = torch.randn((ctx.batch_size,) + tuple(shape[1:]), generator=g)
        rows = ctx.rows()
        return sigma[rows].to(ctx.device), noise[rows].to(ctx.device)

    def train_step(self, batch: dict, step: int) -> dict[str, float] | None:
        ctx = self.ctx
        x0 = self.encode_batch(batch, step).to(ctx.device)
        if self.augment is not None:
            x0, batch = self.augment(x0, batch, step)
        cond = self.make_cond(batch, step)
        sigma, noise = self.noise(step, tuple(x0.shape))
        set_lr(self.opt, self.schedule(step))
        self.opt.zero_grad(set_to_none=True)
        loss = ctx.accumulate([self.net], lambda rows: self.net(x0[rows], split_rows(cond, rows), sigma[rows],
                                                                 noise[rows]).mean(), self.scaler)
        grad_norm = ctx.apply(self.opt, self.model.parameters(), self.grad_clip, self.scaler, loss)
        if grad_norm is None:
            return None
        return {"loss": loss, "grad_norm": grad_norm, "lr": self.opt.param_groups[0]["lr"]}

    def nan_metrics(self, step: int) -> dict[str, float]:
        """The row of a skipped (non-finite) step."""
        return {"loss": float("nan"), "grad_norm": float("nan"), "lr": self.schedule(step)}

    @torch.no_grad()
    def validation(self) -> dict[str, float]:
        """EMA model's loss on fixed held-out images with fixed sigma and noise (comparable across steps and runs)."""
        if self.val_set is None or len(self.val_set) == 0:
            return {}
        ctx = self.ctx
        n = min(self.val_images, len(self.val_set))
        g = generator(linear_step_seed(ctx.seed, -1) ^ 0x5EED)
        total, bs = 0.0, 256
        for start in range(0, n, bs):
            idx = torch.arange(start, min(n, start + bs))
            batch = self.val_set.batch(idx)
            x0 = self.encode_batch(batch, None).to(ctx.device)
            sigma = self.objective.sample_sigma(len(idx), self.model.process, g).to(ctx.device)
            noise = torch.randn(x0.shape, generator=g).to(ctx.device)
            total += float(self.objective.loss(self.ema, x0, self.make_cond(batch, None), sigma=sigma,
                                               noise=noise).sum())
        return {"val_loss": total / n}

    # ------------------------------------------------------------------ checkpoint groups
    def weights(self) -> dict[str, dict[str, Tensor]]:
        """The weight groups (no optimiser state) of a best-so-far checkpoint (consolidated, a collective, when
        sharded: every process calls it)."""
        if self.ctx is not None and self.ctx.sharded:
            return {"model": fsdp.full_state_dict(self.model), "ema": self.ema.state_dict()}
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict()}

    def state_dict(self) -> StepState:
        sharded = self.ctx is not None and self.ctx.sharded
        opt_tensors, opt_skeleton = flatten_optimizer_state(
            fsdp.full_optimizer_state(self.opt) if sharded else self.opt.state_dict())
        state = getattr(self.objective, "state", None)
        return StepState({**self.weights(), "optim": opt_tensors,
                          **({} if state is None else {"objective": state.state_dict()})},
                         {"optim": opt_skeleton})

    def load_state_dict(self, s: StepState) -> None:
        sharded = self.ctx is not None and self.ctx.sharded
        optim = unflatten_optimizer_state(s.tensors["optim"], s.meta["optim"])
        if sharded:  # a consolidated checkpoint: each process keeps its shard
            fsdp.load_full_state_dict(self.model, s.tensors["model"])
        else:
            self.model.load_state_dict(s.tensors["model"])
        self.ema.load_state_dict(s.tensors["ema"])
        if "objective" in s.tensors and getattr(self.objective, "state", None) is not None:
            self.objective.state.load_state_dict(s.tensors["objective"])  # e.g. importance sampling's history
        if sharded:
            fsdp.load_full_optimizer_state(self.opt, optim)
        else:
            self.opt.load_state_dict(optim)


class _ObjectiveModule(nn.Module):
    """model + objective as one module, so DDP sees the whole loss computation in its forward."""

    def __init__(self, model: Preconditioned, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, x0: Tensor, cond: Cond, sigma: Tensor, noise: Tensor) -> Tensor:
        return self.objective.loss(self.model, x0, cond, sigma=sigma, noise=noise)

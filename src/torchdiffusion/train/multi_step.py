"""A training step of several models and optimisers: an update order, a start step per optimiser, each optimiser
with its own lr schedule, each model optionally with an EMA (an autoencoder with a discriminator, e.g. the
KL-VAE + GAN first stage of latent diffusion, Rombach et al. 2022, Sec. 3 and Appendix G).

Per global step k the updates run in their given order; update u runs when k >= u.start_step:
    lr <- u.schedule(k); zero u's gradients; backward of u.loss over the micro-batches; clip; step u's optimiser.
u.loss(nets, batch, k, generator) -> scalar sees every model (under DDP when distributed) by name, the
encoded micro-batch and the global step k (e.g. to switch on an adversarial term where the discriminator
starts); a later update sees the parameters the earlier ones just changed. Its generator is seeded by
seeding.mix_seed(seed, k, u's index, rank, tag=b"multi-step") (per process, so W processes draw other numbers
than one). If any update's loss or gradient is non-finite, the step reports None (the loop's NaN policy);
updates before it in the order have been applied.

Checkpoint groups: "model_<name>", "ema_<name>" for every model (EMA where configured), "optim_<update>"
with the optimiser skeletons in meta "optim". Metrics: "<update>_loss", "<update>_grad_norm", "<update>_lr"
(empty before the update's start step) plus the validation callable's keys.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..data.convert import to_model_range
from ..errors import ConfigError
from ..seeding import generator, mix_seed
from .schedule import LRSchedule
from .state import flatten_optimizer_state, unflatten_optimizer_state
from .step import EMAPair, LoopContext, StepState, set_lr, split_rows

_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass
class ModelSpec:
    """A model of the step; ema_halflife_images > 0 keeps an EMA copy (train.ema's half-life schedule)."""
    module: nn.Module
    ema_halflife_images: float = 0.0
    ema_rampup: Optional[float] = None


@dataclass
class Update:
    """One optimiser: it updates the parameters of `model` with the gradient of `loss`, from start_step on."""
    name: str
    model: str
    loss: Callable[[Mapping[str, nn.Module], dict, int, torch.Generator], Tensor]
    schedule: LRSchedule
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] = \
        lambda params: torch.optim.AdamW(params)  # noqa: E731
    start_step: int = 0
    grad_clip: float = 0.0  # 0 = no clipping


class _Forward(nn.Module):
    """A model wrapped so DDP sees its forward (kwargs pass through)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class MultiModelStep:
    """TrainStep (train.step) of several models and ordered optimisers (see the module docstring).

    validate(models) -> {name: float} runs on the main process at the loop's validation cadence (EMA copies
    replace their models there); validation_columns names its keys for metrics.csv."""

    def __init__(self, models: Mapping[str, ModelSpec], updates: Sequence[Update], *,
                 encode: Callable[[Tensor], Tensor] = to_model_range,
                 validate: Callable[[Mapping[str, nn.Module]], dict[str, float]] | None = None,
                 validation_columns: Sequence[str] = ()):
        for name in list(models) + [u.name for u in updates]:
            if not _NAME.fullmatch(name):
                raise ConfigError(f"model and update names must be lower-case letters, digits and _ (starting "
                                  f"with a letter), got {name!r}")
        if len({u.name for u in updates}) != len(updates):
            raise ConfigError(f"update names must be distinct, got {[u.name for u in updates]}")
        for u in updates:
            if u.model not in models:
                raise ConfigError(f"update {u.name!r} trains model {u.model!r}, which is not one of "
                                  f"{', '.join(models)}")
            if u.start_step < 0:
                raise ConfigError(f"update {u.name!r}: start_step must be >= 0, got {u.start_step}")
        if not updates:
            raise ConfigError("a multi-model step needs at least one update")
        self.specs, self.updates = dict(models), list(updates)
        self.encode, self.validate = encode, validate
        self.metric_columns = tuple(f"{u.name}_{m}" for u in self.updates for m in ("loss", "grad_norm", "lr")) \
            + tuple(validation_columns)

    def setup(self, ctx: LoopContext) -> None:
        if ctx.sharded:
            raise ConfigError("train.parallel=fsdp is implemented for diffusion training, not yet for several "
                              "models and optimisers; valid here: ddp")
        self.ctx = ctx
        self.models = {n: s.module.to(ctx.device) for n, s in self.specs.items()}
        self.ema = {n: copy.deepcopy(m).eval().requires_grad_(False) for n, m in self.models.items()
                    if self.specs[n].ema_halflife_images > 0}
        self.nets = {n: ctx.wrap(_Forward(m)) for n, m in self.models.items()}
        self.opts = {u.name: u.optimizer(self.models[u.model].parameters()) for u in self.updates}
        self.scalers = {u.name: ctx.scaler(u.name) for u in self.updates}

    def modules(self) -> dict[str, nn.Module]:
        return dict(self.models)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return dict(self.opts)

    @property
    def eval_model(self) -> nn.Module | None:
        return None

    def _started(self, model: str, step: int) -> bool:
        return any(u.model == model and step >= u.start_step for u in self.updates)

    def ema_pairs(self, step: int) -> list[EMAPair]:
        return [EMAPair(e, self.models[n], self.specs[n].ema_halflife_images, self.specs[n].ema_rampup)
                for n, e in self.ema.items() if self._started(n, step)]

    def train_step(self, batch: dict, step: int) -> dict[str, float] | None:
        ctx = self.ctx
        batch = {**batch, "x": self.encode(batch["x"]).to(ctx.device)}
        out: dict[str, float] = {}
        for i, u in enumerate(self.updates):
            if step < u.start_step:
                continue
            g = generator(mix_seed(ctx.seed, step, i, ctx.dist.rank, tag=b"multi-step"))
            opt, scaler = self.opts[u.name], self.scalers[u.name]
            set_lr(opt, u.schedule(step))
            opt.zero_grad(set_to_none=True)
            loss = ctx.accumulate(self.nets.values(), lambda rows: u.loss(self.nets, split_rows(batch, rows), step, g),
                                  scaler)
            grad_norm = ctx.apply(opt, self.models[u.model].parameters(), u.grad_clip, scaler, loss)
            if grad_norm is None:
                return None
            out.update({f"{u.name}_loss": loss, f"{u.name}_grad_norm": grad_norm,
                        f"{u.name}_lr": opt.param_groups[0]["lr"]})
        for m in self.models.values():  # gradients left by later updates' losses are not state
            m.zero_grad(set_to_none=True)
        return out

    def nan_metrics(self, step: int) -> dict[str, float]:
        nan = float("nan")
        return {k: v for u in self.updates if step >= u.start_step
                for k, v in ((f"{u.name}_loss", nan), (f"{u.name}_grad_norm", nan), (f"{u.name}_lr", u.schedule(step)))}

    @torch.no_grad()
    def validation(self) -> dict[str, float]:
        if self.validate is None:
            return {}
        models = {n: self.ema.get(n, m) for n, m in self.models.items()}
        modes = {n: m.training for n, m in models.items()}
        for m in models.values():
            m.eval()
        try:
            return dict(self.validate(models))
        finally:
            for n, m in models.items():
                m.train(modes[n])

    def weights(self) -> dict[str, dict[str, Tensor]]:
        return {**{f"model_{n}": m.state_dict() for n, m in self.models.items()},
                **{f"ema_{n}": e.state_dict() for n, e in self.ema.items()}}

    def state_dict(self) -> StepState:
        tensors, skeletons = self.weights(), {}
        for name, opt in self.opts.items():
            tensors[f"optim_{name}"], skeletons[name] = flatten_optimizer_state(opt.state_dict())
        return StepState(tensors, {"optim": skeletons})

    def load_state_dict(self, s: StepState) -> None:
        for n, m in self.models.items():
            m.load_state_dict(s.tensors[f"model_{n}"])
        for n, e in self.ema.items():
            e.load_state_dict(s.tensors[f"ema_{n}"])
        for name, opt in self.opts.items():
            opt.load_state_dict(unflatten_optimizer_state(s.tensors[f"optim_{name}"], s.meta["optim"][name]))

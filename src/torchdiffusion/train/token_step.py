"""The training step of a token (discrete diffusion) model: one TokenModel, one AdamW, one EMA, a token loss.

A token step is a train.multi_step.MultiModelStep with one model ("tokens") and one update ("tokens"), so the
loop's machinery (accumulation, DDP, precision, EMA, checkpoints, bit-exact resume) is the one every step uses.
Data: token grids stored as uint8 "images" (N, 1, h, w) (VQ indices of a codebook of at most 256 codes, e.g.
pipelines.token_cache), decoded to int64 (B, h, w) by `tokens_of`. Per global step k the loss draws its t and
x_t from the multi-step generator seeded by (seed, k, 0, rank) (seeding.mix_seed, tag b"multi-step").

Checkpoint groups: model_tokens, ema_tokens, optim_tokens. Metrics: tokens_loss, tokens_grad_norm, tokens_lr,
and with held-out tokens val_bpt (the EMA model's bound in bits per token on fixed t and x_t).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..core.discrete import DiscreteProcess
from ..core.discrete_objectives import (DiscreteLossConfig, TokenModel, bits_per_token, discrete_loss)
from ..errors import DataError
from ..protocols import Cond
from ..seeding import generator, mix_seed
from .multi_step import ModelSpec, MultiModelStep, Update
from .schedule import LRSchedule


def tokens_of(x: Tensor) -> Tensor:
    """uint8 (B, 1, h, w) token grids -> int64 (B, h, w)."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise DataError(f"token data must be (N, 1, h, w) index grids, got {tuple(x.shape)}")
    return x[:, 0].long()


def token_step(model: TokenModel, process: DiscreteProcess, loss: DiscreteLossConfig = DiscreteLossConfig(), *,
               lr: float = 3e-4, schedule: Optional[LRSchedule] = None, grad_clip: float = 1.0,
               betas=(0.9, 0.999), weight_decay: float = 0.0, ema_halflife_images: float = 50_000.0,
               ema_rampup: Optional[float] = 0.05, make_cond: Callable[[dict, Optional[int]], Cond] | None = None,
               val_tokens: Optional[Tensor] = None, val_labels: Optional[Tensor] = None,
               val_seed: int = 0) -> MultiModelStep:
    """The TrainStep of a token model (see the module notes); val_tokens int64 (n, h, w) (with val_labels (n,)
    for a conditional model: make_cond(batch, None), no dropout) for val_bpt."""
    make_cond = make_cond or (lambda batch, step: None)

    def loss_fn(nets, batch, step, g) -> Tensor:
        x0 = batch["x"]
        process.check_tokens(x0)
        return discrete_loss(process, nets["tokens"], x0, make_cond(batch, step), config=loss, generator=g).loss.mean()

    def validate(models) -> dict[str, float]:
        if val_tokens is None or len(val_tokens) == 0:
            return {}
        net = models["tokens"]
        dev = next(net.parameters()).device
        g = generator(mix_seed(val_seed, tag=b"tokens-val"))
        total = 0.0
        for i in range(0, len(val_tokens), 256):
            x0 = val_tokens[i:i + 256].to(dev)
            cond = None
            if val_labels is not None:
                cond = make_cond({"x": x0, "label": val_labels[i:i + 256].to(dev)}, None)
            out = discrete_loss(process, net, x0, cond, config=DiscreteLossConfig("vlb"), generator=g)
            total += float(bits_per_token(out.vlb, x0[0].numel()).sum())
        return {"val_bpt": total / len(val_tokens)}

    sched = schedule or LRSchedule(lr)
    return MultiModelStep(
        {"tokens": ModelSpec(model, ema_halflife_images=ema_halflife_images, ema_rampup=ema_rampup)},
        [Update("tokens", "tokens", loss_fn, sched, grad_clip=grad_clip,
                optimizer=lambda p: torch.optim.AdamW(p, lr=lr, betas=betas, weight_decay=weight_decay))],
        encode=tokens_of, validate=validate, validation_columns=("val_bpt",) if val_tokens is not None else ())

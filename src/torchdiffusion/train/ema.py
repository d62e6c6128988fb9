"""Exponential moving average of weights, with the half-life schedule of Karras et al. 2022 (EDM, Appendix F.3).

beta(step) = 0.5 ** (batch / h), h = min(halflife_images, rampup * images_seen). The decay depends only on the
step counter, so the EMA needs no state of its own beyond its weights: restoring the weights and the trainer's
step restores it exactly (RELIABILITY 6).
"""
from __future__ import annotations

import torch
from torch import nn


def ema_beta(step: int, batch_size: int, halflife_images: float, rampup: float | None) -> float:
    """Decay used after optimiser step `step` (0-based): images_seen = (step + 1) * batch_size."""
    h = halflife_images
    if rampup is not None and rampup > 0:
        h = min(h, rampup * (step + 1) * batch_size)
    return 0.5 ** (batch_size / max(h, 1e-8))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * model, for parameters; buffers are copied."""
    ema_params = list(ema.parameters())
    # a sharded model's (train.fsdp) parameters are gathered: the EMA is whole on every process
    model_params = [p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)

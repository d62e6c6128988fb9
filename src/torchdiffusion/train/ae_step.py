"""The adversarial training step of a first-stage autoencoder (Esser et al. 2021, Sec. 3.2; Rombach et al. 2022,
Appendix G): a MultiModelStep (train.multi_step) of two models and two ordered updates per global step k:

    "ae"    (the autoencoder, from step 0)      L_ae = L_rec + reg + [k >= gan_start] lambda disc_factor L_G
    "disc"  (the PatchGAN, from disc_start)     L_D  = disc_factor * hinge(D(x), D(sg[x_hat]))
with L_rec, reg (kl_weight * KL or codebook_weight * L_vq) and their reductions as in autoencoders.losses, lambda
LDM's adaptive weight (autoencoders.discriminator.adaptive_weight) at the decoder's last layer (gan_start
defaults to disc_start, as LDM; later gives the discriminator a head start), and x_hat in the
discriminator update computed again by the just-updated autoencoder under no_grad (detached; a VQ codebook is not
updated there). D always sees one batch [x; x_hat] (disc_logits), in both updates. Both optimisers are Adam with
train.betas ((0.5, 0.9) in the presets, as the reference); the KL posterior sample draws from the update's
generator (seeding.mix_seed(seed, k, update, rank)), so both updates resume bit-exactly.

Metrics per step: ae_/disc_ loss, grad_norm, lr (multi_step) and ae_rec, ae_reg, ae_gan, ae_lambda (the terms of
L_ae, averaged over micro-batches; empty before they apply). Validation (held-out images): val_rec_l1 (mean |x -
x_hat| in [-1, 1]), val_psnr, val_ssim (autoencoders.metrics, on [0, 1]), and for VQ val_code_usage /
val_code_perplexity over the whole held-out set and train_code_usage over the training passes since the last
validation.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from ..autoencoders.discriminator import adaptive_weight, hinge_d_loss, hinge_g_loss
from ..autoencoders.losses import AELossConfig, kl_reconstruction_loss, vq_reconstruction_loss
from ..autoencoders.metrics import code_usage, psnr, ssim, to_unit
from ..data.convert import to_model_range
from .multi_step import ModelSpec, MultiModelStep, Update
from .schedule import LRSchedule

_TERMS = ("ae_rec", "ae_reg", "ae_gan", "ae_lambda")


def reconstruct(ae: nn.Module, x: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, dict]:
    """(x_hat, reg term before weighting, extras) of one forward of a KL (posterior sample) or VQ autoencoder
    (possibly wrapped: nets["ae"]); kind read from the unwrapped module."""
    kind = _unwrap(ae).kind
    if kind == "kl":
        x_hat, post = ae(x, generator=generator)
        return x_hat, post.kl().mean(), {}
    x_hat, vq_loss, indices = ae(x)
    return x_hat, vq_loss, {"indices": indices}


def _unwrap(m: nn.Module) -> nn.Module:
    while hasattr(m, "module"):
        m = m.module
    return m


def disc_logits(disc: nn.Module, real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """D's patch logits of reals and fakes from one pass over [real; fake], so BatchNorm's batch statistics cover
    both (two separate passes would normalise each set on its own and hide their difference from D). Both
    updates call D this way, so the generator is judged under the statistics D is trained with."""
    out = disc(torch.cat([real, fake]))
    return out[:len(real)], out[len(real):]


class AEStep(MultiModelStep):
    """MultiModelStep with the per-term metrics of L_ae (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.metric_columns = tuple(self.metric_columns[:6]) + _TERMS + tuple(self.metric_columns[6:])
        self.terms: dict[str, list[float]] = {}

    def note(self, **values: float) -> None:
        for k, v in values.items():
            self.terms.setdefault(k, []).append(float(v))

    def train_step(self, batch: dict, step: int):
        self.terms = {}
        out = super().train_step(batch, step)
        if out is not None:
            out.update({k: sum(v) / len(v) for k, v in self.terms.items()})
        return out


def build_ae_step(ae: nn.Module, disc: nn.Module, loss: AELossConfig, *, lr: float, steps: int, warmup_steps: int = 0,
                  lr_schedule: str = "constant", betas: tuple[float, float] = (0.5, 0.9), eps: float = 1e-8,
                  weight_decay: float = 0.0, grad_clip: float = 0.0, ema_halflife_images: float = 0.0,
                  ema_rampup: Optional[float] = None,
                  perceptual: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                  val_x: Optional[Tensor] = None, val_batch: int = 64,
                  encode: Callable[[Tensor], Tensor] = to_model_range) -> AEStep:
    """The two-update step of `ae` (KLAutoencoder | VQAutoencoder) and `disc` (PatchDiscriminator).

    perceptual(x, x_hat) -> (B,) adds the perceptual term; val_x (N, C, H, W) uint8 held-out images for validation."""
    kind = ae.kind
    rec_fn = kl_reconstruction_loss if kind == "kl" else vq_reconstruction_loss
    reg_weight = loss.kl_weight if kind == "kl" else loss.codebook_weight
    step_ref: dict[str, AEStep] = {}

    def ae_loss(nets: Mapping[str, nn.Module], batch: dict, k: int, g: torch.Generator) -> Tensor:
        x = batch["x"]
        x_hat, reg, _ = reconstruct(nets["ae"], x, g)
        p = perceptual(x, x_hat) if perceptual is not None else None
        rec = rec_fn(x, x_hat, loss.rec, p, loss.perceptual_weight)
        total = rec + reg_weight * reg
        notes = {"ae_rec": float(rec.detach()), "ae_reg": float(reg.detach())}
        if k >= loss.generator_start and loss.disc_factor > 0:
            g_loss = hinge_g_loss(disc_logits(nets["disc"], x.detach(), x_hat)[1])
            lam = adaptive_weight(rec, g_loss, ae.last_layer, loss.disc_weight, loss.max_adaptive_weight)
            total = total + lam * loss.disc_factor * g_loss
            notes.update(ae_gan=float(g_loss.detach()), ae_lambda=float(lam))
        step_ref["step"].note(**notes)
        return total

    def disc_loss(nets: Mapping[str, nn.Module], batch: dict, k: int, g: torch.Generator) -> Tensor:
        x = batch["x"]
        with torch.no_grad():
            x_hat = reconstruct(nets["ae"], x, g)[0]
        return loss.disc_factor * hinge_d_loss(*disc_logits(nets["disc"], x.detach(), x_hat.detach()))

    def adam(b):
        return lambda params: torch.optim.Adam(params, betas=b, eps=eps, weight_decay=weight_decay)

    def validate(models: Mapping[str, nn.Module]) -> dict[str, float]:
        return validation_metrics(models["ae"], val_x, val_batch, encode, raw=ae)

    disc_lr = loss.disc_lr or lr
    updates = [
        Update("ae", "ae", ae_loss, LRSchedule(lr, warmup_steps, steps, lr_schedule), optimizer=adam(betas),
               grad_clip=grad_clip),
        Update("disc", "disc", disc_loss, LRSchedule(disc_lr, warmup_steps, steps, lr_schedule,
                                                    start_step=loss.disc_start),
               optimizer=adam(betas), start_step=loss.disc_start, grad_clip=grad_clip),
    ]
    cols = ("val_rec_l1", "val_psnr", "val_ssim") + (
        ("val_code_usage", "val_code_perplexity", "train_code_usage") if kind == "vq" else ())
    step = AEStep({"ae": ModelSpec(ae, ema_halflife_images, ema_rampup), "disc": ModelSpec(disc)}, updates,
                  encode=encode, validate=validate if val_x is not None and len(val_x) else None,
                  validation_columns=cols if val_x is not None and len(val_x) else ())
    step_ref["step"] = step
    return step


@torch.no_grad()
def validation_metrics(ae: nn.Module, x_u8: Tensor, batch: int = 64, encode: Callable = to_model_range,
                       raw: Optional[nn.Module] = None) -> dict[str, float]:
    """Held-out reconstruction metrics of `ae` (eval mode expected; deterministic: the KL posterior's mode)."""
    dev = next(ae.parameters()).device
    l1, ps, ss, n = 0.0, 0.0, 0.0, 0
    counts = None
    for i in range(0, len(x_u8), batch):
        x = encode(x_u8[i:i + batch]).to(dev)
        if ae.kind == "kl":
            x_hat = ae.decode(ae.encode(x).mode())
        else:
            x_hat, _, idx = ae(x)
            c = torch.bincount(idx.flatten(), minlength=ae.cfg.n_codes)
            counts = c if counts is None else counts + c
        l1 += float((x_hat - x).abs().flatten(1).mean(1).sum())
        a, b = to_unit(x), to_unit(x_hat)
        ps += float(psnr(a, b).clamp(max=100.0).sum())
        ss += float(ssim(a, b).sum())
        n += len(x)
    out = {"val_rec_l1": l1 / n, "val_psnr": ps / n, "val_ssim": ss / n}
    if counts is not None:
        u = code_usage(counts)
        out.update(val_code_usage=u["code_usage"], val_code_perplexity=u["code_perplexity"])
        source = raw if raw is not None else ae
        out["train_code_usage"] = code_usage(source.quantizer.reset_usage())["code_usage"]
    return out

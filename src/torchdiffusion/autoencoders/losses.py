"""The first-stage training losses (Rombach et al. 2022, Appendix G and its reference loss; Esser et al. 2021,
Eq. 4-7), with their reductions stated (tests/test_autoencoders.py pins them).

Notation: x, x_hat (B, C, H, W) in [-1, 1]; P(x, x_hat) (B,) a perceptual distance (LPIPS or classifier
features, autoencoders.perceptual), 0 when none is configured; n = C H W.

KL-VAE (LDM's LPIPSWithDiscriminator with its log-variance fixed at 0):
    L_rec = (1 / B) sum_b [ sum_pixels |x - x_hat| + perceptual_weight * n * P_b ]   (summed over pixels, batch mean)
    L_kl  = (1 / B) sum_b KL_b,  KL_b summed over the latent dims (kl.DiagonalGaussian.kl)
    L_ae  = L_rec + kl_weight * L_kl + lambda * L_G,      kl_weight = 1e-6 (LDM)
VQGAN (Esser et al. 2021's VQLPIPSWithDiscriminator):
    L_rec = mean over all elements of |x - x_hat| + perceptual_weight * mean_b P_b    (a per-element mean)
    L_ae  = L_rec + codebook_weight * L_vq + lambda * L_G  (L_vq: vq.VectorQuantizer's codebook + beta commitment)
lambda is discriminator.adaptive_weight (0 before gan_start, which defaults to the discriminator's start step);
"l2" replaces |.| by (.)^2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

from torch import Tensor

from .discriminator import DiscriminatorConfig


@dataclass(frozen=True)
class AELossConfig:
    """The loss section of an autoencoder run (autoencoders.losses docstring; defaults from LDM's configs)."""
    rec: Literal["l1", "l2"] = "l1"
    perceptual: Literal["none", "lpips", "classifier"] = "none"  # classifier: "classifier-perceptual"
    perceptual_path: Optional[str] = None  # lpips: an LPIPS-VGG16 weights file; classifier: a train-classifier run
    perceptual_weight: float = 1.0  # LDM: 1.0
    kl_weight: float = 1e-6  # LDM's KL-f4 / f8 configs
    codebook_weight: float = 1.0  # Esser et al. 2021
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    disc_start: int = 50001  # LDM's KL configs; short CPU runs start much earlier
    gan_start: Optional[int] = None  # the generator's adversarial term from here (default disc_start, as LDM); a
    # later step gives the discriminator a head start, so a random D does not push the decoder around in short runs
    disc_weight: float = 0.5  # LDM KL: 0.5 (VQ-f4: 0.75)
    disc_factor: float = 1.0
    disc_lr: Optional[float] = None  # default: train.lr
    max_adaptive_weight: float = 1e4  # the reference clamp

    def __post_init__(self):
        if self.perceptual != "none" and not self.perceptual_path:
            raise ValueError(f"loss.perceptual={self.perceptual} needs loss.perceptual_path (an LPIPS-VGG16 weights "
                             f"file for lpips, a train-classifier run folder for classifier)")
        for name in ("perceptual_weight", "kl_weight", "codebook_weight", "disc_weight", "disc_factor",
                     "max_adaptive_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.disc_start < 0:
            raise ValueError(f"loss.disc_start must be >= 0, got {self.disc_start}")
        if self.gan_start is not None and self.gan_start < self.disc_start:
            raise ValueError(f"loss.gan_start ({self.gan_start}) must be >= loss.disc_start ({self.disc_start}): the "
                             f"generator cannot be judged by a discriminator that has not started")

    @property
    def generator_start(self) -> int:
        """The first step of the generator's adversarial term (gan_start, else disc_start)."""
        return self.disc_start if self.gan_start is None else self.gan_start

    @property
    def perceptual_label(self) -> str:
        """How results name the perceptual term: none, lpips-vgg16 or classifier-perceptual."""
        return {"none": "none", "lpips": "lpips-vgg16", "classifier": "classifier-perceptual"}[self.perceptual]


def pixel_error(x: Tensor, x_hat: Tensor, kind: str = "l1") -> Tensor:
    """|x - x_hat| or (x - x_hat)^2 elementwise (B, C, H, W)."""
    d = x_hat - x
    return d.abs() if kind == "l1" else d.pow(2)


def kl_reconstruction_loss(x: Tensor, x_hat: Tensor, kind: str = "l1", perceptual: Optional[Tensor] = None,
                           perceptual_weight: float = 1.0) -> Tensor:
    """LDM's reduction: per-sample sum over pixels (+ perceptual_weight * n * P_b), mean over the batch: ()."""
    per = pixel_error(x, x_hat, kind).flatten(1).sum(1)
    if perceptual is not None:
        per = per + perceptual_weight * x[0].numel() * perceptual.reshape(-1)
    return per.mean()


def kl_term(kl_per_sample: Tensor) -> Tensor:
    """Batch mean of the per-sample KL (each summed over latent dims): ()."""
    return kl_per_sample.mean()


def vq_reconstruction_loss(x: Tensor, x_hat: Tensor, kind: str = "l1", perceptual: Optional[Tensor] = None,
                           perceptual_weight: float = 1.0) -> Tensor:
    """The VQGAN reduction: mean over every element (+ perceptual_weight * mean_b P_b): ()."""
    out = pixel_error(x, x_hat, kind).mean()
    if perceptual is not None:
        out = out + perceptual_weight * perceptual.mean()
    return out


PerceptualFn = Callable[[Tensor, Tensor], Tensor]  # (x, x_hat) -> (B,) distance


def perceptual_or_none(fn: Optional[PerceptualFn], x: Tensor, x_hat: Tensor) -> Optional[Tensor]:
    return None if fn is None else fn(x, x_hat)

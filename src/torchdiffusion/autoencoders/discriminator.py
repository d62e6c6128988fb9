"""The PatchGAN discriminator (Isola et al. 2017, Sec. 3.2.2 and Appendix 6.1.2), its hinge losses (Lim & Ye 2017)
and LDM's adaptive generator weight (Esser et al. 2021, Eq. 7; Rombach et al. 2022's reference loss).

Notation: x (B, C, H, W) real images, x_hat reconstructions, D(.) (B, 1, H', W') patch logits.

    PatchGAN: conv4x4/2 (ndf) LReLU(0.2); n_layers - 1 times conv4x4/2 (ndf * min(2^n, 8)) BN LReLU;
              conv4x4/1 (ndf * min(2^n_layers, 8)) BN LReLU; conv4x4/1 (1)             (the reference's "NLayer")
    hinge     L_D = mean(relu(1 - D(x))) / 2 + mean(relu(1 + D(x_hat))) / 2 ;  L_G = -mean(D(x_hat))
    adaptive  lambda = disc_weight * clamp(||grad_L L_rec|| / (||grad_L L_G|| + 1e-4), 0, 1e4), detached, where L
              is the decoder's last layer; lambda = 0 before the discriminator's start step.

BatchNorm uses the batch's statistics in training and evaluation alike (no running averages), so the
discriminator's whole state is its parameters: a generator step cannot change it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass(frozen=True)
class DiscriminatorConfig:
    base_channels: int = 64  # Isola et al. 2017: 64
    n_layers: int = 3  # the 70x70 PatchGAN of Isola et al. (fewer for 32x32 images: receptive field shrinks)
    norm: str = "batch"  # batch (Isola et al.) or none

    def __post_init__(self):
        if self.base_channels < 1 or self.n_layers < 1:
            raise ValueError(f"discriminator base_channels and n_layers must be >= 1, got {self.base_channels} and "
                             f"{self.n_layers}")
        if self.norm not in ("batch", "none"):
            raise ValueError(f"discriminator norm {self.norm!r} is not valid; valid: batch, none")


def _norm(kind: str, c: int) -> nn.Module:
    return nn.BatchNorm2d(c, track_running_stats=False) if kind == "batch" else nn.Identity()


class PatchDiscriminator(nn.Module):
    """x (B, C, H, W) -> patch logits (B, 1, H', W')."""

    def __init__(self, cfg: DiscriminatorConfig = DiscriminatorConfig(), in_channels: int = 1):
        super().__init__()
        ndf, use_bias = cfg.base_channels, cfg.norm != "batch"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, cfg.n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=use_bias), _norm(cfg.norm, ndf * mult),
                       nn.LeakyReLU(0.2)]
        prev, mult = mult, min(2 ** cfg.n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=use_bias), _norm(cfg.norm, ndf * mult),
                   nn.LeakyReLU(0.2), nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # the reference initialisation: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))): a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """-mean D(x_hat): a scalar."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float = 1.0,
                    max_weight: float = 1e4) -> Tensor:
    """disc_weight * clamp(||d rec_loss / d last_layer|| / (||d g_loss / d last_layer|| + 1e-4), 0, max_weight),
    detached (a scalar tensor). Both graphs are kept for the backward of the full loss."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = torch.norm(g_rec) / (torch.norm(g_gan) + 1e-4)
    return (torch.clamp(w, 0.0, max_weight) * disc_weight).detach()

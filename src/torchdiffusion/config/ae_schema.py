"""The configuration of a first-stage autoencoder run (`torchdiffusion train-ae`): one frozen dataclass tree,
loaded strictly like the diffusion run config (config.strict).

    seed        the run's seed
    data        the data section of a diffusion run (schema.DataConfig)
    ae          {kind: kl | vq, ...}: autoencoders.kl.KLConfig / autoencoders.vq.VQConfig (registry KINDS
                "autoencoder")
    loss        autoencoders.losses.AELossConfig (reconstruction, perceptual, KL / codebook weights, discriminator)
    train       the training loop's settings (train.trainer.TrainConfig); train.betas are the optimisers' Adam
                betas, (0.5, 0.9) in the presets as the reference code
    recon       reconstruction grids and validation metrics (ReconConfig)
    data_shape  (C, H, W) of the training images, set from the data when training starts (never in a preset)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..autoencoders.kl import KLConfig
from ..autoencoders.losses import AELossConfig
from ..train.trainer import TrainConfig
from .schema import DataConfig
from .strict import kind_field


@dataclass(frozen=True)
class ReconConfig:
    grid_images: int = 16  # held-out images shown with their reconstructions in samples/recon_<step>.png
    val_images: int = 512  # held-out images of the validation metrics (rec L1, PSNR, SSIM, code usage)

    def __post_init__(self):
        if self.grid_images < 1 or self.val_images < 1:
            raise ValueError(f"recon.grid_images and recon.val_images must be >= 1, got {self.grid_images} and "
                             f"{self.val_images}")


@dataclass(frozen=True)
class AERunConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=lambda: DataConfig(resolution=32))
    ae: Any = kind_field("autoencoder", KLConfig)
    loss: AELossConfig = field(default_factory=AELossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(betas=(0.5, 0.9), ema_halflife_images=0.0))
    recon: ReconConfig = field(default_factory=ReconConfig)
    data_shape: tuple[int, ...] = ()  # (C, H, W) of the data; () until training starts (set from the data)

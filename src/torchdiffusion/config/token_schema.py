"""The configuration of a token (discrete diffusion) run (`torchdiffusion train-tokens`), loaded strictly.

    seed            the run's seed
    vq_run          the VQ first stage's `train-ae` run folder (or checkpoint); its codes are the tokens
    data            the images whose VQ indices are the training tokens (schema.DataConfig)
    process         core.discrete.DiscreteProcessConfig (absorbing | uniform | mask_replace, steps T)
    loss            core.discrete_objectives.DiscreteLossConfig (hybrid | vlb | ce | maskgit)
    backbone        nn.token_transformer.TokenTransformerConfig
    train           the loop's settings (train.trainer.TrainConfig; eval_every must be 0: no in-loop FID yet)
    sample          TokenSampleConfig: the sampler of training grids and the `sample-tokens` default
    cond            conditioners (e.g. {label: {kind: class}}): adaLN conditions of the backbone, with dropout
                    for classifier-free guidance (sample.guidance_scale)
    num_classes, token_grid, data_shape, vq_fingerprint, token_fingerprint
                    set when training starts (K = the codebook size, (h, w), the images' (C, H, W), and the
                    fingerprints of the VQ weights and of the token set); never in a preset
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..core.discrete import DiscreteProcessConfig
from ..core.discrete_objectives import DiscreteLossConfig
from ..errors import ConfigError
from ..nn.token_transformer import TokenTransformerConfig
from ..train.trainer import TrainConfig
from .schema import DataConfig
from .strict import kind_field


@dataclass(frozen=True)
class TokenSampleConfig:
    sampler: Literal["ancestral", "maskgit"] = "maskgit"
    steps: int = 12  # MaskGIT decodes 256 tokens in 8-12 iterations (Chang et al. 2022, sec. 4)
    temperature: float = 1.0
    choice_temperature: float = 4.5  # MaskGIT's released value
    top_p: Optional[float] = None
    guidance_scale: Optional[float] = None  # conditional runs: classifier-free guidance on logits (None = 1)
    grid_images: int = 64

    def __post_init__(self):
        if self.sampler not in ("ancestral", "maskgit"):
            raise ConfigError(f"sample.sampler {self.sampler!r} is not valid; valid: ancestral, maskgit")
        if self.steps < 1 or self.grid_images < 1:
            raise ConfigError(f"sample.steps and sample.grid_images must be >= 1, got {self.steps}, "
                              f"{self.grid_images}")


@dataclass(frozen=True)
class TokenRunConfig:
    seed: int = 0
    vq_run: str = ""
    data: DataConfig = field(default_factory=lambda: DataConfig(resolution=32))
    process: DiscreteProcessConfig = field(default_factory=DiscreteProcessConfig)
    loss: DiscreteLossConfig = field(default_factory=DiscreteLossConfig)
    backbone: TokenTransformerConfig = field(default_factory=TokenTransformerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: TokenSampleConfig = field(default_factory=TokenSampleConfig)
    # conditioners by the cond key they fill, as in a diffusion run: {label: {kind: class, p_uncond: 0.1}}
    cond: dict = kind_field("conditioner", dict, mapping=True)
    num_classes: int = 0
    token_grid: tuple[int, ...] = ()
    data_shape: tuple[int, ...] = ()
    vq_fingerprint: str = ""
    token_fingerprint: str = ""

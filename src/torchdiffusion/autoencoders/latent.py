"""Latent space as a codec: a trained first stage (KL-VAE or VQ autoencoder of `train-ae`) with a latent scale.

Notation: x in [-1, 1] the image (data.convert.to_model_range of uint8 pixels); E, D the first stage's encoder and
decoder; r = E(x) its raw latent; s the latent scale and m the shift; z = (r - m) * s what the diffusion model
learns and samples (Rombach et al. 2022, "High-resolution image synthesis with latent diffusion models", sec. 4.3.2
and app. G: s = 1 / std of the training latents, so that z has unit variance whatever the autoencoder's KL weight).

- KL (kind "kl"): the encoder's diagonal Gaussian q(r | x) = N(mu, diag(std^2)); r = mu + std * e with
  e ~ N(0, I) (posterior "sample", what LDM trains on) or r = mu (posterior "mean", deterministic).
- VQ (kind "vq"): r = h, the pre-quantisation latent; the decoder quantises (LDM's VQ-regularised first stage:
  the quantiser is absorbed in the decoder), so D(E(x)) is the VQ model's forward.

The first stage's own parameters are frozen and never part of the diffusion run's checkpoint; the run refers to
the autoencoder's run folder and stores its weights' fingerprint (config.codecs checks it on every load).

What a raw-latent cache holds per image ("moments", float32 (C_m, h, w)): KL [mu, std] stacked on channels
(C_m = 2 C'), VQ h (C_m = C'). `raw_from_moments` turns them into r, so training on a cache and encoding on the
fly share one code path and give the same r for the same generator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from ..data.convert import to_model_range
from ..errors import ConfigError


@dataclass(frozen=True)
class LatentCodecConfig:
    """A diffusion run's first stage: `run` the autoencoder's run folder (`torchdiffusion train-ae`).

    scale / shift: None = estimated from the training data when training starts (scale = 1 / std and, with
    estimate_shift, shift = mean of the raw latents of the first `scale_images` training images, over all entries;
    Rombach et al. 2022, app. G, use the first batch); the resolved run config then holds the numbers, so sampling
    and resuming read them back and never recompute them. fingerprint: the autoencoder weights' fingerprint, set
    when training starts; a codec run whose weights differ is refused. cache: a raw-latent cache file
    (`torchdiffusion encode`; null = encode on the fly)."""

    run: str = ""
    scale: Optional[float] = None
    shift: Optional[float] = None
    estimate_shift: bool = False  # LDM scales only (shift 0); True also centres the latents
    scale_images: int = 1024
    fingerprint: str = ""
    cache: Optional[str] = None

    def __post_init__(self):
        if self.scale is not None and not (self.scale > 0 and self.scale < float("inf")):
            raise ValueError(f"model.codec.scale must be a positive number (or null: estimated), got {self.scale}")
        if self.scale_images < 2:
            raise ValueError(f"model.codec.scale_images must be >= 2, got {self.scale_images}")


@dataclass(frozen=True)
class KLCodecConfig(LatentCodecConfig):
    posterior: Literal["sample", "mean"] = "sample"  # LDM trains on posterior samples (Rombach et al. 2022)


@dataclass(frozen=True)
class VQCodecConfig(LatentCodecConfig):
    pass


def _moments_of(posterior) -> Tensor:
    """[mu, std] (B, 2C', h, w) of a diagonal Gaussian posterior."""
    mean = posterior.mean
    std = getattr(posterior, "std", None)
    if std is None:
        std = torch.exp(0.5 * posterior.logvar)
    return torch.cat([mean, std], dim=1)


class LatentCodec(nn.Module):
    """encode(x_u8 (B, C, H, W) uint8) -> z (B, C', H/f, W/f); decode(z) -> x (B, C, H, W) in [-1, 1] (module
    notes). `first_stage` is the autoencoder module (encode(x) -> posterior (KL) or h (VQ); decode(r) -> x);
    data_shape / raw_shape its image and latent shapes (C, H, W) / (C', h, w). scale None: not yet estimated
    (encode_raw and moments still work: what the estimate is made of)."""

    def __init__(self, first_stage: nn.Module, kind: Literal["kl", "vq"], data_shape, raw_shape,
                 scale: Optional[float], shift: Optional[float], posterior: str = "sample", name: str = ""):
        super().__init__()
        self.first_stage = first_stage.eval().requires_grad_(False)
        self.kind, self.posterior, self.name = kind, posterior, name or kind
        self.data_shape = tuple(int(s) for s in data_shape)
        self.raw_shape = tuple(int(s) for s in raw_shape)
        self.scale = None if scale is None else float(scale)
        self.shift = 0.0 if shift is None else float(shift)

    def train(self, mode: bool = True):  # the first stage is frozen: always in eval mode
        return super().train(False)

    @property
    def device(self) -> torch.device:
        p = next(self.first_stage.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def moment_channels(self) -> int:
        return 2 * self.raw_shape[0] if self.kind == "kl" else self.raw_shape[0]

    def latent_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        data_shape = tuple(int(s) for s in data_shape)
        if data_shape != self.data_shape:
            c, *hw = data_shape
            raise ConfigError(f"the images are {'x'.join(map(str, hw))} with {c} channel(s) but the codec run "
                              f"{self.name} was trained on {'x'.join(map(str, self.data_shape[1:]))} with "
                              f"{self.data_shape[0]} channel(s); set data.resolution / data.channels to match "
                              f"(or train an autoencoder on these images)")
        return self.raw_shape

    # ------------------------------------------------------------------ raw latents
    @torch.no_grad()
    def moments(self, x_u8: Tensor) -> Tensor:
        """What a raw-latent cache stores for uint8 images: (B, C_m, h, w) float32 (module notes)."""
        x = to_model_range(x_u8).to(self.device)
        out = self.first_stage.encode(x)
        return (_moments_of(out) if self.kind == "kl" else out).float()

    def raw_from_moments(self, m: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """r of cached moments: VQ h as is; KL mu (posterior "mean") or mu + std * e, e ~ N(0, I) drawn on the CPU
        from `generator` in the shape of mu (posterior "sample"; generator None: the mean)."""
        if self.kind != "kl":
            return m
        c = self.raw_shape[0]
        mean, std = m[:, :c], m[:, c:]
        if self.posterior == "mean" or generator is None:
            return mean
        e = torch.randn(tuple(mean.shape), generator=generator, dtype=torch.float32)
        return mean + std * e.to(mean.device, mean.dtype)

    def encode_raw(self, x_u8: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return self.raw_from_moments(self.moments(x_u8), generator)

    # ------------------------------------------------------------------ the diffusion space
    def _scale(self) -> float:
        if self.scale is None:
            raise ConfigError("model.codec.scale is not set: it is estimated from the training data when training "
                              "starts (or give model.codec.scale=NUMBER)")
        return self.scale

    def scaled(self, r: Tensor) -> Tensor:
        """z = (r - shift) * scale."""
        return (r - self.shift) * self._scale()

    def unscaled(self, z: Tensor) -> Tensor:
        """r = z / scale + shift."""
        return z / self._scale() + self.shift

    def encode(self, x_u8: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """uint8 (B, C, H, W) -> z (B, C', h, w) on the codec's device (KL: the mean without a generator)."""
        return self.scaled(self.encode_raw(x_u8, generator))

    def decode(self, z: Tensor) -> Tensor:
        """z (B, C', h, w) -> images (B, C, H, W) in about [-1, 1], on z's device. Differentiable in z (latent
        DPS takes gradients through it); the first stage's parameters stay frozen."""
        x = self.first_stage.decode(self.unscaled(z).to(self.device, torch.float32))
        return x.to(z.device)


@torch.no_grad()
def encode_moments(codec: LatentCodec, x_u8: Tensor, batch: int = 256, progress=None) -> Tensor:
    """Cached moments (N, C_m, h, w) float32 on the CPU of uint8 images (N, C, H, W), in batches."""
    out = []
    for start in range(0, len(x_u8), batch):
        out.append(codec.moments(x_u8[start:start + batch]).cpu())
        if progress is not None:
            progress(min(start + batch, len(x_u8)), len(x_u8))
    return torch.cat(out) if out else torch.empty((0, codec.moment_channels, *codec.raw_shape[1:]))

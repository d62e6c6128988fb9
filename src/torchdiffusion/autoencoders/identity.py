"""Pixel space as a codec: encode maps uint8 [0, 255] to [-1, 1] (data.convert.to_model_range), decode is the
identity, the diffusion-space shape is the data's."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..data.convert import to_model_range


@dataclass(frozen=True)
class IdentityCodecConfig:
    pass


class IdentityCodec(nn.Module):
    def __init__(self, cfg: IdentityCodecConfig = IdentityCodecConfig()):
        super().__init__()
        self.cfg = cfg

    def encode(self, x_u8: Tensor) -> Tensor:
        return to_model_range(x_u8)

    def decode(self, z: Tensor) -> Tensor:
        return z

    def latent_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(data_shape)

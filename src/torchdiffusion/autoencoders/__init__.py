"""Codecs: the map between data (uint8 images) and the space diffusion runs in, chosen by `model.codec.kind`.

A codec has
    encode(x_u8 (B, C, *S) uint8) -> z (B, *latent_shape) float   (training: what the denoiser learns)
    decode(z) -> x (B, C, *S) float in [-1, 1]                     (sampling: what images are made of)
    latent_shape(data_shape) -> the diffusion-space shape (C', *S') of data of shape (C, *S)
and is an nn.Module (its weights, if any, are part of the run). The diffusion core, samplers and guidance never
see a codec. `identity` is pixel space: the [0, 255] -> [-1, 1] mapping and nothing else.
"""
from .identity import IdentityCodec, IdentityCodecConfig

__all__ = ["IdentityCodec", "IdentityCodecConfig"]

"""Codecs: the map between data (uint8 images) and the space diffusion runs in, chosen by `model.codec.kind`.

A codec has
    encode(x_u8 (B, C, *S) uint8) -> z (B, *latent_shape) float   (training: what the denoiser learns)
    decode(z) -> x (B, C, *S) float in [-1, 1]                     (sampling: what images are made of)
    latent_shape(data_shape) -> the diffusion-space shape (C', *S') of data of shape (C, *S)
and is an nn.Module (its weights, if any, are part of the run). The diffusion core, samplers and guidance never
see a codec. `identity` is pixel space: the [0, 255] -> [-1, 1] mapping and nothing else.

The first-stage autoencoders that latent codecs wrap (trained by `torchdiffusion train-ae`, loaded by
config.first_stage.load_first_stage): kl.KLAutoencoder (KL-VAE, Rombach et al. 2022) and vq.VQAutoencoder (VQGAN,
Esser et al. 2021; the quantiser absorbed in the decoder), built from blocks.Encoder / blocks.Decoder, trained
with losses, discriminator (PatchGAN, hinge, adaptive weight) and perceptual; metrics holds PSNR, SSIM and code
usage.
"""
from .identity import IdentityCodec, IdentityCodecConfig
from .kl import DiagonalGaussian, KLAutoencoder, KLConfig
from .vq import VectorQuantizer, VQAutoencoder, VQConfig

__all__ = ["IdentityCodec", "IdentityCodecConfig", "DiagonalGaussian", "KLAutoencoder", "KLConfig",
           "VectorQuantizer", "VQAutoencoder", "VQConfig"]

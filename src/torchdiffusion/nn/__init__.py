"""Backbones: networks that map (x, c_noise, cond) to a tensor of x's shape; they know nothing about diffusion."""

from torchdiffusion.nn.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig"]

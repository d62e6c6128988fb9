"""Throughput-bench adapter for the shared referee script (throughput_bench.py): torchdiffusion's UNet.

make_unet(spec) builds torchdiffusion.nn.UNet with the spec's widths, residual blocks and attention
resolutions (the same layout as the diffusers UNet2DModel peer, so the forward FLOPs match) and
wraps it so that it is called as model(x, t), with the DDPM step t in [0, 1000) used as c_noise.
"""
from __future__ import annotations

import os

import torch

import torchdiffusion
from torchdiffusion.nn import UNet, UNetConfig

FRAMEWORK = "torchdiffusion"


def framework_version():
    return torchdiffusion.__version__


class _Wrap(torch.nn.Module):
    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        return self.unet(x, t)


def make_unet(spec):
    cfg = UNetConfig(
        image_size=spec["sample_size"],
        in_channels=spec["channels"],
        out_channels=spec["channels"],
        model_channels=spec["base_channels"],
        channel_mult=tuple(spec["channel_mult"]),
        num_res_blocks=spec["num_res_blocks"],
        attn_resolutions=tuple(spec["attn_resolutions"]),
        head_channels=int(os.environ.get("TD_BENCH_HEAD_CHANNELS", "64")),
        dropout=spec.get("dropout", 0.0),
        scale_shift_norm=os.environ.get("TD_BENCH_SCALE_SHIFT", "1") == "1",
        channels_last=os.environ.get("TD_BENCH_CHANNELS_LAST", "1") == "1",
    )
    return _Wrap(UNet(cfg))

#!/usr/bin/env python
"""Training throughput of the unet3d backbone beside diffusers' UNet3DConditionModel, per FLOP, on CPU.

    OMP_NUM_THREADS=1 nice -n 10 PYTHONPATH=src ../peers-venv/bin/python bench/video_throughput.py \
        --out bench/results/video_throughput.json

Both networks take a batch of 4 clips of 8 frames, 1 channel, 32x32 and run forward + backward (a squared-output
loss), fp32, one thread. diffusers' model (0.42; block_out_channels (32, 64), layers_per_block 1, the default
CrossAttn/plain 3-D blocks, a temporal convolution stack and temporal transformer in every block, cross-attention
to a dummy context of 1 token of width 32) and ours (the moving-mnist preset's per-frame U-Net at 32/64 channels,
1 residual block per level, temporal attention at every level) differ in layout, so the comparison is per FLOP:
FLOPs of one forward + backward are counted by torch.utils.flop_counter (matmuls and convolutions), and the
figure is GFLOP/s = FLOPs / median wall time of --reps repetitions after a warm-up. The peer is imported only
when it is installed (the peers venv).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from torchdiffusion.nn.unet3d import UNet3D, UNet3DConfig


def measure(fn, reps: int) -> tuple[float, int]:
    with FlopCounterMode(display=False) as counter:
        fn()
    flops = counter.get_total_flops()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), flops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench/results/video_throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    b, t, s = 4, 8, 32
    x = torch.randn(b, 1, t, s, s)
    c = torch.full((b,), 0.5)
    ours = UNet3D(UNet3DConfig(image_size=s, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                               attn_resolutions=(16,), norm_groups=8, num_heads=4))

    def step_ours():
        ours.zero_grad(set_to_none=True)
        ours(x, c).square().mean().backward()

    res = {"clips": b, "frames": t, "size": s, "threads": 1, "torch": torch.__version__, "reps": args.reps}
    sec, flops = measure(step_ours, args.reps)
    res["torchdiffusion_unet3d"] = {"seconds": sec, "gflop": flops / 1e9, "gflop_per_s": flops / 1e9 / sec,
                                    "params": sum(p.numel() for p in ours.parameters())}
    try:
        from diffusers import UNet3DConditionModel
        import diffusers
    except ImportError:
        res["diffusers"] = "not installed"
    else:
        peer = UNet3DConditionModel(sample_size=s, in_channels=1, out_channels=1,
                                    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), block_out_channels=(32, 64),
                                    layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                                    attention_head_dim=8)
        ctx = torch.zeros(b, 1, 32)

        def step_peer():
            peer.zero_grad(set_to_none=True)
            peer(x, c, encoder_hidden_states=ctx).sample.square().mean().backward()

        sec, flops = measure(step_peer, args.reps)
        res["diffusers_unet3d"] = {"version": diffusers.__version__, "seconds": sec, "gflop": flops / 1e9,
                                   "gflop_per_s": flops / 1e9 / sec, "params": sum(p.numel() for p in peer.parameters())}
        res["ratio_gflop_per_s"] = res["torchdiffusion_unet3d"]["gflop_per_s"] / res["diffusers_unet3d"]["gflop_per_s"]
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

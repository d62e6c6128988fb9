"""Accelerator throughput of one backbone (ours or a peer's) under the precision/layout/compile modes of the
peers' GPU script (../shared/bench/gpu_peer.py), measured the same way so the two can be compared side by side.

python bench/gpu_bench.py --model unet|unet-diffusers|dit|dit-diffusers [--presets s,ddpm-cifar10]
                          [--device cuda|cpu] [--batch 512] [--modes fp32,bf16,bf16+cl,bf16+cl+compile]
                          [--steps 20] [--sample-batch 512] [--graphs] [--out FILE.json]
Per preset and mode, one JSON line: train img/s (forward + backward + fused AdamW of one step, median of --steps
after 3 warm-up steps), achieved TFLOP/s (fwd+bwd FLOPs of one step counted by torch.utils.flop_counter), MFU
against the matmul peak measured in the same process (bf16 8192^3 on CUDA; on CPU the better of bf16 at 256^3 and
fp32 at 1024^3, since bf16 is emulated on most CPUs) and sampling img/s at
NFE 10 (the peer script's loop: z <- z - 0.01 D(z, t_i), ten evaluations, no grad). --graphs samples with
torch.compile(mode="reduce-overhead") (CUDA graphs) on CUDA. The U-Net presets are the referee's ("xs", "s",
"ddpm-cifar10"); "tiny" exists for the CPU smoke run that bench/gpu.sh --device cpu makes. DiT presets: "dit-s" (DiT-S/2 at 32x32, 4 channels: 12
blocks, width 384, 6 heads) and "tiny-dit".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = os.path.dirname(os.path.abspath(__file__))

#: U-Net specs: the referee's throughput presets (../shared/bench/throughput_bench.py, copied here because the
#: shared folder does not travel to an accelerator machine) plus "tiny" for the CPU smoke run
UNET_PRESETS = {
    "tiny": dict(sample_size=16, channels=3, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(8,)),
    "xs": dict(sample_size=32, channels=3, base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
               attn_resolutions=(16,)),
    "s": dict(sample_size=32, channels=3, base_channels=96, channel_mult=(1, 2, 2), num_res_blocks=2,
              attn_resolutions=(16,)),
    "ddpm-cifar10": dict(sample_size=32, channels=3, base_channels=128, channel_mult=(1, 2, 2, 2),
                         num_res_blocks=2, attn_resolutions=(16,)),
}
DIT_PRESETS = {
    "dit-s": dict(size=32, channels=4, patch=2, depth=12, heads=6, head_dim=64, classes=10),
    "tiny-dit": dict(size=16, channels=4, patch=2, depth=2, heads=2, head_dim=16, classes=10),
}


def diffusers_unet(spec):
    """diffusers' UNet2DModel with the spec's layout (attention blocks at the spec's resolutions), as the
    referee's adapter builds it."""
    from diffusers import UNet2DModel
    res = [spec["sample_size"] // 2 ** i for i in range(len(spec["channel_mult"]))]
    attn = [r in spec["attn_resolutions"] for r in res]
    return UNet2DModel(sample_size=spec["sample_size"], in_channels=spec["channels"], out_channels=spec["channels"],
                       layers_per_block=spec["num_res_blocks"],
                       block_out_channels=tuple(spec["base_channels"] * m for m in spec["channel_mult"]),
                       down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
                       up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)))


def build(model: str, preset: str):
    """(module, call(x, t, y), input shape (C, H, W)) of a backbone."""
    if model in ("unet", "unet-diffusers"):
        spec = UNET_PRESETS[preset]
        shape = (spec["channels"], spec["sample_size"], spec["sample_size"])
        if model == "unet-diffusers":
            m = diffusers_unet(spec)
            return m, (lambda net, x, t, y: net(x, t, return_dict=False)[0]), shape
        sys.path.insert(0, os.path.join(HERE, "adapters"))
        import torchdiffusion_unet as adapter  # the throughput bench's adapter: the same layout as the peer's
        return adapter.make_unet(dict(spec)), (lambda net, x, t, y: net(x, t)), shape
    spec = DIT_PRESETS[preset]
    shape = (spec["channels"], spec["size"], spec["size"])
    if model == "dit":
        from torchdiffusion.nn.dit import DiT, DiTConfig
        from torchdiffusion.protocols import BackboneIO, CondSpec
        cfg = DiTConfig(patch_size=spec["patch"], width=spec["heads"] * spec["head_dim"], depth=spec["depth"],
                        heads=spec["heads"])
        m = DiT(cfg, BackboneIO(shape, spec["channels"], (CondSpec("label", "class", spec["classes"]),)))
        return m, (lambda net, x, t, y: net(x, t, {"label": y})), shape
    from diffusers import DiTTransformer2DModel
    m = DiTTransformer2DModel(num_attention_heads=spec["heads"], attention_head_dim=spec["head_dim"],
                              in_channels=spec["channels"], out_channels=spec["channels"], num_layers=spec["depth"],
                              sample_size=spec["size"], patch_size=spec["patch"], num_embeds_ada_norm=spec["classes"],
                              activation_fn="gelu-approximate", norm_type="ada_norm_zero")
    return m, (lambda net, x, t, y: net(x, t.long(), class_labels=y, return_dict=False)[0]), shape


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="unet", choices=["unet", "unet-diffusers", "dit", "dit-diffusers"])
    ap.add_argument("--presets", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--sample-batch", type=int, default=512)
    ap.add_argument("--modes", default="fp32,bf16,bf16+cl,bf16+cl+compile")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--graphs", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    presets = (a.presets or ("s,ddpm-cifar10" if a.model.startswith("unet") else "dit-s")).split(",")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def bench(fn, n):
        for _ in range(3):
            fn()
        sync()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    def matmul_tflops(dtype):
        # 8192^3 on CUDA; 1024^3 on CPU, and 256^3 for bf16 there (emulated bf16 ran 1024^3 ~75x slower than fp32)
        n = 8192 if cuda else (256 if dtype == torch.bfloat16 else 1024)
        A = torch.randn(n, n, device=dev, dtype=dtype)
        return 2 * n ** 3 / bench(lambda: A @ A, 10 if cuda else 3) / 1e12

    # MFU's denominator is the best dense-matmul rate the device shows at any precision the modes use: on a GPU
    # that is bf16; on a CPU without native bf16 it is fp32, and a bf16-only peak there put fp32 modes at 900-4400%.
    peak_bf16 = matmul_tflops(torch.bfloat16)
    peak_fp32 = 0.0 if cuda else matmul_tflops(torch.float32)
    peak = max(peak_bf16, peak_fp32)
    facts = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
             "threads": torch.get_num_threads(), "peak_bf16_tflops": round(peak_bf16, 3),
             "peak_tflops_for_mfu": round(peak, 3), "model": a.model}
    print(json.dumps(facts), flush=True)
    rows = []
    for preset in presets:
        torch.manual_seed(0)
        model, call, shape = build(a.model, preset)
        model = model.to(dev).train()
        x = torch.randn(a.batch, *shape, device=dev)
        t = torch.randint(0, 1000, (a.batch,), device=dev).float()
        y = torch.randint(0, 10, (a.batch,), device=dev)
        with FlopCounterMode(display=False) as fc:
            call(model, x, t, y).float().pow(2).mean().backward()
        flops = fc.get_total_flops()
        model.zero_grad(set_to_none=True)
        for mode in a.modes.split(","):
            m = model.to(memory_format=torch.channels_last) if "cl" in mode and len(shape) == 3 else model
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=cuda)
            net = torch.compile(m) if "compile" in mode else m
            xx = x.contiguous(memory_format=torch.channels_last) if "cl" in mode else x
            amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=mode != "fp32")

            def step():
                with amp:
                    loss = call(net, xx, t, y).float().pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            snet = torch.compile(m, mode="reduce-overhead") if a.graphs and cuda else net
            zb = a.sample_batch
            ts = [torch.full((zb,), 999.0 - 100 * i, device=dev) for i in range(10)]
            ys = torch.randint(0, 10, (zb,), device=dev)

            def sample():
                with torch.inference_mode(), amp:
                    z = torch.randn(zb, *shape, device=dev)
                    if "cl" in mode:
                        z = z.contiguous(memory_format=torch.channels_last)
                    for ti in ts:
                        z = z - 0.01 * call(snet, z, ti, ys)

            try:
                st = bench(step, a.steps)
                ss = bench(sample, max(2, a.steps // 4))
            except Exception as e:  # noqa: BLE001 -- a mode that fails (e.g. compile) is reported, not fatal
                print(json.dumps({"preset": preset, "mode": mode, "failed": repr(e)[:300]}), flush=True)
                continue
            r = dict(model=a.model, preset=preset, mode=mode + ("+graphs" if a.graphs and cuda else ""),
                     params_M=round(sum(p.numel() for p in model.parameters()) / 1e6, 2), batch=a.batch,
                     fwd_bwd_gflop_per_img=round(flops / a.batch / 1e9, 3), train_img_s=round(a.batch / st, 1),
                     train_tflops=round(flops / st / 1e12, 3), mfu_measured=round(flops / st / 1e12 / peak, 3),
                     sample_img_s_nfe10=round(zb / ss, 1))
            rows.append(r)
            print(json.dumps(r), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({**facts, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""First stages side by side: torchdiffusion's KL-f4 / VQ-f4 autoencoders and diffusers' AutoencoderKL / VQModel
built to the same architecture (widths, blocks per level, mid attention, latent channels, GroupNorm groups) and so
the same FLOPs (counted below, not assumed), trained with the same loss on the same batches.

    PYTHONPATH=src ../peers-venv/bin/python bench/ae_compare.py [--steps 15] [--quality-steps 0] [--threads 1]

Throughput: training images per CPU-second (process time, so other jobs on a shared machine do not count;
with one thread it is images/s on an idle core) of one optimiser step (forward, L1 reconstruction + the model's
regulariser: KL with weight 1e-6 for KL, the codebook/commitment loss for VQ; backward; Adam step), batch 32 of
32x32 grey images, the frameworks interleaved round by round; the median round is reported. Ours is also timed
with channels_last=True (NHWC weights and activations; the same maths).
With --quality-steps N both are also trained N steps on Fashion-MNIST (same seed, order and lr) and their
held-out PSNR / SSIM are reported (autoencoders.metrics). Writes bench/results/ae_compare.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from torchdiffusion.autoencoders.blocks import AttnBlock
from torchdiffusion.autoencoders.blocks import Upsample as OurUpsample
from torchdiffusion.autoencoders.kl import KLAutoencoder, KLConfig
from torchdiffusion.autoencoders.metrics import psnr, ssim, to_unit
from torchdiffusion.autoencoders.vq import VQAutoencoder, VQConfig

WIDTH, MULT, BLOCKS, Z, GROUPS, CODES = 16, (1, 2, 2), 1, 3, 8, 256


def count_flops(model: nn.Module, forward, x: torch.Tensor) -> int:
    """2 x multiply-accumulates of every Conv2d and Linear, plus the two attention matmuls (4 N^2 C per head
    group) of mid-block attention (ours: AttnBlock; diffusers: attention_processor.Attention), of one forward."""
    total = [0]
    hooks = []

    def conv(m, i, o):
        total[0] += 2 * o.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def upsample(m, i, o):  # ours runs nearest x2 + 3x3 conv as four 2x2 convs (nearest_upsample_conv2d) without
        conv(m.conv, i, o)  # calling its Conv2d: count the nominal 3x3 conv at the output size, as the peer's

    def lin(m, i, o):
        total[0] += 2 * o.numel() * m.in_features

    def attn(m, i, o):
        h = i[0]
        n = h.shape[2] * h.shape[3] if h.ndim == 4 else h.shape[1]
        c = h.shape[1] if h.ndim == 4 else h.shape[2]
        total[0] += 4 * h.shape[0] * n * n * c

    try:
        from diffusers.models.attention_processor import Attention
    except Exception:  # noqa: BLE001 - diffusers absent: only ours is counted
        Attention = ()
    sub_pixel = {id(m.conv) for m in model.modules() if isinstance(m, OurUpsample)}
    for m in model.modules():
        if isinstance(m, OurUpsample):
            hooks.append(m.register_forward_hook(upsample))
        elif isinstance(m, nn.Conv2d) and id(m) not in sub_pixel:
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lin))
        elif isinstance(m, AttnBlock) or (Attention and isinstance(m, Attention)):
            hooks.append(m.register_forward_hook(attn))
    with torch.no_grad():
        forward(model, x)
    for h in hooks:
        h.remove()
    return total[0] // x.shape[0]


# ------------------------------------------------------------------------------------------- the models
def ours(kind, channels_last=False):
    torch.manual_seed(0)
    if kind == "kl":
        return KLAutoencoder(KLConfig(base_channels=WIDTH, ch_mult=MULT, num_res_blocks=BLOCKS, z_channels=Z,
                                      norm_groups=GROUPS, channels_last=channels_last), 1)
    return VQAutoencoder(VQConfig(base_channels=WIDTH, ch_mult=MULT, num_res_blocks=BLOCKS, z_channels=Z,
                                  n_codes=CODES, norm_groups=GROUPS, restart_every=0, channels_last=channels_last), 1)


def peer(kind):
    from diffusers import AutoencoderKL, VQModel
    torch.manual_seed(0)
    common = dict(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * len(MULT),
                  up_block_types=("UpDecoderBlock2D",) * len(MULT), block_out_channels=tuple(WIDTH * m for m in MULT),
                  layers_per_block=BLOCKS, latent_channels=Z, norm_num_groups=GROUPS, sample_size=32)
    if kind == "kl":
        return AutoencoderKL(**common)
    return VQModel(**common, num_vq_embeddings=CODES, vq_embed_dim=Z)


def loss_ours(model, x, g):
    if model.kind == "kl":
        x_hat, post = model(x, generator=g)
        return (x_hat - x).abs().mean() + 1e-6 * post.kl().mean()
    x_hat, vq, _ = model(x)
    return (x_hat - x).abs().mean() + vq


def loss_peer(model, x, g):
    if hasattr(model, "quantize"):
        out = model(x)
        return (out.sample - x).abs().mean() + out.commit_loss.mean()
    post = model.encode(x).latent_dist
    x_hat = model.decode(post.sample(generator=g)).sample
    return (x_hat - x).abs().mean() + 1e-6 * post.kl().mean()


def fwd_ours(model, x):
    return model(x)


def fwd_peer(model, x):
    return model(x)


def recon_ours(model, x):
    return model.decode(model.encode(x).mode()) if model.kind == "kl" else model(x)[0]


def recon_peer(model, x):
    if hasattr(model, "quantize"):
        return model(x).sample
    return model.decode(model.encode(x).latent_dist.mode()).sample


# ------------------------------------------------------------------------------------------- measurements
def batches(n_steps, batch=32, seed=0, data=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        if data is None:
            yield torch.rand((batch, 1, 32, 32), generator=g) * 2 - 1
        else:
            idx = torch.randint(len(data), (batch,), generator=g)
            yield data[idx].float() / 127.5 - 1


def train_steps(model, loss_fn, xs, lr=5e-4):
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    g = torch.Generator().manual_seed(1)
    model.train()
    n = 0
    t0 = time.process_time()
    for x in xs:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, g).backward()
        opt.step()
        n += len(x)
    return n / (time.process_time() - t0)


def throughput(kind, steps, rounds):
    models = {"ours": (ours(kind), loss_ours), "ours_channels_last": (ours(kind, True), loss_ours),
              "peer": (peer(kind), loss_peer)}
    for m, f in models.values():  # warm-up
        train_steps(m, f, batches(3))
    rates = {k: [] for k in models}
    for r in range(rounds):
        for k, (m, f) in models.items():
            rates[k].append(train_steps(m, f, batches(steps, seed=r)))
    med = {k: statistics.median(v) for k, v in rates.items()}
    x = torch.zeros(1, 1, 32, 32)
    m_ours, m_peer = models["ours"][0], models["peer"][0]
    return {
        **{f"{k}_img_per_cpu_s": v for k, v in med.items()},
        "speedup": med["ours"] / med["peer"], "speedup_channels_last": med["ours_channels_last"] / med["peer"],
        "rounds": rates,
        "ours_flops_per_image": count_flops(m_ours, fwd_ours, x),
        "peer_flops_per_image": count_flops(m_peer, fwd_peer, x),
        "ours_params": sum(p.numel() for p in m_ours.parameters()),
        "peer_params": sum(p.numel() for p in m_peer.parameters()),
    }


@torch.no_grad()
def quality(model, recon, x_u8):
    model.eval()
    ps, ss = [], []
    for i in range(0, len(x_u8), 100):
        x = x_u8[i:i + 100].float() / 127.5 - 1
        y = recon(model, x).clamp(-1, 1)
        ps.append(psnr(to_unit(x), to_unit(y)))
        ss.append(ssim(to_unit(x), to_unit(y)))
    return {"psnr": float(torch.cat(ps).mean()), "ssim": float(torch.cat(ss).mean())}


def train_quality(kind, steps):
    from torchdiffusion.data.fashion_mnist import load_fashion_mnist
    train = load_fashion_mnist("train", resolution=32).x
    val = load_fashion_mnist("val", resolution=32).x[:500]
    out = {}
    for name, m, f, rec in (("ours", ours(kind), loss_ours, recon_ours), ("peer", peer(kind), loss_peer, recon_peer)):
        t0 = time.perf_counter()
        train_steps(m, f, batches(steps, data=train))
        out[name] = {**quality(m, rec, val), "train_s": time.perf_counter() - t0}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15, help="optimiser steps per timing round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quality-steps", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/ae_compare.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import diffusers
    result = {"setup": {"torch": torch.__version__, "diffusers": diffusers.__version__, "threads": args.threads,
                        "cpu": platform.processor() or platform.machine(), "batch": 32, "image": [1, 32, 32],
                        "architecture": {"widths": [WIDTH * m for m in MULT], "blocks_per_level": BLOCKS,
                                         "z_channels": Z, "norm_groups": GROUPS, "mid_attention": True,
                                         "codes": CODES},
                        "steps_per_round": args.steps, "rounds": args.rounds}}
    for kind in ("kl", "vq"):
        r = throughput(kind, args.steps, args.rounds)
        if args.quality_steps:
            r["quality"] = train_quality(kind, args.quality_steps)
            r["quality"]["steps"] = args.quality_steps
        result[kind] = r
        print(f"{kind}: ours {r['ours_img_per_cpu_s']:.1f} img/CPU-s (channels_last "
              f"{r['ours_channels_last_img_per_cpu_s']:.1f}), diffusers {r['peer_img_per_cpu_s']:.1f} img/CPU-s "
              f"({r['speedup']:.2f}x, {r['speedup_channels_last']:.2f}x); "
              f"FLOPs/image {r['ours_flops_per_image'] / 1e6:.1f}M vs "
              f"{r['peer_flops_per_image'] / 1e6:.1f}M; params {r['ours_params']:,} vs {r['peer_params']:,}"
              + (f"; PSNR {r['quality']['ours']['psnr']:.2f} vs {r['quality']['peer']['psnr']:.2f}, SSIM "
                 f"{r['quality']['ours']['ssim']:.3f} vs {r['quality']['peer']['ssim']:.3f}" if "quality" in r else ""),
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

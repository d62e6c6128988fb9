"""DiT throughput beside diffusers' DiTTransformer2DModel at an equal configuration.

Runs in the peers environment (diffusers installed; see bench/README.md), never in the project's own venv:
    ../peers-venv/bin/python bench/dit_throughput.py --threads 2 --out bench/results/dit_throughput.json
Both models: class-conditional (diffusers' ada_norm_zero DiT always is), width = heads * head_dim, the same
depth, patch size, MLP ratio 4 (tanh-GELU), sin-cos absolute positions, 256 timestep frequencies, learned
sigma off. Measured: one training step (MSE to noise + AdamW) and one no-grad forward ("sampling" NFE), images
per second, median of --repeats timed runs after --warmup runs, same inputs for both. Parameter counts are
printed so "equal config" can be checked: they differ by the conditioning embeddings, since every diffusers
ada_norm_zero block carries its own timestep MLP and class table (0.81 M of 8.05 M at the defaults) where ours
share one conditioning vector (README_backbones.md, section 3). Run it with the project's src on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def ours(args):
    from torchdiffusion.nn.dit import DiT, DiTConfig
    from torchdiffusion.protocols import BackboneIO, CondSpec
    cfg = DiTConfig(patch_size=args.patch, width=args.heads * args.head_dim, depth=args.depth, heads=args.heads)
    io = BackboneIO((args.channels, args.size, args.size), args.channels, (CondSpec("label", "class", args.classes),))
    model = DiT(cfg, io)
    return model, lambda x, t, y: model(x, t, {"label": y})


def peer(args):
    from diffusers import DiTTransformer2DModel
    model = DiTTransformer2DModel(num_attention_heads=args.heads, attention_head_dim=args.head_dim,
                                  in_channels=args.channels, out_channels=args.channels, num_layers=args.depth,
                                  sample_size=args.size, patch_size=args.patch, num_embeds_ada_norm=args.classes,
                                  activation_fn="gelu-approximate", norm_type="ada_norm_zero")
    return model, lambda x, t, y: model(x, t, class_labels=y, return_dict=False)[0]


def timed(fn, warmup, repeats, sync):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name, build, args, device):
    torch.manual_seed(0)
    model, call = build(args)
    model = model.to(device).train()
    g = torch.Generator().manual_seed(1)
    b = args.batch
    x = torch.randn(b, args.channels, args.size, args.size, generator=g).to(device)
    noise = torch.randn(x.shape, generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    y = torch.randint(0, args.classes, (b,), generator=g).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else torch.autocast(device.type, enabled=False))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        with amp:
            out = call(x + noise, t.float() if name == "torchdiffusion" else t, y)
        ((out.float() - noise) ** 2).mean().backward()
        opt.step()

    def forward():
        with torch.no_grad(), amp:
            call(x + noise, t.float() if name == "torchdiffusion" else t, y)

    train_s = timed(step, args.warmup, args.repeats, sync)
    model.eval()
    sample_s = timed(forward, args.warmup, args.repeats, sync)
    return {"framework": name, "params": sum(p.numel() for p in model.parameters()),
            "train_img_per_s": b / train_s, "forward_img_per_s": b / sample_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (both models)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        import diffusers
    except ImportError:
        print("error: diffusers is not installed in this environment; run this script with the peers venv "
              "(bench/README.md)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [measure("torchdiffusion", ours, args, device), measure("diffusers", peer, args, device)]
    meta = {"config": vars(args), "torch": torch.__version__, "diffusers": diffusers.__version__}
    for r in rows:
        print(f"{r['framework']:>15}: {r['params'] / 1e6:.2f} M params, train {r['train_img_per_s']:.1f} img/s, "
              f"forward {r['forward_img_per_s']:.1f} img/s")
    a, d = rows
    print(f"ratio torchdiffusion / diffusers: train {a['train_img_per_s'] / d['train_img_per_s']:.2f}x, "
          f"forward {a['forward_img_per_s'] / d['forward_img_per_s']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "runs": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

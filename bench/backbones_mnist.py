#!/usr/bin/env python
"""U-Net vs DiT vs U-ViT on MNIST pixels at equal training minutes: Inception FID-N per CPU-minute.

Each backbone trains with the `mnist` preset's EDM recipe (EDM preconditioning, lognormal noise density, EDM
weighting, batch 64, lr 2e-3 with 100 warm-up steps and cosine decay, bf16 autocast, EMA half-life 10k images,
Heun 18 steps for sampling) and only `model.backbone` changed, for the same wall-clock budget
(`train.max_minutes`) on the same data and seed. Then N samples (seeds 0..N-1, `torchdiffusion sample`) are scored
by bench/mnist_quality.py (FID-N against MNIST test[:N], TF Inception, cached reference statistics; imported, not
copied). See README_backbones.md.

The cosine schedule needs a step count: a short probe (--probe-minutes of training) measures each backbone's
seconds per step (no validation or grids) and train.steps = budget / that (times --step-margin), so the schedule
would end at the budget without the in-loop validation and grids; with them, train.max_minutes stops every run at
the budget, at ~90% of its schedule (lr already below 3% of its peak), so all backbones train for equal minutes. With --mid F a
checkpoint near F x the budget is kept too and scored the same way (a second point on the FID-minutes curve).

    python bench/backbones_mnist.py --minutes 4 --n 1000 --probe-minutes 0.15 \
        --out bench/results/backbones_mnist.json --plot bench/results/backbones_mnist.png --grids bench/results

Run folders go to --workdir (default: the system temporary folder, backbones_mnist/), never into the repository.

Finished stages (a trained run, a sample folder, a score) are reused when the script is run again.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mnist_quality  # noqa: E402  (bench/mnist_quality.py: the FID-N protocol)

#: the backbones compared; the transformers are sized to about the U-Net's forward FLOPs at 28x28 (patch 2: a
#: 14x14 grid of 196 tokens, head width 64)
BACKBONES = {
    "unet": None,  # the preset's own: 32/64/64 channels, one res block per level, attention at 7x7
    "dit": "{kind: dit, patch_size: 2, width: 128, depth: 6, heads: 2}",
    "uvit": "{kind: uvit, patch_size: 2, width: 128, depth: 7, heads: 2}",
}


def cli(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("torchdiffusion")
    return [str(exe) if exe.exists() else "torchdiffusion", *args]


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def backbone_sets(name: str) -> list[str]:
    spec = BACKBONES[name]
    return [] if spec is None else ["--set", f"model.backbone={spec}"]


def probe_seconds_per_step(name: str, work: Path, minutes: float, threads: int, log: Path) -> float:
    """Median seconds per training step of a short run without validation, grids or checkpoints in between."""
    d = work / f"probe_{name}"
    if not (d / "metrics.csv").exists():
        run(cli("train", "--preset", "mnist", "--run", str(d), "--threads", str(threads), *backbone_sets(name),
                "--set", "train.steps=100000", "--set", f"train.max_minutes={minutes}",
                "--set", "train.val_every=100000", "--set", "train.sample_every=100000",
                "--set", "train.ckpt_every=100000", "--set", "train.log_every=100000",
                "--set", "sample.grid_images=4"), log)
    wall = [float(r["wall_s"]) for r in read_metrics(d)]
    dt = [b - a for a, b in zip(wall, wall[1:])]
    dt = dt[min(5, len(dt) // 2):]  # skip the first steps (allocation, warm-up)
    return statistics.median(dt) if dt else wall[-1] / len(wall)


def train(name: str, work: Path, args, log: Path) -> dict:
    d = work / name
    info_file = d / "bench_train.json"
    if info_file.exists():
        return json.loads(info_file.read_text())
    s_per_step = probe_seconds_per_step(name, work, args.probe_minutes, args.threads, log)
    steps = max(200, int(args.minutes * 60 / s_per_step * args.step_margin))
    sets = ["--set", f"train.steps={steps}", "--set", f"train.max_minutes={args.minutes}"]
    if args.mid:
        sets += ["--set", f"train.ckpt_every={max(1, round(steps * args.mid))}", "--set", "train.keep_last=4"]
    load_before = os.getloadavg()
    seconds = run(cli("train", "--preset", "mnist", "--run", str(d), "--threads", str(args.threads),
                      *backbone_sets(name), *sets), log)
    load_after = os.getloadavg()
    rows = read_metrics(d)
    log_txt = (d / "log.txt").read_text()
    params = next((int(w.replace(",", "")) for line in log_txt.splitlines() if "parameters" in line
                   for w in [line.split("from scratch: ")[1].split(" ")[0]]), None)
    info = {"backbone": name, "override": BACKBONES[name] or "preset", "params": params,
            "probe_s_per_step": s_per_step, "train_steps_config": steps, "steps_done": int(rows[-1]["step"]),
            "train_minutes": float(rows[-1]["wall_s"]) / 60, "command_seconds": seconds,
            "images_seen": int(rows[-1]["images"]), "loadavg_1min_before_after": [load_before[0], load_after[0]],
            "val_loss": [(float(r["wall_s"]) / 60, int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]],
            "checkpoints": sorted(p.name for p in (d / "checkpoints").iterdir() if p.name.startswith("step_"))}
    wall = {int(r["step"]): float(r["wall_s"]) / 60 for r in rows}
    info["checkpoint_minutes"] = {c: wall.get(int(c.split("_")[1]), math.nan) for c in info["checkpoints"]}
    info_file.write_text(json.dumps(info, indent=1))
    return info


def score(name: str, work: Path, ckpt: Path, tag: str, args, log: Path) -> dict:
    out = work / f"fid_{name}_{tag}.json"
    if out.exists():
        return json.loads(out.read_text())
    samples = work / f"samples_{name}_{tag}"
    if not (samples / "samples.json").exists():
        run(cli("sample", "--checkpoint", str(ckpt), "--outdir", str(samples), "--seeds", f"0-{args.n - 1}",
                "--batch", "250", "--threads", str(args.threads)), log)
    rec = json.loads((samples / "samples.json").read_text())
    if args.no_fid:
        res = {"fid": float("nan")}
    else:
        res = mnist_quality.main(["--samples", str(samples), "--n", str(args.n), "--threads", str(args.threads),
                                  "--label", f"{name} {tag}"])
    res = {"fid": res["fid"], "n": args.n, "checkpoint": ckpt.name, "step": rec["step"],
           "sampling_s": rec["seconds"], "nfe": rec["nfe"], "sampler": rec["sampler"], "steps": rec["steps"],
           "samples": samples.name}
    out.write_text(json.dumps(res, indent=1))
    return res


def save_grid(samples: Path, dest: Path, count: int = 64) -> None:
    import torch
    from torchdiffusion.pipelines.generate import make_grid, save_png
    from torchdiffusion.pipelines.images import load_sample_folder
    x, _ = load_sample_folder(samples)
    save_png(make_grid(x[:count], nrow=8), dest)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in result["backbones"].items():
        pts = sorted((s["train_minutes"], s["fid"]) for s in r["scores"])
        a.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{name} ({r['params'] / 1e6:.2f} M)")
        for m, f in pts:
            a.annotate(f"{f:.1f}", (m, f), textcoords="offset points", xytext=(4, 4), fontsize=8)
        vl = r["val_loss"]
        b.plot([v[0] for v in vl], [v[2] for v in vl], label=name)
    a.set_xlim(0, result["minutes"] * 1.15)
    a.set_ylim(0, 1.1 * max(s["fid"] for r in result["backbones"].values() for s in r["scores"]))
    a.set_xlabel("training minutes (2 CPU threads)")
    a.set_ylabel(f"FID-{result['n']} vs MNIST test[:{result['n']}]")
    a.set_title("Inception FID per CPU-minute (lower is better)")
    a.legend()
    b.set_xlabel("training minutes")
    b.set_ylabel("EDM-weighted validation loss")
    losses = [v[2] for r in result["backbones"].values() for v in r["val_loss"]]
    if losses:
        b.set_ylim(top=min(1.0, max(losses)))
    b.set_title("validation loss (512 images, every 100 steps)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=4.0, help="training budget per backbone (train.max_minutes)")
    ap.add_argument("--n", type=int, default=1000, help="samples per FID and MNIST test images as reference")
    ap.add_argument("--backbones", default="unet,dit,uvit")
    ap.add_argument("--mid", type=float, default=0.0, help="also score the checkpoint near this fraction of the run")
    ap.add_argument("--probe-minutes", type=float, default=0.3)
    ap.add_argument("--step-margin", type=float, default=1.0, help="train.steps = budget / probed s per step x this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "backbones_mnist")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--grids", type=Path, default=None, help="folder for a 64-sample grid per backbone")
    ap.add_argument("--no-fid", action="store_true", help="plumbing check: sample but do not score")
    args = ap.parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    result = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "minutes": args.minutes, "n": args.n,
              "recipe": "mnist preset (EDM), only model.backbone changed", "threads": args.threads,
              "fid": f"FID-{args.n}, bench/mnist_quality.py", "backbones": {}}
    names = [s for s in args.backbones.split(",") if s]
    trained = {name: train(name, work, args, log) for name in names}  # all training first: one job at a time
    for name in names:
        info = trained[name]
        ckpts = [work / name / "checkpoints" / c for c in info["checkpoints"]]
        final = ckpts[-1]
        scores = [dict(score(name, work, final, "final", args, log), train_minutes=info["train_minutes"])]
        if args.mid and len(ckpts) > 1:
            target = info["steps_done"] * args.mid
            mid = min(ckpts[:-1], key=lambda c: abs(int(c.name.split("_")[1]) - target))
            step = int(mid.name.split("_")[1])
            minutes = info["checkpoint_minutes"][mid.name]
            scores.append(dict(score(name, work, mid, f"step{step}", args, log), train_minutes=minutes))
        result["backbones"][name] = {**info, "scores": scores}
        if args.grids is not None:
            args.grids.mkdir(parents=True, exist_ok=True)
            save_grid(work / scores[0]["samples"], args.grids / f"backbones_grid_{name}.png")
        print(f"{name}: {info['params'] / 1e6:.2f} M params, {info['steps_done']} steps in "
              f"{info['train_minutes']:.2f} min, FID-{args.n} " + ", ".join(f"{s['fid']:.2f} @ {s['train_minutes']:.2f} min"
                                                                          for s in scores), file=sys.stderr)
    text = json.dumps(result, indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.plot is not None:
        plot(result, args.plot)
    print(text)
    return result


if __name__ == "__main__":
    main()

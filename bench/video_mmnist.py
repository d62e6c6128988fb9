#!/usr/bin/env python
"""Joint video + image training on Moving MNIST at equal compute (Ho et al. 2022, sec. 3), and temporal
extension by reconstruction guidance vs replacement.

    OMP_NUM_THREADS=1 nice -n 10 python bench/video_mmnist.py --video-steps 120 --out bench/results/video_mmnist

Data: Moving MNIST of this project (data.moving_mnist: 2 digits, 32x32, 8 frames, 10k training clips, the fixed
1k test clips). Model: the moving-mnist preset's unet3d (16/32/32 channels, temporal attention at 16x16 and 8x8),
EDM, batch 8 clips, constant lr 2e-3, EMA half-life 500 clips, one thread. Arms at equal compute (the same
number of frame-passes, which is what the CPU time of this per-frame network follows; the CPU seconds of every
arm's training process are measured and written): the video-only arm trains --video-steps steps, the arms with
4 images per clip 8/12 of them:
    video-only      8 frames per clip
    joint           8 frames + 4 independent images per clip, block-diagonal temporal mask (cond.frames.mask)
    joint-no-mask   the same batches, no mask: the images attend to the clip's frames
Metrics, on --n clips sampled per arm (EMA weights, Heun, --steps steps, seeds 0..n-1) against the first n test
clips:
    FD-MMNIST-motion  Frechet distance in the 32-d features of the project's Moving MNIST network (eval.video_metrics;
                      trained here for --motion-steps steps on the training clips; NOT the FVD of Unterthiner et al.)
    FID-frames / KID-frames  per-frame, TF-Inception pool3 (eval.inception) on the first --fid-clips clips' frames
                      (Inception costs ~0.6 s per frame on this CPU, hence the small N: compare arms, not papers)
Temporal extension (the joint arm's model): the first 4 frames of --extend-n test clips given, 4 generated, DDPM
--extend-steps steps; continuation error = RMS (model range) between the generated frames and the true ones.
Writes OUT.json, OUT.md, OUT_<arm>.png (frame grids) and OUT_<arm>.gif, OUT_extend.png.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from torchdiffusion.config.loaders import load_run
from torchdiffusion.config.build import build_sigmas
from torchdiffusion.data.convert import to_model_range, to_uint8
from torchdiffusion.data.moving_mnist import load_moving_mnist
from torchdiffusion.eval import InceptionFeatures
from torchdiffusion.eval.fid import fid_from_features
from torchdiffusion.eval.kid import kid_from_features
from torchdiffusion.eval.video_metrics import (MOTION_METRIC, MotionFeatures, fd_motion, frames_of, load_motion_net,
                                               motion_accuracy, protocol, save_motion_net, train_motion_net)
from torchdiffusion.pipelines.clips import frame_grid, save_frame_png, save_gif, tile_clips
from torchdiffusion.sampling.ode import sample_heun
from torchdiffusion.pipelines.generate import generate
from torchdiffusion.pipelines.video import restore_video
from torchdiffusion.sampling.ancestral import sample_ddpm
from torchdiffusion.core.grids import karras

ARMS = {  # arm -> (overrides, frames per clip in a batch)
    "video-only": (["data.image_frames=0"], 8),
    "joint": (["data.image_frames=4", "cond.frames.mask=true"], 12),
    "joint-no-mask": (["data.image_frames=4", "cond.frames.mask=false"], 12),
}
COMMON = ["data.val_split=null", "train.batch_size=8", "train.lr_schedule=constant", "train.warmup_steps=20",
          "train.ema_halflife_images=500", "train.max_minutes=0", "train.log_every=25", "train.sample_every=100000",
          "train.ckpt_every=100000", "train.val_every=100000",
          "sample.grid_images=4", "sample.steps=6"]


def train_arm(name: str, work: Path, steps: int) -> dict:
    """Train one arm in a child process; its CPU seconds (user + system, from the kernel's child accounting) and
    wall seconds are recorded."""
    run = work / name
    rec = {"run": str(run), "steps": steps}
    if not (run / "checkpoints").is_dir():
        args = [sys.executable, "-m", "torchdiffusion.cli.main", "train", "--preset", "moving-mnist", "--run", str(run),
                "--no-progress", "--threads", "1", "--set", f"train.steps={steps}"]
        for s in COMMON + ARMS[name][0]:
            args += ["--set", s]
        t0, r0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(args, check=True)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        rec.update(cpu_seconds=round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 1),
                   wall_seconds=round(time.time() - t0, 1))
        (run / "bench_train.json").write_text(json.dumps(rec))
        print(f"{name}: {rec}", flush=True)
    return json.loads((run / "bench_train.json").read_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--video-steps", type=int, default=120,
                    help="steps of the video-only arm; the arms with 4 images per clip get 8/12 of them")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--fid-clips", type=int, default=8)
    ap.add_argument("--motion-steps", type=int, default=500)
    ap.add_argument("--extend-n", type=int, default=8)
    ap.add_argument("--extend-steps", type=int, default=12)
    ap.add_argument("--work", type=Path, default=Path("runs/video_mmnist"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/video_mmnist"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    result = {"command": "OMP_NUM_THREADS=1 nice -n 10 python bench/video_mmnist.py " + " ".join(sys.argv[1:]),
              "data": "moving-mnist 32x32, 8 frames, 2 digits, 10k train clips; test = the fixed 1k test clips",
              "video_steps": args.video_steps, "n": args.n, "sampler": f"heun {args.steps} steps (EMA)",
              "torch": torch.__version__, "arms": {}}

    trained = {name: train_arm(name, args.work, round(args.video_steps * 8 / ARMS[name][1])) for name in ARMS}
    train = load_moving_mnist("train", resolution=32, frames=8)
    test = load_moving_mnist("test", resolution=32, frames=8)
    real = test.x[:args.n]
    t0 = time.time()
    if (args.work / "motion_net.safetensors").is_file():  # trained beforehand (eval motion-net), or by a last run
        net = load_motion_net(args.work / "motion_net")
        net_steps = json.loads((args.work / "motion_net.json").read_text())["steps"]
    else:
        net_steps = args.motion_steps
        net, rec = train_motion_net(train, steps=args.motion_steps, batch=32)
        save_motion_net(net, rec, args.work / "motion_net")
    motion = MotionFeatures(net)
    acc = motion_accuracy(net, test)
    perm = torch.tensor([3, 6, 0, 5, 1, 7, 2, 4])
    half = len(real) // 2
    result["motion_net"] = {**acc, "seconds": round(time.time() - t0, 1), "steps": net_steps,
                            "sha256": motion.sha256,
                            "fd_real_halves": fd_motion(real[:half], real[half:], motion)[MOTION_METRIC],
                            "fd_real_vs_shuffled_frames": fd_motion(real[:half], real[half:][:, :, perm], motion)[MOTION_METRIC]}
    print("motion net", result["motion_net"], flush=True)
    inception = InceptionFeatures(None)
    real_frames = None

    for name in ARMS:
        info = trained[name]
        run = load_run(Path(info["run"]), None, "ema", torch.device("cpu"))
        sigmas = build_sigmas(run.config.sample, run.model.process, steps=args.steps)
        cache = Path(info["run"]) / f"bench_samples_{args.n}_{args.steps}.pt"
        t0 = time.time()
        if cache.is_file():
            clips = torch.load(cache)
        else:
            clips = generate(run.model, list(range(args.n)), run.sample_shape, sample_heun, sigmas, batch=8)
            torch.save(clips, cache)
        sample_s = time.time() - t0
        fd = fd_motion(real, clips, motion)
        if real_frames is None:  # the reference frames' Inception features, once
            real_frames = inception(frames_of(real[:args.fid_clips]))
        fake_frames = inception(frames_of(clips[:args.fid_clips]))
        ff = {"fid_frames": float(fid_from_features(real_frames, fake_frames)),
              "kid_frames": float(kid_from_features(real_frames, fake_frames).mean),
              "protocol": protocol(real[:args.fid_clips], clips[:args.fid_clips], inception)}
        save_frame_png(frame_grid(clips[:8]), args.out.parent / f"{args.out.name}_{name}.png")
        save_gif(tile_clips(clips[:16]), args.out.parent / f"{args.out.name}_{name}.gif")
        result["arms"][name] = {"step": run.step, "train_cpu_seconds": info.get("cpu_seconds"),
                                "train_wall_seconds": info.get("wall_seconds"), MOTION_METRIC: fd[MOTION_METRIC],
                                "fid_frames": ff["fid_frames"], "kid_frames": ff["kid_frames"],
                                "protocol_motion": fd["protocol"], "protocol_frames": ff["protocol"],
                                "sample_seconds": round(sample_s, 1)}
        print(name, result["arms"][name], flush=True)

    # temporal extension with the joint model: 4 given frames -> 4 new ones
    run = load_run(args.work / "joint", None, "ema", torch.device("cpu"))
    given = to_model_range(test.x[:args.extend_n, :, :4])
    truth = to_model_range(test.x[:args.extend_n, :, 4:])
    sig = karras(args.extend_steps, run.model.process.sigma_min, run.model.process.sigma_max)
    result["extend"] = {"given": 4, "new": 4, "n": args.extend_n, "sampler": f"ddpm {args.extend_steps} steps", "rows": []}
    shown = [test.x[:4]]
    for method, w in (("replacement", 0.0), ("reconstruction", 1.0), ("reconstruction", 4.0), ("reconstruction", 16.0)):
        t0 = time.time()
        x, err, _ = restore_video(run.model, "extend", given, list(range(args.extend_n)), sig, method=method,
                                  weight=w, new_frames=4, sampler=sample_ddpm, batch=args.extend_n)
        cont = float((x[:, :, 4:] - truth).pow(2).mean().sqrt())
        result["extend"]["rows"].append({"method": method, "w_r": w, "continuation_rms": cont,
                                         "given_frames_rms": float(err.mean()), "seconds": round(time.time() - t0, 1)})
        print("extend", result["extend"]["rows"][-1], flush=True)
        shown.append(to_uint8(x[:4]))
    save_frame_png(frame_grid(torch.cat(shown)), args.out.parent / f"{args.out.name}_extend.png")
    result["total_seconds"] = round(time.time() - t_start, 1)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_md(result, args.out.with_suffix(".md"), args.out.name)


def write_md(r: dict, path: Path, stem: str) -> None:
    m = r["motion_net"]
    lines = [f"# Moving MNIST: joint video + image training at equal compute", "",
             f"Command: `{r['command']}` (total {r['total_seconds'] / 60:.1f} min, one thread).", "",
             f"Data: {r['data']}. Equal compute: the video-only arm trains {r['video_steps']} steps of 8 clips x 8 "
             f"frames, the arms with images 8/12 as many steps of 8 clips x (8 + 4) frames (the same frame-passes; "
             f"the CPU seconds each child process used are in the table). Samples: {r['n']} clips per arm, "
             f"{r['sampler']}.", "",
             f"{MOTION_METRIC} network (eval.video_metrics, {m['steps']} steps, {m['seconds']} s): digit-set accuracy "
             f"{m['digit_set_accuracy']:.2f}, direction-set accuracy {m['direction_set_accuracy']:.2f} on test clips; "
             f"FD between two halves of the real test clips {m['fd_real_halves']:.4f}, against the same clips with "
             f"shuffled frames {m['fd_real_vs_shuffled_frames']:.4f} (it sees motion).", "",
             f"| arm | steps | train CPU s | {MOTION_METRIC} | FID-frames (N={r['arms']['joint']['protocol_frames']['n_fake'] * 8} frames) | KID-frames |",
             "|---|---|---|---|---|---|"]
    for name, a in r["arms"].items():
        lines.append(f"| {name} | {a['step']} | {a['train_cpu_seconds']} | {a[MOTION_METRIC]:.4f} | {a['fid_frames']:.1f} | {a['kid_frames']:.4f} |")
    e = r["extend"]
    lines += ["", f"Temporal extension (joint model, {e['given']} frames given, {e['new']} generated, {e['n']} test "
                  f"clips, {e['sampler']}):", "", "| method | w_r | continuation RMS vs truth | given-frames RMS | s |",
              "|---|---|---|---|---|"]
    for row in e["rows"]:
        lines.append(f"| {row['method']} | {row['w_r']:g} | {row['continuation_rms']:.3f} | {row['given_frames_rms']:.1e} "
                     f"| {row['seconds']} |")
    lines += ["", f"Frame grids: `{stem}_<arm>.png` (a clip per row), animations `{stem}_<arm>.gif`, extension rows "
                  f"`{stem}_extend.png` (truth, then replacement, then w_r = 1, 4, 16)."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Video commands: `restore --task extend|interpolate|superres` on a video run (pipelines.video), and the video
metrics `eval fid-frames`, `eval motion-net` and `eval fd-motion` (eval.video_metrics).

Clips are read from a folder or ZIP of clips (data.video_folder: animated GIFs, and MP4/WebM/... with PyAV), such
as the folder `sample` writes for a video run, or from Moving MNIST (`--real moving-mnist`, its fixed test set
at the run's size).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from ..errors import ConfigError, DataError

VIDEO_TASKS = ("extend", "interpolate", "superres")


def _clips_from(spec: str, *, frames: int, resolution: int, n: int | None, what: str):
    """uint8 (N, C, T, H, W) from 'moving-mnist[:SPLIT]' or a folder / ZIP of clips."""
    from ..data.moving_mnist import load_moving_mnist
    from ..data.video_folder import load_video_folder
    if spec.split(":")[0] == "moving-mnist":
        split = spec.split(":", 1)[1] if ":" in spec else "test"
        x = load_moving_mnist(split, resolution=resolution, frames=frames, clips=n).x
    else:
        if not Path(spec).exists():
            raise DataError(f"{what} {spec}: no such folder or ZIP of clips (or give moving-mnist[:split])")
        x = load_video_folder(spec, frames=frames, resolution=resolution, bad_files="skip").x
    if n is not None:
        if len(x) < n:
            raise DataError(f"{what} {spec}: {len(x)} clips, --n {n} asks for more")
        x = x[:n]
    return x


def restore_clips(run, *, task, method, input_spec, outdir, given, new_frames, stride, scale, steps, weight,
                  seeds, limit, batch, sampler_fn, sampler_kw, sampler_name, device) -> None:
    """`restore` on a video run: the first `given` frames (extend), every `stride`-th frame (interpolate) or
    every frame at 1/scale of the size (superres) of each input clip are given; the rest is generated. Writes
    restored/NNNNNN.gif, frames.png (rows per clip: given, restored, original) and restore.json with the
    conditioning error (given frames) and, where the input holds them, the error of the generated frames."""
    from ..data.convert import to_model_range, to_uint8
    from ..pipelines.clips import frame_grid, save_frame_png, save_gif
    from ..pipelines.restore import restore_sigmas
    from ..pipelines.video import VIDEO_METHODS, restore_video
    from ..sampling.ancestral import sample_ddpm
    from .common import parse_seeds

    if method not in VIDEO_METHODS:
        raise ConfigError(f"--method {method}: a video task runs replacement, reconstruction (Ho et al. 2022) or "
                          f"guidance; valid: {', '.join(VIDEO_METHODS)}")
    c, t_model, h, w = run.sample_shape
    if task == "extend":
        k = given or max(1, t_model // 2)
        new = new_frames or t_model - k
        total = k + new
    elif task == "interpolate":
        k = given or (t_model - 1) // stride + 1
        total = stride * (k - 1) + 1
    else:
        total = t_model
    clips = _clips_from(str(input_spec), frames=total, resolution=h, n=limit, what="--input")
    x = to_model_range(clips)
    if task == "extend":
        part, known = x[:, :, :k], list(range(k))
    elif task == "interpolate":
        part, known = x[:, :, ::stride], list(range(0, total, stride))
    else:
        if h % scale or w % scale:
            raise ConfigError(f"--scale {scale} does not divide the model's frames {h}x{w}")
        part, known = torch.nn.functional.avg_pool2d(x.flatten(0, 1), scale).unflatten(0, x.shape[:2]), []
    seed_list = parse_seeds(seeds) if seeds else list(range(len(x)))
    if len(seed_list) < len(x):
        raise ConfigError(f"--seeds gives {len(seed_list)} seeds for {len(x)} clips; give one per clip")
    process = run.model.process
    sigmas = restore_sigmas(steps, process.sigma_min, process.sigma_max)
    t0 = time.perf_counter()
    out, err, _ = restore_video(run.model, task, part, seed_list[:len(x)], sigmas, method=method, weight=weight,
                                new_frames=total - len(known) if task == "extend" else 0, stride=stride, scale=scale,
                                sampler=sampler_fn or sample_ddpm, sampler_options=sampler_kw, batch=batch,
                                device=device)
    seconds = time.perf_counter() - t0
    unknown = [j for j in range(total) if j not in known] if task != "superres" else list(range(total))
    gen_err = float((out[:, :, unknown] - x[:, :, unknown]).pow(2).mean().sqrt())
    (outdir / "restored").mkdir(parents=True, exist_ok=True)
    restored = to_uint8(out)
    for s, clip in zip(seed_list, restored):
        save_gif(clip.transpose(0, 1), outdir / "restored" / f"{s:06d}.gif")
    shown = torch.zeros_like(clips) if task != "superres" else to_uint8(
        part.repeat_interleave(scale, 3).repeat_interleave(scale, 4))
    if task != "superres":
        shown[:, :, known] = clips[:, :, known]
    rows = torch.stack([shown[:8], restored[:8], clips[:8]], dim=1).flatten(0, 1)
    save_frame_png(frame_grid(rows), outdir / "frames.png")
    record = {"checkpoint": str(run.path), "step": run.step, "task": task, "method": method, "w_r": weight,
              "given_frames": known, "frames": total, "scale": scale if task == "superres" else None,
              "sampler": sampler_name or "ddpm", "steps": steps, "seeds": seed_list[:len(x)], "count": len(x),
              "input": str(input_spec), "conditioning_rms_error_mean": float(err.mean()),
              "generated_rms_error_vs_input": gen_err, "seconds": round(seconds, 3)}
    (outdir / "restore.json").write_text(json.dumps(record, indent=2))
    click.echo(f"restored {len(x)} clips ({task}, {method}, w_r {weight:g}) to {outdir} in {seconds:.1f} s; "
               f"conditioning RMS error {record['conditioning_rms_error_mean']:.2e}, generated frames vs input "
               f"RMS {gen_err:.3f}")


# --------------------------------------------------------------------------------------------- eval commands
def _clip_options(f):
    for opt in reversed([
        click.option("--real", default="moving-mnist:test", show_default=True,
                     help="Reference clips: moving-mnist[:split] or a folder / ZIP of clips."),
        click.option("--fake", required=True, type=click.Path(path_type=Path),
                     help="Generated clips: a folder of GIFs (what `sample` writes for a video run)."),
        click.option("--frames", type=int, required=True, help="Frames per clip (the protocol's clip length)."),
        click.option("--resolution", type=int, default=32, show_default=True, help="Frame size (square)."),
        click.option("--n", type=int, default=None, help="Clips on each side (default: all generated)."),
        click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the JSON result here."),
    ]):
        f = opt(f)
    return f


def _emit(result: dict, out) -> None:
    text = json.dumps(result, indent=2)
    if out is not None:
        Path(out).write_text(text)
    click.echo(text)


def _sides(real, fake, frames, resolution, n):
    x_fake = _clips_from(str(fake), frames=frames, resolution=resolution, n=n, what="--fake")
    x_real = _clips_from(real, frames=frames, resolution=resolution, n=len(x_fake), what="--real")
    return x_real, x_fake


@click.command("fid-frames")
@_clip_options
@click.option("--inception-weights", type=click.Path(path_type=Path), default=None,
              help="A local FID Inception file (default: the installed one).")
def fid_frames_cmd(real, fake, frames, resolution, n, out, inception_weights):
    """Per-frame FID and KID of generated clips (every frame an image; TF Inception pool3)."""
    from ..eval import InceptionFeatures
    from ..eval.video_metrics import fid_frames
    x_real, x_fake = _sides(real, fake, frames, resolution, n)
    _emit(fid_frames(x_real, x_fake, InceptionFeatures(inception_weights)), out)


@click.command("motion-net")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Writes OUT.safetensors and OUT.json (how it was trained, sha256).")
@click.option("--frames", type=int, default=8, show_default=True)
@click.option("--resolution", type=int, default=32, show_default=True)
@click.option("--steps", type=int, default=600, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def motion_net_cmd(out, frames, resolution, steps, seed):
    """Train the Moving MNIST feature network of FD-MMNIST-motion (digits and motion directions)."""
    from ..data.moving_mnist import load_moving_mnist
    from ..eval.video_metrics import motion_accuracy, save_motion_net, train_motion_net
    net, rec = train_motion_net(load_moving_mnist("train", resolution=resolution, frames=frames), steps=steps,
                                seed=seed)
    rec["test"] = motion_accuracy(net, load_moving_mnist("test", resolution=resolution, frames=frames))
    save_motion_net(net, rec, Path(out))
    click.echo(f"wrote {Path(out).with_suffix('.safetensors')}: {json.dumps(rec['test'])}")


@click.command("fd-motion")
@_clip_options
@click.option("--net", "net_path", type=click.Path(path_type=Path), required=True,
              help="The network of `eval motion-net` (OUT without suffix).")
@click.option("--sha256", default=None, help="Expected sha256 of its weights (recorded with the result).")
def fd_motion_cmd(real, fake, frames, resolution, n, out, net_path, sha256):
    """FD-MMNIST-motion of generated clips: the Frechet distance in the project's Moving MNIST video features
    (not FVD)."""
    from ..eval.video_metrics import MotionFeatures, fd_motion, load_motion_net
    x_real, x_fake = _sides(real, fake, frames, resolution, n)
    _emit(fd_motion(x_real, x_fake, MotionFeatures(load_motion_net(net_path, sha256))), out)


VIDEO_EVAL_COMMANDS = (fid_frames_cmd, motion_net_cmd, fd_motion_cmd)

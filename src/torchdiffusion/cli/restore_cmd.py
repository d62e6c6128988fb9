"""`torchdiffusion restore`: solve an inverse problem (inpainting, super-resolution, deblurring, colourisation)
on a folder of images with a trained model.

A class-conditional model restores with --labels (one label for all images, or one per image) or, where it was
trained with label dropout (cond.label.p_uncond > 0), with its null label; restore.json says which ("condition").
Outputs keep the input file names (restored/NAME.png, measurement/NAME.png), and no output is written before the
inputs, options and model have been checked.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from ..errors import ConfigError, DataError
from .common import progress_for, quiet_option

METHOD_OPTIONS = {  # method -> restore-function options this command passes on
    "ilvr": ("sigma_stop",), "mcg": ("scale", "prior_std"), "dps": ("scale", "prior_std"),
    "repaint": ("jump", "resample"), "reconstruction": ("weight",),
}
#: methods that work on a latent-space model (A o decode is not linear: no projection, only the DPS gradient)
LATENT_METHODS = ("dps",)


@click.command("restore")
@click.option("--run", "--run-dir", "run_dir", type=click.Path(path_type=Path), default=None,
              help="Run folder: its latest verified checkpoint is used.")
@click.option("--checkpoint", "ckpt_path", type=click.Path(path_type=Path), default=None, help="A checkpoint folder.")
@click.option("--task", type=click.Choice(["inpaint", "superres", "deblur", "colorize", "extend", "interpolate"]),
              required=True, help="Video runs: extend, interpolate or superres (docs/video.md).")
@click.option("--method", default=None,
              help="replacement (or pocs), ilvr, ccdf, mcg, dps, repaint or reconstruction (default repaint); video "
                   "runs: replacement, reconstruction or guidance (default reconstruction).")
@click.option("--sampler", "sampler_name", default=None,
              help="Sampler under the correction (replacement, pocs, ilvr, ccdf, mcg, dps, reconstruction): any grid "
                   "sampler name of `sample --sampler` (default ddpm); repaint has its own.")
@click.option("--sampler-opt", "sampler_opts", multiple=True, metavar="KEY=VALUE",
              help="An option of --sampler, e.g. eta=1 for ddim (repeatable).")
@click.option("--input", "input_dir", type=click.Path(path_type=Path), required=True,
              help="Folder or ZIP of the clean images to measure and restore (the model's size and channels); "
                   "video runs: a folder of clips or moving-mnist[:split].")
@click.option("--given", type=int, default=None,
              help="Video extend: frames given (default half the training clip); interpolate: frames given.")
@click.option("--new-frames", type=int, default=None, help="Video extend: frames to generate (default: the rest of "
                                                               "the training clip length).")
@click.option("--stride", type=int, default=2, show_default=True, help="Video interpolate: every STRIDE-th frame given.")
@click.option("--outdir", type=click.Path(path_type=Path), required=True,
              help="Writes restored/, measurement/, grid.png and restore.json.")
@click.option("--mask", type=click.Choice(["half", "box", "random"]), default="half", show_default=True)
@click.option("--half", type=click.Choice(["bottom", "top", "left", "right"]), default="bottom", show_default=True,
              help="Which half is missing (--mask half).")
@click.option("--missing", type=float, default=0.5, show_default=True, help="Missing fraction (--mask random).")
@click.option("--scale", type=int, default=4, show_default=True, help="Super-resolution factor.")
@click.option("--down", type=click.Choice(["avgpool", "bicubic"]), default="avgpool", show_default=True)
@click.option("--blur-sigma", type=float, default=2.0, show_default=True, help="Deblurring: kernel std in pixels.")
@click.option("--noise", "noise_std", type=float, default=0.0, show_default=True,
              help="Measurement noise std in the model range [-1, 1].")
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--sigma-start", type=float, default=None,
              help="First sigma of the grid (default: the model's sigma_max; ccdf: 2.0).")
@click.option("--seeds", default=None, help="One seed per image, e.g. 0-15 (default: 0..N-1).")
@click.option("--labels", default=None,
              help="Class-conditional models: one label for every image (3) or one per image (0-3, 0,5,7); "
                   "default: the null label where the model was trained with label dropout.")
@click.option("--limit", type=int, default=None, help="Restore only the first N images.")
@click.option("--batch", type=int, default=16, show_default=True)
@click.option("--dps-scale", "dps_scale", type=float, default=1.0, show_default=True, help="dps/mcg: gradient scale zeta.")
@click.option("--prior-std", type=float, default=None, help="dps/mcg: data std gamma (default: the model's sigma_data).")
@click.option("--jump", type=int, default=10, show_default=True, help="repaint: jump length.")
@click.option("--resample", type=int, default=10, show_default=True, help="repaint: resamplings per jump.")
@click.option("--weight", type=float, default=1.0, show_default=True, help="reconstruction: w_r.")
@click.option("--sigma-stop", type=float, default=0.0, show_default=True, help="ilvr: last sigma conditioned.")
@click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema", show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--device", default="auto", show_default=True)
@quiet_option
def restore_cmd(run_dir, ckpt_path, task, method, sampler_name, sampler_opts, input_dir, outdir, mask, half, missing,
                scale, down, blur_sigma, noise_std, steps, sigma_start, seeds, limit, batch, dps_scale, prior_std, jump,
                resample, weight, sigma_stop, weights, threads, device, labels=None, given=None, new_frames=None,
                stride=2):
    """Measure images with a task's operator and restore them; writes restored and measured images and a grid
    (rows of measurement, restoration, original)."""
    from ..config.loaders import load_run
    from ..config.registry import SAMPLERS, inverse_method, lookup
    from ..config.sampler_options import parse_sampler_options
    from ..data.convert import to_model_range, to_uint8
    from ..data.folder import load_image_folder
    from ..pipelines.generate import make_grid, save_png
    from ..pipelines.restore import (TaskConfig, build_operator, measurement_image, restore_images, restore_sigmas,
                                     solver_options)
    from .common import parse_labels, parse_seeds, resolve_device

    if threads:
        torch.set_num_threads(threads)
    if steps < 1 or batch < 1:
        raise ConfigError(f"--steps and --batch must be >= 1, got {steps} and {batch}")
    if run_dir is not None and _is_video_run(run_dir):
        return _restore_video(run_dir, ckpt_path, task, method, sampler_name, sampler_opts, input_dir, outdir, given,
                              new_frames, stride, scale, steps, weight, seeds, limit, batch, weights, device)
    if task in ("extend", "interpolate"):
        raise ConfigError(f"--task {task} is a video task; this run makes images (train a video run, e.g. "
                          f"--preset moving-mnist)")
    method, fn, nfe_of = inverse_method(method or "repaint")
    sampler_fn = sampler_nfe = None
    sampler_kw: dict = {}
    if sampler_name is not None:
        sampler_fn, sampler_nfe = lookup(SAMPLERS, sampler_name, "sampler")
        sampler_kw = parse_sampler_options(sampler_name, sampler_fn, sampler_opts)
    elif sampler_opts:
        raise ConfigError("--sampler-opt needs --sampler NAME (the default sampler under the correction is ddpm)")
    solver_options(method, {}, sampler_name, sampler_fn, sampler_nfe, sampler_kw)  # bad combinations fail here
    dev = resolve_device(device, 0)
    run = load_run(run_dir, ckpt_path, weights, dev)
    model = run.model
    from ..pipelines.generate import codec_decoder
    decode = codec_decoder(run.codec)
    if decode is not None and method not in LATENT_METHODS:
        from ..config.registry import kind_name
        raise ConfigError(f"--method {method} works in pixel space; this model diffuses in the latent space of "
                          f"model.codec.kind={kind_name('codec', run.config.model.codec)} (shape {run.sample_shape} "
                          f"for images {run.image_shape}), where restore runs through the decoder; valid: "
                          f"{', '.join(LATENT_METHODS)}")
    c, h, w = run.image_shape
    if not input_dir.exists():
        raise DataError(f"--input {input_dir}: no such folder or ZIP file")
    data = load_image_folder(input_dir, channels="L" if c == 1 else "RGB")
    images = data.x[:limit] if limit else data.x
    inputs = list(data.info.get("files", ()))[:len(images)] or [f"{i:06d}.png" for i in range(len(images))]
    names = output_names(inputs)
    if tuple(images.shape[1:]) != (c, h, w):
        raise DataError(f"--input images of shape {tuple(images.shape[1:])} do not fit the model's images of shape "
                        f"{(c, h, w)}; resize them (torchdiffusion data prepare) or pick another run")
    seed_list = parse_seeds(seeds) if seeds else list(range(len(images)))
    if len(seed_list) < len(images):
        raise ConfigError(f"--seeds gives {len(seed_list)} seeds for {len(images)} images; give one per image")
    seed_list = seed_list[:len(images)]
    condition, label_list, cond_for = restore_condition(run, parse_labels(labels), len(images), dev)

    cfg = TaskConfig(task=task, mask=mask, half=half, missing=missing, scale=scale, down=down,
                     blur_sigma=blur_sigma, noise_std=noise_std)
    op = build_operator(cfg, (c, h, w))
    x = to_model_range(images)
    op(x[:1])  # a scale that does not divide the size fails here, in one line
    values = {"scale": dps_scale, "prior_std": prior_std if prior_std is not None else model.precond.sigma_data,
              "jump": jump, "resample": resample, "weight": weight, "sigma_stop": sigma_stop}
    options = {k: values[k] for k in METHOD_OPTIONS.get(method, ())}
    nfe = nfe_of(steps, **options) if sampler_nfe is None else sampler_nfe(steps)
    method_options = solver_options(method, options, sampler_name, sampler_fn, sampler_nfe, sampler_kw)
    process = model.process
    top = sigma_start if sigma_start is not None else (2.0 if method == "ccdf" else process.sigma_max)
    sigmas = restore_sigmas(steps, process.sigma_min, top)

    t0 = time.perf_counter()
    done = [0]  # images written so far: outputs are named by position (seeds may repeat)

    def write(chunk, restored, y):  # the output folders appear with the first restored batch
        shown = measurement_image(op, y, (c, h, w))
        for a, b in zip(to_uint8(restored), to_uint8(shown)):
            name = names[done[0]]
            for sub, img in (("restored", a), ("measurement", b)):
                (outdir / sub / name).parent.mkdir(parents=True, exist_ok=True)
                save_png(img, outdir / sub / name)
            done[0] += 1

    with progress_for(len(images), "restore") as progress:
        result = restore_images(model, x, seed_list, op, noise_std, fn, sigmas, batch=batch, options=method_options,
                                device=dev, on_batch=write, cond_for=cond_for, progress=progress, decode=decode,
                                latent_shape=run.sample_shape if decode is not None else None)
    k = min(len(images), 16)
    shown = to_uint8(measurement_image(op, result.measurement[:k], (c, h, w)))
    rows = torch.cat([shown, to_uint8(result.restored[:k]), images[:k]])
    save_png(make_grid(rows, nrow=k), outdir / "grid.png")
    record = {"checkpoint": str(run.path), "step": run.step, "checkpoint_sha256": run.hashes(), "task": task,
              "operator": op.name, "task_config": cfg.__dict__, "method": method, "options": options,
              "sampler": sampler_name or ("ddpm" if method != "repaint" else "repaint"),
              "sampler_options": sampler_kw, "steps": steps, "nfe": nfe, "sigmas": [float(s) for s in sigmas],
              "seeds": seed_list, "count": len(images), "inputs": inputs, "outputs": names,
              "condition": condition, "labels": label_list,
              "measurement_rms_error_mean": float(result.error.mean()),
              "measurement_rms_error_max": float(result.error.max()),
              "seconds": round(time.perf_counter() - t0, 3), "torch": torch.__version__}
    (outdir / "restore.json").write_text(json.dumps(record, indent=2))
    click.echo(f"restored {len(images)} images ({task}, {method}, {record['nfe']} NFE) to {outdir} in "
               f"{record['seconds']:.1f} s; measurement RMS error {record['measurement_rms_error_mean']:.2e} "
               f"(noise {noise_std})")


def _is_video_run(run_dir: Path) -> bool:
    """Whether a run folder's config makes clips (model.data_shape (C, T, H, W)), read before any weight loads."""
    import yaml
    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False  # load_run says what is wrong with the folder
    return len((cfg.get("model") or {}).get("data_shape") or ()) == 4


def _restore_video(run_dir, ckpt_path, task, method, sampler_name, sampler_opts, input_spec, outdir, given, new_frames,
                   stride, scale, steps, weight, seeds, limit, batch, weights, device):
    from ..config.loaders import load_run
    from ..config.registry import SAMPLERS, lookup
    from ..config.sampler_options import parse_sampler_options
    from .common import resolve_device
    from .video import restore_clips
    if task not in ("extend", "interpolate", "superres"):
        raise ConfigError(f"--task {task}: a video run restores extend, interpolate or superres")
    sampler_fn, sampler_kw = None, {}
    if sampler_name is not None:
        sampler_fn, nfe = lookup(SAMPLERS, sampler_name, "sampler")
        if nfe(2) is None:
            raise ConfigError(f"--sampler {sampler_name} chooses its own steps and takes no per-step correction; "
                              f"pick a grid sampler (e.g. ddpm, heun, euler_ancestral)")
        sampler_kw = parse_sampler_options(sampler_name, sampler_fn, sampler_opts)
    elif sampler_opts:
        raise ConfigError("--sampler-opt needs --sampler NAME (the default sampler under the correction is ddpm)")
    dev = resolve_device(device, 0)
    run = load_run(run_dir, ckpt_path, weights, dev)
    restore_clips(run, task=task, method=method or "reconstruction", input_spec=input_spec, outdir=Path(outdir),
                  given=given, new_frames=new_frames, stride=stride, scale=scale, steps=steps, weight=weight,
                  seeds=seeds, limit=limit, batch=batch, sampler_fn=sampler_fn, sampler_kw=sampler_kw,
                  sampler_name=sampler_name, device=dev)


def output_names(inputs: list[str]) -> list[str]:
    """Output PNG names of input files (relative paths): the same path with .png for its suffix ('cat/a.jpg' ->
    'cat/a.png'); where two inputs would meet ('a.jpg' and 'a.png') both keep their whole name ('a.jpg.png')."""
    from collections import Counter
    plain = [str(Path(p).with_suffix(".png")) for p in inputs]
    seen = Counter(plain)
    return [q if seen[q] == 1 else f"{p}.png" for p, q in zip(inputs, plain)]


def restore_condition(run, labels, n: int, device):
    """pipelines.restore.restore_condition for a loaded run (its conditioners, classes and label dropout)."""
    from ..pipelines.restore import restore_condition as condition
    label_cfg = run.config.cond.get("label")
    return condition(run.conditioning, run.num_classes, getattr(label_cfg, "p_uncond", 0), labels, n, device)

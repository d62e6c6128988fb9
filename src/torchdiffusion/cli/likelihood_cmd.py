"""`torchdiffusion likelihood`: bits/dim of held-out images under a trained model.

Estimators (docs/likelihood.md; the computation is pipelines/likelihood.py):
- ode: the probability-flow ODE likelihood of uniformly dequantised images (sampling.likelihood), any model;
- vlb: the variational bound (core.vlb): the discrete DDPM/iDDPM bound for vp_discrete models, VDM's continuous
  bound for vdm models;
- auto: vlb for the models whose training objective is that bound's family (vp_discrete, vdm), ode otherwise.
Both report bits/dim of the 8-bit images in the same convention (level k <-> k / 127.5 - 1, unit bins), with the
mean and its standard error over images.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import click
import torch

from ..errors import ConfigError
from .common import progress_for, quiet_option, resolve_device, set_threads

ESTIMATORS = ("ode", "vlb", "auto")


@click.command("likelihood")
@click.option("--run", "--run-dir", "run_dir", type=click.Path(path_type=Path), default=None,
              help="Run folder: its latest verified checkpoint is used.")
@click.option("--checkpoint", "ckpt_path", type=click.Path(path_type=Path), default=None, help="A checkpoint folder.")
@click.option("--estimator", type=click.Choice(ESTIMATORS), default="auto", show_default=True,
              help="ode: probability-flow ODE; vlb: variational bound (vp_discrete, vdm); auto: vlb where the model "
                   "has one, else ode.")
@click.option("--n", "count", type=int, default=64, show_default=True, help="Number of images (the split's first N).")
@click.option("--split", default=None,
              help="Data split of the run's data set (train, val, test; default: test, or for an image folder the "
                   "run's held-out data.val_split).")
@click.option("--hutchinson", type=int, default=1, show_default=True,
              help="ode: Hutchinson probes per image; 0 = exact divergence (one backward pass per dimension).")
@click.option("--probe", type=click.Choice(["rademacher", "gaussian"]), default="rademacher", show_default=True)
@click.option("--rtol", type=float, default=1e-5, show_default=True, help="ode: relative tolerance (Song et al.: 1e-5).")
@click.option("--atol", type=float, default=1e-5, show_default=True, help="ode: absolute tolerance.")
@click.option("--method", type=click.Choice(["dopri5", "bosh3"]), default="dopri5", show_default=True)
@click.option("--sigma-min", type=float, default=None, help="ode: density at this sigma (default: the model's).")
@click.option("--sigma-max", type=float, default=None, help="ode: prior at this sigma (default: the model's).")
@click.option("--vlb-timesteps", type=int, default=None,
              help="vlb: discrete bound: stratified timesteps per image (default all T); VDM: times per image "
                   "(default 1).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the dequantisation noise and probes of image i from (seed, i).")
@click.option("--batch", type=int, default=16, show_default=True)
@click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write a JSON record here.")
@click.option("--threads", type=int, default=None)
@click.option("--device", default="auto", show_default=True)
@quiet_option
def likelihood(run_dir, ckpt_path, estimator, count, split, hutchinson, probe, rtol, atol, method, sigma_min,
               sigma_max, vlb_timesteps, seed, batch, weights, out, threads, device):
    """Bits/dim of the first N images of a split: mean and standard error."""
    from ..config.build import build_data
    from ..config.loaders import load_run
    from ..pipelines.likelihood import evaluate_bpd, has_vlb

    set_threads(threads)
    dev = resolve_device(device)
    if count < 1:
        raise ConfigError(f"--n must be >= 1, got {count}")
    if batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {batch}")
    if hutchinson < 0:
        raise ConfigError(f"--hutchinson must be >= 0 (0: exact divergence), got {hutchinson}")
    run = load_run(run_dir, ckpt_path, weights, dev)
    model, cfg = run.model, run.config
    model.autocast_dtype = None  # the ODE's divergence and the step control want fp32, whatever training used
    process = model.process
    if estimator == "auto":
        estimator = "vlb" if has_vlb(process) else "ode"
    if estimator == "vlb" and not has_vlb(process):
        from ..config.registry import kind_name
        raise ConfigError(f"--estimator vlb needs a vp_discrete or vdm model; this run's process is "
                          f"'{kind_name('process', cfg.model.process)}' (use --estimator ode)")
    s_min = sigma_min if sigma_min is not None else process.sigma_min
    s_max = sigma_max if sigma_max is not None else process.sigma_max
    if not (0 < s_min < s_max):
        raise ConfigError(f"need 0 < --sigma-min < --sigma-max, got {s_min}, {s_max}")
    if split is None:
        split = "test" if cfg.data.kind != "folder" else cfg.data.val_split
        if not split:
            raise ConfigError("this folder run holds no images out (it was trained without data.val_fraction); "
                              "score its training images with split 'train' (--split train), or train with "
                              "data.val_fraction (e.g. 0.05) to hold some out")
    dataset = build_data(cfg.data, split)
    if len(dataset) < count:
        raise ConfigError(f"--n {count}: split '{split}' has only {len(dataset)} images")
    x_all = dataset.x[:count]
    if run.sample_shape != run.image_shape:
        from ..config.registry import kind_name
        raise ConfigError(f"likelihood gives bits/dim of pixels; this model diffuses in the latent space of "
                          f"model.codec.kind={kind_name('codec', cfg.model.codec)} (shape {run.sample_shape}), whose "
                          f"density is not one of images; use a pixel-space run")
    if x_all.shape[1:] != run.sample_shape:
        raise ConfigError(f"split '{split}' images have shape {tuple(x_all.shape[1:])} but the model takes "
                          f"{run.sample_shape}")
    labels = dataset.label[:count] if run.num_classes > 0 else None  # the likelihood of an image given its label

    with progress_for(count, f"likelihood ({estimator})") as bar:
        res = evaluate_bpd(model, x_all, labels, estimator=estimator, seed=seed, batch=batch, device=dev,
                           sigma_min=s_min, sigma_max=s_max, hutchinson=hutchinson, probe=probe, rtol=rtol, atol=atol,
                           method=method, vlb_timesteps=vlb_timesteps,
                           progress=lambda done, total, seconds: bar(done, total))
    bpd, mean, se, seconds = res.bpd, res.mean, res.stderr, res.seconds
    if not math.isfinite(mean):
        raise ConfigError("the likelihood is not finite; check the model (NaN weights?) and --sigma-min")
    record = {"checkpoint": str(run.path), "step": run.step, "weights": weights,
              "checkpoint_sha256": run.hashes(), "estimator": estimator, "split": split, "n": count,
              "bits_per_dim": mean, "stderr": se, "per_image": [float(v) for v in bpd], "seed": seed,
              "batch": batch, "seconds": round(seconds, 3), "torch": torch.__version__}
    if estimator == "ode":
        record.update(divergence="exact" if hutchinson == 0 else f"hutchinson-{probe}", probes=hutchinson,
                      rtol=rtol, atol=atol, method=method, sigma_min=s_min, sigma_max=s_max,
                      dequantisation="uniform, x = (u8 + w - 1/2) / 127.5 - 1",
                      nfe_mean=res.nfe_mean)
    else:
        record.update(vlb_timesteps=vlb_timesteps)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2))
    extra = f", mean NFE {record['nfe_mean']:.0f}" if estimator == "ode" else ""
    click.echo(f"{estimator}: {mean:.4f} +- {se:.4f} bits/dim (n={count}, split {split}{extra}, {seconds:.1f} s)")

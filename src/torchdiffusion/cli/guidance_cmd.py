"""`torchdiffusion train-classifier`: the classifiers of classifier guidance (--noisy) and of judging samples.
(The guidance options of `sample` are in cli/sample_cmd.py.)"""
from __future__ import annotations

from pathlib import Path

import click
import torch

from ..errors import ConfigError


# --------------------------------------------------------------------------------------------- train-classifier


@click.command("train-classifier")
@click.option("--preset", default="mnist", show_default=True,
              help="Preset (mnist, fashion-mnist, ...) or YAML path: its data, and with --noisy its noise process.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Dotted override of the preset.")
@click.option("--noisy", is_flag=True, help="Train on x0 + sigma n across the process's noise levels (guidance).")
@click.option("--run", "--run-dir", "run_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--steps", type=int, default=None, help="Optimiser steps (default 800 clean, 2000 noisy).")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--width", type=int, default=16, show_default=True, help="Base channels of the encoder.")
@click.option("--seed", type=int, default=None, help="Default: the preset's seed.")
@click.option("--threads", type=int, default=None)
@click.option("--resume", default="none", show_default=True,
              help="none: a new run (the folder must hold no checkpoint); latest: continue the folder's latest "
                   "checkpoint; or a checkpoint folder.")
def train_classifier_cmd(preset, overrides, noisy, run_dir, steps, batch_size, lr, width, seed, threads, resume):
    """Train an image classifier (clean, for judging samples; --noisy, for classifier guidance)."""
    from ..config.build import build_data, build_process
    from ..config.presets_io import load_preset, resolve
    from ..config.registry import kind_name
    from ..config.strict import to_dict

    def process_dict(p) -> dict:
        return {"kind": kind_name("process", p), **to_dict(p)}
    from ..errors import CheckpointError
    from ..nn.classifier import Classifier, ClassifierConfig
    from ..train import checkpoint as ckpt
    from ..train import distributed
    from ..train.classifier import ClassifierTrainConfig, check_run_dir_free, train_classifier
    from .common import dist_info, set_threads  # torchrun's RANK / WORLD_SIZE / LOCAL_RANK; --threads

    ckpt_dir = run_dir / "checkpoints"
    if resume == "none":
        check_run_dir_free(run_dir)
        resume_from = None
    elif resume == "latest":
        resume_from = ckpt.resolve_latest(ckpt_dir) if ckpt_dir.exists() else None
    else:
        resume_from = Path(resume)
        if not resume_from.exists():
            raise CheckpointError(f"{resume_from}: --resume checkpoint does not exist; training does not silently "
                                  f"start fresh (use --resume none to start a new run)")
    info = dist_info()
    set_threads(threads, info.world_size)  # under torchrun: a share of the cores each, like train
    cfg = resolve(load_preset(preset), list(overrides))
    train_set = build_data(cfg.data)
    val_set = build_data(cfg.data, cfg.data.val_split) if cfg.data.val_split else None
    if train_set.num_classes < 2 or not train_set.labelled:
        raise ConfigError(f"train-classifier needs labelled data with >= 2 classes; data.kind={cfg.data.kind} has "
                          f"{train_set.num_classes} (for a folder set data.labels=folder)")
    process = build_process(cfg.model.process)
    h, w = train_set.image_size
    if h != w:
        raise ConfigError(f"train-classifier needs square images, got {h}x{w}; set data.resolution")
    ccfg = ClassifierConfig(image_size=h, in_channels=train_set.channels, num_classes=train_set.num_classes,
                            model_channels=width, sigma_data=cfg.model.sigma_data)
    tcfg = ClassifierTrainConfig(steps=steps or (2000 if noisy else 800), batch_size=batch_size, lr=lr, noisy=noisy,
                                 sigma_min=float(process.sigma_min), sigma_max=float(process.sigma_max))
    if batch_size % info.world_size:
        raise ConfigError(f"--batch-size {batch_size} must split evenly over {info.world_size} processes")
    seed = cfg.seed if seed is None else seed
    torch.manual_seed(seed)
    model = Classifier(ccfg)
    if info.is_main and resume_from is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        click.echo(f"training a {'noisy' if noisy else 'clean'} classifier: "
                   f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(train_set):,} images, "
                   f"{train_set.num_classes} classes"
                   + (f", sigma in [{tcfg.sigma_min:g}, {tcfg.sigma_max:g}]" if noisy else ""))
    device = torch.device("cpu")
    distributed.init(info, device)
    try:
        train_classifier(model, tcfg, train_set, val_set, run_dir, seed=seed, resume_from=resume_from,
                         stored_config={"data": to_dict(cfg.data), "process": process_dict(cfg.model.process)},
                         log=click.echo if info.is_main else None, dist=info, device=device)
    finally:
        distributed.shutdown(info)

"""Conditional generation on the command line: class conditioning of `train`, `train-classifier`, and the
guidance options of `sample` (the guided sampling itself is pipelines/guided.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence

import click
import torch

from ..errors import ConfigError
from .common import parse_labels


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
def train_classifier_cmd(preset, overrides, noisy, run_dir, steps, batch_size, lr, width, seed, threads):
    """Train an image classifier (clean, for judging samples; --noisy, for classifier guidance)."""
    from ..config.build import build_data, build_process
    from ..config.presets_io import load_preset, resolve
    from ..config.strict import to_dict
    from ..nn.classifier import Classifier, ClassifierConfig
    from ..train.classifier import ClassifierTrainConfig, check_run_dir_free, train_classifier

    check_run_dir_free(run_dir)
    if threads:
        torch.set_num_threads(threads)
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
    seed = cfg.seed if seed is None else seed
    torch.manual_seed(seed)
    model = Classifier(ccfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(run_dir / "log.txt", "a")

    def log(msg: str) -> None:
        click.echo(msg)
        log_file.write(msg + "\n")
        log_file.flush()

    log(f"training a {'noisy' if noisy else 'clean'} classifier: {sum(p.numel() for p in model.parameters()):,} "
        f"parameters, {len(train_set):,} images, {train_set.num_classes} classes"
        + (f", sigma in [{tcfg.sigma_min:g}, {tcfg.sigma_max:g}]" if noisy else ""))
    try:
        train_classifier(model, tcfg, train_set, val_set, run_dir, seed=seed,
                         stored_config={"data": to_dict(cfg.data), "process": to_dict(cfg.model.process)}, log=log)
    finally:
        log_file.close()


# --------------------------------------------------------------------------------------------- sample options
_SAMPLE_OPTIONS = [
    click.option("--labels", default=None,
                 help="Class labels, cycled over the seeds: 0-9, 3 or 0,5,7 (default for a class-conditional "
                      "model: 0..K-1)."),
    click.option("--guidance-scale", type=float, default=None,
                 help="Classifier-free guidance scale w: D_u + w (D_c - D_u); 1 = conditional, 0 = unconditional."),
    click.option("--guidance-interval", default=None, metavar="LO,HI",
                 help="Guide only for sigma in (LO, HI] (Kynkaanniemi et al. 2024); elsewhere w = 1."),
    click.option("--classifier", "classifier_run", type=click.Path(path_type=Path), default=None,
                 help="A train-classifier run (--noisy) for classifier guidance."),
    click.option("--classifier-scale", type=float, default=1.0, show_default=True,
                 help="Classifier guidance scale s: D + s sigma^2 grad log p(y | x, sigma)."),
    click.option("--reject", is_flag=True,
                 help="Regenerate samples whose label a classifier does not recover (see --reject-*)."),
    click.option("--reject-threshold", type=float, default=0.0, show_default=True,
                 help="Also reject samples whose classifier confidence p(y | x) is below this."),
    click.option("--reject-budget", type=int, default=None,
                 help="Extra generations allowed in total (default: the number of seeds)."),
    click.option("--reject-classifier", type=click.Path(path_type=Path), default=None,
                 help="Classifier run that judges samples for --reject (default: --classifier)."),
]


def guidance_options(f):
    """Adds the conditional-generation options to `sample`."""
    for opt in reversed(_SAMPLE_OPTIONS):
        f = opt(f)
    return f


def parse_interval(text: Optional[str]) -> Optional[tuple[float, float]]:
    """--guidance-interval 'LO,HI' -> (lo, hi) with 0 <= lo < hi (None stays None)."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--guidance-interval {text!r} is not valid; use LO,HI, e.g. 0.28,5.42") from None
    if not 0 <= lo < hi:
        raise ConfigError(f"--guidance-interval needs 0 <= LO < HI, got {lo:g},{hi:g}")
    return lo, hi


def guided_sampling(run, base, seed_list: Sequence[int], device, *, labels=None, guidance_scale=None,
                    guidance_interval=None, classifier_run=None, classifier_scale=1.0, reject=False,
                    reject_threshold=0.0, reject_budget=None, reject_classifier=None, world_size: int = 1):
    """The options of `guidance_options` -> pipelines.guided.GuidedSampling of `run` around `base` (run.model or
    a wrapper of it), with the classifiers loaded from their runs."""
    from ..config.loaders import load_classifier
    from ..pipelines.guided import GuidedSampling

    interval = parse_interval(guidance_interval)
    label_list = parse_labels(labels)
    classifier = load_classifier(classifier_run, device=device) if classifier_run is not None else None
    judge_run = reject_classifier or classifier_run
    judge = None
    if reject and judge_run is not None:
        if world_size > 1:
            raise ConfigError("--reject runs in one process; drop torchrun or --reject")
        judge = (classifier if reject_classifier is None and classifier is not None
                 else load_classifier(judge_run, device=device))
    return GuidedSampling(run.num_classes, base, seed_list, device, labels=label_list, labels_text=labels,
                          guidance_scale=guidance_scale, interval=interval, classifier=classifier,
                          classifier_scale=classifier_scale, reject=reject, judge=judge,
                          reject_threshold=reject_threshold, reject_budget=reject_budget, log=click.echo,
                          warn=lambda msg: click.echo(msg, err=True))

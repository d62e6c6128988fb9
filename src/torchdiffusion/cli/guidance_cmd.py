"""Conditional generation on the command line: class conditioning of `train`, and `train-classifier`."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence

import click
import torch

from ..errors import ConfigError
from .ranges import parse_int_ranges


def class_conditioning(cfg, train_set, info, device) -> tuple[object, Optional[Callable], Optional[Callable]]:
    """(cfg, make_cond, cond_for) for `train`: with cond.kind=class, model.unet.num_classes is set from the data
    (a value already set must match it), make_cond is the label-dropout data step and cond_for gives training
    grids the labels seed % K. With cond.kind=none both hooks are None."""
    from ..guidance.dropout import LabelDropout, class_labels_for_seeds

    u = cfg.model.unet
    if cfg.cond.kind == "none":
        if u.num_classes > 0:
            raise ConfigError(f"model.unet.num_classes={u.num_classes} needs class labels; set cond.kind=class "
                              f"(or model.unet.num_classes=0 for an unconditional model)")
        return cfg, None, None
    k = train_set.num_classes
    if k < 1 or not train_set.labelled:
        raise ConfigError(f"cond.kind=class needs labelled data, but data.kind={cfg.data.kind} has no class labels; "
                          f"use mnist or fashion-mnist, or data.labels=folder for an image folder")
    if u.num_classes not in (0, k):
        raise ConfigError(f"model.unet.num_classes={u.num_classes} but the data have {k} classes; "
                          f"leave it at 0 (set from the data) or set {k}")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, unet=dataclasses.replace(u, num_classes=k)))
    make_cond = LabelDropout(k, cfg.cond.p_uncond, cfg.seed, info.rank, info.world_size, device)

    def cond_for(seeds: Sequence[int]):
        return {"label": class_labels_for_seeds(seeds, k).to(device)}

    return cfg, make_cond, cond_for


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
    from ..config.strict import to_dict
    from ..errors import CheckpointError
    from ..nn.classifier import Classifier, ClassifierConfig
    from ..train import checkpoint as ckpt
    from ..train import distributed
    from ..train.classifier import ClassifierTrainConfig, check_run_dir_free, train_classifier
    from .main import _dist_info  # torchrun's RANK / WORLD_SIZE / LOCAL_RANK (main reads the environment)

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
    info = _dist_info()
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
                         stored_config={"data": to_dict(cfg.data), "process": to_dict(cfg.model.process)},
                         log=click.echo if info.is_main else None, dist=info, device=device)
    finally:
        distributed.shutdown(info)


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


def parse_labels(text: str, num_classes: int) -> list[int]:
    """'0-9' | '3' | '0,5,7' | '0-4,9' -> labels, each in [0, num_classes)."""
    try:
        out = parse_int_ranges(text)
    except ValueError:
        raise ConfigError(f"--labels {text!r} is not valid; use a label (3), a range (0-9), a list (0,5,7) "
                          f"or both") from None
    if not out:
        raise ConfigError("--labels is empty; use e.g. 0-9")
    bad = [v for v in out if not 0 <= v < num_classes]
    if bad:
        raise ConfigError(f"--labels {bad[0]} is out of range; this model/classifier has {num_classes} classes "
                          f"(0-{num_classes - 1})")
    return out


def _parse_interval(text: Optional[str]) -> Optional[tuple[float, float]]:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--guidance-interval {text!r} is not valid; use LO,HI, e.g. 0.28,5.42") from None
    if not 0 <= lo < hi:
        raise ConfigError(f"--guidance-interval needs 0 <= LO < HI, got {lo:g},{hi:g}")
    return lo, hi


class GuidedSampling:
    """What `sample` generates with: the (guided) denoiser, the labels per seed and, with --reject, the rejection
    loop. Without any of these options and with an unconditional model it is the plain `base` denoiser."""

    def __init__(self, run, base, seed_list: Sequence[int], device, *, labels=None, guidance_scale=None,
                 guidance_interval=None, classifier_run=None, classifier_scale=1.0, reject=False,
                 reject_threshold=0.0, reject_budget=None, reject_classifier=None, world_size: int = 1):
        from ..config.loaders import load_classifier
        from ..guidance.cfg import ClassifierFreeGuidance, null_label
        from ..guidance.classifier import ClassifierGuidance

        k_model = run.config.model.unet.num_classes
        interval = _parse_interval(guidance_interval)
        self.classifier = load_classifier(classifier_run, device=device) if classifier_run is not None else None
        judge_run = reject_classifier or classifier_run
        if reject and judge_run is None:
            raise ConfigError("--reject needs a classifier to judge samples: --reject-classifier RUN or --classifier RUN")
        if reject and world_size > 1:
            raise ConfigError("--reject runs in one process; drop torchrun or --reject")
        self.judge = None
        if reject:
            self.judge = (self.classifier if reject_classifier is None and self.classifier is not None
                          else load_classifier(judge_run, device=device))
        k_clf = [m.cfg.num_classes for m in (self.classifier, self.judge) if m is not None]
        if k_model and any(k != k_model for k in k_clf):
            raise ConfigError(f"the model has {k_model} classes but the classifier has {k_clf[0]}")
        k = k_model or (k_clf[0] if k_clf else 0)
        if guidance_scale is not None and not k_model:
            raise ConfigError("--guidance-scale needs a class-conditional model (train with --set cond.kind=class); "
                              "for an unconditional model use --classifier RUN --classifier-scale S")
        if interval is not None and guidance_scale is None and self.classifier is None:
            raise ConfigError("--guidance-interval applies to --guidance-scale or --classifier guidance")
        if labels is not None and not k:
            raise ConfigError("--labels needs a class-conditional model or a --classifier; this model is "
                              "unconditional")
        label_list = parse_labels(labels, k) if labels is not None else (list(range(k)) if k else None)
        self.labels = ([label_list[i % len(label_list)] for i in range(len(seed_list))]
                       if label_list is not None and (k_model or self.classifier is not None or reject) else None)
        self.device = device
        self.label_of = dict(zip(seed_list, self.labels)) if self.labels is not None else {}
        denoiser = base  # run.model, or a wrapper of it (e.g. an NFE counter)
        if k_model and guidance_scale is not None and guidance_scale != 1.0:
            denoiser = ClassifierFreeGuidance(denoiser, guidance_scale, null_label(k_model), interval=interval)
        if self.classifier is not None:
            denoiser = ClassifierGuidance(denoiser, self.classifier, classifier_scale,
                                          denoiser_cond="same" if k_model else "none", interval=interval)
        self.denoiser = denoiser
        self.reject, self.reject_threshold, self.reject_budget = reject, reject_threshold, reject_budget
        self.result = None
        self.settings = {
            "labels": labels, "guidance_scale": guidance_scale if k_model else None,
            "guidance_interval": list(interval) if interval else None,
            "classifier": str(self.classifier.checkpoint_path) if self.classifier is not None else None,
            "classifier_noisy": self.classifier.noisy if self.classifier is not None else None,
            "classifier_scale": classifier_scale if self.classifier is not None else None,
        }
        if self.classifier is not None and not self.classifier.noisy:
            click.echo("warning: --classifier was trained on clean images only; guidance needs a noisy "
                       "classifier (train-classifier --noisy)", err=True)

    def cond_for(self, labels: Sequence[int]):
        """cond_for for generate(): the labels of consecutive chunks, in order."""
        if self.labels is None:
            return None
        pos = [0]

        def cond(chunk):
            out = torch.tensor(labels[pos[0]:pos[0] + len(chunk)], dtype=torch.int64, device=self.device)
            pos[0] += len(chunk)
            return {"label": out}

        return cond

    def generate(self, generate_fn, seeds: Sequence[int], shape, sampler, sigmas, *, batch, device, on_batch=None):
        """generate_fn is pipelines.generate.generate (same arguments, the guided denoiser and labels added)."""
        denoiser = self.denoiser
        labels = [self.label_of[s] for s in seeds] if self.labels is not None else None
        if not self.reject:
            return generate_fn(denoiser, seeds, shape, sampler, sigmas, batch=batch, device=device,
                               cond_for=self.cond_for(labels) if labels is not None else None, on_batch=on_batch)
        from ..data.convert import to_model_range
        from ..pipelines.rejection import rejection_sample

        def gen(s, y):
            return generate_fn(denoiser, s, shape, sampler, sigmas, batch=batch, device=device,
                               cond_for=self.cond_for(y.tolist()))

        @torch.no_grad()
        def classify(images):
            return torch.softmax(self.judge(to_model_range(images).to(device)).float(), dim=1).cpu()

        self.result = rejection_sample(gen, classify, list(seeds), torch.tensor(labels),
                                       threshold=self.reject_threshold, budget=self.reject_budget)
        summ = self.result.summary()
        click.echo(f"rejection: {summ['accepted']}/{summ['count']} accepted after {summ['generated']} generations "
                   f"(acceptance rate {summ['acceptance_rate']:.3f}, final accuracy {summ['final_accuracy']:.3f} by "
                   f"the judging classifier)")
        if on_batch is not None:
            on_batch(list(seeds), self.result.samples)
        return self.result.samples

    def record(self) -> dict:
        out = {k: v for k, v in self.settings.items() if v is not None}
        if self.labels is not None:
            out["label_per_seed"] = self.labels
        if self.result is not None:
            out["rejection"] = {**self.result.summary(), "threshold": self.reject_threshold,
                                "classifier": str(self.judge.checkpoint_path), "final_seeds": self.result.seeds,
                                "attempts": self.result.attempts}
        return out

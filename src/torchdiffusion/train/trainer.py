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
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..core.objectives import Objective
from ..core.precond import Preconditioned, describe_precision
from ..data.order import iterate_batches
from ..errors import EXIT_PREEMPTED as _EXIT_PREEMPTED, TorchDiffusionError
from ..protocols import Cond
from ..seeding import linear_step_seed
from . import checkpoint as ckpt
from . import guard, inloop
from .inloop import Evaluator, interleave  # noqa: F401 (the names' former home)
from .loop_config import RESUMABLE_CHANGES, TrainConfig, _diff_configs, changed_keys  # noqa: F401 (the same)
from .budget import CALIBRATION_STEPS, BudgetPlanner, fraction_step, loop_events
from .distributed import DistInfo, barrier
from .ema import ema_beta, ema_update
from .logger import METRIC_COLUMNS, RunLogger, step_message
from .schedule import lr_at_step
from .state import capture_rng, restore_rng
from .step import LoopContext, StepState, TrainStep


class TrainingError(TorchDiffusionError):
    pass


#: exit code after a SIGTERM/SIGINT stop that saved a resumable checkpoint (the table in errors.py)
EXIT_PREEMPTED = _EXIT_PREEMPTED


def step_seed(seed: int, step: int) -> int:
    """Seed of the diffusion step's training-noise generator of global step `step` (seeding.linear_step_seed)."""
    return linear_step_seed(seed, step)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to cfg.lr, then constant or cosine decay to 0 at cfg.steps (train.schedule)."""
    return lr_at_step(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_schedule)


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
        # train.fit_minutes (train.budget): planned after calibration, re-planned at the end of the warm-up
        self.budget = BudgetPlanner(cfg.fit_minutes, cfg.steps, replan_at=cfg.warmup_steps, batch=cfg.batch_size,
                                    events=loop_events(cfg, val_set, sample_grid if dist.is_main else None))
        self.own_s = 0.0  # seconds of this fit spent in the loop's own work (validation, grids, checkpoints)
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
    model = property(lambda self: self.train_step_obj.model)
    ema = property(lambda self: self.train_step_obj.ema)
    opt = property(lambda self: self.train_step_obj.opt)
    eval_model = property(lambda self: getattr(self.train_step_obj, "eval_model", None))

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
        changed = changed_keys(self.complete_config(c.meta["config"]), self.resolved_config)
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
            self.budget.resume(int(planned), bool(c.meta["trainer"].get("replanned", True)))
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

    def _observe_budget(self, log: RunLogger) -> bool:
        """train.fit_minutes: give the planner this step's times; a (re-)plan sets the run's length, True."""
        planned = self.budget.observe(self.step, self.wall_s(), self.own_s)
        if planned is None:
            return False
        self._apply_plan(planned)
        if log.bar is not None:
            log.bar.total = planned
        b = self.budget
        how = (f"measured since the first plan ({b.first} steps), the validations and sample grids still to come "
               f"reserved" if b.stage == 2 else f"measured over {CALIBRATION_STEPS} steps")
        log.info(f"train.fit_minutes {self.cfg.fit_minutes:g}: {b.rate * self.cfg.batch_size:.1f} img/s {how}, so "
                 f"this run trains {planned} steps (train.steps {b.cap})")
        return True

    def _own(self, work: Callable[[], object]):
        """Run a piece of the loop's own work, its seconds counted apart from the steps' (train.budget)."""
        t0 = self.wall_s()
        try:
            return work()
        finally:
            self.own_s += self.wall_s() - t0

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

    def evaluate(self) -> dict:
        """FID/KID of the EMA's samples, gathered over the processes (train.inloop.evaluate)."""
        return inloop.evaluate(self)

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
            log.info(f"training from scratch: {n_params:,} parameters, {len(self.train_set):,} training images, "
                     f"global batch {cfg.batch_size} on {self.dist.world_size} process(es)")
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
                if self._observe_budget(log):
                    cfg = self.cfg
                row = {"step": self.step, "images": self.step * cfg.batch_size, **out}
                evaluating = self.evaluator is not None and (self.step % cfg.eval_every == 0 or self.step == cfg.steps)
                validating = self.step % cfg.val_every == 0 or self.step == cfg.steps or evaluating
                if validating:
                    if self.dist.is_main:
                        row.update(self._own(self.validation))
                out_of_patience, scores = False, None
                if evaluating:
                    scores = self._own(self.evaluate)
                    row.update({k: float(scores[k]) for k in ("fid", "kid", "kid_std")})
                    inloop.record_evaluation(self, scores, log)
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
                    log.info(step_message(self.step, cfg.steps, out, row, row["images_per_s"] if logged_row
                                          else round(rate, 2), cfg.batch_size))
                    t_line, step_line = now, self.step
                log.metrics(row)
                log.progress(self.step, {k: v for k, v in out.items() if k == "loss" or k.endswith("_loss")})
                if self.sample_grid is not None and self.dist.is_main and (
                        self.step % cfg.sample_every == 0 or self.step == cfg.steps):
                    self._own(lambda: self._sample_grid(log))
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
                    last_ckpt = self._own(self.save)
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


TrainLoop = Trainer  # the loop's name in the step design; Trainer stays the public name

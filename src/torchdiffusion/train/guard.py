"""The training guard: stop a run that starts to memorise, and keep its best-validation weights.

Two optional rules, checked by the loop (train.trainer) after each validation / in-loop evaluation:

1. Validation loss. A rising validation loss while the training loss keeps falling is a necessary condition
   for memorisation (eval.memorization): the model fits its training images better than unseen ones. A
   validation counts as "risen" when val_loss > (1 + val_tolerance) x the best val_loss so far; the run stops
   after `val_patience` risen validations in a row (a new best resets the count). With val_patience > 0 the
   weights (raw and EMA) of the best validation are kept in checkpoints/best_val/ (never pruned by keep_last).
2. Near-copies. The in-loop evaluation's audit (eval.inloop with train.eval_audit > 0) reports the share of its
   samples that are near-copies of training images by the ratio test (d1/d2 < 1/3, Yoon et al. 2023; Gu et al.
   2023); the run stops when that share exceeds `stop_near_copy_share`.

A stop is logged (log.txt and a `guard` row of metrics.csv: 1 = stopped by the validation rule, 2 = by the
near-copy rule), described in RUN/eval/guard.json, and shown by the report (pipelines.report). The guard's
state travels in the checkpoint's trainer meta, so a resumed run counts on from where it stopped.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from . import checkpoint as ckpt

#: metrics.csv values of the `guard` column on the stopping row
STOP_CODES = {"val_loss": 1, "near_copy": 2}


def check_config(cfg) -> None:
    """ValueError (shown as one config line) for bad guard settings of a train.trainer.TrainConfig."""
    if cfg.val_patience < 0:
        raise ValueError(f"train.val_patience must be >= 0 (0: never stop on the validation loss), got "
                         f"{cfg.val_patience}")
    if not (isinstance(cfg.val_tolerance, (int, float)) and math.isfinite(cfg.val_tolerance)
            and cfg.val_tolerance >= 0):
        raise ValueError(f"train.val_tolerance must be a finite number >= 0 (relative), got {cfg.val_tolerance}")
    if not 0.0 <= cfg.stop_near_copy_share <= 1.0:
        raise ValueError(f"train.stop_near_copy_share must be in [0, 1] (0: off), got {cfg.stop_near_copy_share}")
    if cfg.eval_audit < 0:
        raise ValueError(f"train.eval_audit must be >= 0 (training images the in-loop audit compares with; 0: off), "
                         f"got {cfg.eval_audit}")
    if cfg.stop_near_copy_share > 0 and not (cfg.eval_every > 0 and cfg.eval_audit > 0):
        raise ValueError("train.stop_near_copy_share needs the in-loop audit: set train.eval_every > 0 and "
                         "train.eval_audit > 0 (e.g. 2000 training images)")


class TrainingGuard:
    """State and decisions of the two stop rules (module docstring). Pure bookkeeping: the loop feeds it the
    validation losses and audit shares and acts on what it answers."""

    def __init__(self, val_patience: int = 0, val_tolerance: float = 0.02, stop_near_copy_share: float = 0.0):
        self.val_patience, self.val_tolerance = int(val_patience), float(val_tolerance)
        self.stop_near_copy_share = float(stop_near_copy_share)
        self.best_val, self.best_val_step, self.val_risen = math.inf, None, 0
        self.reason: Optional[str] = None  # "val_loss" | "near_copy" once a rule fired
        self.detail = ""

    @classmethod
    def from_config(cls, cfg) -> "TrainingGuard":
        return cls(cfg.val_patience, cfg.val_tolerance, cfg.stop_near_copy_share)

    @property
    def enabled(self) -> bool:
        return self.val_patience > 0 or self.stop_near_copy_share > 0

    def observe_val(self, step: int, val_loss: float) -> bool:
        """Record a validation loss; True when it is a new best (the caller keeps the best-validation weights)."""
        improved = math.isfinite(val_loss) and val_loss < self.best_val
        if improved:
            self.best_val, self.best_val_step, self.val_risen = float(val_loss), int(step), 0
        elif not math.isfinite(val_loss) or val_loss > (1.0 + self.val_tolerance) * self.best_val:
            self.val_risen += 1
        else:  # within the tolerance of the best: flat, not risen
            self.val_risen = 0
        if self.reason is None and 0 < self.val_patience <= self.val_risen:
            self.reason = "val_loss"
            self.detail = (f"validation loss above (1 + {self.val_tolerance:g}) x its best {self.best_val:.5g} (step "
                           f"{self.best_val_step}) for {self.val_risen} validations in a row (train.val_patience)")
        return improved

    def observe_audit(self, step: int, near_copy_share: float) -> None:
        if self.reason is None and 0 < self.stop_near_copy_share < near_copy_share:
            self.reason = "near_copy"
            self.detail = (f"the in-loop audit's near-copy share {near_copy_share:.3f} passed "
                           f"train.stop_near_copy_share {self.stop_near_copy_share:g}")

    # ------------------------------------------------------------------ checkpoint meta
    def meta(self) -> dict:
        if self.best_val_step is None and self.reason is None:
            return {}
        return {"guard": {"best_val": self.best_val if math.isfinite(self.best_val) else None, "best_val_step": self.best_val_step,
                          "val_risen": self.val_risen, "reason": self.reason, "detail": self.detail}}

    def load(self, trainer_meta: dict) -> None:
        g = trainer_meta.get("guard")
        if not g:
            return
        self.best_val = float(g["best_val"]) if g.get("best_val_step") is not None else math.inf
        self.best_val_step = g.get("best_val_step")
        self.val_risen = int(g.get("val_risen", 0))
        self.reason, self.detail = g.get("reason"), g.get("detail", "")


def save_best_val(trainer, val_loss: float) -> Optional[Path]:
    """Keep the step's weights in RUN/checkpoints/best_val/ (one checkpoint, replaced on improvement). Main
    process only; a sharded step gathers its weights collectively first (the caller runs this on every process)."""
    weights = trainer.train_step_obj.weights() if trainer.ctx.sharded else None
    if not trainer.dist.is_main:
        return None
    best_dir = trainer.ckpt_dir / "best_val"
    path = ckpt.save_checkpoint(
        best_dir, trainer.step, tensors=weights or trainer.train_step_obj.weights(),
        meta={"config": trainer.resolved_config, "val_loss": val_loss,
              "trainer": {"step": trainer.step, "images_seen": trainer.step * trainer.cfg.batch_size},
              "data_fingerprint": trainer.data_fingerprint},
        data_fingerprint=trainer.data_fingerprint)
    ckpt.prune(best_dir, 1)
    return path


def write_stop(run_dir: Path, guard: TrainingGuard, step: int) -> dict:
    """RUN/eval/guard.json: why and where the guard stopped the run, and the best validation."""
    record = {"stopped_at": step, "reason": guard.reason, "detail": guard.detail,
              "best_val_step": guard.best_val_step,
              "best_val_loss": guard.best_val if guard.best_val_step is not None else None,
              "best_val_checkpoint": "checkpoints/best_val" if guard.best_val_step is not None else None}
    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "guard.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out / "guard.json")
    return record


def _share(dist, value):
    """value as the main process has it, on every process (so all take the same decision)."""
    if not dist.enabled:
        return value
    import torch.distributed as tdist
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def on_checks(trainer, row: dict, scores: Optional[dict], log) -> bool:
    """The loop's call after a step's validation (row["val_loss"], main process) and in-loop evaluation (scores,
    every process): update the guard, keep the best-validation weights, and on the first firing of a rule log
    it, mark the metrics row (`guard` column) and write eval/guard.json. True when a rule fired now."""
    g = trainer.guard
    if scores is not None and "near_copy_share" in scores:
        row["near_copy_share"] = float(scores["near_copy_share"])
    if not g.enabled:
        return False
    before = g.reason
    improved = False
    if trainer.dist.is_main and isinstance(row.get("val_loss"), float):
        improved = g.observe_val(trainer.step, row["val_loss"])
    if scores is not None and "near_copy_share" in scores:
        g.observe_audit(trainer.step, float(scores["near_copy_share"]))
    improved, g.reason, g.detail = _share(trainer.dist, (improved, g.reason, g.detail))
    if improved and g.val_patience > 0:
        save_best_val(trainer, row.get("val_loss"))
    if g.reason is None or before is not None:
        return False
    row["guard"] = STOP_CODES[g.reason]
    if trainer.dist.is_main:
        write_stop(trainer.run_dir, g, trainer.step)
        log.info(f"step {trainer.step}: training guard: {g.detail}"
                 + (f"; best validation at step {g.best_val_step} kept in checkpoints/best_val"
                    if g.best_val_step is not None and g.val_patience > 0 else ""))
    return True


def resumed_stop(trainer) -> bool:
    """At the start of a resumed fit: True when the run was stopped by a rule that is still on (the loop then
    returns at once); a rule switched off since (e.g. train.val_patience=0) lets the run continue."""
    g = trainer.guard
    still_on = {"val_loss": g.val_patience > 0, "near_copy": g.stop_near_copy_share > 0}
    if g.reason is not None and still_on.get(g.reason, False):
        return True
    if g.reason is not None:  # its rule is off now: count afresh
        g.reason, g.detail, g.val_risen = None, "", 0
    return False

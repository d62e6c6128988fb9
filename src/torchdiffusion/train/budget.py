"""Fitting a run's length to a time budget (train.fit_minutes): the same recipe on a slow and on a fast machine.

A fixed step count trains for 9 minutes on one 2-core machine and for 28 on another (the mnist preset: ~185 img/s
with native bf16, ~60 img/s on an AVX2-only CPU). Cutting the slow run with train.max_minutes stops it mid-way down
its cosine schedule, with the learning rate still high. With train.fit_minutes = M the loop instead measures its
own speed once, over CALIBRATION_STEPS steps after the first (which carries warm-up costs), and fixes the run's
length at

    planned = min(train.steps, k + floor(MARGIN * (60 M - t_k) * r))

with k the step, t_k the training seconds so far and r the measured steps per second; MARGIN leaves room for the
loop's validation, sample grids and checkpoints, which the measured steps do not contain. The learning-rate
schedule is then re-planned to end at `planned` (it is a pure function of the step and the total, train.schedule);
calibration ends inside the warm-up of any preset that uses it, where the schedule does not depend on the total,
so no step before it saw another learning rate than a run planned from the start. `planned` is stored in every
checkpoint (trainer.planned_steps) and a resumed run keeps it, so resume stays bit-exact; it is logged, and
metrics.csv's step column shows it. train.max_minutes stays the hard stop.

Where the warm-up is longer than the calibration (mnist-cond: 100 steps against 21), the loop re-plans once more
at the end of the warm-up, still before the schedule depends on the total, from what it has measured by then:

    planned = largest N <= train.steps with  (N - k) * s  +  reserve(k, N)  <=  REPLAN_MARGIN * (60 M - t_k)

with s the seconds per step measured since the first plan (the loop's own work excluded, it is timed apart) and
reserve the loop's work still to come between step k and N: every validation (val_every, val_images images) and
every sample grid (sample_every, grid images x the sampler's denoiser calls), each counted on its cadence and at
the last step, and costed at FORWARD_SHARE of a training step's time per image for each forward pass (a backward
costs about two forwards). The first plan's MARGIN covers that work as a flat share and its 20 steps often run
slower than the later ones, so the first plan alone left ~12 % of the budget unused on a steady 2-core machine
(642 steps in 8.8 of 10 minutes); the re-plan corrects both ways, also when the machine slows down after the
calibration. A run resumed from a checkpoint written before the re-plan re-measures (the re-plan then needs
CALIBRATION_STEPS steps of the resumed process before the warm-up ends, else the first plan stands); from any later
checkpoint it keeps the stored plan, bit-exactly.

A planned run's length depends on the machine it started on; two machines give two different (each
deterministic) runs. Set fit_minutes = 0 for a fixed length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

CALIBRATION_STEPS = 20
MARGIN = 0.92
REPLAN_MARGIN = 0.97  # checkpoints, log lines and drift of the rate, which the reserve does not count
FORWARD_SHARE = 1 / 3  # one forward pass of an image, as a share of a training step's time per image


@dataclass(frozen=True)
class LoopEvent:
    """Work the loop does every `every` steps and at its last step, costing `forward_images` forward passes of
    one image (a validation: val_images; a sample grid: images x denoiser calls)."""
    every: int
    forward_images: int


def loop_events(cfg, val_set, sample_grid) -> list[LoopEvent]:
    """The loop's own work on a cadence (a train.TrainConfig's): its validations on val_set, and the sample grids
    of `sample_grid` (its attribute forward_images: grid images x denoiser calls; 0 when it does not say)."""
    events = [LoopEvent(cfg.val_every, min(cfg.val_images, len(val_set)))] if val_set is not None else []
    if sample_grid is not None:
        events.append(LoopEvent(cfg.sample_every, int(getattr(sample_grid, "forward_images", 0))))
    return events


def events_between(every: int, step: int, total: int) -> int:
    """How many of the steps step+1..total hold an event of this cadence (multiples of `every`, and the last)."""
    if total <= step or every <= 0:
        return 0
    return total // every - step // every + (0 if total % every == 0 else 1)


def reserve_s(events: Sequence[LoopEvent], step: int, total: int, step_s: float, batch: int) -> float:
    """Seconds of the loop's own work in steps step+1..total, at FORWARD_SHARE * step_s / batch per forward image."""
    per_image = FORWARD_SHARE * step_s / max(batch, 1)
    return sum(events_between(e.every, step, total) * e.forward_images * per_image for e in events)


def replanned_steps(cap: int, step: int, elapsed_s: float, step_s: float, minutes: float,
                    events: Sequence[LoopEvent] = (), batch: int = 1) -> int:
    """The largest length N in step+1..cap whose steps and loop work fit REPLAN_MARGIN of the time left."""
    if not step_s > 0:
        return cap
    left = REPLAN_MARGIN * max(0.0, 60.0 * minutes - elapsed_s)

    def fits(n: int) -> bool:
        return (n - step) * step_s + reserve_s(events, step, n, step_s, batch) <= left

    lo, hi = step + 1, max(step + 1, cap)  # cost grows with n: bisect for the last n that fits
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def fraction_step(fraction: float, total: int) -> int:
    """The step at `fraction` of a run of `total` steps (train.keep_fractions, sample.autoguide_fraction): the same
    point of the schedule whatever length train.fit_minutes planned, e.g. 0.3 -> 198 of 661, 480 of 1,600."""
    return max(1, min(total, round(fraction * total)))


def planned_steps(cap: int, step: int, elapsed_s: float, steps_per_s: float, minutes: float) -> int:
    """The run's length: at most `cap`, at least step + 1 (one more step than done), else what fits the budget."""
    if not steps_per_s > 0:
        return cap
    left = max(0.0, 60.0 * minutes - elapsed_s)
    return max(step + 1, min(cap, step + math.floor(MARGIN * left * steps_per_s)))


class BudgetPlanner:
    """The loop's side of train.fit_minutes: call `observe(step, t, own_s)` after each step (t: training seconds of
    this process so far, resumed runs included; own_s: the seconds of those spent in the loop's own work, which
    the step rate must not contain); it returns the planned length at the end of calibration, and again at
    `replan_at` (the end of the warm-up) when that comes CALIBRATION_STEPS or more steps later."""

    def __init__(self, minutes: float, cap: int, planned: Optional[int] = None, replan_at: int = 0,
                 events: Sequence[LoopEvent] = (), batch: int = 1):
        self.minutes, self.cap, self.planned = minutes, cap, planned
        self.replan_at, self.events, self.batch = replan_at, tuple(events), batch
        self.replanned = False
        self.rate: Optional[float] = None
        self.stage = 0  # which plan `planned` is: 1 after calibration, 2 after the re-plan
        self.first: Optional[int] = None  # the first plan, before the re-plan (logged)
        self._start: Optional[tuple[int, float]] = None
        self._since_plan: Optional[tuple[int, float]] = None

    @property
    def enabled(self) -> bool:
        return self.minutes > 0

    def resume(self, planned: int, replanned: bool) -> None:
        """A checkpoint's plan: kept; a plan made before the re-plan may still be re-planned in this process."""
        self.planned, self.replanned = planned, replanned

    def observe(self, step: int, elapsed_s: float, own_s: float = 0.0) -> Optional[int]:
        if not self.enabled or self.replanned:
            return None
        t = elapsed_s - own_s  # seconds of steps alone
        if self._start is None:  # the first step of this fit: its time carries warm-up, measure from its end
            self._start = (step, t)
            return None
        if self.planned is None:
            s0, t0 = self._start
            if step - s0 < CALIBRATION_STEPS:
                return None
            self.rate = (step - s0) / max(t - t0, 1e-9)
            self.planned = self.first = planned_steps(self.cap, step, elapsed_s, self.rate, self.minutes)
            self.stage = 1
            self._since_plan = (step, t)
            if self.replan_at < step + CALIBRATION_STEPS:  # no re-plan: the warm-up ends too soon for one
                self.replanned = True
            return self.planned
        if self._since_plan is None:  # resumed with a first plan: measure from here
            self._since_plan = (step, t)
        if step < self.replan_at:
            return None
        self.replanned = True
        s0, t0 = self._since_plan
        if step - s0 < CALIBRATION_STEPS:  # too few steps measured since the resume: the plan stands
            return None
        self.first = self.planned
        self.rate = (step - s0) / max(t - t0, 1e-9)
        self.planned = replanned_steps(self.cap, step, elapsed_s, 1.0 / self.rate, self.minutes, self.events,
                                       self.batch)
        self.stage = 2
        return self.planned

    def meta(self) -> dict:
        if self.planned is None:
            return {}
        return {"planned_steps": self.planned, "replanned": self.replanned}

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

A planned run's length depends on the machine it started on; two machines give two different (each
deterministic) runs. Set fit_minutes = 0 for a fixed length.
"""
from __future__ import annotations

import math
from typing import Optional

CALIBRATION_STEPS = 20
MARGIN = 0.92


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
    """The loop's side of train.fit_minutes: call `observe(step, t)` after each step (t: training seconds of this
    process so far, resumed runs included); it returns the planned length once, at the end of calibration."""

    def __init__(self, minutes: float, cap: int, planned: Optional[int] = None):
        self.minutes, self.cap, self.planned = minutes, cap, planned
        self._start: Optional[tuple[int, float]] = None

    @property
    def enabled(self) -> bool:
        return self.minutes > 0

    def observe(self, step: int, elapsed_s: float) -> Optional[int]:
        if not self.enabled or self.planned is not None:
            return None
        if self._start is None:  # the first step of this fit: its time carries warm-up, measure from its end
            self._start = (step, elapsed_s)
            return None
        s0, t0 = self._start
        if step - s0 < CALIBRATION_STEPS:
            return None
        rate = (step - s0) / max(elapsed_s - t0, 1e-9)
        self.planned = planned_steps(self.cap, step, elapsed_s, rate, self.minutes)
        self.rate = rate
        return self.planned

    def meta(self) -> dict:
        return {"planned_steps": self.planned} if self.planned is not None else {}

"""Progress of long work (sampling, restoring, feature extraction, likelihoods) on stderr, never on stdout, where
commands print their JSON.

One helper for every command: on a terminal a tqdm bar; otherwise (a log file, a cluster job) one-line records,
the first after the first unit of work and then one every `every_s` seconds, each with the rate and an ETA, and
a last one when the work is done:

    sample: 16/64 images (25%), 3.1 images/s, 5 s elapsed, ETA 15 s

The work reports through `update(n)` (n more units done) or by calling the object as `progress(done, total)`,
the callback signature of eval.refstats.extract_features and pipelines.likelihood.evaluate_bpd.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Literal, Optional, TextIO

Mode = Literal["auto", "bar", "lines", "off"]
MODES = ("auto", "bar", "lines", "off")


def format_seconds(s: float) -> str:
    """5 -> '5 s', 75 -> '1 min 15 s', 3725 -> '1 h 02 min'."""
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        m, sec = divmod(int(round(s)), 60)
        return f"{m} min {sec:02d} s"
    h, rest = divmod(int(round(s)), 3600)
    return f"{h} h {rest // 60:02d} min"


class Progress:
    """Progress of `total` units of work named `what` (e.g. 'sample', 'reference mnist:test').

    mode: auto (a bar when `stream` is a terminal, else lines), bar, lines or off (nothing is written; `--quiet`).
    every_s: seconds between line records (the first record comes after the first update, whatever every_s).
    clock: seconds (time.monotonic; a fake clock in tests)."""

    def __init__(self, total: Optional[int], what: str, unit: str = "images", *, mode: Mode = "auto",
                 every_s: float = 30.0, stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic):
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} is not valid; valid: {', '.join(MODES)}")
        self.total, self.what, self.unit = total, what, unit
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if isatty is not None and isatty() else "lines"
        self.mode, self.every_s, self.clock = mode, float(every_s), clock
        self.done = 0
        self.t0 = clock()
        self._last_line: Optional[float] = None  # clock of the last line record (None: none yet)
        self._closed = False
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=what, unit=f" {unit}" if unit else "it", file=self.stream,
                            dynamic_ncols=True, leave=True)

    # ------------------------------------------------------------------ reporting
    def update(self, n: int = 1) -> None:
        """n more units done."""
        self.set(self.done + int(n))

    def set(self, done: int, total: Optional[int] = None) -> None:
        """`done` units done so far (of `total`, when it becomes known only now)."""
        if total is not None:
            self.total = int(total)
            if self.bar is not None:
                self.bar.total = self.total
        done = int(done)
        step, self.done = done - self.done, done
        if self.mode == "off" or self._closed:
            return
        finished = self.total is not None and self.done >= self.total
        if self.bar is not None:
            self.bar.update(step)
            if finished:  # a callback user (feature extraction) never closes: the bar ends with the work
                self.close()
            return
        now = self.clock()
        if finished or self._last_line is None or now - self._last_line >= self.every_s:
            self._write(self.line(now))
            self._last_line = now
            if finished:
                self._closed = True

    __call__ = set  # progress(done, total): the callback form

    def line(self, now: Optional[float] = None) -> str:
        """'what: done/total unit (pct%), rate unit/s, elapsed, ETA' at clock time `now`."""
        elapsed = (self.clock() if now is None else now) - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.what}: {self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.done / self.total:.0f}%)"
        parts.append(f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 10 else f"{rate:.2f}")
        parts[-1] += f" {self.unit}/s"
        parts.append(f"{format_seconds(elapsed)} elapsed")
        if self.total and self.done >= self.total:
            parts.append("done")
        elif self.total and rate > 0:
            parts.append(f"ETA {format_seconds((self.total - self.done) / rate)}")
        return ", ".join(parts)

    def _write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bar; in line mode write the last record unless the work's end was already reported."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "lines" and not self._closed and self.done:
            self._write(self.line())
        self._closed = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_mode(quiet: bool) -> Mode:
    """A command's --quiet -> the Progress mode (off, else auto)."""
    return "off" if quiet else "auto"


__all__ = ["Progress", "progress_mode", "format_seconds", "MODES"]

"""Run-folder logging: log.txt (human), metrics.csv (one row per logged step), progress on a terminal.

On a terminal a tqdm bar; otherwise (cluster logs, files) one-line records every `log_every` steps.
"""
from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from tqdm import tqdm

METRIC_COLUMNS = ["step", "images", "loss", "grad_norm", "lr", "val_loss", "images_per_s", "wall_s",
                  "fid", "kid", "kid_std"]  # the last three: in-loop evaluation rows only (train.eval_every)
#: columns that depend on the wall clock; everything else is bit-identical across resume (RELIABILITY 1)
TIMING_COLUMNS = ("images_per_s", "wall_s")


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool = True,
                 progress: bool | None = None, columns: list[str] | None = None):
        """columns: metrics.csv's header (default METRIC_COLUMNS; a training step may add its own)."""
        self.enabled = enabled
        self.columns = list(columns or METRIC_COLUMNS)
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.csv"
        self.log_path = run_dir / "log.txt"
        self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._truncate_metrics(start_step)

    def _truncate_metrics(self, start_step: int) -> None:
        """On resume, drop rows written after the checkpoint we resume from, so every step has exactly one row."""
        if not self.metrics_path.exists():
            with open(self.metrics_path, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
            return
        with open(self.metrics_path, newline="") as f:
            rows = list(csv.reader(f))
        header = rows[0]
        if header != self.columns:  # a file from an older version: same columns by name, new ones empty
            rows = [self.columns] + [[dict(zip(header, r)).get(c, "") for c in self.columns] for r in rows[1:] if r]
        keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= start_step]
        tmp = self.metrics_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(keep)
        tmp.replace(self.metrics_path)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        with open(self.log_path, "a") as f:
            f.write(line + "\n")
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def metrics(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c)) for c in self.columns])

    def progress(self, step: int, postfix: Mapping[str, Any] | None = None) -> None:
        if self.bar is not None:
            self.bar.n = step
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # exact round trip: resumed runs compare bit for bit
    return str(v)


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))

"""Run-folder logging: log.txt (human), metrics.csv (one row per logged step), progress on a terminal, and
optionally TensorBoard (train.tensorboard: metrics.csv's rows as scalars and the sample grids as images in
RUN/tensorboard, through torch.utils.tensorboard when the `tensorboard` package is installed).

On a terminal a tqdm bar; otherwise (cluster logs, files) one-line records after the first step, every
`log_every` steps and every `log_seconds` seconds (the trainer decides when).
"""
from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from tqdm import tqdm

from ..errors import ConfigError

METRIC_COLUMNS = ["step", "images", "loss", "grad_norm", "lr", "val_loss", "images_per_s", "wall_s",
                  "fid", "kid", "kid_std"]  # the last three: in-loop evaluation rows only (train.eval_every)
#: columns that depend on the wall clock; everything else is bit-identical across resume (RELIABILITY 1)
TIMING_COLUMNS = ("images_per_s", "wall_s")
TENSORBOARD_INSTALL = "pip install tensorboard (or pip install 'torchdiffusion[tensorboard]')"


def tensorboard_writer_class():
    """torch.utils.tensorboard.SummaryWriter, or a one-line ConfigError saying how to install the package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(f"train.tensorboard=true needs the tensorboard package, which is not installed: "
                          f"{TENSORBOARD_INSTALL}; or set train.tensorboard=false (metrics.csv has the same "
                          f"numbers)") from None
    return SummaryWriter


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool = True,
                 progress: bool | None = None, columns: list[str] | None = None, tensorboard: bool = False):
        """columns: metrics.csv's header (default METRIC_COLUMNS; a training step may add its own). tensorboard:
        also write the rows and images to run_dir/tensorboard (events after start_step, left by an interrupted
        run, are purged, as metrics.csv's rows are)."""
        self.enabled = enabled
        self.columns = list(columns or METRIC_COLUMNS)
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.csv"
        self.log_path = run_dir / "log.txt"
        self.bar = None
        self.writer = None
        if not enabled:
            return
        writer_class = tensorboard_writer_class() if tensorboard else None  # refuse before anything is written
        run_dir.mkdir(parents=True, exist_ok=True)
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._truncate_metrics(start_step)
        if writer_class is not None:
            self.writer = writer_class(str(run_dir / "tensorboard"), purge_step=start_step + 1)

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
        if self.writer is not None:
            step = int(row["step"])
            for c in self.columns:
                v = row.get(c)
                if c != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(c, float(v), step)

    def image(self, tag: str, image, step: int) -> None:
        """A uint8 (C, H, W) image (a sample grid) at `step`, to TensorBoard when it is on (the PNG is written
        by the caller)."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="CHW")

    def progress(self, step: int, postfix: Mapping[str, Any] | None = None) -> None:
        if self.bar is not None:
            self.bar.n = step
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


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


def step_message(step: int, total: int, metrics: dict, row: dict, images_per_s: float, batch: int) -> str:
    """A log line of the loop: 'step 50/600 loss ... 74.3 img/s val_loss ... ETA 7.2 min'."""
    eta = (total - step) * batch / max(images_per_s, 1e-9)
    return (f"step {step}/{total} {format_metrics(metrics)} {images_per_s} img/s"
            + "".join(f" {k} {row[k]:.4f}" for k in row if k.startswith("val_") and isinstance(row[k], float))
            + (f" ETA {eta / 60:.1f} min" if step < total else ""))


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # exact round trip: resumed runs compare bit for bit
    return str(v)


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))

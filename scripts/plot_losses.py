#!/usr/bin/env python
"""Training and validation loss of one run folder in one figure (the README's loss plot):

    python scripts/plot_losses.py runs/mnist-cond docs/images/mnist_demo_loss.png --title "make demo: ..."

`torchdiffusion report` draws each curve on its own; this puts both on one linear axis for the README. It reads
metrics.csv with the report's reader and smooths with the report's moving average.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from torchdiffusion.pipelines.report import moving_average, read_metrics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--title", default="")
    ap.add_argument("--window", type=int, default=25, help="steps in the moving mean")
    a = ap.parse_args()
    series = read_metrics(a.run / "metrics.csv")
    if not series.get("loss"):
        sys.exit(f"error: {a.run / 'metrics.csv'} has no loss rows (give a run folder that has trained)")
    step, loss = zip(*series["loss"])
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    ax.plot(step, loss, lw=0.6, alpha=0.35, label="train loss (per step)")
    ax.plot(step, moving_average(loss, a.window), lw=1.6, label=f"train loss ({a.window}-step mean)")
    if series.get("val_loss"):
        ax.plot(*zip(*series["val_loss"]), "o-", ms=3, label="validation loss (EMA, fixed noise)")
    median = sorted(loss)[len(loss) // 2]
    ax.set_ylim(0.8 * min(loss), min(max(loss), 3 * median))  # the first steps' large losses would flatten the rest
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    if a.title:
        ax.set_title(a.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(a.out)


if __name__ == "__main__":
    main()

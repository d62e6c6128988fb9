#!/usr/bin/env python
"""Training and validation loss of one run folder in one figure (the README's loss plot):

    python scripts/plot_losses.py runs/mnist-cond docs/images/mnist_demo_loss.png --title "make demo: ..."
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--title", default="")
    ap.add_argument("--window", type=int, default=25, help="steps in the moving mean")
    a = ap.parse_args()
    rows = list(csv.DictReader(open(a.run / "metrics.csv")))
    step = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    mean = [sum(loss[max(0, i - a.window + 1):i + 1]) / len(loss[max(0, i - a.window + 1):i + 1])
            for i in range(len(loss))]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    ax.plot(step, loss, lw=0.6, alpha=0.35, label="train loss (per step)")
    ax.plot(step, mean, lw=1.6, label=f"train loss ({a.window}-step mean)")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="validation loss (EMA, fixed noise)")
    median = sorted(loss)[len(loss) // 2]
    ax.set_ylim(0.8 * min(loss), min(max(loss), 3 * median))  # the first steps' large losses would flatten the rest
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    if a.title:
        ax.set_title(a.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(a.out)


if __name__ == "__main__":
    main()

"""The report's "Memorisation over training" section: validation loss, FID/KID and the near-copy share side by side.

A rising validation loss is a necessary condition for memorisation (eval.memorization); the in-loop audit's
near-copy share (train.eval_audit) is the direct sign; FID/KID say whether sample quality suffers. The section
lines the three up per step (a table and one figure with a shared step axis), marks the best validation loss,
and shows the training guard's stop (RUN/eval/guard.json, train.guard) when it stopped the run.

    memorisation_section(run_dir, series, out_dir) -> HTML, or "" when the run has none of these measurements
"""
from __future__ import annotations

import html
import json
from pathlib import Path

COLUMNS = (("val_loss", "validation loss"), ("fid", "FID"), ("kid", "KID"), ("near_copy_share", "near-copy share"))
FIGURE = "memorisation_over_training.png"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _guard(run_dir: Path) -> dict | None:
    path = run_dir / "eval" / "guard.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"reason": "unreadable eval/guard.json"}


def _plot(series: dict, keys: list[str], best_step, stop_step, out_dir: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(6.4, 1.9 * len(keys) + 0.6), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        xs, ys = zip(*series[key])
        ax.plot(xs, ys, marker="o", ms=3)
        ax.set_ylabel(dict(COLUMNS)[key])
        ax.grid(alpha=0.3)
        if best_step is not None:
            ax.axvline(best_step, color="tab:green", ls=":", lw=1)
        if stop_step is not None:
            ax.axvline(stop_step, color="tab:red", ls="--", lw=1)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("dotted: best validation loss; dashed: training guard stop", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / FIGURE, dpi=90)
    plt.close(fig)
    return FIGURE


def memorisation_section(run_dir: Path, series: dict, out_dir: Path) -> str:
    """The section's HTML ("" when metrics.csv has no validation loss, FID/KID or near-copy share and the guard
    never stopped the run)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    keys = [k for k, _ in COLUMNS if series.get(k)]
    guard = _guard(run_dir)
    if not keys and guard is None:
        return ""
    parts = []
    best_step = min(series["val_loss"], key=lambda p: p[1])[0] if series.get("val_loss") else None
    if guard is not None:
        parts.append(f'<p class="note"><b>Training guard stopped the run at step {_fmt(guard.get("stopped_at"))}'
                     f'</b> ({_fmt(guard.get("reason"))}): {_fmt(guard.get("detail"))}. Best validation loss '
                     f'{_fmt(guard.get("best_val_loss"))} at step {_fmt(guard.get("best_val_step"))}'
                     + (f', kept in {_fmt(guard.get("best_val_checkpoint"))}' if guard.get("best_val_checkpoint")
                        else "") + ".</p>")
    elif series.get("guard"):
        parts.append('<p class="note">The metrics mark a training guard stop, but eval/guard.json is missing.</p>')
    if "near_copy_share" not in keys:
        parts.append('<p class="note">No in-loop near-copy share (train.eval_audit, with train.eval_every).</p>')
    if keys:
        stop = guard.get("stopped_at") if guard else None
        fig = _plot(series, keys, best_step, stop, out_dir)
        if fig:
            parts.append(f'<img src="{fig}" alt="memorisation over training" width="560">')
        values = {k: dict(series[k]) for k in keys}
        steps = sorted({s for k in keys for s in values[k]})
        head = "".join(f"<th>{html.escape(dict(COLUMNS)[k])}</th>" for k in keys)
        rows = "".join("<tr><td>" + str(s) + ("*" if s == best_step else "") + "</td>"
                       + "".join(f"<td>{_fmt(values[k].get(s))}</td>" for k in keys) + "</tr>" for s in steps)
        parts.append(f"<table><tr><th>step</th>{head}</tr>{rows}</table>"
                     '<p class="note">* best validation loss. A validation loss that rises while the training loss '
                     "falls is a necessary condition for memorisation; the near-copy share (ratio test d1/d2 &lt; "
                     "1/3 against training images) is the direct sign.</p>")
    return "".join(parts)

"""A sweep of a cascade's inference augmentation level: the last stage's FID / KID at each level, a table, a plot.

With the non-truncated ("full") hand-off the stages before the last are sampled once and their outputs re-noised
at every level (Ho et al. 2021 note this as the practical advantage of non-truncated augmentation); the truncated
hand-off re-runs the previous stage to each level's sigma. The metric is injected (score(uint8 images) -> dict
with "fid" and "kid"), so this module needs no feature network.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..core.augmentation import level_text, sigma_of_time
from .cascade import Stage, cascade_generate


def sweep_levels(stages: Sequence[Stage], seeds: Sequence[int], levels: Sequence[float], score: Callable, *,
                 handoff: str = "full", blur: Optional[float] = None, low_res: Optional[Tensor] = None,
                 batch: int = 16, device=torch.device("cpu"), outdir: Optional[Path] = None,
                 log: Callable[[str], None] = lambda m: None) -> list[dict]:
    """One row per level t (the last SR stage's; earlier SR stages keep their own sample level): {t, level, sigma,
    fid, kid, kid_std, n, seconds}. outdir: a grid of the first 64 final images per level (grid_t<t>.png)."""
    from .generate import make_grid, save_png
    prefix_low = low_res
    head = list(stages)
    first_sr = 0 if low_res is not None else 1
    fixed = [st.conditioner.cfg.sample_level for st in stages[first_sr:-1]]
    reuse = handoff == "full" and len(stages) > 1 and low_res is None
    if reuse:  # sample the stages before the last once
        t0 = time.perf_counter()
        pre = cascade_generate(head[:-1], seeds, levels=fixed or 0.0, handoff=handoff, blur=blur, batch=batch,
                               device=device)
        prefix_low, head = pre["images"][-1], [stages[-1]]
        log(f"earlier stages: {len(seeds)} images in {time.perf_counter() - t0:.1f} s")
    rows = []
    for t in levels:
        t0 = time.perf_counter()
        lv = ([t] if reuse else fixed + [t])
        out = cascade_generate(head, seeds, levels=lv, handoff=handoff, blur=blur, low_res=prefix_low, batch=batch,
                               device=device, offset=len(stages) - 1 if reuse else 0)  # the full cascade's streams
        images = out["images"][-1]
        sec = time.perf_counter() - t0
        m = score(images)
        s = float(sigma_of_time(t))
        rows.append({"t": t, "level": level_text(t), "sigma": s, **m, "seconds": round(sec, 2)})
        log(f"{level_text(t)}: FID {m['fid']:.2f} KID {m['kid']:.4f} ({sec:.1f} s)")
        if outdir is not None:
            save_png(make_grid(images[:64]), Path(outdir) / f"grid_t{t:.3f}.png")
    return rows


def sweep_table(record: dict) -> str:
    lines = [f"# Cascade sweep of the inference augmentation level ({record['handoff']} hand-off)", "",
             f"Real: {record['real']}; features: {record['extractor']}; N = {record['count']} (seeds {record['seeds']})",
             "", "| level | sigma | FID | KID x 1e3 | seconds |", "|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['level']} | {r['sigma']:.3g} | {r['fid']:.2f} | {1e3 * r['kid']:.2f} +- "
                     f"{1e3 * r['kid_std']:.2f} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: Sequence[dict], path: Path, title: str = "", series: Optional[dict] = None) -> None:
    """FID against the augmentation time t (one line, or several: series = {label: rows})."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = series or {"FID": rows}
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for label, rs in series.items():
        ax.plot([r["t"] for r in rs], [r["fid"] for r in rs], marker="o", label=label)
    ax.set_xlabel("inference augmentation time t  (SNR = cot^2(pi t / 2))")
    ax.set_ylabel("FID of the final images")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["sweep_levels", "sweep_table", "plot_sweep"]

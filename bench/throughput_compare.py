"""Side-by-side table of the referee's throughput JSON files in a results folder (stdlib only).

usage: python bench/throughput_compare.py bench/results
Groups the runs by (preset, threads, framework) and reports train img/s, achieved GFLOP/s,
% of the practical peak measured in the same process, and the ratio ours / peer.
"""
from __future__ import annotations

import glob
import json
import os
import statistics
import sys


def load(folder):
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "throughput_*_r*_*.json"))):
        with open(path) as f:
            r = json.load(f)
        runs.setdefault((r["preset"], r["threads"], r["framework"]), []).append(r)
    return runs


def main(folder):
    runs = load(folder)
    rows = ["| preset | threads | framework | params | GFLOP/img fwd | train img/s (median of runs) | train GFLOP/s | % of peak "
            "| sample img/s | other-CPU busy before/after | runs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for preset, threads in sorted({(p, t) for p, t, _ in runs}):
        med = {}
        for fw in ("torchdiffusion", "diffusers"):
            rs = runs.get((preset, threads, fw), [])
            if not rs:
                continue
            img = statistics.median(r["train_img_per_s"] for r in rs)
            gfs = statistics.median(r["train_gflops"] for r in rs)
            pct = statistics.median(100 * r["train_gflops"] / r["peak_gflops_median"] for r in rs)
            smp = statistics.median(r["sample_img_per_s"] for r in rs)
            busy = ", ".join(f"{100 * r['other_cpu_busy_before']:.0f}/{100 * r['other_cpu_busy_after']:.0f}%" for r in rs)
            med[fw] = (img, smp)
            r0 = rs[0]
            rows.append(f"| {preset} | {threads} | {fw} | {r0['params'] / 1e6:.2f} M | {r0['fwd_gflop_per_img']:.2f} | {img:.2f} "
                        f"| {gfs:.1f} | {pct:.0f}% | {smp:.2f} | {busy} | {len(rs)} |")
        if len(med) == 2:
            ratios.append(f"{preset}, {threads} thread(s): train {med['torchdiffusion'][0] / med['diffusers'][0]:.2f}x, "
                          f"sampling {med['torchdiffusion'][1] / med['diffusers'][1]:.2f}x (torchdiffusion / diffusers)")
    print("\n".join(rows + [""] + ratios))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results")

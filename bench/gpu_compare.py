"""Ratios ours / diffusers of bench/gpu.sh's JSON files (stdlib only): python bench/gpu_compare.py FOLDER."""
from __future__ import annotations

import glob
import json
import os
import sys


def main(folder: str) -> None:
    rows = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        for r in data.get("rows", []):
            family = r["model"].split("-")[0]
            fw = "diffusers" if r["model"].endswith("diffusers") else "torchdiffusion"
            rows[(family, r["preset"], r["mode"], fw)] = r
    print("| model | preset | mode | ours train img/s | peer train img/s | train ratio | ours MFU | peer MFU "
          "| ours sample img/s | peer sample img/s | sample ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (family, preset, mode, fw), r in sorted(rows.items()):
        if fw != "torchdiffusion":
            continue
        p = rows.get((family, preset, mode, "diffusers"))
        if p is None:
            print(f"| {family} | {preset} | {mode} | {r['train_img_s']} | - | - | {r['mfu_measured']} | - "
                  f"| {r['sample_img_s_nfe10']} | - | - |")
            continue
        print(f"| {family} | {preset} | {mode} | {r['train_img_s']} | {p['train_img_s']} "
              f"| {r['train_img_s'] / p['train_img_s']:.2f}x | {r['mfu_measured']} | {p['mfu_measured']} "
              f"| {r['sample_img_s_nfe10']} | {p['sample_img_s_nfe10']} "
              f"| {r['sample_img_s_nfe10'] / p['sample_img_s_nfe10']:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/gpu")

"""Headline of the analytic bench: per problem and NFE, the best peer row and the best torchdiffusion row
(sliced W2), their ratio, and whether ours meets the goal: SWD <= max(0.7 x best peer, floor + 2 sd).

    python bench/analytic_goal.py bench/results/analytic_torchdiffusion.csv [more.csv ...] [--nfe 5,10]
Only rows that ran at exactly the target NFE count (a row marked (k) with k != target is skipped).
Stdlib only.
"""
from __future__ import annotations

import argparse
import csv


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--nfe", default="5,10")
    ap.add_argument("--ours", default="torchdiffusion")
    args = ap.parse_args(argv)
    nfes = [int(v) for v in args.nfe.split(",")]
    rows = []
    for path in args.csv:
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    print("| problem | NFE | best peer | SWD | best torchdiffusion | SWD | ratio | floor + 2 sd | goal | met |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for problem in dict.fromkeys(r["problem"] for r in rows):
        pr = [r for r in rows if r["problem"] == problem]
        floor = next(float(r["swd"]) for r in pr if r["sampler"] == "exact-samples")
        sd = next(float(r["swd"]) for r in pr if r["sampler"] == "exact-samples-std")
        for nfe in nfes:
            ok = [r for r in pr if r["framework"] != "reference" and not r["error"] and r["swd"]
                  and int(float(r["nfe_target"])) == nfe and abs(float(r["nfe"]) - nfe) < 1e-6]
            peers = [r for r in ok if r["framework"] != args.ours]
            ours = [r for r in ok if r["framework"] == args.ours]
            if not peers or not ours:
                continue
            bp = min(peers, key=lambda r: float(r["swd"]))
            bo = min(ours, key=lambda r: float(r["swd"]))
            p, o = float(bp["swd"]), float(bo["swd"])
            goal = max(0.7 * p, floor + 2 * sd)
            print(f"| {problem} | {nfe} | {bp['framework']}/{bp['sampler']} | {p:.4f} | {bo['sampler']} | {o:.4f} | "
                  f"{o / p:.2f} | {floor + 2 * sd:.4f} | {goal:.4f} | {'yes' if o <= goal else 'no'} |")


if __name__ == "__main__":
    main()

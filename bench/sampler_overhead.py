"""Sampler overhead per denoiser call: torchdiffusion's samplers beside k-diffusion's, same Karras grid,
driven by a near-zero-cost denoiser D(x, sigma) = x / (1 + sigma^2), so the time measured is the sampler's own
(step arithmetic, noise draws, Python bookkeeping).

Run in an environment where k-diffusion's sampling module imports (the peers venv) with this repository's src
on the path, e.g.

    PYTHONPATH=src:../shared/bench/adapters ../peers-venv/bin/python bench/sampler_overhead.py

Each (sampler, shape) pair is timed `--repeats` times alternating ours and the peer; the minimum CPU time of the
process (time.process_time, one thread: robust to other jobs on a shared machine, unlike wall time) over
repeats divided by the number of denoiser calls actually made is the overhead per NFE. Noise: each side's
default source as a user gets it: ours from one generator per row (what `torchdiffusion sample` uses; a
Brownian tree per row for the SDE samplers), k-diffusion's global generator (torchsde's Brownian tree for
its SDE samplers). Writes bench/results/sampler_overhead.md (and .json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from torchdiffusion.config.registry import SAMPLERS  # noqa: E402
from torchdiffusion.core import grids  # noqa: E402
from torchdiffusion.sampling import randn  # noqa: E402


def load_kdiffusion():
    try:
        import kdiff_import  # the referee bench's loader (its adapters folder on PYTHONPATH)
        return kdiff_import.load_sampling(), kdiff_import.version()
    except ImportError:
        from importlib.metadata import version

        from k_diffusion import sampling
        return sampling, version("k-diffusion")


class Trivial:
    """D(x, sigma) = x / (1 + sigma^2) (exact for N(0, I) data); counts calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        return x / (1 + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2)


SMIN, SMAX = 0.002, 80.0

# our registry name -> (k-diffusion function, extra kwargs for ours, extra kwargs for k-diffusion, call style)
PAIRS = {
    "euler": ("sample_euler", {}, {}, "grid"),
    "heun": ("sample_heun", {}, {}, "grid"),
    "euler_ancestral": ("sample_euler_ancestral", {}, {}, "grid"),
    "dpm2": ("sample_dpm_2", {}, {}, "grid"),
    "dpm2_ancestral": ("sample_dpm_2_ancestral", {}, {}, "grid"),
    "lms": ("sample_lms", {}, {}, "grid"),
    "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", {}, {}, "grid"),
    "dpmpp_2m": ("sample_dpmpp_2m", {}, {}, "grid"),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {}, {}, "grid"),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {}, {}, "grid"),
    "edm": ("sample_heun", {"S_churn": 40.0}, {"s_churn": 40.0}, "grid"),
    "dpm_fast": ("sample_dpm_fast", {}, {}, "fast"),
    "dpm_adaptive": ("sample_dpm_adaptive", {}, {}, "adaptive"),
}


def time_ours(name, shape, steps, seeds, opts, per_row=True):
    fn = SAMPLERS[name][0]
    den = Trivial()
    gens = [torch.Generator().manual_seed(s) for s in seeds] if per_row else torch.Generator().manual_seed(seeds[0])
    noise = randn(shape, gens)
    if PAIRS[name][3] == "fast":
        sig = grids.karras(steps + 1, SMIN, SMAX)[:-1]  # `steps` NFE from SMAX to SMIN, as k-diffusion's n
    elif PAIRS[name][3] == "adaptive":
        sig = torch.tensor([SMAX, SMIN], dtype=torch.float64)
    else:
        sig = grids.karras(steps, SMIN, SMAX)
    t0 = time.process_time()
    fn(den, noise, sig, generator=gens, **opts)
    return time.process_time() - t0, den.calls


def time_peer(K, name, shape, steps, seed, opts):
    fn_name, _, _, style = PAIRS[name]
    fn = getattr(K, fn_name)
    den = Trivial()
    model = lambda x, s: den(x, s)  # noqa: E731
    torch.manual_seed(seed)
    noise = torch.randn(shape)
    t0 = time.process_time()
    if style == "fast":
        fn(model, noise * SMAX, SMIN, SMAX, steps, disable=True, **opts)
    elif style == "adaptive":
        fn(model, noise * SMAX, SMIN, SMAX, disable=True, **opts)
    else:
        sig = K.get_sigmas_karras(steps, SMIN, SMAX, rho=7.0)
        fn(model, noise * sig[0], sig, disable=True, **opts)
    return time.process_time() - t0, den.calls


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samplers", default="", help="comma list (default: all pairs)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "sampler_overhead"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="torchsde")  # float32 sigma_min round-off notices from the peer
    K, kversion = load_kdiffusion()
    names = [s for s in args.samplers.split(",") if s] or list(PAIRS)
    shapes = {"B=1 x 2": (1, 2), "B=16 x 3x32x32": (16, 3, 32, 32)}
    rows = []
    for label, shape in shapes.items():
        seeds = list(range(shape[0]))
        for name in names:
            _, ours_opts, peer_opts, _ = PAIRS[name]
            best_o = best_1 = best_p = float("inf")
            nfe_o = nfe_p = 0
            for _ in range(args.repeats):
                t, nfe_o = time_ours(name, shape, args.steps, seeds, ours_opts)
                best_o = min(best_o, t / nfe_o)
                t, nfe_1 = time_ours(name, shape, args.steps, seeds, ours_opts, per_row=False)
                best_1 = min(best_1, t / nfe_1)
                t, nfe_p = time_peer(K, name, shape, args.steps, 0, peer_opts)
                best_p = min(best_p, t / nfe_p)
            rows.append({"shape": label, "sampler": name, "peer": PAIRS[name][0], "nfe_ours": nfe_o, "nfe_peer": nfe_p,
                         "us_per_nfe_ours": best_o * 1e6, "us_per_nfe_ours_one_gen": best_1 * 1e6,
                         "us_per_nfe_peer": best_p * 1e6, "ratio": best_o / best_p, "ratio_one_gen": best_1 / best_p})
            r = rows[-1]
            print(f"{label:16s} {name:20s} ours {r['us_per_nfe_ours']:9.1f} (1 gen {r['us_per_nfe_ours_one_gen']:9.1f}) "
                  f"us/NFE ({nfe_o:3d})   k-diffusion {r['us_per_nfe_peer']:9.1f} us/NFE ({nfe_p:3d})   ratio "
                  f"{r['ratio']:.2f} (1 gen {r['ratio_one_gen']:.2f})", flush=True)
    meta = {"steps": args.steps, "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
            "k-diffusion": kversion, "python": platform.python_version(), "machine": platform.machine()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    lines = ["# Sampler overhead per NFE: torchdiffusion vs k-diffusion", "",
             "Trivial denoiser D(x, sigma) = x / (1 + sigma^2); Karras grid (sigma 0.002 to 80, rho 7), "
             f"{args.steps} steps; best of {args.repeats} alternating runs, process CPU time; {args.threads} thread(s); torch "
             f"{torch.__version__}, k-diffusion {kversion}. Microseconds of sampler time per denoiser call (lower is "
             "better); ratio = ours / k-diffusion. Reproduce: `bench/sampler_overhead.py` (see its docstring).", "",
             "Noise: k-diffusion draws from the global generator (torchsde's Brownian tree for its SDE samplers). "
             "Ours is timed twice: with one generator per row, as `torchdiffusion sample` runs it (each seed's "
             "image independent of the batch; a Brownian tree per row for the SDE samplers), and with one "
             "generator for the batch (the same noise regime as k-diffusion: the like-for-like sampler overhead). "
             "dpm_adaptive takes its own steps (per row for us, per batch for k-diffusion), so its NFE differ.", ""]
    for label in shapes:
        lines += [f"## {label}", "",
                  "| sampler | k-diffusion function | NFE ours / peer | us/NFE ours, per-row seeds | us/NFE ours, one "
                  "generator | us/NFE k-diffusion | ratio per-row | ratio one generator |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["shape"] == label:
                lines.append(f"| {r['sampler']} | {r['peer']} | {r['nfe_ours']} / {r['nfe_peer']} | "
                             f"{r['us_per_nfe_ours']:.1f} | {r['us_per_nfe_ours_one_gen']:.1f} | "
                             f"{r['us_per_nfe_peer']:.1f} | {r['ratio']:.2f} | {r['ratio_one_gen']:.2f} |")
        lines.append("")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}.md")


if __name__ == "__main__":
    main()

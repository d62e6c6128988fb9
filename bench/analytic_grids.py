"""Optimised sigma grids for the analytic bench's models (and the held-out ones), computed once and cached.

For each problem, sampler in the adapter's OPT_SAMPLERS and NFE in OPT_NFE, runs
`torchdiffusion.sampling.gridopt.optimize_grid` with its default settings (the same rule for every model:
128 pilot seeds, 48 log-linear candidates in [0.002, 80], dynamic programme, pattern search) on the model,
i.e. the exact denoiser of the problem, and writes bench/results/grids/<model>/<sampler>_n<NFE>.json with
the pilot's cost. It never sees the bench's reference samples, its seeds or its metrics.

    python bench/analytic_grids.py --bench-dir ../shared/bench [--problems gmm2d,gmm64,digits64] [--force]
Run with the peers venv's python (the bench problems need scikit-learn); bench/analytic.sh calls it.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-dir", default=os.path.join(HERE, "..", "..", "shared", "bench"))
    ap.add_argument("--problems", default="gmm2d,gmm64,digits64")
    ap.add_argument("--samplers", default="", help="comma list (default: all of the adapter's OPT_SAMPLERS)")
    ap.add_argument("--nfe", default="", help="comma list (default: the adapter's OPT_NFE)")
    ap.add_argument("--force", action="store_true", help="recompute grids that are already cached")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, args.bench_dir)
    import analytic_problems  # noqa: E402  (the referee's problems)

    sys.path.insert(0, HERE)
    import heldout_problems  # noqa: E402

    heldout_problems.register(analytic_problems)
    adapter = load_module(os.path.join(HERE, "adapters", "torchdiffusion_analytic.py"), "td_adapter")
    from torchdiffusion.core import grids
    from torchdiffusion.sampling.gridopt import GridSearchConfig, optimize_grid

    cfg = GridSearchConfig()
    names = [s for s in args.samplers.split(",") if s] or list(adapter.OPT_SAMPLERS)
    nfes = [int(v) for v in args.nfe.split(",") if v] or list(adapter.OPT_NFE)
    for pname in [p for p in args.problems.split(",") if p]:
        problem = analytic_problems.make_problem(pname)
        denoiser = lambda x, sigma, cond=None, p=problem: p.denoise(x, sigma).to(x.dtype)  # noqa: E731
        for name in names:
            for nfe in nfes:
                path = adapter.grid_path(problem.dim, problem.sigma_data, name, nfe)
                if os.path.exists(path) and not args.force:
                    continue
                t0 = time.perf_counter()
                res = optimize_grid(denoiser, (problem.dim,), nfe, adapter.OPT_SAMPLERS[name],
                                    sigma_min=adapter.SIGMA_MIN, sigma_max=adapter.SIGMA_MAX, config=cfg)
                seconds = time.perf_counter() - t0
                seeds = len(cfg.pilot_seeds)
                meta = dict(model=pname, dim=problem.dim, sigma_data=problem.sigma_data, sampler=name,
                            steps=nfe, method="gridopt (teacher + dynamic programme + pattern search)",
                            candidates=res.info["candidates"], pilot_seeds=seeds,
                            teacher_nfe_per_seed=res.teacher_calls // seeds,
                            search_nfe_per_seed=res.search_calls // seeds,
                            pilot_rms_error=res.pilot_error, dp_sigmas=res.dp_sigmas.tolist(),
                            dp_pilot_rms_error=res.dp_error, seconds=round(seconds, 1))
                grids.save_grid(path, res.sigmas, meta)
                print(f"{pname:9s} {name:9s} n={nfe:3d} pilot RMS {res.dp_error:.4g} -> {res.pilot_error:.4g} "
                      f"({seconds:.0f} s): {[round(v, 4) for v in res.sigmas.tolist()]}", flush=True)


if __name__ == "__main__":
    main()

"""`torchdiffusion grid`: a sigma grid optimised for one model and one sampler (sampling/gridopt.py), and
a look at a saved grid.

    torchdiffusion grid optimize --run runs/mnist --sampler unipc --steps 10        # -> runs/mnist/grids/unipc_n10.json
    torchdiffusion sample --run runs/mnist --sampler unipc --steps 10 --grid optimized \\
        --grid-file runs/mnist/grids/unipc_n10.json --outdir out
    torchdiffusion grid show runs/mnist/grids/unipc_n10.json

The search uses the model and pilot noise only (no data): a fine Heun trajectory of the pilot seeds, a
dynamic programme over candidate sigmas on the local error of each step, and a pattern search on the
sampler's end-point error against that trajectory. Its cost is printed and saved with the grid.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from ..errors import ConfigError
from .common import build_run_sampler


@click.group("grid")
def grid_group():
    """Sigma grids: optimise one for a model and a sampler (`optimize`), or print a saved one (`show`)."""


@grid_group.command("optimize")
@click.option("--run", "--run-dir", "run_dir", type=click.Path(path_type=Path), default=None, help="Run folder.")
@click.option("--checkpoint", "ckpt_path", type=click.Path(path_type=Path), default=None, help="A checkpoint folder.")
@click.option("--sampler", default=None, help="Sampler name (default: the run's sample.sampler).")
@click.option("--steps", type=int, default=None, help="Number of steps n of the grid (default: the run's).")
@click.option("--sampler-opt", "sampler_opts", multiple=True, metavar="KEY=VALUE", help="A sampler option (repeatable).")
@click.option("--pilot-seeds", type=int, default=64, show_default=True, help="Pilot noise seeds (1000000 + i).")
@click.option("--candidates", type=int, default=48, show_default=True, help="Candidate sigmas (log-linear).")
@click.option("--substeps", type=int, default=4, show_default=True, help="Heun sub-steps per candidate interval.")
@click.option("--sweeps", type=int, default=3, show_default=True, help="Pattern-search sweeps (0: programme only).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Grid file (default: RUN/grids/SAMPLER_nSTEPS.json).")
@click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema", show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--device", default="cpu", show_default=True)
def optimize_cmd(run_dir, ckpt_path, sampler, steps, sampler_opts, pilot_seeds, candidates, substeps, sweeps, out,
                 weights, threads, device):
    """Compute the grid of STEPS steps that minimises SAMPLER's error on this model; save it as JSON."""
    from ..config.loaders import load_run
    from ..core import grids
    from ..pipelines.settings import override_sample
    from ..sampling.gridopt import GridSearchConfig, optimize_grid

    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    for name, v, lo in (("--pilot-seeds", pilot_seeds, 1), ("--substeps", substeps, 1), ("--sweeps", sweeps, 0)):
        if v < lo:
            raise ConfigError(f"{name} must be >= {lo}, got {v}")
    run = load_run(run_dir, ckpt_path, weights, device)
    cfg = run.config
    scfg = override_sample(cfg.sample, sampler=sampler, steps=steps)
    name, n = scfg.sampler, scfg.steps
    fn, opts, nfe = build_run_sampler(scfg, sampler_opts)
    smin = cfg.sample.sigma_min if cfg.sample.sigma_min is not None else run.model.process.sigma_min
    smax = cfg.sample.sigma_max if cfg.sample.sigma_max is not None else run.model.process.sigma_max
    search = GridSearchConfig(candidates=candidates, substeps=substeps, refine_sweeps=sweeps,
                              pilot_seeds=tuple(range(1_000_000, 1_000_000 + pilot_seeds)))
    shape = tuple(run.sample_shape)
    if out is None and run_dir is None:
        raise ConfigError("give --out PATH for the grid file (or --run RUN to write RUN/grids/SAMPLER_nSTEPS.json)")
    path = out or Path(run_dir) / "grids" / f"{name}_n{n}.json"
    karras = grids.karras(n, smin, smax, cfg.sample.rho)  # the usual grid, for comparison
    t0 = time.perf_counter()
    res = optimize_grid(run.model, shape, n, fn, sigma_min=smin, sigma_max=smax, config=search,
                        dtype=torch.float32, device=device, log=lambda m: click.echo(m, err=True), baseline=karras)
    karras_err = res.info["baseline_error"]
    seconds = time.perf_counter() - t0
    meta = {"sampler": name, "sampler_options": opts, "steps": n, "nfe": nfe, "checkpoint": str(run.path),
            "checkpoint_sha256": run.hashes(), "weights": weights, "sigma_min": smin, "sigma_max": smax,
            "pilot_seeds": pilot_seeds, "candidates": res.info["candidates"], "substeps": substeps, "sweeps": sweeps,
            "pilot_rms_error": res.pilot_error, "dp_pilot_rms_error": res.dp_error,
            "karras_pilot_rms_error": karras_err, "dp_sigmas": res.dp_sigmas.tolist(),
            "teacher_nfe_per_seed": res.teacher_calls // pilot_seeds,
            "search_nfe_per_seed": res.search_calls // pilot_seeds, "seconds": round(seconds, 1)}
    grids.save_grid(path, res.sigmas, meta)
    click.echo(f"wrote {path}: pilot RMS error {res.pilot_error:.4g} (Karras rho={cfg.sample.rho}: {karras_err:.4g}) "
               f"in {seconds:.0f} s; use it with: torchdiffusion sample ... --sampler {name} --steps {n} "
               f"--grid optimized --grid-file {path}")


@grid_group.command("show")
@click.argument("path", type=click.Path(path_type=Path))
def show_cmd(path):
    """Print a saved grid and the settings it was computed with."""
    from ..core import grids

    sig, meta = grids.load_grid(path)
    click.echo(json.dumps({"steps": sig.numel() - 1, "sigmas": sig.tolist(), "meta": meta}, indent=1))

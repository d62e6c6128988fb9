"""`torchdiffusion sample`: one PNG per seed, a grid and samples.json from a trained run (pipelines.generate)."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigError
from .common import build_run_sampler, dist_info, parse_seeds, resolve_device, set_threads
from .guidance_cmd import guidance_options, guided_sampling


@click.command()
@click.option("--run", "--run-dir", "run_dir", type=click.Path(path_type=Path), default=None,
              help="Run folder: its latest verified checkpoint is used.")
@click.option("--checkpoint", "ckpt_path", type=click.Path(path_type=Path), default=None, help="A checkpoint folder.")
@click.option("--outdir", type=click.Path(path_type=Path), required=True, help="Where PNGs, grid.png and samples.json go.")
@click.option("--seeds", default="0-63", show_default=True, help="Seeds, e.g. 0-63 or 0,5,9.")
@click.option("--batch", type=int, default=16, show_default=True)
@click.option("--sampler", default=None, help="A sampler name, e.g. heun, dpmpp_2m, edm (docs/samplers.md; default: the run's sample.sampler).")
@click.option("--steps", type=int, default=None, help="Number of sampler steps (default: the run's sample.steps).")
@click.option("--grid", "grid_kind", default=None, help="karras, loglinear, discrete, optimized or uniform_t (default: the run's).")
@click.option("--grid-file", type=click.Path(path_type=Path), default=None,
              help="With --grid optimized: a grid from `torchdiffusion grid optimize` (docs/grids.md).")
@click.option("--eta", type=float, default=None, help="DDIM eta.")
@click.option("--sampler-opt", "sampler_opts", multiple=True, metavar="KEY=VALUE",
              help="A sampler option, e.g. S_churn=40 (repeatable; see docs/samplers.md).")
@click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema", show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--device", default="auto", show_default=True)
@guidance_options  # --labels, --guidance-scale/-interval, --classifier(-scale), --reject* (cli/guidance_cmd.py)
def sample(run_dir, ckpt_path, outdir, seeds, batch, sampler, steps, grid_kind, eta, sampler_opts, weights, threads,
           device, grid_file=None, **guidance):
    """Generate one PNG per seed, a grid, and samples.json."""
    from ..config.build import build_sigmas
    from ..config.loaders import load_run
    from ..config.registry import GRIDS
    from ..config.sampler_options import CountingDenoiser
    from ..pipelines.generate import sample_run
    from ..pipelines.settings import override_sample

    info = dist_info()
    set_threads(threads, info.world_size)
    dev = resolve_device(device, info.local_rank)
    if batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {batch}")
    seed_list = parse_seeds(seeds)
    run = load_run(run_dir, ckpt_path, weights, dev)
    scfg = override_sample(run.config.sample, sampler=sampler, steps=steps, grid=grid_kind, grid_file=grid_file,
                           eta=eta, grids=GRIDS)
    fn, options, nfe = build_run_sampler(scfg, sampler_opts)
    sigmas = build_sigmas(scfg, run.model.process)
    counter = CountingDenoiser(run.model) if nfe is None else None  # adaptive samplers: measure the NFE
    guided = guided_sampling(run, counter or run.model, seed_list, dev, world_size=info.world_size, **guidance)
    record = sample_run(run, guided, seed_list, outdir, sample_config=scfg, sampler=fn, sampler_options=options,
                        sigmas=sigmas, nfe=nfe, seeds_text=seeds, batch=batch, rank=info.rank,
                        world_size=info.world_size, device=dev, counter=counter)
    if info.is_main:
        click.echo(f"wrote {len(seed_list)} images to {outdir} in {record['seconds']:.1f} s "
                   f"({scfg.sampler}, {scfg.steps} steps, {record['nfe']} NFE)")


__all__ = ["sample"]

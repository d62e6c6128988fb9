"""`torchdiffusion train-tokens` and `sample-tokens`: discrete diffusion over the tokens of a VQ first stage
(config.token_training; docs/discrete.md). A command of its own: the `train` run config is the continuous
frame's (config.token_training says why)."""
from __future__ import annotations

from pathlib import Path

import click

from .common import (dist_info, parse_labels, parse_seeds, preset_or_saved, resolve_device, run_training,
                     set_threads, training_options)


@click.command("train-tokens")
@click.option("--preset", default=None, help="Token preset (fashion-vq-tokens) or a YAML path.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Dotted override, e.g. vq_run=runs/fashion-vq-f4 or process.kind=uniform.")
@training_options
def train_tokens_cmd(preset, overrides, run_dir, resume, allow_config_change, print_config, threads, device, progress,
                     until_step):
    """Train a token model on the VQ indices of the data; running it again on the same run folder resumes."""
    import yaml

    from ..config.strict import to_dict
    from ..config.token_training import load_token_preset, resolve_tokens, train_tokens_run

    info = dist_info()
    set_threads(threads, info.world_size)
    run_dir, base = preset_or_saved(preset, run_dir, load_token_preset, command="train-tokens",
                                    presets="fashion-vq-tokens", marker="vq_run", kind="token")
    cfg = resolve_tokens(base, list(overrides))
    if print_config:
        click.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)
        return
    run_training(train_tokens_run, cfg, run_dir, info, resume=resume, allow_changes=allow_config_change,
                 device=device, progress=progress, until_step=until_step)


@click.command("sample-tokens")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path), help="A train-tokens run folder.")
@click.option("--seeds", default="0-63", show_default=True, help="Seeds, e.g. 0-63 or 0,5,9.")
@click.option("--outdir", default=None, type=click.Path(path_type=Path), help="Default RUN/generated.")
@click.option("--sampler", type=click.Choice(["ancestral", "maskgit"]), default=None,
              help="Default: the run's sample.sampler.")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the run's sample.steps).")
@click.option("--temperature", type=float, default=None, help="Divides the x0 logits.")
@click.option("--top-p", type=float, default=None, help="Nucleus truncation of p(x0 | x_t), in (0, 1].")
@click.option("--guidance-scale", type=float, default=None,
              help="Classifier-free guidance on logits, l_u + w (l_c - l_u) (conditional runs; 1 = conditional).")
@click.option("--labels", default=None,
              help="Class labels of a class-conditional run, cycled over the seeds: 0-9, 3, 0,5,7 (default: seed % K).")
@click.option("--overwrite", is_flag=True, help="Replace the samples an earlier run of this command wrote there.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--device", default="auto", show_default=True)
def sample_tokens_cmd(run_dir, seeds, outdir, sampler, steps, temperature, top_p, guidance_scale, labels, overwrite,
                      threads, device):
    """Sample tokens and decode them through the VQ decoder: OUTDIR/<seed>.png and grid.png (`eval` reads them)."""
    import dataclasses

    from ..config.token_training import load_token_run, sample_token_run
    from ..errors import ConfigError

    set_threads(threads)
    seed_list = parse_seeds(seeds)
    label_list = parse_labels(labels)
    dev = resolve_device(device)
    run = load_token_run(run_dir, dev)
    s = run.config.sample
    change = {k: v for k, v in dict(sampler=sampler, steps=steps, temperature=temperature, top_p=top_p,
                                    guidance_scale=guidance_scale).items() if v is not None}
    s = dataclasses.replace(s, **change)
    if s.sampler == "maskgit" and run.process.mask_index is None:
        raise ConfigError(f"--sampler maskgit needs a process with a mask token; this run's is {run.process.kind} "
                          f"(use --sampler ancestral)")
    out = outdir or run_dir / "generated"
    paths = sample_token_run(run, seed_list, out, sample_cfg=s, device=dev, overwrite=overwrite, labels=label_list)
    click.echo(f"wrote {len(paths)} images and grid.png to {out}")

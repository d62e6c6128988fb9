"""`torchdiffusion train`: resolve the run's config (preset or the run folder's saved config, --set overrides),
handle signals, and call config.training.train_run."""
from __future__ import annotations

from pathlib import Path

import click

from .common import dist_info, run_training, set_threads, training_options


@click.command("train")
@click.option("--preset", default=None, help="Preset name (mnist, fashion-mnist, folder, ...) or a YAML path.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Dotted override, e.g. train.steps=500.")
@training_options
def train(preset, overrides, run_dir, resume, allow_config_change, print_config, threads, device, progress,
          until_step):
    """Train a model; running it again on the same run folder resumes."""
    import yaml

    from ..config.presets_io import load_preset, resolve
    from ..config.strict import load_yaml, to_dict
    from ..config.training import train_run

    info = dist_info()
    set_threads(threads, info.world_size)
    name = preset or "mnist"
    run_dir = run_dir or Path("runs") / Path(name).stem
    saved = run_dir / "config.yaml"
    if saved.exists() and preset is None:
        base = load_yaml(saved)
    else:
        base = load_preset(name)
    cfg = resolve(base, list(overrides))
    if print_config:
        click.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)
        return
    run_training(train_run, cfg, run_dir, info, resume=resume, allow_changes=allow_config_change, device=device,
                 progress=progress, until_step=until_step)

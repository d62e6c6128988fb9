"""`torchdiffusion train-ae`: train a first-stage autoencoder (KL-VAE or VQGAN with a PatchGAN) for latent diffusion.
Resolves the run's config (an autoencoder preset or the run folder's saved config, --set overrides), handles
signals and calls config.ae_training.train_ae_run."""
from __future__ import annotations

from pathlib import Path

import click

from .common import dist_info, run_training, set_threads, training_options


@click.command("train-ae")
@click.option("--preset", default=None,
              help="Autoencoder preset (mnist-kl-f4, mnist-vq-f4, fashion-kl-f4, fashion-vq-f4) or a YAML path.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Dotted override, e.g. train.steps=500.")
@training_options
def train_ae_cmd(preset, overrides, run_dir, resume, allow_config_change, print_config, threads, device, progress,
                 until_step):
    """Train a first-stage autoencoder; running it again on the same run folder resumes."""
    import yaml

    from ..config.ae_training import load_ae_preset, resolve_ae, train_ae_run
    from ..config.strict import load_yaml, to_dict
    from ..errors import ConfigError

    info = dist_info()
    set_threads(threads, info.world_size)
    saved = run_dir / "config.yaml" if run_dir is not None else None
    if preset is None and not (saved is not None and saved.exists()):
        raise ConfigError("train-ae needs --preset (mnist-kl-f4, mnist-vq-f4, fashion-kl-f4, fashion-vq-f4 or a YAML "
                          "path), or --run of an existing autoencoder run to resume")
    run_dir = run_dir or Path("runs") / Path(preset).stem
    saved = run_dir / "config.yaml"
    base = load_yaml(saved) if saved.exists() and preset is None else load_ae_preset(preset)
    if saved.exists() and preset is None and "ae" not in base:
        raise ConfigError(f"{saved} is not an autoencoder run's config (no 'ae' section); give --preset")
    cfg = resolve_ae(base, list(overrides))
    if print_config:
        click.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)
        return
    run_training(train_ae_run, cfg, run_dir, info, resume=resume, allow_changes=allow_config_change, device=device,
                 progress=progress, until_step=until_step)

"""`torchdiffusion train-ae`: train a first-stage autoencoder (KL-VAE or VQGAN with a PatchGAN) for latent diffusion.
Resolves the run's config (an autoencoder preset or the run folder's saved config, --set overrides), handles
signals and calls config.ae_training.train_ae_run."""
from __future__ import annotations

from pathlib import Path

import click

from .common import dist_info, preset_or_saved, run_training, set_threads, training_options


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
    from ..config.strict import to_dict

    info = dist_info()
    set_threads(threads, info.world_size)
    run_dir, base = preset_or_saved(preset, run_dir, load_ae_preset, command="train-ae",
                                    presets="mnist-kl-f4, mnist-vq-f4, fashion-kl-f4, fashion-vq-f4", marker="ae",
                                    kind="autoencoder", marker_text="'ae' section")
    cfg = resolve_ae(base, list(overrides))
    if print_config:
        click.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)
        return
    run_training(train_ae_run, cfg, run_dir, info, resume=resume, allow_changes=allow_config_change, device=device,
                 progress=progress, until_step=until_step)

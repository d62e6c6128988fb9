"""`torchdiffusion train-ae`: train a first-stage autoencoder (KL-VAE or VQGAN with a PatchGAN) for latent diffusion.
Resolves the run's config (an autoencoder preset or the run folder's saved config, --set overrides), handles
signals and calls config.ae_training.train_ae_run."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from .common import dist_info, resolve_device, set_threads


@click.command("train-ae")
@click.option("--preset", default=None,
              help="Autoencoder preset (mnist-kl-f4, mnist-vq-f4, fashion-kl-f4, fashion-vq-f4) or a YAML path.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Dotted override, e.g. train.steps=500.")
@click.option("--run", "--run-dir", "run_dir", default=None, type=click.Path(path_type=Path),
              help="Run folder (default runs/<preset>). An existing run folder resumes.")
@click.option("--resume", default="latest", show_default=True, help="PATH to a checkpoint, 'latest' or 'none'.")
@click.option("--allow-config-change", is_flag=True, help="Resume even though the config or data changed.")
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--progress/--no-progress", default=None, help="tqdm bar (default: only on a terminal).")
@click.option("--until-step", type=int, default=None,
              help="Stop with a checkpoint at this step; run again to continue.")
def train_ae_cmd(preset, overrides, run_dir, resume, allow_config_change, print_config, threads, device, progress,
                 until_step):
    """Train a first-stage autoencoder; running it again on the same run folder resumes."""
    import yaml

    from ..config.ae_training import load_ae_preset, resolve_ae, train_ae_run
    from ..config.strict import load_yaml, to_dict
    from ..errors import ConfigError
    from ..train.trainer import EXIT_PREEMPTED

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
    stop = {"flag": False}

    def on_signal(signum, frame):  # SIGTERM/SIGINT: checkpoint at the next step boundary, exit 75
        stop["flag"] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        result = train_ae_run(cfg, run_dir, resume=resume, allow_changes=allow_config_change, dist=info,
                              device=resolve_device(device, info.local_rank), progress=progress,
                              until_step=until_step, should_stop=lambda: stop["flag"])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if result.stopped == "signal":
        sys.exit(EXIT_PREEMPTED)

"""`torchdiffusion encode`: write the raw-latent cache of a data set under a first stage (a `train-ae` run).

    torchdiffusion encode --codec-run runs/ae-fashion-kl --out runs/ae-fashion-kl/latents-train.safetensors
    torchdiffusion encode --codec-run AE --preset fashion-latent-kl --set data.limit=2000 --out CACHE

The data are the autoencoder run's own data section unless --preset is given; --set data.KEY=VALUE overrides
either. An up-to-date cache is left as it is; a stale one (other images or another autoencoder) is recomputed.
A diffusion run uses the cache with --set model.codec.cache=CACHE (pipelines/latent_cache.py has the format).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .common import resolve_device, set_threads


@click.command("encode")
@click.option("--codec-run", "codec_run", type=click.Path(path_type=Path), required=True,
              help="The autoencoder run folder (torchdiffusion train-ae).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The cache file to write (.safetensors).")
@click.option("--preset", default=None, help="Take the data section of this preset (default: the autoencoder run's).")
@click.option("--set", "overrides", multiple=True, metavar="data.KEY=VALUE", help="Override a data key.")
@click.option("--batch", type=int, default=256, show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--device", default="auto", show_default=True)
def encode_cmd(codec_run, out, preset, overrides, batch, threads, device):
    """Encode a data set's images with a first stage and write the raw-latent cache (fingerprinted)."""
    from ..config.build import build_data
    from ..config.codecs import build_latent_codec, first_stage
    from ..config.presets_io import load_preset
    from ..config.schema import DataConfig
    from ..config.strict import apply_overrides, from_dict, to_dict
    from ..data import dataset_fingerprint
    from ..errors import ConfigError
    from ..autoencoders.latent import KLCodecConfig, VQCodecConfig
    from ..pipelines.latent_cache import ensure_cache

    set_threads(threads)
    if batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {batch}")
    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise ConfigError(f"--set {bad[0]}: encode takes data.KEY=VALUE overrides only")
    fs = first_stage(codec_run)
    base = load_preset(preset)["data"] if preset else to_dict(fs.config.data)
    data = apply_overrides({"data": base}, list(overrides))["data"]
    dcfg = from_dict(DataConfig, data, "data")
    dataset = build_data(dcfg)
    ccfg = (KLCodecConfig if fs.kind == "kl" else VQCodecConfig)(run=str(codec_run), fingerprint=fs.fingerprint)
    codec = build_latent_codec(ccfg).to(resolve_device(device, 0))
    codec.latent_shape((dataset.channels, *dataset.image_size))  # images the autoencoder was not trained on: refused
    t0 = time.perf_counter()

    def say(msg):
        click.echo(msg, err=True)

    def progress(done, total):
        if done == total or done % (batch * 20) == 0:
            print(f"  encoded {done}/{total} images", file=sys.stderr, flush=True)

    moments = ensure_cache(out, codec, dataset, dataset_fingerprint(dataset), fs.fingerprint, batch=batch, say=say,
                           replace_stale=True, progress=progress)
    click.echo(f"{out}: {len(moments)} images, moments {tuple(moments.shape[1:])} ({fs.kind}, latent "
               f"{tuple(fs.latent_shape)}) in {time.perf_counter() - t0:.1f} s")


__all__ = ["encode_cmd"]

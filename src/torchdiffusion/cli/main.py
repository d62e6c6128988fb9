"""The `torchdiffusion` command: the click group, its error handling, and the registration of every command
(each command in its cli/*_cmd.py, their shared helpers in cli/common.py).

The cli package is the only one that reads argv and the environment (RANK / WORLD_SIZE / LOCAL_RANK from torchrun).
Every user error is one line on stderr and a non-zero exit code; --debug shows the traceback.
"""
from __future__ import annotations

import importlib
import sys

import click
import torch

from ..errors import TorchDiffusionError

EXIT_INTERRUPTED = 130


class _Group(click.Group):
    """Turns project errors into one line (RELIABILITY 4, 26) unless --debug is given."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TorchDiffusionError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except (torch.OutOfMemoryError, MemoryError):
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo("error: out of memory; lower train.batch_size (with train.grad_accum to keep the global batch), "
                       "the model size, or --batch when sampling; the last checkpoint is intact", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def cli(ctx, debug):
    """torchdiffusion: train, sample and evaluate diffusion models."""
    ctx.obj = {"debug": debug}


#: every command: (module of cli/, its click command or group). A new command is one module plus one line here.
COMMANDS = (
    ("train_cmd", "train"),
    ("train_ae_cmd", "train_ae_cmd"),
    ("sample_cmd", "sample"),
    ("env_cmd", "data"),
    ("env_cmd", "env"),
    ("guidance_cmd", "train_classifier_cmd"),
    ("eval_cmd", "eval_group"),
    ("audit_cmd", "audit_cmd"),
    ("report_cmd", "report_cmd"),
    ("eval_cond_cmd", "eval_cond_cmd"),
    ("grid_cmd", "grid_group"),
    ("restore_cmd", "restore_cmd"),
    ("likelihood_cmd", "likelihood"),
    ("encode_cmd", "encode_cmd"),
)
for _module, _name in COMMANDS:
    cli.add_command(getattr(importlib.import_module(f".{_module}", __package__), _name))


def main():
    cli(prog_name="torchdiffusion")


if __name__ == "__main__":
    main()

"""The `torchdiffusion` command: the click group, its error handling, and the registration of every command
(each command in its cli/*_cmd.py, their shared helpers in cli/common.py).

The cli package is the only one that reads argv and the environment (RANK / WORLD_SIZE / LOCAL_RANK from torchrun).
Every user error is one line on stderr and an exit code of the table in errors.py (docs/cli.md); --debug, before or
after the command's name, shows the traceback.
"""
from __future__ import annotations

import importlib
import sys

import click
import torch

from .. import __version__
from ..errors import EXIT_INTERRUPTED, EXIT_REFUSED, TorchDiffusionError


def _debug(ctx) -> bool:
    """--debug given to the group (torchdiffusion --debug CMD) or after the command (torchdiffusion CMD --debug)."""
    return bool(ctx.obj and ctx.obj.get("debug"))


def _debug_flag(ctx, param, value):
    if value:
        ctx.find_root().ensure_object(dict)["debug"] = True
    return value


_DEBUG_HELP = "Show full tracebacks."


def _add_debug(command: click.Command) -> None:
    """Every command (and sub-command) accepts --debug too; it is taken out before the command runs."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _add_debug(sub)
    if not any("--debug" in p.opts for p in command.params):
        command.params.append(click.Option(["--debug"], is_flag=True, expose_value=False, is_eager=True,
                                           callback=_debug_flag, help=_DEBUG_HELP))


class _Group(click.Group):
    """Turns project errors into one line (RELIABILITY 4, 26) unless --debug is given."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TorchDiffusionError as e:
            if _debug(ctx):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except (torch.OutOfMemoryError, MemoryError):
            if _debug(ctx):
                raise
            click.echo("error: out of memory; lower --batch (sample, restore, eval, audit, likelihood) or, when "
                       "training, train.batch_size (with train.grad_accum to keep the global batch), "
                       "train.precision=bf16 or the model size; files already written are intact", err=True)
            sys.exit(EXIT_REFUSED)  # RELIABILITY 24: one line with the knobs
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help=_DEBUG_HELP + " Also accepted after the command.")
@click.version_option(__version__, "--version", prog_name="torchdiffusion", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx, debug):
    """torchdiffusion: train, sample and evaluate diffusion models."""
    obj = ctx.ensure_object(dict)
    obj["debug"] = obj.get("debug", False) or debug


#: every command: (module of cli/, its click command or group). A new command is one module plus one line here.
COMMANDS = (
    ("train_cmd", "train"),
    ("train_ae_cmd", "train_ae_cmd"),
    ("sample_cmd", "sample"),
    ("cascade_cmd", "cascade_group"),
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
    ("list_cmd", "list_cmd"),
    ("interop_cmd", "convert_diffusers_cmd"),
    ("interop_cmd", "export_diffusers_cmd"),
    ("encode_cmd", "encode_cmd"),
    ("tokens_cmd", "train_tokens_cmd"),
    ("tokens_cmd", "sample_tokens_cmd"),
)
for _module, _name in COMMANDS:
    _command = getattr(importlib.import_module(f".{_module}", __package__), _name)
    _add_debug(_command)
    cli.add_command(_command)


def main():
    cli(prog_name="torchdiffusion")


if __name__ == "__main__":
    main()

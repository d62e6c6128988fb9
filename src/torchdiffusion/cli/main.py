"""The `torchdiffusion` command: the click group, its error handling, and the registration of every command
(train is defined here; the others in cli/*_cmd.py, their shared helpers in cli/common.py).

The cli package is the only one that reads argv and the environment (RANK / WORLD_SIZE / LOCAL_RANK from torchrun).
Every user error is one line on stderr and a non-zero exit code; --debug shows the traceback.
"""
from __future__ import annotations

import importlib
import signal
import sys
from pathlib import Path

import click
import torch

from ..errors import ConfigError, TorchDiffusionError
from .common import dist_info, resolve_device, set_threads

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


# --------------------------------------------------------------------------------------------- train
@cli.command()
@click.option("--preset", default=None, help="Preset name (mnist, fashion-mnist, folder, ...) or a YAML path.")
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
              help="Stop with a checkpoint at this step (e.g. to fit a job's time slot); run again to continue.")
def train(preset, overrides, run_dir, resume, allow_config_change, print_config, threads, device, progress,
          until_step):
    """Train a model; running it again on the same run folder resumes."""
    import yaml

    from ..config.presets_io import load_preset, resolve
    from ..config.strict import load_yaml, to_dict

    info = dist_info()
    set_threads(threads, info.world_size)
    name = preset or "mnist"
    run_dir = run_dir or Path("runs") / Path(name).stem
    saved = run_dir / "config.yaml"
    if saved.exists() and preset is None:
        base = load_yaml(saved)
    else:
        base = load_preset(name)
    cfg = resolve(base, list(overrides))
    if print_config:
        click.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)
        return
    _train(cfg, run_dir, resume, allow_config_change, info, resolve_device(device, info.local_rank), progress,
           until_step)


def _complete_config(cls, stored: dict) -> dict:
    """A checkpoint's stored config with today's defaults for the keys it predates (unknown keys: left as stored,
    so the resume check lists them)."""
    from ..config.strict import from_dict, to_dict
    try:
        return to_dict(from_dict(cls, stored))
    except ConfigError:
        return stored


def _train(cfg, run_dir: Path, resume: str, allow_changes: bool, info, device, progress, until_step=None):
    import yaml

    from ..config.build import build_conditioning, build_data, build_objective, build_run_model, build_sampler, \
        build_sigmas, diffusion_shape, resolve_for_data
    from ..config.strict import to_dict
    from ..data import dataset_fingerprint
    from ..errors import CheckpointError
    from ..pipelines.generate import generate, make_grid, save_png
    from ..train import checkpoint as ckpt
    from ..train import distributed
    from ..train.trainer import EXIT_PREEMPTED, Trainer

    torch.manual_seed(cfg.seed)
    train_set = build_data(cfg.data)
    val_set = build_data(cfg.data, cfg.data.val_split) if cfg.data.val_split else None
    cfg = resolve_for_data(cfg, train_set)  # model.data_shape and class counts from the data, checked
    conditioning = build_conditioning(cfg.cond, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                                      device=device)
    make_cond = conditioning if conditioning else None  # conditioners: cond from the batch, with their dropout
    cond_for = conditioning.cond_for if conditioning else None  # training grids: each conditioner's default
    model_cfg = cfg.model
    ckpt_dir = run_dir / "checkpoints"
    if resume == "latest":
        resume_from = ckpt.resolve_latest(ckpt_dir) if ckpt_dir.exists() else None
    elif resume == "none":
        if ckpt_dir.exists() and ckpt.resolve_latest(ckpt_dir) is not None:
            raise ConfigError(f"{run_dir} already holds checkpoints; use --resume latest to continue it, "
                              f"or another --run folder to start fresh")
        resume_from = None
    else:
        resume_from = Path(resume)
        if not resume_from.exists():
            raise CheckpointError(f"{resume_from}: --resume checkpoint does not exist; training does not silently "
                                  f"start fresh (use --resume none to start a new run)")
    model = build_run_model(cfg)
    objective = build_objective(cfg.objective, model_cfg)
    resolved = to_dict(cfg)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "samples").mkdir(exist_ok=True)
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
        tmp.replace(run_dir / "config.yaml")

    sampler = build_sampler(cfg.sample)
    sigmas = build_sigmas(cfg.sample, model.process)
    shape = diffusion_shape(model_cfg)
    seeds = list(range(cfg.sample.grid_images))

    def sample_grid(ema, step):
        images = generate(ema, seeds, shape, sampler, sigmas, batch=64, device=device, cond_for=cond_for)
        save_png(make_grid(images), run_dir / "samples" / f"grid_{step:08d}.png")

    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    distributed.init(info, device)
    try:
        from .eval_cmd import build_inloop_evaluator  # train.eval_every > 0: FID/KID during training
        evaluator = build_inloop_evaluator(cfg, model, shape, train_set, info, device, cond_for)
        trainer = Trainer(cfg.train, model=model, objective=objective, train_set=train_set, val_set=val_set,
                          run_dir=run_dir, seed=cfg.seed, resolved_config=resolved, make_cond=make_cond,
                          data_fingerprint=dataset_fingerprint(train_set), sample_grid=sample_grid, dist=info,
                          device=device, should_stop=lambda: stop["flag"], progress=progress,
                          until_step=until_step, evaluator=evaluator,
                          complete_config=lambda stored: _complete_config(type(cfg), stored))
        result = trainer.fit(resume_from, allow_changes)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        distributed.shutdown(info)
    if result.stopped == "signal":
        sys.exit(EXIT_PREEMPTED)


#: the commands besides train: (module of cli/, its click command or group). A new command is one module plus
#: one line here.
COMMANDS = (
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
)
for _module, _name in COMMANDS:
    cli.add_command(getattr(importlib.import_module(f".{_module}", __package__), _name))


def main():
    cli(prog_name="torchdiffusion")


if __name__ == "__main__":
    main()

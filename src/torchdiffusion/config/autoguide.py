"""Autoguidance from a run's files (Karras et al. 2024; guidance.autoguidance): the guide of `--autoguide PATH`, or the
run's own early checkpoint that its config names (sample.autoguide_step, kept by train.keep_steps), checked to be a
weaker model of the same task. Shared by `sample` and by every path that makes a run's images (config.run_images:
`eval --fake RUN`, `audit --run`), so they judge the images `sample` writes."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..train.budget import fraction_step


def autoguided(run, path: Path, scale: float, weights: str, device):
    """run.model guided by the model at `path` (guidance.autoguidance), after checking that the two models share
    the process, the data and the conditions (a guide of another task is refused in one line)."""
    from .loaders import load_run
    from .strict import to_dict
    from ..guidance.autoguidance import AutoGuidance

    if not path.exists():
        raise ConfigError(f"--autoguide {path}: no such run or checkpoint folder")
    is_run = (path / "checkpoints").is_dir()
    bad = load_run(path if is_run else None, None if is_run else path, weights, device)
    for what in ("data", "model.process", "cond"):
        mine, theirs = run.config, bad.config
        for part in what.split("."):
            mine, theirs = getattr(mine, part, None), getattr(theirs, part, None)
        mine, theirs = (to_dict(v) if v is not None and not isinstance(v, dict) else v for v in (mine, theirs))
        if mine != theirs:
            raise ConfigError(f"--autoguide {path}: its {what} differs from the sampled run's; the guide must be a "
                              f"weaker model of the same data, process and conditions")
    return AutoGuidance(run.model, bad.model, scale)


def default_guide(run, run_dir: Path | None, autoguide_path: Path | None) -> Path | None:
    """The guide `sample` uses: --autoguide PATH; none for --autoguide none; else the run's own checkpoint of step
    sample.autoguide_step (or of sample.autoguide_fraction of the run's planned length) where the config names one
    (kept by train.keep_steps / train.keep_fractions), found from --run (a run sampled by
    --checkpoint uses the run folder above it); none when the sampled checkpoint is not later than that step."""
    if autoguide_path is not None:
        return None if str(autoguide_path) == "none" else autoguide_path
    sample = run.config.sample
    step, keep = sample.autoguide_step, "train.keep_steps"
    fraction = getattr(sample, "autoguide_fraction", None)
    if fraction is not None:  # of the run's length as planned (train.fit_minutes) or configured
        total = run.checkpoint.meta.get("trainer", {}).get("planned_steps") or run.config.train.steps
        step, keep = fraction_step(fraction, int(total)), "train.keep_fractions"
    if step is None:
        return None
    if run.step <= step:
        return None  # the sampled checkpoint is the guide or older than it: nothing weaker to guide away from
    root = run_dir if run_dir is not None else Path(run.path).parent.parent
    guide = root / "checkpoints" / f"step_{step:08d}"
    if not guide.is_dir():
        what = f"sample.autoguide_step {step}" if fraction is None else f"sample.autoguide_fraction {fraction} (step {step})"
        value = step if fraction is None else fraction
        raise ConfigError(f"{what}: the run has no checkpoint {guide.name} to guide with "
                          f"(train with {keep} containing {value}); or sample with --autoguide none")
    return guide


__all__ = ["autoguided", "default_guide"]

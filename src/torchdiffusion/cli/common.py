"""Helpers every command shares: the process's place in a torchrun job, CPU threads, the device, the integer-list
syntax of --seeds and --labels (class names too), the sampler a run samples with after its command-line
overrides, the feature network of --feature-weights / --classifier, and progress on stderr (--quiet).

A leaf of the cli package: it imports no command module, so commands import it and never each other.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import click
import torch

from ..errors import ConfigError


# ------------------------------------------------------------------------------------------- process
def dist_info():
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (a single process without torchrun)."""
    from ..train.distributed import DistInfo
    try:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ConfigError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun)") from None


def set_threads(threads: int | None, world_size: int = 1) -> None:
    """--threads, or with several processes on one machine an equal share of the cores each."""
    if threads is None and world_size > 1:
        threads = max(1, (os.cpu_count() or 1) // world_size)
    if threads:
        torch.set_num_threads(threads)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """--device auto | cpu | cuda | cuda:N; 'auto' and 'cuda' pick this process's GPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; valid: cpu, auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"--device {name!r} is not valid; valid: auto, cpu, cuda, cuda:N")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


# ------------------------------------------------------------------------------------------- integer lists
def parse_int_ranges(text: str) -> list[int]:
    """'0-63', '3', '0,5,9', '0-4,9': ranges and single integers separated by commas, in order; ValueError on
    anything else (a descending range included). Empty parts are ignored, so the result may be empty."""
    from ..pipelines.settings import int_ranges  # one parser for the commands and the library
    return int_ranges(text)


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


def _names_line(class_names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(class_names[:limit]) + (f", ... ({len(class_names)} in all)" if len(class_names) > limit else "")
    return f"{shown} (or labels 0..{len(class_names) - 1})"


def parse_labels(text: Optional[str], class_names: Sequence[str] = ()) -> Optional[list[int]]:
    """'0-9' | '3' | '0,5,7' | '0-4,9' | 'circle,square' -> labels (None stays None). With the run's class names
    (data.class_names) a comma-separated part that is a class name (exactly, else ignoring case) is its label;
    other parts are integers or ranges. Whether integers are classes of the model is checked where the number
    of classes is known (pipelines.guided)."""
    if text is None:
        return None
    names = [str(c) for c in class_names]
    if names == [str(k) for k in range(len(names))]:
        names = []  # the names are the integers themselves (MNIST's digits): nothing to add
    exact = {c: k for k, c in enumerate(names)}
    folded: dict[str, int] = {}
    for k, c in enumerate(names):
        folded.setdefault(c.casefold(), k)
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part in exact or part.casefold() in folded:
            out.append(exact.get(part, folded.get(part.casefold())))
            continue
        try:
            out.extend(parse_int_ranges(part))
        except ValueError:
            if names:
                raise ConfigError(f"--labels: {part!r} is not a class of this run; valid: {_names_line(names)}") from None
            raise ConfigError(f"--labels {text!r} is not valid; use a label (3), a range (0-9), a list (0,5,7) "
                              f"or both") from None
    if not out:
        raise ConfigError("--labels is empty; use e.g. 0-9" + (f" or class names: {_names_line(names)}" if names else ""))
    return out


# ------------------------------------------------------------------------------------------- sampler
def build_run_sampler(scfg, sampler_opts: Sequence[str] = ()) -> tuple[Callable, dict, Optional[int]]:
    """(sampler, its --sampler-opt options, NFE per image or None where only a count can tell) of a sample
    config (pipelines.settings.override_sample has applied the command's flags to it)."""
    from ..config.sampler_options import build_run_sampler as build  # shared with the library's pipeline
    return build(scfg, sampler_opts)


# ------------------------------------------------------------------------------------------- features
def make_extractor(feature_weights, classifier, batch: int, device):
    """Inception (default) or a project-trained classifier (labelled 'classifier')."""
    if classifier is not None:
        try:
            from ..config.loaders import load_classifier
        except ImportError:
            raise ConfigError("--classifier needs a classifier run from `torchdiffusion train-classifier`, which "
                              "this installation does not have") from None
        from ..eval import ClassifierFeatures
        from ..eval.inception import file_sha256
        module = load_classifier(Path(classifier), device=device)
        weights = Path(getattr(module, "checkpoint_path", "")) / "model.safetensors"
        return ClassifierFeatures(module, name=f"classifier:{Path(classifier).name}", device=device,
                                  sha256=file_sha256(weights) if weights.is_file() else "")
    from ..eval import InceptionFeatures
    return InceptionFeatures(feature_weights, batch_size=batch, device=device, option="--feature-weights PATH")


# ------------------------------------------------------------------------------------------- real images
#: the data sets `--real NAME:SPLIT` names (eval, cascade sweep)
DATASETS = ("mnist", "fashion-mnist")


def load_real_images(spec: str, split: str | None = None, limit: int | None = None) -> tuple[torch.Tensor, str]:
    """'mnist:test' / 'fashion-mnist:train' / a folder (or ZIP) of images -> (uint8 images, source label)."""
    from ..data import load_fashion_mnist, load_image_folder, load_mnist
    from ..errors import DataError
    from ..pipelines.images import IMAGE_EXT, load_sample_folder

    name, _, sp = spec.partition(":")
    if name in DATASETS:
        sp = sp or split or "test"
        ds = (load_mnist if name == "mnist" else load_fashion_mnist)(sp)
        source = f"{name}:{sp}"
    else:
        p = Path(spec)
        if not p.exists():
            raise DataError(f"{spec}: not a data set ({', '.join(DATASETS)}, e.g. mnist:test), a statistics file "
                            f"or a folder of images")
        if p.is_dir() and any(q.suffix.lower() in IMAGE_EXT for q in p.iterdir()):
            x = load_sample_folder(p, option="--real")[0]  # a flat folder (e.g. samples): seed order, grid.png skipped
        else:
            x = load_image_folder(p, channels="auto").x  # class subfolders or a ZIP
        source = f"folder:{p.resolve().name}"
    if name in DATASETS:
        x = ds.x
    if limit is not None:
        if limit < 2:
            raise ConfigError(f"--limit must be >= 2, got {limit}")
        x = x[:limit]
        source += f"[:{len(x)}]"
    return x, source


# ------------------------------------------------------------------------------------------- progress
def _remember_quiet(ctx: click.Context, param, value: bool) -> None:
    ctx.meta["torchdiffusion.quiet"] = bool(value)


def quiet_option(f):
    """--quiet for a command with long work: no progress bar or progress lines (progress_for reads it)."""
    return click.option("--quiet", is_flag=True, expose_value=False, callback=_remember_quiet,
                        help="No progress bar or progress lines on stderr.")(f)


def progress_for(total: Optional[int], what: str, unit: str = "images", *, off: bool = False):
    """pipelines.progress.Progress of the running command on stderr: a tqdm bar on a terminal, else a line every
    30 s with an ETA; nothing with --quiet (quiet_option) or `off` (e.g. a torchrun process other than the
    main one)."""
    from ..pipelines.progress import Progress, progress_mode
    ctx = click.get_current_context(silent=True)
    quiet = off or bool(ctx is not None and ctx.meta.get("torchdiffusion.quiet"))
    return Progress(total, what, unit, mode=progress_mode(quiet))


# ------------------------------------------------------------------------------------------- training commands
def training_options(f):
    """The options every training command shares (train, train-ae): --run/--run-dir, --resume,
    --allow-config-change, --print-config, --threads, --device, --progress and --until-step."""
    options = [
        click.option("--run", "--run-dir", "run_dir", default=None, type=click.Path(path_type=Path),
                     help="Run folder (default runs/<preset>). An existing run folder resumes."),
        click.option("--resume", default="latest", show_default=True, help="PATH to a checkpoint, 'latest' or 'none'."),
        click.option("--allow-config-change", is_flag=True, help="Resume even though the config or data changed."),
        click.option("--print-config", is_flag=True, help="Print the resolved config and exit."),
        click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--progress/--no-progress", default=None, help="tqdm bar (default: only on a terminal)."),
        click.option("--until-step", type=int, default=None,
                     help="Stop with a checkpoint at this step (e.g. to fit a job's time slot); run again to continue."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def preset_or_saved(preset, run_dir, load_preset: Callable[[str], dict], *, command: str, presets: str,
                    marker: str, kind: str, marker_text: str | None = None) -> tuple[Path, dict]:
    """(run folder, base config) of a training command without a default preset (train-ae, train-tokens): --preset
    (runs/<preset> by default), or the saved config.yaml of an existing --run to resume, which must hold `marker`
    (the key that tells a `kind` run's config from another's; marker_text names it in the message)."""
    from ..config.strict import load_yaml
    saved = run_dir / "config.yaml" if run_dir is not None else None
    if preset is None and not (saved is not None and saved.exists()):
        raise ConfigError(f"{command} needs --preset ({presets} or a YAML path), or --run of an existing {kind} run "
                          f"to resume")
    run_dir = run_dir or Path("runs") / Path(preset).stem
    saved = run_dir / "config.yaml"
    if not (saved.exists() and preset is None):
        return run_dir, load_preset(preset)
    base = load_yaml(saved)
    if marker not in base:
        raise ConfigError(f"{saved} is not {'an' if kind[0] in 'aeiou' else 'a'} {kind} run's config (no {marker_text or marker}); "
                          f"give --preset")
    return run_dir, base


def run_training(train_fn: Callable, cfg, run_dir: Path, info, *, resume: str, allow_changes: bool, device: str,
                 progress, until_step) -> None:
    """train_fn(cfg, run_dir, ...) (config.training.train_run or config.ae_training.train_ae_run) with SIGTERM/SIGINT
    turned into a checkpoint at the next step boundary and exit code 75 (errors.EXIT_CODES)."""
    import signal
    import sys
    from ..train.trainer import EXIT_PREEMPTED
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        result = train_fn(cfg, run_dir, resume=resume, allow_changes=allow_changes, dist=info,
                          device=resolve_device(device, info.local_rank), progress=progress, until_step=until_step,
                          should_stop=lambda: stop["flag"])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if result.stopped == "signal":
        sys.exit(EXIT_PREEMPTED)

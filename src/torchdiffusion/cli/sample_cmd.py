"""`torchdiffusion sample`: one PNG per seed, a grid and samples.json from a trained run (pipelines.generate), with
class labels, classifier-free and classifier guidance and rejection sampling (pipelines.guided)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import click

from ..errors import ConfigError
from ..config.autoguide import autoguided, default_guide
from .common import (build_run_sampler, dist_info, parse_labels, parse_seeds, progress_for, quiet_option,
                     resolve_device, set_threads)


# --------------------------------------------------------------------------------------------- guidance options
_SAMPLE_OPTIONS = [
    click.option("--labels", default=None,
                 help="Class labels, cycled over the seeds: 0-9, 3, 0,5,7 or the run's class names (circle,square) "
                      "(default for a class-conditional model: 0..K-1)."),
    click.option("--guidance-scale", type=float, default=None,
                 help="Classifier-free guidance scale w: D_u + w (D_c - D_u); 1 = conditional, 0 = unconditional."),
    click.option("--guidance-interval", default=None, metavar="LO,HI",
                 help="Guide only for sigma in (LO, HI] (Kynkaanniemi et al. 2024); elsewhere w = 1."),
    click.option("--classifier", "classifier_run", type=click.Path(path_type=Path), default=None,
                 help="A train-classifier run (--noisy) for classifier guidance."),
    click.option("--classifier-scale", type=float, default=1.0, show_default=True,
                 help="Classifier guidance scale s: D + s sigma^2 grad log p(y | x, sigma)."),
    click.option("--reject", is_flag=True,
                 help="Regenerate samples whose label a classifier does not recover (see --reject-*)."),
    click.option("--reject-threshold", type=float, default=0.0, show_default=True,
                 help="Also reject samples whose classifier confidence p(y | x) is below this."),
    click.option("--reject-budget", type=int, default=None,
                 help="Extra generations allowed in total (default: the number of seeds)."),
    click.option("--reject-classifier", type=click.Path(path_type=Path), default=None,
                 help="Classifier run that judges samples for --reject (default: --classifier)."),
]


def guidance_options(f):
    """Adds the conditional-generation options to `sample`."""
    for opt in reversed(_SAMPLE_OPTIONS):
        f = opt(f)
    return f


def parse_interval(text: Optional[str]) -> Optional[tuple[float, float]]:
    """--guidance-interval 'LO,HI' -> (lo, hi) with 0 <= lo < hi (None stays None)."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--guidance-interval {text!r} is not valid; use LO,HI, e.g. 0.28,5.42") from None
    if not 0 <= lo < hi:
        raise ConfigError(f"--guidance-interval needs 0 <= LO < HI, got {lo:g},{hi:g}")
    return lo, hi


def guided_sampling(run, base, seed_list: Sequence[int], device, *, labels=None, guidance_scale=None,
                    guidance_interval=None, classifier_run=None, classifier_scale=1.0, reject=False,
                    reject_threshold=0.0, reject_budget=None, reject_classifier=None, world_size: int = 1):
    """The options of `guidance_options` -> pipelines.guided.GuidedSampling of `run` around `base` (run.model or
    a wrapper of it), with the classifiers loaded from their runs."""
    from ..config.loaders import load_classifier
    from ..pipelines.guided import GuidedSampling

    interval = parse_interval(guidance_interval)
    names = tuple(getattr(run.config.data, "class_names", ()))  # the run's classes by name (data.class_names)
    if len(names) != (run.num_classes or (len(names) if classifier_run is not None else -1)):
        names = ()  # the names are those of the model's classes (or of a classifier trained on the run's data)
    label_list = parse_labels(labels, names)
    classifier = load_classifier(classifier_run, device=device) if classifier_run is not None else None
    judge_run = reject_classifier or classifier_run
    judge = None
    if reject and judge_run is not None:
        if world_size > 1:
            raise ConfigError("--reject runs in one process; drop torchrun or --reject")
        judge = (classifier if reject_classifier is None and classifier is not None
                 else load_classifier(judge_run, device=device))
    return GuidedSampling(run.num_classes, base, seed_list, device, labels=label_list, labels_text=labels,
                          guidance_scale=guidance_scale, interval=interval, classifier=classifier,
                          classifier_scale=classifier_scale, reject=reject, judge=judge,
                          reject_threshold=reject_threshold, reject_budget=reject_budget,
                          uncond=run.conditioning.null if run.conditioning else None, log=click.echo,
                          warn=lambda msg: click.echo(msg, err=True))


def default_guidance_scale(run, given: float | None) -> float | None:
    """--guidance-scale if given, else the run's sample.guidance_scale (checked: a class-conditional run trained
    with label dropout), else None."""
    if given is not None:
        return given
    w = run.config.sample.guidance_scale
    if w is None:
        return None
    if not run.num_classes:
        raise ConfigError(f"sample.guidance_scale {w:g} in {run.path}'s config needs a class-conditional run "
                          f"(cond.label: {{kind: class, p_uncond: 0.1}}); this run is unconditional")
    return w


# --------------------------------------------------------------------------------------------- sample
@click.command()
@click.option("--run", "--run-dir", "run_dir", type=click.Path(path_type=Path), default=None,
              help="Run folder: its latest verified checkpoint is used.")
@click.option("--checkpoint", "ckpt_path", type=click.Path(path_type=Path), default=None, help="A checkpoint folder.")
@click.option("--outdir", type=click.Path(path_type=Path), required=True,
              help="Where PNGs, grid.png and samples.json go: a new or empty folder (see --overwrite).")
@click.option("--overwrite", is_flag=True,
              help="Reuse a non-empty --outdir: first remove the PNGs, grid.png and samples.json an earlier "
                   "`sample` wrote there (only those).")
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
@click.option("--autoguide", "autoguide_path", type=click.Path(path_type=Path), default=None,
              help="Autoguidance (Karras et al. 2024): a weaker model of the same task (a run folder or a checkpoint "
                   "folder, e.g. an early checkpoint of the same run) to guide away from; 'none': no guide even "
                   "where the run's sample.autoguide_step or autoguide_fraction names one.")
@click.option("--autoguide-scale", type=float, default=None,
              help="w in D_bad + w (D_good - D_bad); 1 = the model alone (default: the run's sample.autoguide_scale).")
@click.option("--frames", type=int, default=None,
              help="Video runs: frames per clip (default: the training clips'; the frame count is free).")
@quiet_option
@guidance_options  # --labels, --guidance-scale/-interval, --classifier(-scale), --reject* (above)
def sample(run_dir, ckpt_path, outdir, overwrite, seeds, batch, sampler, steps, grid_kind, eta, sampler_opts, weights, threads,
           device, grid_file=None, autoguide_path=None, autoguide_scale=None, frames=None, **guidance):
    """Generate one PNG per seed (clips: one GIF), a grid, and samples.json."""
    from ..config.build import build_sigmas
    from ..config.loaders import load_run
    from ..config.registry import GRIDS
    from ..config.sampler_options import CountingDenoiser
    from ..pipelines.generate import prepare_outdir, sample_run
    from ..pipelines.settings import override_sample

    info = dist_info()
    set_threads(threads, info.world_size)
    dev = resolve_device(device, info.local_rank)
    if batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {batch}")
    seed_list = parse_seeds(seeds)
    if info.is_main:  # before the model loads: a refusal costs nothing (several processes: the main one checks)
        prepare_outdir(outdir, overwrite)
    run = load_run(run_dir, ckpt_path, weights, dev)
    sr = [name for name, c in run.conditioning.items.items() if hasattr(c, "low_res_of")]
    if sr:
        raise ConfigError(f"{run.path} is a super-resolution stage (cond.{sr[0]}): it needs a low-resolution input; "
                          f"sample it with `torchdiffusion cascade sample --stage BASE_RUN --stage SR_RUN` or "
                          f"`cascade sample --low-res DIR --stage SR_RUN`")
    shape = run.sample_shape
    if frames is not None:
        if len(shape) != 4:
            raise ConfigError(f"--frames applies to video runs (clips (C, T, H, W)); this run makes {tuple(shape)}")
        if frames < 1:
            raise ConfigError(f"--frames must be >= 1, got {frames}")
        shape = (shape[0], frames, *shape[2:])
    scfg = override_sample(run.config.sample, sampler=sampler, steps=steps, grid=grid_kind, grid_file=grid_file,
                           eta=eta, grids=GRIDS)
    fn, options, nfe = build_run_sampler(scfg, sampler_opts)
    sigmas = build_sigmas(scfg, run.model.process)
    base = run.model
    guide = default_guide(run, run_dir, autoguide_path)
    extra = None
    if guide is not None:
        w = run.config.sample.autoguide_scale if autoguide_scale is None else autoguide_scale
        base = autoguided(run, guide, w, weights, dev)
        extra = {"autoguidance": {"guide": str(guide), "scale": w, "networks_per_nfe": 2}}  # good and guide each call
    counter = CountingDenoiser(base) if nfe is None else None  # adaptive samplers: measure the NFE
    guidance = {**guidance, "guidance_scale": default_guidance_scale(run, guidance.get("guidance_scale"))}
    guided = guided_sampling(run, counter or base, seed_list, dev, world_size=info.world_size, **guidance)
    with progress_for(len(seed_list[info.rank::info.world_size]), "sample", off=not info.is_main) as progress:
        record = sample_run(run, guided, seed_list, outdir, sample_config=scfg, sampler=fn, sampler_options=options,
                            sigmas=sigmas, nfe=nfe, seeds_text=seeds, batch=batch, rank=info.rank,
                            world_size=info.world_size, device=dev, counter=counter, progress=progress,
                            extra=extra, shape=shape)
    if info.is_main:
        click.echo(f"wrote {len(seed_list)} {'clips' if len(shape) == 4 else 'images'} to {outdir} in {record['seconds']:.1f} s "
                   f"({scfg.sampler}, {scfg.steps} steps, {record['nfe']} NFE{', x2 networks: autoguided' if guide else ''})")


__all__ = ["sample"]

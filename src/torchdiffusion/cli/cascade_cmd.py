"""`torchdiffusion cascade sample|sweep`: cascaded generation (pipelines.cascade) from trained stage runs.

    torchdiffusion cascade sample --stage BASE --stage SR --aug-level snr=3 --outdir OUT [--handoff truncated]
    torchdiffusion cascade sweep --stage BASE --stage SR --levels none,snr=10,snr=5,snr=3,t=0.5 --real fashion-mnist:test
                                 --classifier CLS --outdir OUT

Per stage: --sampler / --steps take one value for all stages or a comma list with one per stage.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import click

from ..errors import ConfigError
from .common import build_run_sampler, load_real_images, make_extractor, parse_seeds, resolve_device, set_threads


def _per_stage(text: Optional[str], n: int, name: str, cast=str) -> list:
    """'a' or 'a,b,c' -> one value per stage (None entries when not given)."""
    if text is None:
        return [None] * n
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) == 1:
        parts = parts * n
    if len(parts) != n:
        raise ConfigError(f"{name} {text!r}: give one value, or one per stage ({n} stages)")
    try:
        return [cast(p) if p else None for p in parts]
    except ValueError:
        raise ConfigError(f"{name} {text!r} is not valid") from None


def load_stages(stage_paths: Sequence[Path], samplers, steps, weights: str, device):
    """pipelines.cascade.Stage per --stage (a run folder or a checkpoint folder), with its sampler and grid."""
    from ..config.build import build_sigmas
    from ..config.loaders import load_run
    from ..config.registry import GRIDS
    from ..pipelines.cascade import Stage
    from ..pipelines.settings import override_sample

    stages, records = [], []
    for k, path in enumerate(stage_paths):
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"--stage {path}: no such run or checkpoint folder")
        is_run = (path / "checkpoints").is_dir()
        run = load_run(path if is_run else None, None if is_run else path, weights, device)
        if tuple(run.sample_shape) != tuple(run.image_shape):
            raise ConfigError(f"--stage {path}: a latent-space model; the cascade hands pixel images between stages "
                              f"(train stages with the identity codec)")
        scfg = override_sample(run.config.sample, sampler=samplers[k], steps=steps[k], grids=GRIDS,
                               steps_name="--steps")
        fn, _, nfe = build_run_sampler(scfg)
        sigmas = build_sigmas(scfg, run.model.process)
        stages.append(Stage(path.name, run.model, run.sample_shape, fn, sigmas,
                            run.conditioning if run.conditioning else None))
        records.append({"stage": k + 1, "path": str(run.path), "step": run.step, "weights": weights,
                        "checkpoint_sha256": run.hashes(), "shape": list(run.sample_shape), "sampler": scfg.sampler,
                        "steps": scfg.steps, "nfe": nfe, "sigmas": [float(s) for s in sigmas],
                        "low_res": stages[-1].low_res})
    return stages, records


def _low_res_inputs(folder: Optional[Path], seeds: Sequence[int]):
    """--low-res DIR: the seed-named PNGs (000000.png ...) or, failing those, the images in name order; seed i takes
    image i."""
    if folder is None:
        return None
    from ..pipelines.images import load_sample_folder
    images = load_sample_folder(folder, option="--low-res")[0]
    if len(images) < len(seeds):
        raise ConfigError(f"--low-res {folder}: {len(images)} images for {len(seeds)} seeds")
    return images[:len(seeds)]


def _common(f):
    opts = [
        click.option("--stage", "stage_paths", multiple=True, required=True, type=click.Path(path_type=Path),
                     help="A stage's run (or checkpoint) folder, in order: a base model, then SR stages (repeat)."),
        click.option("--low-res", "low_res_dir", type=click.Path(path_type=Path), default=None,
                     help="A folder of low-resolution PNGs that replaces the base stage (then every --stage is SR)."),
        click.option("--outdir", type=click.Path(path_type=Path), required=True),
        click.option("--seeds", default="0-63", show_default=True),
        click.option("--batch", type=int, default=16, show_default=True),
        click.option("--sampler", default=None, help="One sampler for all stages or a comma list (one per stage)."),
        click.option("--steps", default=None, help="Steps for all stages or a comma list (one per stage)."),
        click.option("--handoff", type=click.Choice(["full", "truncated"]), default="full", show_default=True,
                     help="full: each stage runs to sigma 0 and its output is re-noised (non-truncated); truncated: "
                          "the previous stage stops at the level's sigma and hands its noisy z over."),
        click.option("--blur", type=float, default=None,
                     help="Fixed blur std (low-res pixels) at inference (default: each SR run's sample_blur; 0 none)."),
        click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema", show_default=True),
        click.option("--threads", type=int, default=None),
        click.option("--device", default="auto", show_default=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.group("cascade")
def cascade_group():
    """Cascaded diffusion: a base stage and super-resolution stages with conditioning augmentation."""


def _setup(stage_paths, sampler, steps, weights, threads, device):
    set_threads(threads)
    dev = resolve_device(device)
    n = len(stage_paths)
    stages, records = load_stages(stage_paths, _per_stage(sampler, n, "--sampler"),
                                  _per_stage(steps, n, "--steps", int), weights, dev)
    return dev, stages, records


def _levels_of(text: Optional[str], stages, low_res) -> list[float]:
    """--aug-level: one level for all SR stages or a comma list; default: each SR run's own sample level."""
    from ..conditioners.low_res import parse_level
    from ..pipelines.cascade import check_stages
    check_stages(stages, None if low_res is None else tuple(low_res.shape[1:]))
    sr = [st for st in stages[(0 if low_res is not None else 1):]]
    if text is None:
        return [st.conditioner.cfg.sample_level for st in sr]
    return _per_stage(text, len(sr), "--aug-level", parse_level) if sr else []


@cascade_group.command("sample")
@_common
@click.option("--aug-level", default=None,
              help="Inference augmentation level of the SR stages: snr=3, t=0.3, sigma=0.5 or none (one for all, "
                   "or a comma list; default: each SR run's sample_snr / sample_time).")
@click.option("--overwrite", is_flag=True, help="Reuse a non-empty --outdir (removes what an earlier run wrote).")
def cascade_sample(stage_paths, low_res_dir, outdir, seeds, batch, sampler, steps, handoff, blur, weights, threads,
                   device, aug_level, overwrite):
    """Generate through every stage: OUTDIR/stageK/<seed>.png and grid.png per stage, grid.png (last stage) and
    cascade.json."""
    from ..pipelines.cascade import cascade_generate, describe_levels
    from ..pipelines.generate import make_grid, prepare_outdir, save_png

    seed_list = parse_seeds(seeds)
    prepare_cascade_outdir(outdir, overwrite)
    dev, stages, records = _setup(stage_paths, sampler, steps, weights, threads, device)
    low_res = _low_res_inputs(low_res_dir, seed_list)
    levels = _levels_of(aug_level, stages, low_res)
    dirs = [outdir / f"stage{k + 1}" for k in range(len(stages))]
    for d in dirs:
        prepare_outdir(d, overwrite)
        d.mkdir(parents=True, exist_ok=True)

    def write(k, chunk, images):
        for s, img in zip(chunk, images):
            save_png(img, dirs[k] / f"{s:06d}.png")

    t0 = time.perf_counter()
    out = cascade_generate(stages, seed_list, levels=levels, handoff=handoff, blur=blur, low_res=low_res,
                           batch=batch, device=dev, on_batch=write)
    for k, images in enumerate(out["images"]):
        save_png(make_grid(images[:256]), dirs[k] / "grid.png")
    save_png(make_grid(out["images"][-1][:256]), outdir / "grid.png")
    for rec, sec, lv in zip(records, out["seconds"], describe_levels(out["levels"])):
        rec.update(seconds=round(sec, 3), aug_level=lv)
    record = {"stages": records, "seeds": seeds, "count": len(seed_list), "batch": batch, "handoff": handoff,
              "aug_levels_t": levels, "blur": blur, "low_res": None if low_res_dir is None else str(low_res_dir),
              "seconds": round(time.perf_counter() - t0, 3)}
    (outdir / "cascade.json").write_text(json.dumps(record, indent=2))
    click.echo(f"wrote {len(seed_list)} images per stage ({len(stages)} stages, {handoff} hand-off) to {outdir} "
               f"in {record['seconds']:.1f} s")


def prepare_cascade_outdir(outdir: Path, overwrite: bool) -> None:
    """A new or empty --outdir, or (--overwrite) one that holds only what `cascade sample` writes there."""
    from ..errors import OutputError
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"--outdir {outdir} is a file; give a folder")
    entries = sorted(outdir.iterdir()) if outdir.is_dir() else []
    ours = {"grid.png", "cascade.json", "sweep.json", "sweep.md", "sweep.png"}
    others = [p for p in entries if not (p.name in ours or (p.is_dir() and p.name.startswith("stage")))]
    if entries and not overwrite:
        raise OutputError(f"--outdir {outdir} is not empty ({len(entries)} entries); give a new folder or --overwrite")
    if others:
        raise OutputError(f"--outdir {outdir} holds files the cascade did not write (e.g. {others[0].name}); give "
                          f"an empty or new folder")
    outdir.mkdir(parents=True, exist_ok=True)


@cascade_group.command("sweep")
@_common
@click.option("--levels", default="none,snr=10,snr=5,snr=3,t=0.5", show_default=True,
              help="Inference levels to evaluate (comma list of snr=, t=, sigma= or none).")
@click.option("--real", required=True, help="mnist:test, fashion-mnist:test, or a folder of images.")
@click.option("--real-limit", type=int, default=None, help="Use only the first N real images.")
@click.option("--feature-weights", type=click.Path(path_type=Path), default=None,
              help="Inception weights file (default: the packaged or configured one).")
@click.option("--classifier", type=click.Path(path_type=Path), default=None,
              help="A train-classifier run whose features replace Inception's (a domain FID).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None)
@click.option("--overwrite", is_flag=True)
def cascade_sweep(stage_paths, low_res_dir, outdir, seeds, batch, sampler, steps, handoff, blur, weights, threads,
                  device, levels, real, real_limit, feature_weights, classifier, cache_dir, overwrite):
    """FID and KID of the last stage at each inference level: OUTDIR/sweep.json, sweep.md and sweep.png."""
    from ..conditioners.low_res import level_text, parse_level
    from ..pipelines.cascade import level_grid
    from ..pipelines.cascade_sweep import plot_sweep, sweep_levels, sweep_table

    seed_list = parse_seeds(seeds)
    prepare_cascade_outdir(outdir, overwrite)
    grid = level_grid(parse_level(v) for v in levels.split(","))
    dev, stages, records = _setup(stage_paths, sampler, steps, weights, threads, device)
    low_res = _low_res_inputs(low_res_dir, seed_list)
    _levels_of(None, stages, low_res)  # the stages fit together (one line otherwise)
    real_images, source = load_real_images(real, limit=real_limit)
    extractor = make_extractor(feature_weights, classifier, batch=64, device=dev)
    scorer = fid_kid_scorer(extractor, real_images, source, cache_dir)
    rows = sweep_levels(stages, seed_list, grid, scorer, handoff=handoff, blur=blur, low_res=low_res, batch=batch,
                        device=dev, outdir=outdir, log=lambda m: click.echo(m, err=True))
    record = {"stages": records, "seeds": seeds, "count": len(seed_list), "handoff": handoff, "blur": blur,
              "real": source, "extractor": getattr(extractor, "name", "?"), "rows": rows}
    (outdir / "sweep.json").write_text(json.dumps(record, indent=2))
    (outdir / "sweep.md").write_text(sweep_table(record))
    plot_sweep(rows, outdir / "sweep.png", title=f"{handoff} hand-off, N={len(seed_list)}")
    best = min(rows, key=lambda r: r["fid"])
    click.echo(f"best level {level_text(best['t'])}: FID {best['fid']:.2f}; table in {outdir / 'sweep.md'}")


def fid_kid_scorer(extractor, real_images, source: str, cache_dir=None):
    """score(uint8 images) -> {"fid", "kid", "kid_std", "n"} against the cached reference of real_images."""
    import warnings

    from ..eval import SmallSampleWarning, cached_reference, extract_features, score

    reference, _, _ = cached_reference(real_images, extractor, source=source, cache_dir=cache_dir)

    def scorer(images):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SmallSampleWarning)
            r = score(reference, extract_features(extractor, images), metrics=("fid", "kid"), extractor=extractor,
                      allow_small_n=True, min_n=0, seed=0)
        p = "classifier_" if "classifier_fid" in r else ""
        return {"fid": float(r[p + "fid"]), "kid": float(r[p + "kid"]), "kid_std": float(r[p + "kid_std"]),
                "n": int(r["n_fake"])}
    return scorer


__all__ = ["cascade_group", "load_stages", "fid_kid_scorer"]

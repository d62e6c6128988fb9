"""Training a run from its resolved config: the library function behind `torchdiffusion train`.

It sits in config (row 5) because it assembles components from a config (data, conditioners, codec, model,
objective, sampler for grids, in-loop evaluation) and hands them to the training loop (train.trainer)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from ..errors import CheckpointError, ConfigError
from ..train.distributed import DistInfo
from ..train.trainer import TrainResult
from .schema import RunConfig


#: keys that training sets from the data (build.resolve_for_data); a checkpoint that predates one takes the value
#: the data give today (the data fingerprint check still compares the data themselves)
DATA_DERIVED = (("data", "class_names"),)


def complete_config(cls, stored: dict, current: dict | None = None) -> dict:
    """A checkpoint's stored config with today's defaults for the keys it predates (unknown keys: left as stored,
    so the resume check lists them); keys of DATA_DERIVED it predates take their value in `current`."""
    from .strict import from_dict, to_dict
    try:
        out = to_dict(from_dict(cls, stored))
    except ConfigError:
        return stored
    for section, key in DATA_DERIVED if current else ():
        if key not in (stored.get(section) or {}) and key in (current.get(section) or {}):
            out[section][key] = current[section][key]
    return out


def write_run_config(run_dir: Path, resolved: dict) -> None:
    """RUN/config.yaml (atomically: tmp + rename) and RUN/samples/, as every training command writes them."""
    import yaml
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "samples").mkdir(exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
    tmp.replace(run_dir / "config.yaml")


def resume_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint a training command resumes from: --resume latest (the run folder's newest verified
    checkpoint, None in a new folder), none (a new run: refused if the folder holds checkpoints) or a path (must
    exist: training never silently starts fresh, RELIABILITY 9)."""
    from ..train import checkpoint as ckpt
    ckpt_dir = run_dir / "checkpoints"
    if resume == "latest":
        return ckpt.resolve_latest(ckpt_dir) if ckpt_dir.exists() else None
    if resume == "none":
        if ckpt_dir.exists() and ckpt.resolve_latest(ckpt_dir) is not None:
            raise ConfigError(f"{run_dir} already holds checkpoints; use --resume latest to continue it, "
                              f"or another --run folder to start fresh")
        return None
    resume_from = Path(resume)
    if not resume_from.exists():
        raise CheckpointError(f"{resume_from}: --resume checkpoint does not exist; training does not silently "
                              f"start fresh (use --resume none to start a new run)")
    return resume_from


def train_run(cfg: RunConfig, run_dir: Path, *, resume: str = "latest", allow_changes: bool = False,
              dist: DistInfo = DistInfo(), device: torch.device = torch.device("cpu"), progress: bool | None = None,
              until_step: int | None = None, should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train (or resume) the run of a resolved config in run_dir: data, conditioners and codec from the config,
    the model sized from the data, the loop with the diffusion step, training-time grids and in-loop evaluation.
    resume: latest (the folder's newest verified checkpoint, if any), none (a new run: refused if the folder holds
    checkpoints) or a checkpoint path (must exist). should_stop() is polled at each step boundary (signals).
    The main process holds the run folder's lock (train.runlock) throughout: a second `train` on the same folder
    is refused in one line naming the holder's pid."""
    from ..train.runlock import run_lock
    with run_lock(run_dir, enabled=dist.is_main):
        return _train_run(cfg, run_dir, resume=resume, allow_changes=allow_changes, dist=dist, device=device,
                          progress=progress, until_step=until_step, should_stop=should_stop)


def _train_run(cfg: RunConfig, run_dir: Path, *, resume: str, allow_changes: bool, dist: DistInfo,
               device: torch.device, progress: bool | None, until_step: int | None,
               should_stop: Callable[[], bool] | None) -> TrainResult:
    info = dist

    from .build import build_codec, build_conditioning, build_data, build_objective, build_run_model, \
        build_sampler, build_sigmas, diffusion_shape, resolve_for_data
    from .codecs import LatentEncoder, is_latent, prepare_latent_run, write_codec_record
    from .strict import to_dict
    from ..data import dataset_fingerprint
    from ..pipelines.generate import codec_decoder, denoiser_calls, generate, make_grid, save_png
    from ..train import checkpoint as ckpt
    from ..train import distributed
    from ..train.trainer import Trainer

    if cfg.train.tensorboard:
        from ..train.logger import tensorboard_writer_class
        tensorboard_writer_class()  # not installed: one line before any data is read
    torch.manual_seed(cfg.seed)
    train_set = build_data(cfg.data)
    val_set = build_data(cfg.data, cfg.data.val_split) if cfg.data.val_split else None
    cfg = resolve_for_data(cfg, train_set)  # model.data_shape and class counts from the data, checked
    conditioning = build_conditioning(cfg.cond, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                                      device=device)
    make_cond = conditioning if conditioning else None  # conditioners: cond from the batch, with their dropout
    cond_for = conditioning.cond_for if conditioning else None  # training grids: each conditioner's default
    if conditioning and low_res_names(conditioning):  # super resolution: grids of the held-out images' low res
        cond_for = reference_low_res(conditioning, val_set if val_set is not None else train_set)
    model_cfg = cfg.model
    resume_from = resume_checkpoint(run_dir, resume)
    encode_batch, loop_set = None, train_set
    if is_latent(model_cfg.codec):  # scale, shift and fingerprint: estimated now, or the resumed run's
        stored = None
        if resume_from is not None:
            stored = (ckpt.load_checkpoint(resume_from).meta.get("config") or {}).get("model", {}).get("codec")
        cfg, codec, loop_set = prepare_latent_run(cfg, train_set, stored, device=device, is_main=info.is_main)
        model_cfg = cfg.model
        encode_batch = LatentEncoder(codec, cfg.seed, cfg.train.batch_size, info.rank, info.world_size, device)
    else:
        codec = build_codec(model_cfg.codec).to(device)
    model = build_run_model(cfg)
    decode = codec_decoder(codec)
    objective = build_objective(cfg.objective, model_cfg)
    resolved = to_dict(cfg)
    if info.is_main:
        write_run_config(run_dir, resolved)
        if is_latent(model_cfg.codec):
            write_codec_record(run_dir, model_cfg)

    sampler = build_sampler(cfg.sample)
    sigmas = build_sigmas(cfg.sample, model.process)
    shape = diffusion_shape(model_cfg)
    seeds = list(range(cfg.sample.grid_images))

    def sample_grid(ema, step):
        images = generate(ema, seeds, shape, sampler, sigmas, batch=64 if len(shape) == 3 else 8, device=device,
                          cond_for=cond_for, decode=decode)
        if images.ndim == 5:  # clips: a frame grid (a clip per row) and the clips tiled as an animated GIF
            from ..pipelines.clips import frame_grid, save_gif, tile_clips
            save_gif(tile_clips(images), run_dir / "samples" / f"clips_{step:08d}.gif")
            grid = frame_grid(images)
        else:
            grid = make_grid(images)
        save_png(grid, run_dir / "samples" / f"grid_{step:08d}.png")
        return grid  # also a TensorBoard image with train.tensorboard

    # what a grid costs, in forward passes of one image (train.budget reserves it when it plans the run's length)
    sample_grid.forward_images = len(seeds) * denoiser_calls(sampler, sigmas)

    distributed.init(info, device)
    try:
        evaluator = build_inloop_evaluator(cfg, model, shape, train_set, info, device, cond_for, decode=decode)
        trainer = Trainer(cfg.train, model=model, objective=objective, train_set=loop_set, val_set=val_set,
                          run_dir=run_dir, seed=cfg.seed, resolved_config=resolved, make_cond=make_cond,
                          encode=codec.encode, encode_batch=encode_batch,
                          data_fingerprint=dataset_fingerprint(train_set), sample_grid=sample_grid, dist=info,
                          device=device, should_stop=should_stop, progress=progress,
                          until_step=until_step, evaluator=evaluator,
                          complete_config=lambda stored: complete_config(type(cfg), stored, resolved),
                          augment=conditioning.augment if conditioning.augments else None)
        return trainer.fit(resume_from, allow_changes)
    finally:
        distributed.shutdown(info)


def low_res_names(conditioning) -> list[str]:
    """The names of the run's super-resolution conditioners (those that make a low-res image from a batch)."""
    return [name for name, c in conditioning.items.items() if hasattr(c, "low_res_of")]


def reference_low_res(conditioning, dataset):
    """cond_for(seeds) of an SR run's training grids and in-loop evaluation: seed i is conditioned on the low-res
    version of image i % N of `dataset` (the conditioners' own down-sampler, their sampling level)."""
    from ..conditioners.low_res import LowResInput

    def cond_for(seeds):
        idx = torch.tensor([int(s) % len(dataset) for s in seeds], dtype=torch.int64)
        batch = dataset.batch(idx)
        return conditioning.for_sampling(seeds, {name: LowResInput(conditioning[name].low_res_of(batch))
                                                 for name in low_res_names(conditioning)})
    return cond_for


def build_inloop_evaluator(cfg, model, shape, train_set, info, device, cond_for=None, cache_dir=None, decode=None):
    """The train command's in-loop evaluator (None when train.eval_every is 0).

    Reference: the first train.eval_reference_images images of train.eval_reference (default the data's
    val_split, else its training split; an image folder's training split), cached like `eval ref`; the main
    process computes a missing cache file first, the others then read it. Samples: train.eval_sampler /
    eval_steps (default the sample section), one generator per seed like `sample`."""
    from ..eval import InceptionFeatures, InLoopEvaluator, cached_reference
    from .build import build_data, build_sampler, build_sigmas
    from ..pipelines.generate import generate
    from ..pipelines.settings import override_sample
    from ..train import distributed

    t = cfg.train
    if not t.eval_every:
        return None
    if len(shape) != 3:
        raise ConfigError("train.eval_every (in-loop FID) scores images; for clips set train.eval_every=0 and score "
                          "checkpoints with `torchdiffusion eval fid-frames` / `eval fd-motion`")
    cache_dir = cache_dir or os.environ.get("TORCHDIFFUSION_CACHE_DIR") or None
    scfg = override_sample(cfg.sample, sampler=t.eval_sampler, steps=t.eval_steps,
                           source="train.eval_sampler / train.eval_steps", steps_name="train.eval_steps")
    sampler, sigmas = build_sampler(scfg), build_sigmas(scfg, model.process)
    weights = None if t.eval_features == "inception" else t.eval_features
    extractor = InceptionFeatures(weights, device=device, option="train.eval_features (a local default_1.pt)")
    # an image folder's held-out share (data.val_fraction) is usually too small for reference statistics: its
    # training split is the default reference there
    default = cfg.data.split if cfg.data.kind == "folder" else cfg.data.val_split or cfg.data.split
    split = t.eval_reference or default
    real = train_set if split == cfg.data.split else build_data(cfg.data, split)
    images = real.x[:t.eval_reference_images] if t.eval_reference_images else real.x
    source = f"{cfg.data.kind}:{split}[:{len(images)}]"
    reference = None
    if info.is_main:
        reference, _, _ = cached_reference(images, extractor, source=source, cache_dir=cache_dir,
                                           progress=_progress(f"in-loop reference {source}"))
    distributed.barrier(info)
    if reference is None:
        reference, _, _ = cached_reference(images, extractor, source=source, cache_dir=cache_dir)

    def sample_images(ema, seeds):
        return generate(ema, seeds, shape, sampler, sigmas, batch=64, device=device, cond_for=cond_for,
                        decode=decode)

    audit_train = None
    if t.eval_audit:  # the training images the in-loop audit compares the samples with (train.guard)
        from ..eval.refstats import extract_features
        audit_train = extract_features(extractor, train_set.x[:t.eval_audit])
    return InLoopEvaluator(sample_images, extractor, reference, t.eval_images, kid_subsets=t.eval_kid_subsets,
                           audit_train=audit_train)


def _progress(what: str):
    """progress(done, total) of the in-loop reference's features (pipelines.progress: a bar on a terminal, else
    lines with an ETA, on stderr)."""
    from ..pipelines.progress import Progress
    return Progress(None, what)

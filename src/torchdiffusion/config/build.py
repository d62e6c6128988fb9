"""Turn a RunConfig into components: process, model, objective, data, sampler and its sigma grid."""
from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..core import grids
from ..core.objectives import LossHistory, Objective
from ..core.precond import AUTO, LearnedVariance, Preconditioned, Preconditioner
from ..core.vdm import VDM, VDMModel
from ..core.processes import VPDiscrete
from ..data import ImageArrayDataset, open_dataset
from ..data.folder import FOLDER_SPLITS
from ..errors import ConfigError
from ..conditioners.base import Conditioning
from ..protocols import BackboneIO, CondSpec
from .registry import DATASETS, GRIDS, SAMPLERS, lookup
from .schema import DataConfig, ModelConfig, ObjectiveConfig, RunConfig, SampleConfig

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": AUTO}  # auto: core.precond


def build_process(cfg):
    """The noise process of model.process: a process kind's frozen dataclass is its own config (a copy is
    returned, so a VDM model's learned schedule never lands on the config)."""
    if not dataclasses.is_dataclass(cfg):
        raise ConfigError(f"model.process must be a process config, got {type(cfg).__name__}")
    return dataclasses.replace(cfg)


def diffusion_shape(cfg: ModelConfig) -> tuple[int, ...]:
    """(C, *S) the denoiser works in: the codec's latent shape of model.data_shape."""
    if not cfg.data_shape:
        raise ConfigError("model.data_shape is not set: it is set from the data when training starts (or give "
                          "model.data_shape=[C,H,W] to build an untrained model)")
    return tuple(build_codec(cfg.codec).latent_shape(tuple(cfg.data_shape)))


def build_codec(cfg):
    from .registry import kind_entry, kind_name
    entry = kind_entry("codec", kind_name("codec", cfg))
    if entry.build is None:  # kl / vq: a first-stage run folder, loaded by config.codecs (the registry cannot
        from .codecs import build_latent_codec  # import the run loaders without an import circle)
        return build_latent_codec(cfg)
    return entry.build(cfg)


def build_backbone(cfg: ModelConfig, conds: Sequence[CondSpec] = ()):
    """The backbone of model.backbone for the model's diffusion-space shape and the declared conditions."""
    from .registry import kind_entry, kind_name
    shape = diffusion_shape(cfg)
    out = shape[0]
    if cfg.variance == "learned":  # the backbone also outputs the variance channels (iDDPM); samples keep C
        if not isinstance(cfg.process, VPDiscrete):
            raise ConfigError(f"model.variance 'learned' needs model.process.kind 'vp_discrete' (got "
                              f"'{kind_name('process', cfg.process)}')")
        out = 2 * out
    kind = kind_name("backbone", cfg.backbone)
    try:
        return kind_entry("backbone", kind).build(cfg.backbone, BackboneIO(shape, out, tuple(conds)))
    except ValueError as e:
        raise ConfigError(f"model.backbone ({kind}): {e}") from None


def build_model(cfg: ModelConfig, precision: str = "fp32", conds: Sequence[CondSpec] = ()) -> Preconditioned:
    """The denoiser: backbone (for the declared conditions `conds`, see build_conditioning) + process + head."""
    backbone = build_backbone(cfg, conds)
    process = build_process(cfg.process)
    cls = VDMModel if isinstance(process, VDM) else LearnedVariance if cfg.variance == "learned" else Preconditioned
    return cls(backbone, process, Preconditioner(cfg.head, cfg.sigma_data), autocast_dtype=PRECISIONS[precision])


def build_conditioning(cond: Mapping[str, object], *, seed: int = 0, rank: int = 0, world_size: int = 1,
                       device: torch.device | str = "cpu") -> Conditioning:
    """The run's conditioners (cond section), in config order."""
    from .registry import kind_entry, kind_name
    items = []
    for key, ccfg in cond.items():
        entry = kind_entry("conditioner", kind_name("conditioner", ccfg), f"cond.{key}")
        items.append(entry.build(key, ccfg, seed=seed, rank=rank, world_size=world_size))
    return Conditioning(items, device)


def build_run_model(cfg: RunConfig, precision: Optional[str] = None) -> Preconditioned:
    """The denoiser of a resolved run config (data shape and conditioners filled in)."""
    specs = build_conditioning(cfg.cond, seed=cfg.seed).specs
    return build_model(cfg.model, cfg.train.precision if precision is None else precision, specs)


def resolve_for_data(cfg: RunConfig, dataset, where: str = "data") -> RunConfig:
    """The config with what the data decide filled in, checked (RELIABILITY 21: before the first forward pass, in
    one line): model.data_shape from the images, each class conditioner's num_classes from the labels, and
    data.class_names from the data's class names (so `--labels` can name classes)."""
    shape = tuple(getattr(dataset, "sample_shape", (int(dataset.channels), *(int(s) for s in dataset.image_size))))
    if cfg.model.data_shape and tuple(cfg.model.data_shape) != shape:
        raise ConfigError(f"{where} {'clips' if len(shape) == 4 else 'images'} are {'x'.join(map(str, shape[1:]))} "
                          f"with {shape[0]} channel(s) but "
                          f"model.data_shape is {list(cfg.model.data_shape)}; set data.resolution / data.channels "
                          f"to match (or leave model.data_shape unset: it is set from the data)")
    cond = {}
    for key, ccfg in cfg.cond.items():
        if hasattr(ccfg, "num_classes"):
            k = dataset.num_classes
            if k < 1 or not dataset.labelled:
                raise ConfigError(f"cond.{key} (class) needs labelled data, but data.kind={cfg.data.kind} has no "
                                  f"class labels; use mnist or fashion-mnist, or data.labels=folder for an image folder")
            if ccfg.num_classes not in (0, k):
                raise ConfigError(f"cond.{key}.num_classes={ccfg.num_classes} but the data have {k} classes; "
                                  f"leave it at 0 (set from the data) or set {k}")
            ccfg = dataclasses.replace(ccfg, num_classes=k)
        if hasattr(ccfg, "for_data"):  # a super-resolution conditioner: channels and target size from the data
            latent = tuple(build_codec(cfg.model.codec).latent_shape(shape))
            if latent != shape:
                raise ConfigError(f"cond.{key} ({type(ccfg).__name__}) concatenates pixels; it needs the pixel-space "
                                  f"codec (model.codec.kind=identity), not a latent codec")
            ccfg = ccfg.for_data(shape[0], shape[1:], f"cond.{key}")
        cond[key] = ccfg
    model = dataclasses.replace(cfg.model, data_shape=shape)
    data = dataclasses.replace(cfg.data, class_names=tuple(str(c) for c in dataset.class_names))
    out = dataclasses.replace(cfg, model=model, cond=cond, data=data)
    with torch.random.fork_rng(devices=[]):  # a backbone that cannot take the shape fails here; the trial build
        build_backbone(out.model, build_conditioning(out.cond).specs)  # leaves the global RNG (the init) alone
    return out


def check_data_fits_model(dataset, cfg: RunConfig, where: str = "data") -> None:
    """RELIABILITY 21: data whose channels or size differ from the model's fail in one line."""
    resolve_for_data(cfg, dataset, where)


def build_objective(cfg: ObjectiveConfig, model_cfg: ModelConfig) -> Objective:
    from .registry import kind_name
    kind = kind_name("process", model_cfg.process)
    if cfg.density == "discrete" and kind != "vp_discrete":
        raise ConfigError(f"objective.density 'discrete' needs model.process.kind 'vp_discrete' (got "
                          f"'{kind}'); use 'lognormal' or 'uniform_t'")
    if cfg.density == "importance" and kind != "vp_discrete":
        raise ConfigError(f"objective.density 'importance' needs model.process.kind 'vp_discrete' (got '{kind}')")
    if (cfg.density == "vdm" or cfg.weighting == "vlb") and kind != "vdm":
        raise ConfigError(f"objective.density 'vdm' and weighting 'vlb' need model.process.kind 'vdm' (got '{kind}')")
    if cfg.weighting == "vlb" and cfg.density != "vdm":
        raise ConfigError("objective.weighting 'vlb' (VDM's bound) needs objective.density 'vdm' (uniform t)")
    if cfg.weighting == "hybrid" and (model_cfg.variance != "learned" or kind != "vp_discrete"):
        raise ConfigError("objective.weighting 'hybrid' needs model.variance 'learned' and model.process.kind "
                          "'vp_discrete'")
    state = LossHistory(model_cfg.process.T) if cfg.density == "importance" else None
    return Objective(cfg.density, cfg.weighting, cfg.P_mean, cfg.P_std, model_cfg.sigma_data, cfg.min_snr_gamma,
                     cfg.t_min, cfg.vlb_lambda, state)


def build_dataset(kind: str, **options):
    """The data set of a registered kind (registry.DATASETS) with its options checked (DataError naming the valid
    kinds/options); options equal to None count as not given."""
    from ..errors import DataError
    if kind not in DATASETS:
        close = difflib.get_close_matches(kind, list(DATASETS), n=1)
        raise DataError(f"unknown data set kind {kind!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                        f"valid: {', '.join(DATASETS)}")
    loader, valid, required = DATASETS[kind]
    return open_dataset(kind, loader, valid, required, **options)


def build_data(cfg: DataConfig, split: str | None = None):
    options = dict(split=split or cfg.split, path=cfg.path, channels=cfg.channels, resolution=cfg.resolution,
                   bad_files=cfg.bad_files, labels=cfg.labels, val_fraction=cfg.val_fraction, frames=cfg.frames,
                   frame_stride=cfg.frame_stride, image_frames=cfg.image_frames, digits=cfg.digits, clips=cfg.clips)
    video_keys = ("frames", "frame_stride", "image_frames", "digits", "clips")
    given = [k for k in video_keys if options[k] is not None and k not in (DATASETS[cfg.kind][1] if cfg.kind in
                                                                            DATASETS else ())]
    if given:
        raise ConfigError(f"data.{given[0]} applies to video data sets (moving-mnist, video-folder), not "
                          f"data.kind={cfg.kind}")
    valid = DATASETS[cfg.kind][1] if cfg.kind in DATASETS else ()
    if cfg.val_fraction is not None and "val_fraction" not in valid:
        raise ConfigError(f"data.val_fraction applies to image folders; data.kind={cfg.kind} has fixed splits "
                          f"(set data.val_fraction=null and choose data.val_split)")
    if cfg.kind == "folder" and options["split"] not in FOLDER_SPLITS:
        raise ConfigError(f"split {options['split']!r}: an image folder has the splits train, train+val and, with "
                          f"data.val_fraction, val; ask for split 'train' (its training images) instead")
    if cfg.kind == "folder" and options["split"] == "val" and not cfg.val_fraction:
        raise ConfigError(f"data.{'val_split' if split else 'split'}='val': an image folder holds out images only "
                          f"with data.val_fraction (e.g. 0.05: that share of the files, chosen by a hash of each "
                          f"file's path); set it, or "
                          + ("set data.val_split=null for no validation loss" if split else "data.split=train"))
    dataset = build_dataset(cfg.kind, **{k: v for k, v in options.items() if k in valid})
    if cfg.limit is not None:
        if cfg.limit < 1:
            raise ConfigError(f"data.limit must be >= 1 (or null for all images), got {cfg.limit}")
        if hasattr(dataset, "subset"):  # video clips
            return dataset.subset(cfg.limit)
        dataset = ImageArrayDataset(dataset.x[:cfg.limit], dataset.label[:cfg.limit],
                                    class_names=dataset.class_names, info=dataset.info)
    if cfg.downsample != 1:  # a cascade's base stage: the one down-sampler of data.resize, kept at rest as uint8
        from ..data.resize import check_factor, downsample_uint8
        check_factor(cfg.downsample, tuple(dataset.x.shape[-2:]), where="data.downsample")
        dataset = ImageArrayDataset(downsample_uint8(dataset.x, cfg.downsample), dataset.label,
                                    class_names=dataset.class_names,
                                    info={**dict(dataset.info or {}), "downsample": cfg.downsample})
    return dataset


def build_sigmas(cfg: SampleConfig, process, steps: int | None = None) -> Tensor:
    """The float64 (n+1,) descending sigma grid of kind sample.grid (registry.GRIDS), within the process's range."""
    n = steps if steps is not None else cfg.steps
    smin = cfg.sigma_min if cfg.sigma_min is not None else process.sigma_min
    smax = cfg.sigma_max if cfg.sigma_max is not None else process.sigma_max
    return lookup(GRIDS, cfg.grid, "sample.grid")(process, n, smin, smax, cfg)


def build_sampler(cfg: SampleConfig) -> Callable:
    fn, _ = lookup(SAMPLERS, cfg.sampler, "sampler")
    if cfg.sampler == "ddim":
        return functools.partial(fn, eta=cfg.eta)
    if cfg.sampler == "ddpm" and cfg.variance is not None:
        return functools.partial(fn, variance=cfg.variance)
    return fn

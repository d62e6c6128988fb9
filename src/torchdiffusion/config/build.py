"""Turn a RunConfig into components: process, model, objective, data, sampler and its sigma grid."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
from torch import Tensor

from ..core import grids
from ..core.objectives import LossHistory, Objective
from ..core.precond import LearnedVariance, Preconditioned, Preconditioner
from ..core.vdm import VDM, VDMModel
from ..core.processes import VPDiscrete
from ..data import DATASET_OPTIONS, ImageArrayDataset, build_dataset
from ..errors import ConfigError
from ..nn.unet import UNet
from .registry import PROCESSES, SAMPLERS, lookup
from .schema import DataConfig, ModelConfig, ObjectiveConfig, ProcessConfig, SampleConfig

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_process(cfg: ProcessConfig):
    cls = lookup(PROCESSES, cfg.kind, "noise process")
    valid = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "kind" or value is None:
            continue
        if f.name not in valid:
            raise ConfigError(f"model.process.{f.name} does not apply to process kind '{cfg.kind}'; "
                              f"its options: {', '.join(sorted(valid))}")
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"model.process: {e}") from None


def build_model(cfg: ModelConfig, precision: str = "fp32") -> Preconditioned:
    unet_cfg = cfg.unet
    if cfg.variance == "learned":  # the backbone also outputs the variance channels (iDDPM); samples keep C
        if cfg.process.kind != "vp_discrete":
            raise ConfigError(f"model.variance 'learned' needs model.process.kind 'vp_discrete' (got "
                              f"'{cfg.process.kind}')")
        unet_cfg = dataclasses.replace(unet_cfg, out_channels=2 * unet_cfg.out_channels)
    try:
        backbone = UNet(unet_cfg)
    except ValueError as e:
        raise ConfigError(f"model.unet: {e}") from None
    process = build_process(cfg.process)
    cls = VDMModel if isinstance(process, VDM) else LearnedVariance if cfg.variance == "learned" else Preconditioned
    return cls(backbone, process, Preconditioner(cfg.head, cfg.sigma_data), autocast_dtype=PRECISIONS[precision])


def build_objective(cfg: ObjectiveConfig, model_cfg: ModelConfig) -> Objective:
    if cfg.density == "discrete" and model_cfg.process.kind != "vp_discrete":
        raise ConfigError(f"objective.density 'discrete' needs model.process.kind 'vp_discrete' (got "
                          f"'{model_cfg.process.kind}'); use 'lognormal' or 'uniform_t'")
    kind = model_cfg.process.kind
    if cfg.density == "importance" and kind != "vp_discrete":
        raise ConfigError(f"objective.density 'importance' needs model.process.kind 'vp_discrete' (got '{kind}')")
    if (cfg.density == "vdm" or cfg.weighting == "vlb") and kind != "vdm":
        raise ConfigError(f"objective.density 'vdm' and weighting 'vlb' need model.process.kind 'vdm' (got '{kind}')")
    if cfg.weighting == "vlb" and cfg.density != "vdm":
        raise ConfigError("objective.weighting 'vlb' (VDM's bound) needs objective.density 'vdm' (uniform t)")
    if cfg.weighting == "hybrid" and (model_cfg.variance != "learned" or kind != "vp_discrete"):
        raise ConfigError("objective.weighting 'hybrid' needs model.variance 'learned' and model.process.kind "
                          "'vp_discrete'")
    state = LossHistory(build_process(model_cfg.process).T) if cfg.density == "importance" else None
    return Objective(cfg.density, cfg.weighting, cfg.P_mean, cfg.P_std, model_cfg.sigma_data, cfg.min_snr_gamma,
                     cfg.t_min, cfg.vlb_lambda, state)


def build_data(cfg: DataConfig, split: str | None = None):
    options = dict(split=split or cfg.split, path=cfg.path, channels=cfg.channels, resolution=cfg.resolution,
                   bad_files=cfg.bad_files, labels=cfg.labels)
    valid = DATASET_OPTIONS[cfg.kind]
    if cfg.kind == "folder":
        if split not in (None, cfg.split):
            raise ConfigError(f"data.val_split={split!r}: an image folder has no held-out split; set "
                              f"data.val_split=null (the folder preset does)")
        options.pop("split")
    dataset = build_dataset(cfg.kind, **{k: v for k, v in options.items() if k in valid})
    if cfg.limit is not None:
        if cfg.limit < 1:
            raise ConfigError(f"data.limit must be >= 1 (or null for all images), got {cfg.limit}")
        dataset = ImageArrayDataset(dataset.x[:cfg.limit], dataset.label[:cfg.limit],
                                    class_names=dataset.class_names, info=dataset.info)
    return dataset


def check_data_fits_model(dataset, cfg: ModelConfig, where: str = "data") -> None:
    """RELIABILITY 21: a mismatch of channels or size fails before the first forward pass, in one line."""
    c = dataset.channels
    h, w = dataset.image_size
    u = cfg.unet
    if c + u.concat_channels != u.in_channels:
        raise ConfigError(f"{where} has {c} channel(s) but model.unet.in_channels is {u.in_channels}"
                          f"{' (minus ' + str(u.concat_channels) + ' concatenated)' if u.concat_channels else ''}; "
                          f"set data.channels or model.unet.in_channels/out_channels to match")
    if (h, w) != (u.image_size, u.image_size):
        raise ConfigError(f"{where} images are {h}x{w} but model.unet.image_size is {u.image_size}; "
                          f"set data.resolution or model.unet.image_size to match")


def build_sigmas(cfg: SampleConfig, process, steps: int | None = None) -> Tensor:
    """The float64 (n+1,) descending sigma grid of the configured kind, within the process's range."""
    n = steps if steps is not None else cfg.steps
    smin = cfg.sigma_min if cfg.sigma_min is not None else process.sigma_min
    smax = cfg.sigma_max if cfg.sigma_max is not None else process.sigma_max
    if cfg.grid == "karras":
        return grids.karras(n, smin, smax, cfg.rho)
    if cfg.grid == "loglinear":
        return grids.loglinear(n, smin, smax)
    if cfg.grid == "optimized":
        if not cfg.grid_file:
            raise ConfigError("sample.grid 'optimized' needs sample.grid_file (a grid written by "
                              "`torchdiffusion grid optimize`)")
        return grids.load_grid(cfg.grid_file, n)[0]
    if cfg.grid == "uniform_t":
        return _uniform_t_grid(process, n, smin, smax)
    if not isinstance(process, VPDiscrete):
        raise ConfigError("sample.grid 'discrete' needs a discrete-time model (model.process.kind vp_discrete); "
                          "use 'karras' or 'loglinear'")
    return grids.discrete(process.sigmas(), n, cfg.spacing)


def _uniform_t_grid(process, n: int, smin: float, smax: float) -> Tensor:
    """Uniform in the process's own time: VDM's learned schedule when the process carries one (a VDM model's
    process), else t_of_sigma on [t(sigma_min), t(sigma_max)] mapped back through sigma(t)."""
    if getattr(process, "schedule", None) is not None:
        return process.uniform_t_grid(n)
    if not (hasattr(process, "sigma") and hasattr(process, "t_of_sigma")):
        raise ConfigError(f"sample.grid 'uniform_t' needs a process with a time variable; "
                          f"{type(process).__name__} has none, use 'karras' or 'loglinear'")
    lo, hi = (float(process.t_of_sigma(torch.tensor(s, dtype=torch.float64))) for s in (smin, smax))
    return grids.continuous_uniform_t(n, process.sigma, lo, hi)


def build_sampler(cfg: SampleConfig) -> Callable:
    fn, _ = lookup(SAMPLERS, cfg.sampler, "sampler")
    if cfg.sampler == "ddim":
        return functools.partial(fn, eta=cfg.eta)
    if cfg.sampler == "ddpm" and cfg.variance is not None:
        return functools.partial(fn, variance=cfg.variance)
    return fn

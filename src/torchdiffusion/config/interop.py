"""diffusers interop: load a local diffusers UNet2DModel folder as a torchdiffusion model, convert it into a run
folder, and export this project's U-Net runs to that layout where the architectures coincide (docs/interop.md).

Nothing here imports diffusers: config.json and scheduler_config.json are read as JSON, the weights with the
project's validated safetensors reader (train.checkpoint), the network is nn.diffusers_unet.

The mapping into the one frame x = x0 + sigma n (core.processes, core.precond):
- the scheduler's betas -> model.process vp_discrete: T = num_train_timesteps; "linear" and "scaled_linear" keep
  their end points (VPDiscrete scales end points by 1000 / T, so they are stored divided by it), and
  "squaredcos_cap_v2" is the cosine schedule (s = 0.008, betas capped at 0.999). sigma_t = sqrt((1 - abar_t) / abar_t).
- prediction_type -> model.head: "epsilon" -> eps, "v_prediction" -> v with sigma_data = 1 (then c_in is the VP
  scale 1 / sqrt(1 + sigma^2) and D = x / (1 + sigma^2) - sigma v / sqrt(1 + sigma^2), Salimans & Ho 2022),
  "sample" -> x0. The network's timestep input is the process's c_noise, the fractional DDPM timestep, which is
  the integer t exactly on the table's sigmas.
- sampling: a diffusers loop over timesteps t_0 > ... > t_{n-1} is the sigma grid sigma_table[t_j] followed by 0
  (DDIM's final alpha_bar = 1); `scheduler_sigmas` builds it. diffusers starts at x_T = z, which is the frame's
  x = z sqrt(1 + sigma_max^2); this project's samplers start at sigma_max z (a relative difference of
  1 / (2 sigma_max^2), 2e-5 for the linear T = 1000 schedule), so `diffusers_start_noise` rescales z to match.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch import Tensor

from ..conditioners.base import Conditioning
from ..conditioners.classlabel import ClassConditionerConfig
from ..core.precond import Preconditioned
from ..core.processes import VPDiscrete
from ..errors import CheckpointError, ConfigError
from ..nn.diffusers_unet import DiffusersUNet2DConfig
from ..train import checkpoint as ckpt
from .build import build_conditioning, build_run_model, diffusion_shape
from .schema import ModelConfig, RunConfig, SampleConfig
from .strict import to_dict

UNET_CLASS = "UNet2DModel"
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
WEIGHTS = "diffusion_pytorch_model.safetensors"
#: UNet2DModel config.json keys that must hold these values (the subset nn.diffusers_unet implements)
_FIXED = {"time_embedding_type": "positional", "class_embed_type": None, "downsample_type": "conv",
          "upsample_type": "conv", "act_fn": ("silu", "swish")}
#: config.json keys that say nothing about the network (diffusers' bookkeeping)
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "num_train_timesteps", "_use_default_values"}
#: attention parameter names of diffusers' old attention blocks -> today's (diffusers converts them on load too)
_OLD_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return doc


@dataclass(frozen=True)
class DiffusersFolder:
    """The files of a diffusers model folder: the UNet's config.json and weights, the scheduler's config. Either
    flat (config.json, diffusion_pytorch_model.safetensors, scheduler_config.json side by side) or a pipeline
    folder (unet/ and scheduler/ subfolders, as DDPMPipeline.save_pretrained writes)."""

    root: Path
    unet_config: dict
    scheduler_config: dict
    weights: Path

    @classmethod
    def open(cls, folder) -> "DiffusersFolder":
        root = Path(folder)
        if not root.is_dir():
            raise ConfigError(f"{root}: no such folder (a diffusers UNet2DModel folder holds config.json and "
                              f"{WEIGHTS})")
        unet = root / "unet" if (root / "unet" / "config.json").exists() else root
        if not (unet / "config.json").exists():
            raise ConfigError(f"{root}: no config.json (nor unet/config.json); a diffusers UNet2DModel folder holds "
                              f"config.json and {WEIGHTS}")
        weights = unet / WEIGHTS
        if not weights.exists():
            others = sorted(p.name for p in unet.iterdir() if p.suffix in (".bin", ".safetensors", ".pt", ".ckpt"))
            raise CheckpointError(f"{unet}: no {WEIGHTS}" + (f" (found {', '.join(others)}; pickled .bin weights "
                                  "are never loaded, save them with safe_serialization=True)" if others else ""))
        sched = next((p for p in (root / "scheduler" / "scheduler_config.json", unet / "scheduler_config.json",
                                  root / "scheduler_config.json") if p.exists()), None)
        if sched is None:
            raise ConfigError(f"{root}: no scheduler_config.json (nor scheduler/scheduler_config.json); it tells the "
                              f"noise schedule and what the network predicts: save the scheduler into the folder "
                              f"(scheduler.save_pretrained(folder))")
        return cls(root, _read_json(unet / "config.json"), _read_json(sched), weights)


@dataclass(frozen=True)
class SchedulerMapping:
    """What a scheduler config means in this project: the process, the head and the scheduler's sampling
    defaults as a SampleConfig; `notes` lists scheduler options that sampling here does not reproduce."""

    process: VPDiscrete
    head: str
    sigma_data: float
    sample: SampleConfig
    notes: tuple[str, ...] = ()


def map_scheduler(sc: dict) -> SchedulerMapping:
    """A DDPMScheduler/DDIMScheduler config -> process, head and sampling defaults (see the module notes)."""
    name = sc.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler {name!r} is not supported; supported: {', '.join(SCHEDULERS)} configs "
                          f"(beta_schedule {', '.join(BETA_SCHEDULES)}; prediction_type {', '.join(PREDICTIONS)})")
    T = sc.get("num_train_timesteps", 1000)
    schedule = sc.get("beta_schedule", "linear")
    pred = sc.get("prediction_type", "epsilon")
    if sc.get("trained_betas") is not None:
        raise ConfigError("scheduler trained_betas (an explicit list) is not supported; supported: beta_schedule "
                          f"{', '.join(BETA_SCHEDULES)}")
    if schedule not in BETA_SCHEDULES:
        raise ConfigError(f"scheduler beta_schedule {schedule!r} is not supported; supported: "
                          f"{', '.join(BETA_SCHEDULES)}")
    if pred not in PREDICTIONS:
        raise ConfigError(f"scheduler prediction_type {pred!r} is not supported; supported: {', '.join(PREDICTIONS)}")
    if sc.get("rescale_betas_zero_snr"):
        raise ConfigError("scheduler rescale_betas_zero_snr=true (sigma_max = infinity) is not supported; supported: "
                          "schedules with abar_T > 0")
    variance = sc.get("variance_type", "fixed_small")
    if variance not in ("fixed_small", "fixed_large", "fixed_small_log", "fixed_large_log", None):
        raise ConfigError(f"scheduler variance_type {variance!r} (a learned variance) is not supported; supported: "
                          f"fixed_small, fixed_large")
    if not (isinstance(T, int) and T >= 2):
        raise ConfigError(f"scheduler num_train_timesteps must be an integer >= 2, got {T!r}")
    k = 1.0 if T == 1000 else T / 1000.0  # VPDiscrete multiplies the end points by 1000 / T
    b0, b1 = float(sc.get("beta_start", 0.0001)), float(sc.get("beta_end", 0.02))
    process = VPDiscrete(T=T, schedule=BETA_SCHEDULES[schedule], beta_start=b0 * k, beta_end=b1 * k)
    spacing = sc.get("timestep_spacing", "leading")
    if spacing not in ("leading", "trailing", "linspace"):
        raise ConfigError(f"scheduler timestep_spacing {spacing!r} is not supported; supported: leading, trailing, "
                          f"linspace")
    notes = []
    if sc.get("clip_sample", name in SCHEDULERS):
        notes.append(f"clip_sample (x0 clipped to +-{sc.get('clip_sample_range', 1.0)} inside the diffusers step) is "
                     f"not reproduced: the samplers here use the network's x0 estimate as it is")
    if sc.get("thresholding"):
        notes.append("thresholding (dynamic x0 thresholding) is not reproduced")
    if sc.get("steps_offset", 0) and spacing == "leading":
        notes.append(f"steps_offset={sc['steps_offset']} is not reproduced by sample.spacing leading (offset 0)")
    if name == "DDIMScheduler":
        if not sc.get("set_alpha_to_one", True):
            notes.append("set_alpha_to_one=false (DDIM's last step stops at t = 0, not at the data) is not "
                         "reproduced: grids here end at sigma = 0")
        sample = SampleConfig(sampler="ddim", steps=50, grid="discrete", spacing=spacing, eta=0.0)
    else:
        sample = SampleConfig(sampler="ddpm", steps=T, grid="discrete", spacing=spacing,
                              variance="large" if str(variance).startswith("fixed_large") else "small")
    return SchedulerMapping(process, PREDICTIONS[pred], 1.0 if pred == "v_prediction" else 0.5, sample,
                            tuple(notes))


def map_unet(uc: dict) -> DiffusersUNet2DConfig:
    """A UNet2DModel config.json -> DiffusersUNet2DConfig, or a one-line ConfigError naming what is supported."""
    name = uc.get("_class_name", UNET_CLASS)
    if name != UNET_CLASS:
        raise ConfigError(f"model class {name!r} is not supported; supported: {UNET_CLASS} (pixel-space DDPM U-Nets) "
                          f"with blocks DownBlock2D, AttnDownBlock2D, UpBlock2D, AttnUpBlock2D, UNetMidBlock2D")
    for key, want in _FIXED.items():
        got = uc.get(key, want if not isinstance(want, tuple) else want[0])
        if got != want and not (isinstance(want, tuple) and got in want):
            raise ConfigError(f"UNet2DModel {key}={got!r} is not supported; supported: "
                              f"{' or '.join(map(repr, want)) if isinstance(want, tuple) else repr(want)}")
    valid = {f.name for f in dataclasses.fields(DiffusersUNet2DConfig)}
    unknown = sorted(set(uc) - valid - set(_FIXED) - _IGNORED)
    if unknown:
        raise ConfigError(f"UNet2DModel option(s) {', '.join(unknown)} not supported; supported: "
                          f"{', '.join(sorted(valid))}")
    if uc.get("sample_size") is None:
        raise ConfigError("UNet2DModel sample_size is null: the image size must be known; set sample_size in "
                          "config.json")
    fields = {k: v for k, v in uc.items() if k in valid}
    if fields.get("norm_num_groups") is None:
        fields.pop("norm_num_groups", None)
    try:
        return DiffusersUNet2DConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"UNet2DModel config: {e}") from None


def run_config(folder: DiffusersFolder) -> tuple[RunConfig, tuple[str, ...]]:
    """The run config a diffusers folder stands for (data_shape from sample_size and in_channels), and the notes
    on scheduler options that are not reproduced."""
    net = map_unet(folder.unet_config)
    sm = map_scheduler(folder.scheduler_config)
    if net.out_channels != net.in_channels:
        raise ConfigError(f"UNet2DModel out_channels={net.out_channels} != in_channels={net.in_channels} (a learned "
                          f"variance?); supported: out_channels == in_channels")
    model = ModelConfig(process=sm.process, head=sm.head, sigma_data=sm.sigma_data, backbone=net,
                        data_shape=(net.in_channels, *net.hw))
    cond = {"label": ClassConditionerConfig(num_classes=net.num_class_embeds, p_uncond=0.0)} \
        if net.num_class_embeds else {}
    return RunConfig(model=model, sample=sm.sample, cond=cond), sm.notes


def _weights(folder: DiffusersFolder) -> dict[str, Tensor]:
    sd = ckpt.read_safetensors(folder.weights)
    out = {}
    for key, t in sd.items():
        for old, new in _OLD_ATTENTION.items():
            if f".attentions." in key and f".{old}" in key:
                key = key.replace(f".{old}", f".{new}")
        out[key] = t.float() if t.is_floating_point() else t
    return out


def _load_backbone(model: Preconditioned, sd: dict[str, Tensor], where: Path) -> None:
    own = model.backbone.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"missing {', '.join(missing[:3])}" if missing else "",
                 f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
                 f"shape of {shapes[0]} is {tuple(sd[shapes[0]].shape)}, config.json says {tuple(own[shapes[0]].shape)}"
                 if shapes else ""]
        raise CheckpointError(f"{where}: the weights do not fit config.json ({'; '.join(p for p in parts if p)})")
    model.backbone.load_state_dict(sd)


@dataclass
class LoadedDiffusers:
    """A diffusers folder as a torchdiffusion model: `model` is a Denoiser (x, sigma, cond) -> x0 estimate that
    every sampler, guidance wrapper and inverse solver takes; `config` the equivalent run config."""

    model: Preconditioned
    config: RunConfig
    notes: tuple[str, ...] = ()
    folder: Optional[DiffusersFolder] = None

    @property
    def process(self) -> VPDiscrete:
        return self.model.process

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return diffusion_shape(self.config.model)

    @property
    def conditioning(self) -> Conditioning:
        return build_conditioning(self.config.cond, seed=self.config.seed)


def load_diffusers(folder, device: torch.device | str = "cpu") -> LoadedDiffusers:
    """Load a local diffusers UNet2DModel folder (config.json, diffusion_pytorch_model.safetensors and
    scheduler_config.json) as a torchdiffusion model in eval mode; diffusers is not needed."""
    f = DiffusersFolder.open(folder)
    cfg, notes = run_config(f)
    with torch.random.fork_rng(devices=[]):  # building initialises weights; leave the caller's RNG alone
        model = build_run_model(cfg, precision="fp32")
    _load_backbone(model, _weights(f), f.weights)
    model.eval().requires_grad_(False).to(device)
    return LoadedDiffusers(model, cfg, notes, f)


def scheduler_sigmas(process: VPDiscrete, timesteps) -> Tensor:
    """The sigma grid of a diffusers loop over `timesteps` (descending ints, e.g. scheduler.timesteps after
    set_timesteps): sigma_table[t_j] for each j, then 0. Exact for DDIM when each step's previous timestep is the
    next listed one (T divisible by the number of steps) and set_alpha_to_one is true."""
    t = torch.as_tensor(timesteps).to(torch.int64).reshape(-1)
    if t.numel() < 1 or int(t.min()) < 0 or int(t.max()) >= process.T or not bool((t[1:] < t[:-1]).all()):
        raise ConfigError(f"timesteps must be strictly descending integers in [0, {process.T - 1}]")
    return torch.cat([process.sigmas()[t], torch.zeros(1, dtype=torch.float64)])


def diffusers_start_noise(z: Tensor, sigma_max: float) -> Tensor:
    """The noise to hand a sampler here (which starts at x = sigmas[0] * noise) so that it starts where a diffusers
    loop starting from x_T = z does: x = z / s = z sqrt(1 + sigma_max^2)."""
    return z * math.sqrt(1.0 + 1.0 / (sigma_max * sigma_max))


# --------------------------------------------------------------------------------------------- run folders
def convert_diffusers(folder, run_dir, *, overwrite: bool = False) -> Path:
    """Write a run folder (config.yaml, checkpoints/step_00000000 with the weights as both `model` and `ema`) from
    a diffusers folder, so every command that takes --run works on it. Returns the checkpoint path."""
    loaded = load_diffusers(folder)
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"{run_dir} already holds checkpoints; use another --run folder (or --overwrite)")
        shutil.rmtree(ckpt_dir)
    resolved = to_dict(loaded.config)
    tensors = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}
    source = {"format": "diffusers", "unet_config": loaded.folder.unet_config,
              "scheduler_config": loaded.folder.scheduler_config, "notes": list(loaded.notes)}
    path = ckpt.save_checkpoint(ckpt_dir, 0, tensors={"model": tensors, "ema": tensors},
                                meta={"config": resolved, "trainer": {"step": 0, "nan_skips": 0, "images_seen": 0},
                                      "source": source})
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
    tmp.replace(run_dir / "config.yaml")
    return path

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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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
    if sc.get("clip_sample", True):
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
            if ".attentions." in key and f".{old}" in key:
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


# --------------------------------------------------------------------------------------------- export
def _export_refusal(what: str) -> ConfigError:
    return ConfigError(f"cannot export to diffusers' UNet2DModel layout: {what}; exportable: a pixel-space "
                       f"(codec identity) unet run on vp_discrete with head eps, x0 or v (sigma_data 1), fixed "
                       f"variance, channel_mult[0] 1, positional noise embedding, no attn_pos, no context/concat/"
                       f"scalar conditions, one attention head width (docs/interop.md)")


def export_config(cfg: RunConfig) -> tuple[dict, dict]:
    """(UNet2DModel config.json, DDPMScheduler scheduler_config.json) of a run config whose U-Net coincides with
    diffusers' layout, or a one-line ConfigError saying what differs."""
    from ..nn.unet import UNetConfig
    from .registry import kind_name

    m = cfg.model
    net = m.backbone
    if not isinstance(net, UNetConfig):
        raise _export_refusal(f"the backbone is {kind_name('backbone', net)}, not unet")
    if kind_name("codec", m.codec) != "identity":
        raise _export_refusal(f"the model works in a codec's latent space ({kind_name('codec', m.codec)})")
    p = m.process
    if not isinstance(p, VPDiscrete):
        raise _export_refusal(f"the process is {kind_name('process', p)} (its noise label is not a DDPM timestep)")
    if m.variance != "fixed":
        raise _export_refusal("model.variance is learned")
    if m.head not in ("eps", "x0", "v") or (m.head == "v" and m.sigma_data != 1.0):
        raise _export_refusal(f"head {m.head} with sigma_data {m.sigma_data} has no diffusers prediction_type")
    if p.schedule == "cosine" and (p.cosine_s != 0.008 or p.max_beta != 0.999):
        raise _export_refusal("the cosine schedule's s / max_beta differ from squaredcos_cap_v2's 0.008 / 0.999")
    if net.channel_mult[0] != 1:
        raise _export_refusal(f"channel_mult[0] = {net.channel_mult[0]} (diffusers' first level has conv_in's width)")
    if net.noise_embedding != "positional" or net.attn_pos != "none" or not net.resample_with_conv:
        raise _export_refusal("noise_embedding, attn_pos or resample_with_conv differ from DDPM's")
    if net.context_dim or net.concat_channels or net.embed_conds or any(k != "label" for k in cfg.cond):
        raise _export_refusal("the U-Net takes context, concat or scalar/vector conditions")
    C, H, W = m.data_shape
    widths = [net.model_channels * k for k in net.channel_mult]
    sizes = tuple(min(H, W) >> level for level in range(len(widths)))
    attn = [s in net.attn_resolutions for s in sizes]
    attn_widths = {w for w, a in zip(widths, attn) if a} | ({widths[-1]} if net.mid_attention else set())
    if net.head_channels:
        head_dim = net.head_channels
    else:
        dims = {w // net.num_heads for w in attn_widths}
        if len(dims) > 1:
            raise _export_refusal(f"num_heads={net.num_heads} gives head widths {sorted(dims)}; diffusers has one "
                                  f"attention_head_dim (set head_channels)")
        head_dim = dims.pop() if dims else None
    num_classes = int(getattr(cfg.cond.get("label"), "num_classes", 0) or 0)
    unet = {
        "_class_name": UNET_CLASS, "sample_size": H if H == W else [H, W], "in_channels": C, "out_channels": C,
        "center_input_sample": False, "time_embedding_type": "positional", "freq_shift": 0, "flip_sin_to_cos": True,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": "UNetMidBlock2D", "add_attention": bool(net.mid_attention),
        "block_out_channels": widths, "layers_per_block": net.num_res_blocks, "mid_block_scale_factor": 1,
        "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": net.dropout,
        "act_fn": "silu", "attention_head_dim": head_dim, "norm_num_groups": net.norm_groups,
        "attn_norm_num_groups": net.norm_groups, "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if net.scale_shift_norm else "default",
        "time_embedding_dim": net.emb_mult * net.model_channels, "class_embed_type": None,
        "num_class_embeds": num_classes + 1 if num_classes else None,  # + the null label of CFG
    }
    k = 1000.0 / p.T  # VPDiscrete's end-point scaling; diffusers takes the betas' end points as they are
    beta_schedule = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}[p.schedule]
    scheduler = {
        "_class_name": "DDPMScheduler", "num_train_timesteps": p.T, "beta_schedule": beta_schedule,
        "beta_start": p.beta_start * k if p.T != 1000 else p.beta_start,
        "beta_end": p.beta_end * k if p.T != 1000 else p.beta_end, "trained_betas": None,
        "prediction_type": {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[m.head],
        "variance_type": "fixed_small", "clip_sample": False, "thresholding": False,
        "timestep_spacing": cfg.sample.spacing, "steps_offset": 0, "rescale_betas_zero_snr": False,
    }
    return unet, scheduler


def export_state_dict(unet_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """nn.unet.UNet parameter names -> diffusers UNet2DModel's (the fused qkv split into to_q, to_k, to_v)."""
    import re

    simple = [(r"^noise_mlp\.0\.", "time_embedding.linear_1."), (r"^noise_mlp\.2\.", "time_embedding.linear_2."),
              (r"^label_embed\.", "class_embedding."), (r"^norm_out\.", "conv_norm_out."),
              (r"^down\.(\d+)\.(\d+)\.res\.", r"down_blocks.\1.resnets.\2."),
              (r"^down\.(\d+)\.(\d+)\.attn\.", r"down_blocks.\1.attentions.\2."),
              (r"^downsample\.(\d+)\.conv\.", r"down_blocks.\1.downsamplers.0.conv."),
              (r"^up\.(\d+)\.(\d+)\.res\.", r"up_blocks.\1.resnets.\2."),
              (r"^up\.(\d+)\.(\d+)\.attn\.", r"up_blocks.\1.attentions.\2."),
              (r"^upsample\.(\d+)\.conv\.", r"up_blocks.\1.upsamplers.0.conv."),
              (r"^mid\.res\.", "mid_block.resnets.0."), (r"^mid\.attn\.", "mid_block.attentions.0."),
              (r"^mid2\.", "mid_block.resnets.1.")]
    leaf = [(r"\.emb\.", ".time_emb_proj."), (r"\.skip\.", ".conv_shortcut."), (r"\.norm\.", ".group_norm."),
            (r"\.proj\.", ".to_out.0.")]
    out: dict[str, Tensor] = {}
    for key, t in unet_sd.items():
        new = key
        for pat, rep in simple:
            new = re.sub(pat, rep, new)
        if ".resnets." in new or ".attentions." in new:
            for pat, rep in leaf:
                new = re.sub(pat, rep, new)
        t = t.detach().cpu().float().contiguous()
        if new.endswith((".qkv.weight", ".qkv.bias")):
            for name, part in zip(("to_q", "to_k", "to_v"), t.chunk(3, dim=0)):
                out[new.replace(".qkv.", f".{name}.")] = part.contiguous()
        else:
            out[new] = t
    return out


def export_diffusers(run_dir, out_dir, *, weights: str = "ema", overwrite: bool = False) -> Path:
    """Write a flat diffusers folder (config.json, diffusion_pytorch_model.safetensors, scheduler_config.json)
    from a unet run whose architecture coincides with UNet2DModel's (export_config says when it does not).
    Loads with diffusers' UNet2DModel.from_pretrained(out_dir) and DDPMScheduler.from_pretrained(out_dir)."""
    import safetensors.torch

    from .loaders import load_run

    run = load_run(Path(run_dir), weights=weights)
    unet_cfg, sched_cfg = export_config(run.config)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir} is not empty; choose an empty or new folder (or --overwrite)")
    sd = export_state_dict(run.model.backbone.state_dict())
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    for name, doc in (("config.json", unet_cfg), ("scheduler_config.json", sched_cfg)):
        (out_dir / name).write_text(json.dumps(doc, indent=2) + "\n")
    return out_dir

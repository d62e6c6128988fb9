"""The run configuration: one frozen dataclass tree, loaded strictly from YAML presets and --set overrides.

Each component's own settings live in its own config class (UNetConfig beside the U-Net, TrainConfig beside
the trainer); this module only composes them. Sections that choose a component by `kind` (process, backbone,
codec, conditioners) are unions keyed on kind (strict.kind_field). Configs of earlier releases are rewritten on
read (migrate.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ..autoencoders.identity import IdentityCodecConfig
from ..core.processes import VPDiscrete
from ..nn.unet import UNetConfig
from ..train.trainer import TrainConfig
from .migrate import migrate_model_config, migrate_run_config
from .strict import kind_field


@dataclass(frozen=True)
class ModelConfig:
    """The model spec: a noise process, an output head, a backbone and a codec, each chosen by `kind` through the
    registry (config.registry.KINDS); each kind's fields are those of its own config class (the process kinds'
    are the process dataclasses of core.processes / core.vdm, the backbones' beside the backbone, e.g.
    nn.unet.UNetConfig). data_shape is the (C, H, W) of the training images, set from the data when training
    starts; the diffusion-space shape is codec.latent_shape(data_shape)."""

    process: Any = kind_field("process", VPDiscrete)
    head: Literal["eps", "x0", "v", "edm"] = "eps"
    variance: Literal["fixed", "learned"] = "fixed"  # learned: iDDPM's interpolated variance (2C output channels)
    sigma_data: float = 0.5  # Karras et al. 2022; used by the v and edm heads and the edm weighting
    backbone: Any = kind_field("backbone", UNetConfig)
    codec: Any = kind_field("codec", IdentityCodecConfig)
    data_shape: tuple[int, ...] = ()  # (C, H, W) of the data; () until training starts (set from the data)

    __migrate__ = staticmethod(migrate_model_config)


@dataclass(frozen=True)
class ObjectiveConfig:
    density: Literal["discrete", "uniform_t", "lognormal", "importance", "vdm"] = "discrete"
    weighting: Literal["eps", "x0", "v", "edm", "min_snr", "hybrid", "vlb"] = "eps"
    P_mean: float = -1.2  # Karras et al. 2022
    P_std: float = 1.2  # Karras et al. 2022
    min_snr_gamma: float = 5.0  # Hang et al. 2023
    t_min: float = 1e-5  # Song et al. 2021
    vlb_lambda: float = 0.001  # Nichol & Dhariwal 2021: weight of L_vlb in the hybrid loss


@dataclass(frozen=True)
class DataConfig:
    kind: str = "mnist"  # a data set kind of registry.DATASETS: mnist, fashion-mnist, folder
    path: Optional[str] = None  # folder or ZIP of images (kind=folder)
    split: str = "train"  # mnist / fashion-mnist: train (50k), val (10k), test (10k), train+val; folder: train,
    #   val, train+val (the held-out share is val_fraction)
    val_split: Optional[str] = "val"  # held-out images for the validation loss (null: none)
    val_fraction: Optional[float] = None  # folder: share of files held out as split val, chosen by a hash of each
    #   file's relative path (adding files moves no other file); null: none held out
    channels: Literal["auto", "L", "RGB", "RGBA"] = "L"  # folder: auto keeps what the files are
    limit: Optional[int] = None  # use only the first N images of each split (small-data experiments, tests)
    resolution: Optional[int] = None  # resize/center-crop folder images; pad MNIST-like 28x28 to this size
    downsample: int = 1  # > 1: area-average by this factor (data.resize; a cascade's base stage, e.g. 28 -> 14)
    bad_files: Literal["skip", "error"] = "error"  # folder: skip bad files (counted) or fail before step 0
    labels: Literal["none", "folder", "json"] = "none"  # folder: class labels from first-level subfolder names,
    #   or json: from the dataset.json of EDM's dataset_tool layout (what `torchdiffusion data prepare` writes)
    # video data sets (moving-mnist, video-folder): frames per clip, stride between them in the source video,
    # independent images appended to every clip of a batch (joint video + image training, Ho et al. 2022), and
    # moving-mnist's digits per clip and clip count (null: 10k train, 1k val, 1k test)
    frames: Optional[int] = None
    frame_stride: Optional[int] = None
    image_frames: Optional[int] = None
    digits: Optional[int] = None
    clips: Optional[int] = None
    class_names: tuple[str, ...] = ()  # names of labels 0..K-1, set from the data when training starts (folder:
    #   the subfolder names); `--labels` accepts them

    def __post_init__(self):
        from .registry import DATASETS
        if self.kind not in DATASETS:
            import difflib
            close = difflib.get_close_matches(self.kind, list(DATASETS), n=1)
            raise ValueError(f"kind {self.kind!r} is not valid{f' (did you mean {close[0]!r}?)' if close else ''}; "
                             f"valid: {', '.join(DATASETS)}")
        if isinstance(self.downsample, bool) or not isinstance(self.downsample, int) or self.downsample < 1:
            raise ValueError(f"downsample must be an integer >= 1 (1: full resolution), got {self.downsample!r}")


@dataclass(frozen=True)
class SampleConfig:
    """The sampler used for training-time grids and as the `sample` command's default."""

    sampler: str = "heun"
    steps: int = 18  # EDM uses 18 Heun steps (35 NFE) on CIFAR-10
    grid: str = "karras"  # a kind of registry.GRIDS: karras, loglinear, discrete, optimized, uniform_t
    grid_file: Optional[str] = None  # grid: optimized -> a JSON grid from `torchdiffusion grid optimize`
    rho: float = 7.0  # Karras et al. 2022
    spacing: Literal["leading", "trailing", "linspace"] = "trailing"  # discrete grids
    sigma_min: Optional[float] = None  # default: the process's
    sigma_max: Optional[float] = None  # default: the process's
    eta: float = 0.0  # ddim
    variance: Optional[Literal["small", "large", "learned"]] = None  # ddpm (default: the sampler's, small)
    grid_images: int = 64  # fixed seeds 0..grid_images-1 for training-time grids
    # Autoguidance by default (Karras et al. 2024): `sample` guides with this run's checkpoint of this step (keep it
    # with train.keep_steps) at autoguide_scale unless --autoguide is given; None = no default guide
    autoguide_step: Optional[int] = None
    # or the checkpoint at this fraction of the run's (planned) length (keep it with train.keep_fractions)
    autoguide_fraction: Optional[float] = None
    autoguide_scale: float = 2.0
    # Classifier-free guidance by default (Ho & Salimans 2022): a class-conditional run trained with label dropout
    # is sampled at this scale w (D_u + w (D_c - D_u)) unless --guidance-scale is given; None = conditional, no CFG
    guidance_scale: Optional[float] = None

    def __post_init__(self):
        if self.guidance_scale is not None and (isinstance(self.guidance_scale, bool) or
                                                not isinstance(self.guidance_scale, (int, float))
                                                or self.guidance_scale < 0):
            raise ValueError(f"sample.guidance_scale must be a number >= 0 or null, got {self.guidance_scale!r}")
        if self.autoguide_step is not None and (not isinstance(self.autoguide_step, int) or self.autoguide_step < 1):
            raise ValueError(f"sample.autoguide_step must be a step >= 1 or null, got {self.autoguide_step!r}")
        f = self.autoguide_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1):
            raise ValueError(f"sample.autoguide_fraction must be a fraction of the run in (0, 1) or null, got {f!r}")
        if f is not None and self.autoguide_step is not None:
            raise ValueError(f"sample.autoguide_step ({self.autoguide_step}) and sample.autoguide_fraction ({f}) both "
                             f"name a guide; set one of them to null")


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    # conditioners by the cond key they fill: {label: {kind: class, p_uncond: 0.1}}; {} = unconditional
    cond: dict = kind_field("conditioner", dict, mapping=True)

    __migrate__ = staticmethod(migrate_run_config)

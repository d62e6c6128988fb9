"""The run configuration: one frozen dataclass tree, loaded strictly from YAML presets and --set overrides.

Each component's own settings live in its own config class (UNetConfig beside the U-Net, TrainConfig beside
the trainer); this module only composes them and adds the small sections that name components by `kind`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..nn.unet import UNetConfig
from ..train.trainer import TrainConfig


@dataclass(frozen=True)
class ProcessConfig:
    """Which noise process the model is trained in; unset (null) fields take the paper defaults of that kind."""

    kind: Literal["vp_discrete", "vp_continuous", "sub_vp", "ve", "edm", "vdm"] = "vp_discrete"
    T: Optional[int] = None  # vp_discrete: 1000 or 2000 (Ho et al. 2020)
    schedule: Optional[Literal["linear", "cosine"]] = None  # vp_discrete
    beta_start: Optional[float] = None  # vp_discrete (linear)
    beta_end: Optional[float] = None  # vp_discrete (linear)
    beta_min: Optional[float] = None  # vp_continuous, sub_vp
    beta_max: Optional[float] = None  # vp_continuous, sub_vp
    sigma_min: Optional[float] = None  # ve, edm
    sigma_max: Optional[float] = None  # ve, edm
    gamma_min: Optional[float] = None  # vdm: log-SNR schedule end point gamma(0) = -log SNR (Kingma et al. 2021: -13.3)
    gamma_max: Optional[float] = None  # vdm: gamma(1) (Kingma et al. 2021: 5.0)


@dataclass(frozen=True)
class ModelConfig:
    process: ProcessConfig = field(default_factory=ProcessConfig)
    head: Literal["eps", "x0", "v", "edm"] = "eps"
    variance: Literal["fixed", "learned"] = "fixed"  # learned: iDDPM's interpolated variance (2C output channels)
    sigma_data: float = 0.5  # Karras et al. 2022; used by the v and edm heads and the edm weighting
    unet: UNetConfig = field(default_factory=UNetConfig)


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
    kind: Literal["mnist", "fashion-mnist", "folder"] = "mnist"
    path: Optional[str] = None  # folder or ZIP of images (kind=folder)
    split: str = "train"  # mnist / fashion-mnist: train (50k), val (10k), test (10k), train+val
    val_split: Optional[str] = "val"  # held-out images for the validation loss (null: none)
    channels: Literal["auto", "L", "RGB", "RGBA"] = "L"  # folder: auto keeps what the files are
    limit: Optional[int] = None  # use only the first N images of each split (small-data experiments, tests)
    resolution: Optional[int] = None  # resize/center-crop folder images; pad MNIST-like 28x28 to this size
    bad_files: Literal["skip", "error"] = "error"  # folder: skip bad files (counted) or fail before step 0
    labels: Literal["none", "folder"] = "none"  # folder: class labels from first-level subfolder names


@dataclass(frozen=True)
class SampleConfig:
    """The sampler used for training-time grids and as the `sample` command's default."""

    sampler: str = "heun"
    steps: int = 18  # EDM uses 18 Heun steps (35 NFE) on CIFAR-10
    grid: Literal["karras", "loglinear", "discrete", "optimized", "uniform_t"] = "karras"
    grid_file: Optional[str] = None  # grid: optimized -> a JSON grid from `torchdiffusion grid optimize`
    rho: float = 7.0  # Karras et al. 2022
    spacing: Literal["leading", "trailing", "linspace"] = "trailing"  # discrete grids
    sigma_min: Optional[float] = None  # default: the process's
    sigma_max: Optional[float] = None  # default: the process's
    eta: float = 0.0  # ddim
    variance: Optional[Literal["small", "large", "learned"]] = None  # ddpm (default: the sampler's, small)
    grid_images: int = 64  # fixed seeds 0..grid_images-1 for training-time grids


@dataclass(frozen=True)
class CondConfig:
    """Conditioning of the denoiser. kind=class: cond = {"label": (B,) int64}, the null label is num_classes
    (model.unet.num_classes is set from the data's classes when left at 0)."""

    kind: Literal["none", "class"] = "none"
    p_uncond: float = 0.1  # label dropout for classifier-free guidance (Ho & Salimans 2022 use 0.1 or 0.2)

    def __post_init__(self):
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"cond.p_uncond must be in [0, 1], got {self.p_uncond}")


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    cond: CondConfig = field(default_factory=CondConfig)

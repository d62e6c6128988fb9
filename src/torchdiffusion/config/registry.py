"""The one registry: names in configs and on the command line -> classes and functions."""
from __future__ import annotations

import difflib
from typing import Any, Callable, Optional

from ..core import grids, processes, vdm
from ..errors import ConfigError
from ..sampling.ancestral import sample_ddim, sample_ddpm
from ..sampling.ode import sample_euler, sample_heun
from ..sampling.multistep import nfe_plms, sample_deis, sample_ipndm, sample_plms, sample_unipc
from ..sampling import dpm_solver, kdiff
from ..sampling.adaptive import sample_pf_ode
from ..sampling.sde import pc_nfe, sample_pc, sample_pc_em

PROCESSES: dict[str, type] = {
    "vp_discrete": processes.VPDiscrete,
    "vp_continuous": processes.VPContinuous,
    "sub_vp": processes.SubVP,
    "ve": processes.VE,
    "edm": processes.EDM,
    "vdm": vdm.VDM,
}

#: name -> (sampler function, NFE of an n-step grid ending in 0; None where the sampler chooses its own steps)
SAMPLERS: dict[str, tuple[Callable, Callable[[int], Optional[int]]]] = {
    "euler": (sample_euler, lambda n: n),
    "heun": (sample_heun, lambda n: 2 * n - 1),
    "ddim": (sample_ddim, lambda n: n),
    "ddpm": (sample_ddpm, lambda n: n),
    "unipc": (sample_unipc, lambda n: n),
    "ipndm": (sample_ipndm, lambda n: n),
    "plms": (sample_plms, nfe_plms),
    "deis": (sample_deis, lambda n: n),
    # the k-diffusion family (sampling.kdiff, sampling.dpm_solver; docs/samplers.md)
    "euler_ancestral": (kdiff.sample_euler_ancestral, lambda n: n),
    "dpm2": (kdiff.sample_dpm2, lambda n: 2 * n - 1),
    "dpm2_ancestral": (kdiff.sample_dpm2_ancestral, lambda n: 2 * n - 1),
    "lms": (kdiff.sample_lms, lambda n: n),
    "dpm_fast": (dpm_solver.sample_dpm_fast, lambda n: n),
    "dpm_adaptive": (dpm_solver.sample_dpm_adaptive, lambda n: None),  # step-size controlled: measured, not known
    "dpmpp_2s_ancestral": (kdiff.sample_dpmpp_2s_ancestral, lambda n: 2 * n - 1),
    "dpmpp_2m": (kdiff.sample_dpmpp_2m, lambda n: n),
    "dpmpp_2m_sde": (kdiff.sample_dpmpp_2m_sde, lambda n: n),
    "dpmpp_3m_sde": (kdiff.sample_dpmpp_3m_sde, lambda n: n),
    "edm": (kdiff.sample_edm, lambda n: 2 * n - 1),
    # Score SDE (sampling.sde, sampling.adaptive; docs/score_sde.md)
    "pc": (sample_pc, pc_nfe),  # reverse-diffusion predictor + Langevin corrector: n + n_corrector (n - 1)
    "pc_em": (sample_pc_em, pc_nfe),  # Euler-Maruyama predictor + Langevin corrector
    "pf_ode": (sample_pf_ode, lambda n: None),  # adaptive Dormand-Prince on the probability-flow ODE: measured
}


#: one line per sampler for `torchdiffusion list samplers` (paper; NFE of an n-step grid); tests check every
#: SAMPLERS name has one
SAMPLER_SUMMARIES: dict[str, str] = {
    "euler": "Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1 without the correction); NFE n",
    "heun": "Heun's 2nd-order ODE method (Karras et al. 2022, Alg. 1, no churn); NFE 2n - 1",
    "ddim": "DDIM (Song et al. 2021a) on any sigma grid; eta scales the fresh noise (0: deterministic); NFE n",
    "ddpm": "ancestral DDPM (Ho et al. 2020, Alg. 2), learned variance where the model has one; NFE n",
    "unipc": "UniPC predictor-corrector, data prediction (Zhao et al. 2023); NFE n",
    "ipndm": "improved PNDM, equal-step Adams-Bashforth on eps (Zhang & Chen 2023); NFE n",
    "plms": "pseudo linear multistep (Liu et al. 2022): pseudo improved Euler start, then AB2-AB4",
    "deis": "DEIS multistep tAB (Zhang & Chen 2023), a Lagrange polynomial through the last eps; NFE n",
    "euler_ancestral": "ancestral Euler: Euler to sigma_down plus noise (k-diffusion); NFE n",
    "dpm2": "DPM-Solver-2 in sigma (Lu et al. 2022a, Alg. 1; k-diffusion's DPM2); NFE 2n - 1",
    "dpm2_ancestral": "DPM-2 steps to sigma_down plus ancestral noise (k-diffusion); NFE 2n - 1",
    "lms": "linear multistep (Adams-Bashforth) in sigma on the grid's own steps (k-diffusion); NFE n",
    "dpm_fast": "DPM-Solver-fast with an NFE budget of n (Lu et al. 2022a)",
    "dpm_adaptive": "DPM-Solver-12/23 with error-controlled steps (Lu et al. 2022a); NFE measured",
    "dpmpp_2s_ancestral": "DPM-Solver++(2S) with ancestral noise (Lu et al. 2022b, Alg. 1); NFE 2n - 1",
    "dpmpp_2m": "DPM-Solver++(2M) multistep, data prediction (Lu et al. 2022b, Alg. 2); NFE n",
    "dpmpp_2m_sde": "SDE-DPM-Solver++(2M) (Lu et al. 2022b, sec. 5); eta scales the Langevin part; NFE n",
    "dpmpp_3m_sde": "third-order multistep DPM-Solver++ with the SDE part of dpmpp_2m_sde; NFE n",
    "edm": "EDM's stochastic sampler with churn (Karras et al. 2022, Alg. 2); NFE 2n - 1",
    "pc": "predictor-corrector: reverse diffusion + Langevin (Song et al. 2021, Alg. 2/3)",
    "pc_em": "predictor-corrector with an Euler-Maruyama predictor (Song et al. 2021)",
    "pf_ode": "probability-flow ODE by adaptive Dormand-Prince (Song et al. 2021); NFE measured",
}


#: inverse-problem solvers: name -> (restore function, NFE of an n-step grid given the method's options). The
#: correction methods (inverse.methods.SAMPLER_METHODS) take `sampler=` (a SAMPLERS function) and `sampler_options`;
#: their NFE below is DDPM's (n), the sampler's own NFE formula applies otherwise (inverse_nfe).
def _inverse_methods() -> dict[str, tuple[Callable, Callable[..., int]]]:
    from ..inverse import methods as inv

    def plain(n: int, **options) -> int:
        return n

    return {
        "replacement": (inv.restore_replacement, plain),
        "ilvr": (inv.restore_ilvr, plain),
        "ccdf": (inv.restore_ccdf, plain),
        "mcg": (inv.restore_mcg, plain),
        "dps": (inv.restore_dps, plain),
        "repaint": (inv.restore_repaint, lambda n, jump=10, resample=10, **o: inv.repaint_nfe(n, jump, resample)),
        "reconstruction": (inv.restore_reconstruction, plain),
    }


INVERSE_METHODS = _inverse_methods()
#: one line per inverse method for `torchdiffusion list methods`; tests check every INVERSE_METHODS name has one
INVERSE_SUMMARIES: dict[str, str] = {
    "replacement": "replacement / POCS: project onto A x = y after every step (Song et al. 2021; Chung et al. 2022)",
    "ilvr": "ILVR: replace the low frequencies by the measurement's (Choi et al. 2021); down-sampling or blur",
    "ccdf": "come-closer-diffuse-faster: start from the diffused estimate A^+ y (Chung, Sim & Ye 2022)",
    "mcg": "manifold-constrained gradient, then projection (Chung et al. 2022)",
    "dps": "diffusion posterior sampling: a gradient step on ||y - A D(x)|| (Chung et al. 2023)",
    "repaint": "RePaint: replacement with jumps back up the grid (Lugmayr et al. 2022)",
    "reconstruction": "reconstruction guidance: replacement plus a weighted gradient (Ho et al. 2022, sec. 3.1)",
}
#: other accepted names of inverse methods: alias -> name in INVERSE_METHODS
INVERSE_ALIASES = {"pocs": "replacement"}


def inverse_method(name: str) -> tuple[str, Callable, Callable[..., int]]:
    """(canonical name, restore function, NFE formula) of an inverse method name or alias (pocs = replacement),
    or a one-line ConfigError naming the valid ones."""
    canonical = INVERSE_ALIASES.get(name, name)
    if canonical not in INVERSE_METHODS:
        names = list(INVERSE_METHODS) + [f"{a} (= {b})" for a, b in INVERSE_ALIASES.items()]
        close = difflib.get_close_matches(name, list(INVERSE_METHODS) + list(INVERSE_ALIASES), n=1, cutoff=0.4)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown restore method '{name}'{hint}; valid: {', '.join(names)}")
    fn, nfe = INVERSE_METHODS[canonical]
    return canonical, fn, nfe

#: sample.grid kinds: name -> grid(process, n, sigma_min, sigma_max, sample_config) -> float64 (n + 1,)
GRIDS: dict[str, Callable] = {"karras": grids.grid_karras, "loglinear": grids.grid_loglinear,
                              "discrete": grids.grid_discrete, "optimized": grids.grid_optimized,
                              "uniform_t": grids.grid_uniform_t}


def _datasets() -> dict[str, tuple[Callable, tuple[str, ...], tuple[str, ...]]]:
    from ..data.fashion_mnist import load_fashion_mnist
    from ..data.folder import load_image_folder
    from ..data.mnist import load_mnist
    from ..data.moving_mnist import load_moving_mnist
    from ..data.video_folder import load_video_folder
    return {
        "mnist": (load_mnist, ("split", "channels", "resolution", "path", "cache_dir"), ()),
        "moving-mnist": (load_moving_mnist, ("split", "channels", "resolution", "frames", "frame_stride", "digits",
                                             "digit_size", "speed", "clips", "image_frames", "path"), ()),
        "video-folder": (load_video_folder, ("path", "split", "channels", "resolution", "frames", "frame_stride",
                                             "image_frames", "bad_files"), ("path",)),
        "fashion-mnist": (load_fashion_mnist, ("split", "channels", "resolution", "path"), ()),
        "folder": (load_image_folder, ("path", "channels", "resolution", "bad_files", "labels", "alpha_background",
                                       "min_size", "max_pixels", "max_bytes", "split", "val_fraction"), ("path",)),
    }


#: data set kinds: name -> (loader(**options) -> ImageArrayDataset, its option names, the required ones)
DATASETS = _datasets()


def register_dataset(name: str, loader: Callable, options: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
    if name in DATASETS and DATASETS[name][0] is not loader:
        raise ConfigError(f"data set kind '{name}' is already registered")
    DATASETS[name] = (loader, tuple(options), tuple(required))


def lookup(table: dict, name: str, what: str):
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.4)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"unknown {what} '{name}'{hint}; valid: {', '.join(table)}")


# --------------------------------------------------------------------------------------------- kinds
# Config sections that choose a component by `kind` (strict.kind_field): each kind names its frozen config class
# (beside the component's class) and how to build the component. Adding a backbone, codec or conditioner is one
# new file plus one register_* line here (or, from another package, a call to register_* or an entry point in
# the group "torchdiffusion.<table>", e.g. "torchdiffusion.backbone").
from dataclasses import dataclass as _dataclass  # noqa: E402


@_dataclass(frozen=True)
class Kind:
    config: type
    build: Optional[Callable] = None  # table-specific: see register_backbone / register_codec / register_conditioner
    summary: str = ""


KINDS: dict[str, dict[str, Kind]] = {"process": {}, "backbone": {}, "codec": {}, "conditioner": {},
                                    "autoencoder": {}}


def _register(table: str, name: str, config: type, build: Optional[Callable], summary: str) -> None:
    existing = KINDS[table].get(name)
    if existing is not None and (existing.config is not config or existing.build is not build):
        raise ConfigError(f"{table} kind '{name}' is already registered (by {existing.config.__module__})")
    KINDS[table][name] = Kind(config, build, summary)


def register_backbone(name: str, config: type, build: Callable, summary: str = "") -> None:
    """build(cfg, io: protocols.BackboneIO) -> nn.Module with forward(x, c_noise, cond) -> (B, io.out_channels, *S)."""
    _register("backbone", name, config, build, summary)


def register_codec(name: str, config: type, build: Callable, summary: str = "") -> None:
    """build(cfg) -> a codec module (autoencoders/__init__.py describes the interface)."""
    _register("codec", name, config, build, summary)


def register_autoencoder(name: str, config: type, build: Callable, summary: str = "") -> None:
    """build(cfg, in_channels) -> a first-stage autoencoder (autoencoders.kl / autoencoders.vq): the `ae` section of
    a `train-ae` run (config.ae_schema)."""
    _register("autoencoder", name, config, build, summary)


def register_conditioner(name: str, config: type, build: Callable, summary: str = "") -> None:
    """build(key, cfg, *, seed, rank, world_size) -> a conditioner (conditioners/base.py describes the interface)."""
    _register("conditioner", name, config, build, summary)


def _load_entry_points(table: str) -> None:
    """Kinds that installed packages declare in the entry-point group torchdiffusion.<table> (loaded on a miss)."""
    from importlib.metadata import entry_points
    for ep in entry_points(group=f"torchdiffusion.{table}"):
        if ep.name not in KINDS[table]:
            ep.load()  # the module registers its kinds when imported


def kinds_of(table: str) -> list[str]:
    return list(KINDS[table])


def kind_entry(table: str, name: Any, where: str = "") -> Kind:
    if not isinstance(name, str):
        raise ConfigError(f"{where}.kind must be a string; valid: {', '.join(KINDS[table])}")
    if name not in KINDS[table]:
        _load_entry_points(table)
    if name not in KINDS[table]:
        close = difflib.get_close_matches(name, list(KINDS[table]), n=1, cutoff=0.4)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where + ': ' if where else ''}unknown {table} kind '{name}'{hint}; "
                          f"valid: {', '.join(KINDS[table])}")
    return KINDS[table][name]


def kind_name(table: str, config: Any) -> str:
    """The kind under which the config's class is registered."""
    for name, entry in KINDS[table].items():
        if type(config) is entry.config:
            return name
    raise ConfigError(f"{type(config).__name__} is not a registered {table} config; registered: "
                      f"{', '.join(f'{k} ({e.config.__name__})' for k, e in KINDS[table].items())}")


def _register_builtin() -> None:
    from ..autoencoders.identity import IdentityCodec, IdentityCodecConfig
    from ..autoencoders.kl import KLAutoencoder, KLConfig
    from ..autoencoders.vq import VQAutoencoder, VQConfig
    from ..conditioners.augment import AugmentConditioner
    from ..conditioners.classlabel import ClassConditioner, ClassConditionerConfig
    from ..conditioners.low_res import LowResConditioner, LowResConfig
    from ..conditioners.frames import FramesConditioner, FramesConditionerConfig
    from ..data.augment import AugmentConfig
    from ..nn.diffusers_unet import DiffusersUNet2DConfig, build_diffusers_unet
    from ..nn.dit import DiTConfig, build_dit
    from ..nn.token_transformer import TokenTransformerConfig, build_token_transformer
    from ..nn.unet import UNetConfig, build_unet
    from ..nn.unet3d import UNet3DConfig, build_unet3d
    from ..nn.uvit import UViTConfig, build_uvit

    for name, cls in PROCESSES.items():  # a process's frozen dataclass is its own config
        _register("process", name, cls, None, (cls.__doc__ or "").strip().split("\n")[0])
    register_backbone("unet", UNetConfig, build_unet, "U-Net with AdaGN residual blocks and attention (ADM)")
    register_backbone("unet3d", UNet3DConfig, build_unet3d,
                      "factorised space-time U-Net for clips: per-frame U-Net + temporal attention (Ho et al. 2022)")
    register_backbone("dit", DiTConfig, build_dit, "diffusion transformer with adaLN-Zero blocks (Peebles & Xie 2023)")
    register_backbone("uvit", UViTConfig, build_uvit, "U-ViT: all inputs as tokens, long skips (Bao et al. 2023)")
    register_backbone("token_transformer", TokenTransformerConfig, build_token_transformer,
                      "bidirectional transformer over discrete tokens, logits of x0 (token models only; core.discrete)")
    register_backbone("diffusers_unet2d", DiffusersUNet2DConfig, build_diffusers_unet,
                      "diffusers' UNet2DModel layout (DDPM U-Net), for folders loaded by config.interop")
    register_codec("identity", IdentityCodecConfig, IdentityCodec, "pixel space: [0, 255] -> [-1, 1]")
    from ..autoencoders.latent import KLCodecConfig, VQCodecConfig
    # built by config.build.build_codec through config.codecs (it loads the autoencoder's run folder)
    _register("codec", "kl", KLCodecConfig, None, "latent space of a KL-VAE run (train-ae), scaled")
    _register("codec", "vq", VQCodecConfig, None,
              "pre-quantisation latent space of a VQ autoencoder run (train-ae); the decoder quantises")
    register_autoencoder("kl", KLConfig, KLAutoencoder, "KL-regularised autoencoder (Rombach et al. 2022)")
    register_autoencoder("vq", VQConfig, VQAutoencoder, "vector-quantised autoencoder, VQGAN (Esser et al. 2021)")
    register_conditioner("class", ClassConditionerConfig, ClassConditioner,
                         "class label with dropout to the null label (classifier-free guidance)")
    register_conditioner("low_res", LowResConfig, LowResConditioner,
                         "super-resolution: the down-sampled image, noise/blur augmented, concatenated (CDM)")
    register_conditioner("frames", FramesConditionerConfig, FramesConditioner,
                         "real frame indices and the independent-image mask of video clips (backbone unet3d)")
    register_conditioner("augment", AugmentConfig, AugmentConditioner,
                         "non-leaking augmentation, its parameters as a vector condition (zero at sampling)")


_register_builtin()

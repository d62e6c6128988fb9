"""A trained run as one object: `torchdiffusion.load(RUN_OR_CHECKPOINT)` -> DiffusionPipeline.

    pipe = torchdiffusion.load("runs/mnist")
    images = pipe.sample(range(16), sampler="dpmpp_2m", steps=20)      # uint8 (16, 1, 28, 28)
    pipe.save(images, "out/")                                          # out/000000.png ... (seed names)

It composes the same pieces as the commands, so a seed gives the same image as `torchdiffusion sample` with the
same settings (sampler, steps, grid, labels, guidance): the run's config (config.loaders.load_run), the sample
settings with the overrides (pipelines.settings.override_sample), the sampler with its options
(config.sampler_options.build_run_sampler), the sigma grid (config.build.build_sigmas), labels and guidance
(pipelines.guided.GuidedSampling) and per-seed generation through the run's codec (pipelines.generate);
`restore` is pipelines.restore's solve, as the `restore` command runs it.

It sits in config (row 5 of docs/DESIGN.md) because it resolves samplers, grids and inverse methods by name
through the registry, which pipelines (row 4) may not import.

Shapes: images are uint8 (N, C, H, W) with C = 1 or 3 (or a list of PIL images with output="pil"); `shape` is the
diffusion space (C', *S) the sampler works in (the codec's latent shape), `data_shape` the images' (C, H, W).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import ConfigError, DataError

OUTPUTS = ("tensor", "pil")
Seeds = Union[int, str, Sequence[int], range]


def _device(device) -> torch.device:
    """'auto' (a GPU when there is one), 'cpu', 'cuda', 'cuda:N' or a torch.device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not valid; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: CUDA is not available on this machine; valid: cpu, auto")
    return dev


def _seed_list(seeds: Seeds) -> list[int]:
    """An int (one seed), a sequence or range of ints, or the command line's text ('0-63', '0,5,9')."""
    if isinstance(seeds, str):
        from ..pipelines.settings import parse_int_list
        out = parse_int_list(seeds, "seeds")
    elif isinstance(seeds, int) and not isinstance(seeds, bool):
        out = [seeds]
    else:
        try:
            out = [int(s) for s in seeds]
        except (TypeError, ValueError):
            raise ConfigError(f"seeds must be an int, a sequence of ints or text like '0-63', got "
                              f"{type(seeds).__name__}") from None
    if not out:
        raise ConfigError("seeds is empty; give e.g. range(16)")
    if any(s < 0 for s in out):
        raise ConfigError("seeds must be non-negative")
    return out


def _label_list(labels, class_names: Sequence[str] = ()) -> Optional[list[int]]:
    """None, an int, a class name, a sequence of ints or names, or text like '0-9' / 'circle,square' -> label list
    (cycled over the seeds, as --labels). Names are the run's class names (exactly, else ignoring case)."""
    if labels is None:
        return None
    names = [str(c) for c in class_names]
    folded: dict[str, int] = {}
    for k, c in enumerate(names):
        folded.setdefault(c.casefold(), k)

    def one(part) -> list[int]:
        if isinstance(part, str):
            part = part.strip()
            if part in names:
                return [names.index(part)]
            if part.casefold() in folded:
                return [folded[part.casefold()]]
            try:
                from ..pipelines.settings import int_ranges
                return int_ranges(part)
            except ValueError:
                valid = f"class names {', '.join(names[:20])} or " if names else ""
                raise ConfigError(f"label {part!r} is not valid; use {valid}labels like 3, 0-9 or 0,5,7") from None
        if isinstance(part, bool) or not isinstance(part, (int, Tensor)):
            raise ConfigError(f"labels must be ints, class names or text like '0-9', got {type(part).__name__}")
        return [int(part)]

    if isinstance(labels, str):
        items = labels.split(",")
    elif isinstance(labels, Tensor):
        items = labels.reshape(-1).tolist()
    elif isinstance(labels, int):
        items = [labels]
    else:
        try:
            items = list(labels)
        except TypeError:
            raise ConfigError(f"labels must be an int, a sequence of ints or names, or text like '0-9', got "
                              f"{type(labels).__name__}") from None
    out = [v for item in items for v in one(item)]
    if not out:
        raise ConfigError("labels is empty; give e.g. range(10)")
    return out


def _check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise ConfigError(f"output {output!r} is not valid; valid: {', '.join(OUTPUTS)}")


def _as_output(images: Tensor, output: str):
    """uint8 (N, C, H, W) as it is, or as a list of PIL images."""
    if output == "pil":
        from ..pipelines.images import to_pil
        return [to_pil(im) for im in images]
    return images


def _options_text(options: Optional[Mapping[str, Any]]) -> list[str]:
    """{'S_churn': 40} -> ['S_churn=40'], parsed and checked like --sampler-opt."""
    if options is None:
        return []
    if not isinstance(options, Mapping):
        raise ConfigError(f"sampler_options must be a dict like {{'S_churn': 40}}, got {type(options).__name__}")
    return [f"{k}={v}" for k, v in options.items()]


class DiffusionPipeline:
    """A trained run, ready to sample, restore, encode and decode (see the module docstring; docs/api.md).

    Attributes: model (the denoiser D(x, sigma, cond), eval mode), config (the RunConfig), checkpoint (its
    folder, or the diffusers folder), step, weights ('ema' or 'raw'), device, process (the noise process's kind,
    e.g. 'edm'), sigma_min / sigma_max / sigma_data, shape (diffusion space), data_shape (images), codec (the
    first stage; identity: pixel space), conditioners ({name: {'kind', 'num_classes'}}), num_classes (0:
    unconditional), class_names (where the run records them; labels may then be given by name)."""

    def __init__(self, model, config, device: torch.device, *, checkpoint: Optional[Path] = None, step: int = 0,
                 weights: str = "ema"):
        """model: the run's denoiser (eval mode, on `device`); config: its RunConfig (model.data_shape set)."""
        from .build import build_codec, build_conditioning, diffusion_shape
        from .registry import kind_name

        self.model, self.config, self.device = model, config, device
        self.checkpoint, self.step, self.weights = checkpoint, int(step), weights
        self.process: str = kind_name("process", config.model.process)
        proc = model.process
        self.sigma_min, self.sigma_max = float(proc.sigma_min), float(proc.sigma_max)
        self.sigma_data = float(model.precond.sigma_data)
        self.shape: tuple[int, ...] = tuple(diffusion_shape(config.model))
        self.data_shape: tuple[int, ...] = tuple(config.model.data_shape)
        self.codec = build_codec(config.model.codec)
        if isinstance(self.codec, torch.nn.Module):
            self.codec = self.codec.to(device).eval()
        self.conditioning = build_conditioning(config.cond, seed=config.seed, device=device)  # cond on `device`
        self.conditioners: dict[str, dict[str, Any]] = {
            name: {"kind": kind_name("conditioner", ccfg), "num_classes": int(getattr(ccfg, "num_classes", 0) or 0)}
            for name, ccfg in config.cond.items()}
        label = config.cond.get("label")
        self.num_classes: int = int(getattr(label, "num_classes", 0) or 0)
        #: the classes' names where the run records them (data.class_names of a folder run), else ()
        self.class_names: tuple[str, ...] = tuple(str(c) for c in getattr(config.data, "class_names", None) or ())

    @classmethod
    def from_run(cls, run, device: torch.device) -> "DiffusionPipeline":
        """From a config.loaders.LoadedRun (load_run)."""
        return cls(run.model, run.config, device, checkpoint=run.path, step=run.step, weights=run.weights)

    def __repr__(self) -> str:
        cond = ", ".join(f"{k}: {v['kind']}" + (f" ({v['num_classes']} classes)" if v["num_classes"] else "")
                         for k, v in self.conditioners.items()) or "none"
        return (f"DiffusionPipeline({self.checkpoint}, step {self.step}, {self.weights} weights, process "
                f"{self.process}, sigma [{self.sigma_min:g}, {self.sigma_max:g}], shape {self.shape}, images "
                f"{self.data_shape}, conditioners {cond}, device {self.device})")

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, seeds: Seeds, *, sampler: Optional[str] = None, steps: Optional[int] = None,
               grid: Optional[str] = None, eta: Optional[float] = None,
               sampler_options: Optional[Mapping[str, Any]] = None, labels=None,
               guidance_scale: Optional[float] = None, guidance_interval: Optional[Sequence[float]] = None,
               batch: int = 16, output: str = "tensor", progress: bool = False):
        """One image per seed: uint8 (N, C, H, W), or N PIL images with output="pil".

        sampler / steps / grid / eta: as `sample --sampler/--steps/--grid/--eta` (default: the run's sample
        settings); sampler_options: {'S_churn': 40} as --sampler-opt. labels: one label, a list cycled over the
        seeds, or text like '0-9' (class names too, where the run records them); default for a class-conditional
        model: 0..K-1 cycled. guidance_scale: w of classifier-free guidance D_u + w (D_c - D_u);
        guidance_interval: (lo, hi], guide only there. Seed s draws all its noise from
        torch.Generator().manual_seed(s), so its image does not depend on `batch`. progress: a bar (terminal) or
        lines on stderr. Bad input is a one-line ConfigError."""
        from ..pipelines.generate import codec_decoder, generate
        from ..pipelines.guided import GuidedSampling
        from .build import build_sigmas
        from .registry import GRIDS
        from .sampler_options import build_run_sampler
        from ..pipelines.settings import override_sample
        from ..pipelines.progress import Progress

        _check_output(output)
        sr = [n for n, c in self.conditioning.items.items() if hasattr(c, "low_res_of")] if self.conditioning else []
        if sr:
            raise ConfigError(f"this is a super-resolution stage (cond.{sr[0]}): it needs a low-resolution input; "
                              f"run it after a base stage with pipelines.cascade.cascade_generate or "
                              f"`torchdiffusion cascade sample`")
        seed_list = _seed_list(seeds)
        if not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch must be an int >= 1, got {batch!r}")
        scfg = override_sample(self.config.sample, sampler=sampler, steps=steps, grid=grid, eta=eta, grids=GRIDS,
                               source="sample()", steps_name="steps", grid_name="grid")
        fn, _, _ = build_run_sampler(scfg, _options_text(sampler_options))
        sigmas = build_sigmas(scfg, self.model.process)
        interval = None
        if guidance_interval is not None:
            try:
                lo, hi = (float(v) for v in guidance_interval)
            except (TypeError, ValueError):
                raise ConfigError(f"guidance_interval must be (lo, hi), got {guidance_interval!r}") from None
            if not 0 <= lo < hi:
                raise ConfigError(f"guidance_interval needs 0 <= lo < hi, got {lo:g}, {hi:g}")
            interval = (lo, hi)
        label_list = _label_list(labels, self.class_names)
        guided = GuidedSampling(self.num_classes, self.model, seed_list, self.device, labels=label_list,
                                guidance_scale=guidance_scale, interval=interval,
                                uncond=self.conditioning.null if self.conditioning else None,
                                log=lambda msg: None, warn=_stderr)
        with Progress(len(seed_list), "sample", mode="auto" if progress else "off") as bar:
            images = guided.generate(generate, seed_list, self.shape, fn, sigmas, batch=batch, device=self.device,
                                     on_batch=lambda chunk, imgs: bar.update(len(chunk)),
                                     decode=codec_decoder(self.codec))
        return _as_output(images, output)

    # ------------------------------------------------------------------ restoration
    def restore(self, images, task: str = "inpaint", method: str = "repaint", *, seeds: Optional[Seeds] = None,
                steps: int = 50, sigma_start: Optional[float] = None, sampler: Optional[str] = None,
                sampler_options: Optional[Mapping[str, Any]] = None, mask: str = "half", half: str = "bottom",
                missing: float = 0.5, scale: int = 4, down: str = "avgpool", blur_sigma: float = 2.0,
                noise: float = 0.0, method_options: Optional[Mapping[str, Any]] = None, batch: int = 16,
                labels=None, output: str = "tensor", return_measurement: bool = False, progress: bool = False):
        """Measure `images` with a task's operator and restore them, as the `restore` command does.

        images: uint8 (N, C, H, W) or (C, H, W), a list of PIL images, or a folder/ZIP of images; the model's
        size and channels. task: inpaint (mask half|box|random, half, missing), superres (scale, down avgpool|
        bicubic), deblur (blur_sigma px) or colorize; noise: measurement noise std in [-1, 1]. method:
        replacement (pocs), ilvr, ccdf, mcg, dps, repaint or reconstruction; method_options: that method's own
        (dps/mcg: scale, prior_std (default sigma_data); repaint: jump, resample; reconstruction: weight; ilvr:
        sigma_stop). sampler / sampler_options: the sampler under a correction method (default ddpm). seeds:
        one per image (default 0..N-1): image i's measurement and sampler noise come from seed i. labels: for a
        class-conditional model, one label for all images or one per image (default: the null label, where the
        model was trained with label dropout). Returns uint8
        restorations (N, C, H, W) (PIL with output="pil"), and with return_measurement=True also the
        measurements shown at image size (A^+ y, holes black)."""
        from ..data.convert import to_model_range, to_uint8
        from ..pipelines.restore import (TaskConfig, build_operator, measurement_image, restore_images,
                                         restore_sigmas, solver_options)
        from ..pipelines.progress import Progress
        from .registry import SAMPLERS, inverse_method, lookup
        from .sampler_options import parse_sampler_options

        _check_output(output)
        if not isinstance(steps, int) or steps < 1 or not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"steps and batch must be ints >= 1, got {steps!r} and {batch!r}")
        method, fn, _ = inverse_method(method)
        from ..pipelines.generate import codec_decoder
        decode = codec_decoder(self.codec)
        if decode is not None and method != "dps":  # A o decode is not linear: only the DPS gradient (docs/latent.md)
            raise ConfigError(f"method '{method}' works in pixel space; this model diffuses in a latent space (shape "
                              f"{self.shape} for images {self.data_shape}), where restore runs through the decoder; "
                              f"valid: dps")
        sampler_fn = sampler_nfe = None
        sampler_kw: dict = {}
        if sampler is not None:
            sampler_fn, sampler_nfe = lookup(SAMPLERS, sampler, "sampler")
            sampler_kw = parse_sampler_options(sampler, sampler_fn, _options_text(sampler_options))
        elif sampler_options:
            raise ConfigError("sampler_options needs sampler=NAME (the default sampler under the correction is ddpm)")
        options = dict(method_options or {})
        if method in ("dps", "mcg"):
            options.setdefault("prior_std", self.sigma_data)
        method_kw = solver_options(method, options, sampler, sampler_fn, sampler_nfe, sampler_kw)
        x_u8 = self._images_in(images)
        seed_list = _seed_list(seeds) if seeds is not None else list(range(len(x_u8)))
        if len(seed_list) < len(x_u8):
            raise ConfigError(f"seeds gives {len(seed_list)} seeds for {len(x_u8)} images; give one per image")
        seed_list = seed_list[:len(x_u8)]
        cfg = TaskConfig(task=task, mask=mask, half=half, missing=missing, scale=scale, down=down,
                         blur_sigma=blur_sigma, noise_std=noise)
        op = build_operator(cfg, self.data_shape)
        x = to_model_range(x_u8)
        op(x[:1])  # a scale that does not divide the size fails here, in one line
        top = sigma_start if sigma_start is not None else (2.0 if method == "ccdf" else self.sigma_max)
        sigmas = restore_sigmas(steps, self.sigma_min, top)
        cond_for = self._restore_cond(_label_list(labels, self.class_names), len(x))
        try:
            with Progress(len(x), "restore", mode="auto" if progress else "off") as bar:
                result = restore_images(self.model, x, seed_list, op, noise, fn, sigmas, batch=batch,
                                        options=method_kw, device=self.device, cond_for=cond_for, progress=bar,
                                        decode=decode, latent_shape=self.shape if decode is not None else None)
        except TypeError as e:  # a method option the method does not take
            raise ConfigError(f"method_options for '{method}': {e}") from None
        restored = _as_output(to_uint8(result.restored), output)
        if not return_measurement:
            return restored
        shown = to_uint8(measurement_image(op, result.measurement, self.data_shape))
        return restored, _as_output(shown, output)

    def _restore_cond(self, labels: Optional[list[int]], n: int):
        """restore_images' cond_for (pipelines.restore.restore_condition): None, the labels or the null label."""
        from ..pipelines.restore import restore_condition
        label_cfg = self.config.cond.get("label")
        return restore_condition(self.conditioning, self.num_classes, getattr(label_cfg, "p_uncond", 0), labels, n,
                                 self.device, flag="labels=")[2]

    def _images_in(self, images) -> Tensor:
        """uint8 (N, C, H, W) of the model's image shape from a tensor, PIL images or a folder/ZIP path."""
        c, h, w = self.data_shape
        if isinstance(images, (str, Path)):
            from ..data.folder import load_image_folder
            if not Path(images).exists():
                raise DataError(f"{images}: no such folder or ZIP file of images")
            images = load_image_folder(images, channels="L" if c == 1 else "RGB").x
        elif not isinstance(images, Tensor):
            from ..pipelines.images import from_pil
            images = from_pil(list(images), channels=c)
        if images.dim() == 3:
            images = images[None]
        if images.dtype != torch.uint8:
            raise ConfigError(f"images must be uint8 (0..255), got {images.dtype}; convert floats in [-1, 1] "
                              f"with torchdiffusion.data.convert.to_uint8")
        if images.dim() != 4 or tuple(images.shape[1:]) != (c, h, w):
            raise DataError(f"images of shape {tuple(images.shape[1:])} do not fit the model's images of shape "
                            f"{(c, h, w)}")
        return images

    # ------------------------------------------------------------------ first stage
    @torch.no_grad()
    def encode(self, images) -> Tensor:
        """uint8 images (N, C, H, W) (or PIL images) -> the diffusion space (N, *shape) through the run's codec
        (the identity codec: x / 127.5 - 1)."""
        x = self._images_in(images).to(self.device)
        return self.codec.encode(x)

    @torch.no_grad()
    def decode(self, z: Tensor, output: str = "tensor"):
        """Diffusion-space tensors (N, *shape) -> uint8 images (N, C, H, W) (PIL with output="pil") through the
        run's codec."""
        from ..data.convert import to_uint8
        _check_output(output)
        if not isinstance(z, Tensor) or tuple(z.shape[1:]) != self.shape:
            raise ConfigError(f"decode takes (N, {', '.join(map(str, self.shape))}) tensors, got "
                              f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        return _as_output(to_uint8(self.codec.decode(z.to(self.device)).cpu()), output)

    # ------------------------------------------------------------------ files
    @staticmethod
    def save(images, path, seeds: Optional[Seeds] = None) -> list[Path]:
        """Write images (uint8 (N, C, H, W) or PIL) as PNGs: into a folder as <seed>.png (000000.png, ... as
        `sample` names them; seeds default 0..N-1), or, for a path ending in .png, one file (a grid when N > 1).
        Returns the written paths."""
        from ..pipelines.generate import save_images
        return save_images(images, path, None if seeds is None else _seed_list(seeds))


def _stderr(msg: str) -> None:
    import sys
    print(msg, file=sys.stderr)


def _is_diffusers_folder(path: Path) -> bool:
    """A diffusers UNet2DModel folder: config.json naming the class (or unet/config.json), no checkpoint manifest."""
    import json
    if (path / "MANIFEST.json").exists() or (path / "checkpoints").is_dir():
        return False
    if (path / "unet" / "config.json").exists():
        return True
    try:
        return "_class_name" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def load(path, device="cpu", ema: bool = True) -> DiffusionPipeline:
    """A run folder (its latest verified checkpoint), a checkpoint folder or a local diffusers UNet2DModel folder
    (config.interop.load_diffusers; its weights are both 'ema' and 'raw') as a DiffusionPipeline on `device`
    ('auto', 'cpu', 'cuda', 'cuda:N' or a torch.device) with the EMA weights (ema=False: the raw weights)."""
    from .loaders import load_run

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such run folder, checkpoint folder or diffusers folder")
    dev = _device(device)
    if _is_diffusers_folder(path):
        from .interop import load_diffusers
        loaded = load_diffusers(path, device=dev)
        return DiffusionPipeline(loaded.model, loaded.config, dev, checkpoint=path, step=0,
                                 weights="ema" if ema else "raw")
    is_run = (path / "checkpoints").is_dir() or not (path / "MANIFEST.json").exists()
    run = load_run(run_dir=path if is_run else None, checkpoint=None if is_run else path,
                   weights="ema" if ema else "raw", device=dev)
    return DiffusionPipeline.from_run(run, dev)


__all__ = ["DiffusionPipeline", "load"]

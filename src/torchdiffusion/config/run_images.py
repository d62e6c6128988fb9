"""Images of a trained run, whatever its family: the one path by which commands that judge a model's images
(`audit --run`, `eval ... --fake RUN`) make them.

    src = open_run(run_dir, checkpoint, weights="ema", sampler=None, steps=None, device=dev)
    images = src.generate(seeds, batch=64, on_batch=None)        # uint8 (N, C, H, W), one generator per seed
    src.config.data                                             # the data the run was trained on
    src.record(seeds)                                           # what made them (sampler, steps, checkpoint, ...)

Two families: a diffusion run (`train`: config.loaders.load_run, a grid sampler, decoded through the run's codec)
and a token run (`train-tokens`: config.token_training.load_token_run, MaskGIT or ancestral sampling, decoded
through the VQ decoder). A checkpoint's stored config says which (a token run's has `vq_run`). Labels of a
class-conditional run are seed % K in both, so a seed's image does not depend on the batch or the command.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

TOKEN_MARKER = "vq_run"  # the key only a token run's config has


@dataclass
class RunImages:
    """A loaded run that generates decoded images; `family` is "diffusion" or "tokens"."""
    family: str
    config: object  # RunConfig | TokenRunConfig (both have .data)
    checkpoint: Path
    step: int
    weights: str
    sampler: str
    steps: int
    num_classes: int
    checkpoint_sha256: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # family-specific settings for the record (grid, top-p, ...)
    _generate: Callable = None

    def generate(self, seeds: Sequence[int], *, batch: int = 64,
                 on_batch: Optional[Callable[[Sequence[int], torch.Tensor], None]] = None) -> torch.Tensor:
        """uint8 (len(seeds), C, H, W) decoded images; on_batch(chunk, images) after each batch."""
        return self._generate(list(seeds), batch, on_batch)

    def record(self, seeds: Sequence[int]) -> dict:
        seeds = list(seeds)
        return {"family": self.family, "checkpoint": str(self.checkpoint), "step": self.step, "weights": self.weights,
                "checkpoint_sha256": self.checkpoint_sha256, "sampler": self.sampler, "steps": self.steps,
                **self.extra, "seeds": f"{seeds[0]}-{seeds[-1]}" if seeds else "",
                "labels": "seed % num_classes" if self.num_classes else None, "count": len(seeds)}


def is_token_config(stored) -> bool:
    return isinstance(stored, dict) and TOKEN_MARKER in stored


def open_run(run_dir: Path | None = None, checkpoint: Path | None = None, *, weights: str = "ema",
             sampler: str | None = None, steps: int | None = None,
             device: torch.device | str = "cpu") -> RunImages:
    """Exactly one of a run folder (its latest verified checkpoint) or a checkpoint folder, of either family;
    sampler/steps override the run's sample section (a token run takes ancestral or maskgit)."""
    from ..errors import ConfigError
    from ..train import checkpoint as ckpt
    from .loaders import resolve_checkpoint
    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights {weights!r} is not valid; valid: ema, raw")
    path = resolve_checkpoint(run_dir, checkpoint)
    c = ckpt.load_checkpoint(path)
    hashes = {k: v["sha256"] for k, v in c.manifest["files"].items() if k.endswith(".safetensors")}
    if is_token_config(c.meta.get("config")):
        return _token_images(c, path, weights, sampler, steps, device, hashes)
    return _diffusion_images(c, path, weights, sampler, steps, device, hashes)


def _diffusion_images(c, path, weights, sampler, steps, device, hashes) -> RunImages:
    from ..pipelines.generate import codec_decoder, generate
    from ..pipelines.settings import override_sample
    from .build import build_sampler, build_sigmas
    from .loaders import run_from_checkpoint
    from .autoguide import autoguided, default_guide
    run = run_from_checkpoint(c, path, weights, device)
    scfg = override_sample(run.config.sample, sampler=sampler, steps=steps)
    fn, sigmas = build_sampler(scfg), build_sigmas(scfg, run.model.process)
    k = run.num_classes
    cond_for = (lambda chunk: {"label": torch.tensor([s % k for s in chunk], device=device)}) if k > 0 else None
    decode = codec_decoder(run.codec)
    extra = {"grid": scfg.grid}
    model = run.model
    guide = default_guide(run, None, None)  # the run's own autoguidance guide, as `sample` uses it by default
    if guide is not None:
        model = autoguided(run, guide, scfg.autoguide_scale, weights, device)
        extra["autoguidance"] = {"guide": str(guide), "scale": scfg.autoguide_scale, "networks_per_nfe": 2}
    w = scfg.guidance_scale if k > 0 else None  # the run's default classifier-free guidance, as `sample` uses it
    if w is not None and w != 1.0:
        from ..guidance.cfg import ClassifierFreeGuidance, null_label
        model = ClassifierFreeGuidance(model, w, run.conditioning.null if run.conditioning else null_label(k))
    if w is not None:
        extra["guidance_scale"] = w

    def gen(seeds, batch, on_batch):
        return generate(model, seeds, run.sample_shape, fn, sigmas, batch=batch, cond_for=cond_for,
                        device=device, decode=decode, on_batch=on_batch)

    return RunImages("diffusion", run.config, path, run.step, weights, scfg.sampler, scfg.steps, k, hashes,
                     extra, gen)


def _token_images(c, path, weights, sampler, steps, device, hashes) -> RunImages:
    from ..errors import ConfigError
    from ..pipelines.tokens import decode_tokens
    from .token_training import sample_tokens, token_run_from_checkpoint
    run = token_run_from_checkpoint(c, path, device, weights)
    change = {k: v for k, v in (("sampler", sampler), ("steps", steps)) if v is not None}
    try:
        scfg = dataclasses.replace(run.config.sample, **change)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"token sampling: {e}") from None
    if scfg.sampler == "maskgit" and run.process.mask_index is None:
        raise ConfigError(f"sampler maskgit needs a process with a mask token; this run's is {run.process.kind} "
                          f"(use ancestral)")

    def gen(seeds, batch, on_batch):
        out = []
        for i in range(0, len(seeds), batch):
            chunk = seeds[i:i + batch]
            x = sample_tokens(scfg, run.model, run.process, run.config.token_grid, chunk, device=device,
                              batch=batch, conditioning=run.conditioning)
            images = decode_tokens(run.first_stage.module, x, device=device)
            if on_batch is not None:
                on_batch(chunk, images)
            out.append(images)
        shape = tuple(run.config.data_shape)
        return torch.cat(out) if out else torch.empty((0, *shape), dtype=torch.uint8)

    extra = {"temperature": scfg.temperature, "top_p": scfg.top_p, "guidance_scale": scfg.guidance_scale,
             "vq_run": run.config.vq_run}
    if scfg.sampler == "maskgit":
        extra["choice_temperature"] = scfg.choice_temperature
    return RunImages("tokens", run.config, path, run.step, weights, scfg.sampler, scfg.steps,
                     run.num_classes, hashes, extra, gen)


__all__ = ["RunImages", "is_token_config", "open_run"]

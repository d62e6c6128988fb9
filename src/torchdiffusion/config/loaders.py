"""Load what a run folder or checkpoint holds: the resolved config and a ready denoiser.

Commands that act on a trained model (sample, eval, audit, restore, likelihood, report) share this one path, so a
run folder is resolved, verified and rebuilt the same way everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..core.precond import Preconditioned
from ..errors import ConfigError
from ..train import checkpoint as ckpt
from ..conditioners.base import Conditioning
from .build import build_codec, build_conditioning, build_run_model, diffusion_shape
from .schema import RunConfig
from .strict import from_dict


@dataclass
class LoadedRun:
    model: Preconditioned  # eval mode, on the requested device
    config: RunConfig
    checkpoint: ckpt.Checkpoint
    path: Path  # the checkpoint folder
    weights: str  # "ema" or "raw"

    @property
    def step(self) -> int:
        return int(self.checkpoint.meta["trainer"]["step"])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, *S) of the diffusion space the samplers work in (the codec's latent shape of the data)."""
        return diffusion_shape(self.config.model)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the training images (what the codec decodes to)."""
        return tuple(self.config.model.data_shape)

    @property
    def conditioning(self) -> Conditioning:
        """The run's conditioners: sampling cond from user input, null conditions for guidance."""
        return build_conditioning(self.config.cond, seed=self.config.seed)

    @property
    def num_classes(self) -> int:
        """Classes of the model's class condition ('label'), 0 for a model without one."""
        label = self.config.cond.get("label")
        return int(getattr(label, "num_classes", 0) or 0)

    @property
    def codec(self):
        """The run's codec on the model's device (a latent codec's autoencoder decodes where the samples are)."""
        p = next(self.model.parameters(), None)
        return build_codec(self.config.model.codec).to(p.device if p is not None else "cpu")

    def hashes(self) -> dict[str, str]:
        return {k: v["sha256"] for k, v in self.checkpoint.manifest["files"].items() if k.endswith(".safetensors")}


def resolve_checkpoint(run_dir: Path | None = None, checkpoint: Path | None = None) -> Path:
    """Exactly one of a run folder (its latest verified checkpoint) or a checkpoint folder."""
    if (run_dir is None) == (checkpoint is None):
        raise ConfigError("give exactly one of --run RUN or --checkpoint DIR")
    if run_dir is not None:
        run_dir = Path(run_dir)
        if not run_dir.exists():
            raise ConfigError(f"--run {run_dir}: no such run folder")
        path = ckpt.resolve_latest(run_dir / "checkpoints")
        if path is None:
            raise ConfigError(f"--run {run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
        return path
    return Path(checkpoint)


def load_run(run_dir: Path | None = None, checkpoint: Path | None = None,
             weights: Literal["ema", "raw"] = "ema", device: torch.device | str = "cpu") -> LoadedRun:
    """Verify and load a checkpoint, rebuild its model from the stored config, load the chosen weights."""
    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights {weights!r} is not valid; valid: ema, raw")
    path = resolve_checkpoint(run_dir, checkpoint)
    return run_from_checkpoint(ckpt.load_checkpoint(path), path, weights, device)


def run_from_checkpoint(c: ckpt.Checkpoint, path: Path, weights: Literal["ema", "raw"] = "ema",
                        device: torch.device | str = "cpu") -> LoadedRun:
    """load_run of an already loaded (verified) checkpoint; a token run's is refused in one line."""
    stored = c.meta.get("config")
    if isinstance(stored, dict) and "vq_run" in stored:
        raise ConfigError(f"{path} is a token run's checkpoint (train-tokens); use sample-tokens, or audit / eval "
                          f"--fake RUN, which take both kinds of run")
    cfg = from_dict(RunConfig, stored)
    model = build_run_model(cfg)
    model.load_state_dict(c.tensors["ema" if weights == "ema" else "model"])
    model.eval().requires_grad_(False).to(device)
    return LoadedRun(model, cfg, c, path, weights)


def load_classifier(run_dir: Path | None = None, checkpoint: Path | None = None,
                    device: torch.device | str = "cpu"):
    """The classifier a `train-classifier` run folder (or checkpoint folder) holds, verified, in eval mode with
    requires_grad off: `module(x, sigma=None) -> logits (B, K)`, `module.features(x, sigma=None) -> (B, F)`,
    x in model range [-1, 1] (plus noise of level sigma for a noisy classifier). `module.noisy` tells whether it
    was trained across noise levels (for classifier guidance) or on clean images only (for judging samples)."""
    from ..nn.classifier import Classifier, ClassifierConfig

    path = resolve_checkpoint(run_dir, checkpoint)
    c = ckpt.load_checkpoint(path)
    stored = c.meta.get("config") or {}
    if "classifier" not in stored:
        raise ConfigError(f"{path} holds no classifier (a diffusion model? use load_run); train one with "
                          f"`torchdiffusion train-classifier`")
    model = Classifier(from_dict(ClassifierConfig, stored["classifier"]))
    model.load_state_dict(c.tensors["ema" if "ema" in c.tensors else "model"])  # the EMA weights when trained with EMA
    model.eval().requires_grad_(False).to(device)
    model.noisy = bool(stored.get("train", {}).get("noisy", False))
    model.checkpoint_path = path
    model.summary = dict(c.meta.get("trainer") or {})
    return model

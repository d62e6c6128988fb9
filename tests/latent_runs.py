"""Tiny first-stage runs for the latent-diffusion tests: a randomly initialised KL or VQ autoencoder saved in the
`train-ae` run format (config/first_stage.py), so a latent diffusion run has something to load in milliseconds."""
from __future__ import annotations

from pathlib import Path

import torch

from torchdiffusion.config.ae_schema import AERunConfig
from torchdiffusion.config.first_stage import build_autoencoder
from torchdiffusion.config.strict import from_dict, to_dict
from torchdiffusion.train import checkpoint as ckpt

#: the smallest autoencoder worth encoding with: 8 channels, f = 4 ((1, 2, 2)), 3 latent channels
TINY_AE = {"base_channels": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 3, "mid_attn": False,
           "norm_groups": 4}


def make_ae_run(path: Path, kind: str = "kl", data_shape=(1, 32, 32), seed: int = 0, data: dict | None = None,
                **ae) -> Path:
    """A run folder holding one checkpoint of a randomly initialised autoencoder of `kind` for images of
    data_shape (C, H, W), with the data section `data` (default: 64 MNIST images at 32x32)."""
    spec = {"kind": kind, **TINY_AE, **({"n_codes": 16} if kind == "vq" else {}), **ae}
    data = data or {"kind": "mnist", "split": "train", "val_split": None, "limit": 64, "resolution": 32}
    cfg = from_dict(AERunConfig, {"seed": seed, "data": data, "ae": spec, "data_shape": list(data_shape)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_autoencoder(cfg)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(__import__("yaml").safe_dump(to_dict(cfg), sort_keys=False))
    ckpt.save_checkpoint(path / "checkpoints", 1, tensors={"model_ae": module.state_dict()},
                         meta={"config": to_dict(cfg), "trainer": {"step": 1}})
    return path

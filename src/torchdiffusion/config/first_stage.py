"""Loading a trained first stage: an autoencoder run folder of `torchdiffusion train-ae` (or one of its checkpoints).

The run format (written by train.trainer.Trainer with train.ae_step's MultiModelStep):
    RUN/config.yaml                      the resolved run config (config.ae_schema.AERunConfig)
    RUN/metrics.csv, RUN/log.txt         per-step losses and the validation metrics
    RUN/samples/recon_<step>.png         held-out images over their reconstructions
    RUN/checkpoints/step_XXXXXXXX/       tensor groups model_ae, ema_ae (with EMA), model_disc, optim_ae,
                                         optim_disc, rng; config.json (the same config), trainer.json, ...
load_first_stage verifies the checkpoint (train.checkpoint: manifest, sizes, sha256), rebuilds the autoencoder from
the stored config, loads the EMA weights where present (else the raw ones) and returns it in eval mode.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..train import checkpoint as ckpt
from .ae_schema import AERunConfig
from .registry import kind_entry, kind_name
from .strict import from_dict

#: the VQ quantiser's bookkeeping buffers (usage counts, pass counter): not weights, left out of the fingerprint
_COUNTERS = ("quantizer.usage", "quantizer.window", "quantizer.calls", "quantizer.restarts")


def build_autoencoder(cfg: AERunConfig, in_channels: int | None = None) -> nn.Module:
    """The autoencoder of an AE run config (its `ae` kind), for images of cfg.data_shape's channels."""
    if in_channels is None:
        if not cfg.data_shape:
            raise ConfigError("the autoencoder's data_shape is not set (it is set from the data when training starts)")
        in_channels = int(cfg.data_shape[0])
    entry = kind_entry("autoencoder", kind_name("autoencoder", cfg.ae), "ae")
    return entry.build(cfg.ae, in_channels)


def weights_fingerprint(state: Mapping[str, Tensor]) -> str:
    """sha256 over the sorted names, dtypes, shapes and bytes of a state dict's tensors (counters excluded)."""
    h = hashlib.sha256()
    for k in sorted(state):
        if k.endswith(_COUNTERS):
            continue
        t = state[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class FirstStage:
    module: nn.Module  # KLAutoencoder | VQAutoencoder, eval mode, requires_grad off
    kind: str  # "kl" | "vq"
    data_shape: tuple[int, int, int]  # (C, H, W) of the training images
    latent_shape: tuple[int, int, int]  # (z_channels, H/f, W/f)
    fingerprint: str  # weights_fingerprint of the loaded weights
    config: AERunConfig
    checkpoint: Path  # the checkpoint folder loaded
    weights: str  # "ema" or "model"
    step: int


def resolve_ae_checkpoint(path: Path) -> Path:
    """A run folder -> its latest verified checkpoint; a checkpoint folder -> itself. One-line CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such autoencoder run or checkpoint (train one with `torchdiffusion "
                              f"train-ae`)")
    if (path / ckpt.MANIFEST).exists() or path.name.startswith("step_"):
        return path
    if (path / "checkpoints").is_dir():
        search = ckpt.find_latest(path / "checkpoints")
        if search.path is None:
            why = "; ".join(f"{n}: {r}" for n, r in search.skipped[:2])
            raise CheckpointError(f"{path}: no complete checkpoint in {path / 'checkpoints'}"
                                  + (f" ({why})" if why else ""))
        return search.path
    raise CheckpointError(f"{path}: neither an autoencoder run folder (with checkpoints/) nor a checkpoint folder")


def load_first_stage(path: Path | str, device: torch.device | str = "cpu") -> FirstStage:
    """The first stage an AE run folder (its latest verified checkpoint) or checkpoint folder holds."""
    cpath = resolve_ae_checkpoint(Path(path))
    c = ckpt.load_checkpoint(cpath)
    stored = c.meta.get("config") or {}
    if not isinstance(stored, dict) or "ae" not in stored:
        raise CheckpointError(f"{cpath}: holds no autoencoder (its config has no 'ae' section); train one with "
                              f"`torchdiffusion train-ae`")
    try:
        cfg = from_dict(AERunConfig, stored)
    except ConfigError as e:
        raise CheckpointError(f"{cpath}: its autoencoder config does not load: {e}") from None
    group = "ema_ae" if "ema_ae" in c.tensors else "model_ae"
    if group not in c.tensors:
        raise CheckpointError(f"{cpath}: no model_ae weights in the checkpoint")
    module = build_autoencoder(cfg)
    try:
        module.load_state_dict(c.tensors[group])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{cpath}: {group} does not fit the autoencoder its config describes ({first})") from None
    module.eval().requires_grad_(False).to(device)
    data_shape = tuple(int(s) for s in cfg.data_shape)
    return FirstStage(module=module, kind=kind_name("autoencoder", cfg.ae), data_shape=data_shape,
                      latent_shape=tuple(module.latent_shape(data_shape)),
                      fingerprint=weights_fingerprint(c.tensors[group]), config=cfg, checkpoint=cpath,
                      weights="ema" if group == "ema_ae" else "model", step=int(c.step))


def reconstruction_metrics(module: nn.Module, x_u8: Tensor, *, extractor=None, batch: int = 64,
                           device: torch.device | str = "cpu") -> dict:
    """Held-out reconstruction quality of a first stage on uint8 images (N, C, H, W): rec_l1 (mean |x - x_hat| in
    [-1, 1]), psnr and ssim (autoencoders.metrics, on [0, 1], means over images), for VQ code_usage and
    code_perplexity over the whole set, and with a feature extractor (eval: Inception, or a project classifier,
    labelled by its name) rfid: the FID of the reconstructions against the originals, and rkid (KID, same sets).
    KL models reconstruct from the posterior's mode."""
    from ..autoencoders.metrics import code_usage, psnr, ssim, to_unit
    from ..data.convert import to_model_range, to_uint8

    module = module.eval()
    l1 = ps = ss = 0.0
    counts, recon = None, []
    with torch.no_grad():
        for i in range(0, len(x_u8), batch):
            x = to_model_range(x_u8[i:i + batch]).to(device)
            if module.kind == "kl":
                x_hat = module.decode(module.encode(x).mode())
            else:
                x_hat, _, idx = module(x)
                c = torch.bincount(idx.flatten(), minlength=module.cfg.n_codes).cpu()
                counts = c if counts is None else counts + c
            x_hat = x_hat.clamp(-1, 1)
            l1 += float((x_hat - x).abs().flatten(1).mean(1).sum())
            ps += float(psnr(to_unit(x), to_unit(x_hat)).clamp(max=100.0).sum())
            ss += float(ssim(to_unit(x), to_unit(x_hat)).sum())
            recon.append(to_uint8(x_hat.cpu()))
    n = len(x_u8)
    out = {"n": n, "rec_l1": l1 / n, "psnr": ps / n, "ssim": ss / n}
    if counts is not None:
        out.update(code_usage(counts))
    if extractor is not None:
        from ..eval import fid_from_features, kid_from_features
        real, fake = extractor(x_u8), extractor(torch.cat(recon))
        out["rfid"] = float(fid_from_features(real, fake))
        k = kid_from_features(real, fake, subset_size=min(1000, n))
        out["rkid"] = float(k.mean)
        out["extractor"] = getattr(extractor, "name", type(extractor).__name__)
    return out

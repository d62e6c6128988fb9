"""Latent codecs from a run config: the first stage of `model.codec: {kind: kl | vq, run: AE_RUN}`, its latent
scale estimated when training starts, the raw-latent cache, and the training-time encoder.

Notation as in autoencoders/latent.py: r the raw latent of the autoencoder, z = (r - shift) * scale.

What a diffusion run stores (its config.yaml and every checkpoint's config): model.codec.run (the autoencoder's
run folder, made absolute), scale and shift (numbers, estimated once from the training data when the run starts
and read back ever after), fingerprint (of the autoencoder's weights; every later load of the codec compares it
and refuses a different autoencoder in one line) and the optional cache path.

Randomness: KL posterior samples at training step k come from a generator seeded by mix_seed(seed, k) with the
tag b"latent-posterior", drawn for the whole global batch (process r keeps rows r, r + W, ...), so they are the
same on resume and on any number of processes; the scale estimate uses the tag b"latent-scale", validation
b"latent-val".
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..autoencoders.latent import KLCodecConfig, LatentCodec, LatentCodecConfig, VQCodecConfig, encode_moments
from ..errors import CheckpointError, ConfigError, DataError
from ..seeding import generator, mix_seed

__all__ = ["KLCodecConfig", "VQCodecConfig", "build_latent_codec", "first_stage", "is_latent", "prepare_latent_run",
           "LatentEncoder", "LatentCachedDataset", "estimate_scale", "encode_moments"]

_CACHE: dict = {}


def is_latent(codec_cfg) -> bool:
    return isinstance(codec_cfg, LatentCodecConfig)


def _kind(cfg) -> str:
    return "kl" if isinstance(cfg, KLCodecConfig) else "vq"


def _stamp(path: Path) -> tuple:
    """What invalidates the in-process cache of a loaded first stage: the run folder's checkpoints changing."""
    ck = path / "checkpoints"
    try:
        items = sorted((p.name, p.stat().st_mtime_ns) for p in ck.iterdir()) if ck.is_dir() else []
    except OSError:
        items = []
    return (str(path), tuple(items))


def first_stage(run: str | Path):
    """The autoencoder run folder's FirstStage (config.autoencoders.load_first_stage), loaded once per process
    while the folder's checkpoints stay as they are. A missing or damaged folder is one line."""
    if not run:
        raise ConfigError("model.codec.run is not set: give the autoencoder's run folder (torchdiffusion train-ae), "
                          "e.g. --set model.codec.run=runs/ae-fashion-kl")
    path = Path(run).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"model.codec.run {run}: no such autoencoder run folder (train one with "
                          f"`torchdiffusion train-ae`)")
    key = _stamp(path)
    if key not in _CACHE:
        from .first_stage import load_first_stage
        try:
            with torch.random.fork_rng(devices=[]):  # building the module before its weights load draws an init
                fs = load_first_stage(path)       # that must not move the diffusion model's (global RNG)
        except (CheckpointError, ConfigError, DataError) as e:
            raise CheckpointError(f"model.codec.run {run}: cannot load the autoencoder: {e}") from None
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"model.codec.run {run}: damaged autoencoder run ({type(e).__name__}: "
                                  f"{str(e)[:200]})") from None
        _CACHE.clear()  # one first stage at a time is plenty; the others reload on demand
        _CACHE[key] = fs
    return _CACHE[key]


def build_latent_codec(cfg: LatentCodecConfig) -> LatentCodec:
    """The codec of a kl / vq codec config: its first stage (frozen), kind checked, fingerprint checked when the
    config has one, scale and shift from the config (None until estimated)."""
    kind = _kind(cfg)
    fs = first_stage(cfg.run)
    if fs.kind != kind:
        raise ConfigError(f"model.codec.kind is {kind} but {cfg.run} holds a {fs.kind} autoencoder; set "
                          f"model.codec.kind={fs.kind}")
    if cfg.fingerprint and cfg.fingerprint != fs.fingerprint:
        raise CheckpointError(f"model.codec.run {cfg.run}: the autoencoder's weights (fingerprint "
                              f"{fs.fingerprint[:12]}) are not the ones this run was trained with "
                              f"({cfg.fingerprint[:12]}); point model.codec.run at the original autoencoder run")
    return LatentCodec(fs.module, kind, fs.data_shape, fs.latent_shape, cfg.scale, cfg.shift,
                       getattr(cfg, "posterior", "sample"), name=str(cfg.run))


# ------------------------------------------------------------------------------------------- raw latents
def estimate_scale(codec: LatentCodec, moments: Tensor, seed: int, estimate_shift: bool) -> tuple[float, float]:
    """(scale, shift): 1 / std of the raw latents r of `moments` over all entries (float64), and their mean when
    estimate_shift (else 0). KL with posterior "sample": r drawn as in training (tag b"latent-scale")."""
    g = generator(mix_seed(seed, tag=b"latent-scale"))
    r = codec.raw_from_moments(moments, g).double()
    std = float(r.std())
    if not (std > 0 and std < float("inf")):
        raise DataError(f"the raw latents of the first {len(moments)} training images have std {std}; the "
                        f"autoencoder's encoder output is constant or not finite, so no latent scale exists")
    return 1.0 / std, float(r.mean()) if estimate_shift else 0.0


class LatentEncoder:
    """The diffusion step's encode_batch(batch, step) -> z for a latent run: the batch's cached "moments" when the
    training set is a LatentCachedDataset, else the codec's moments of batch["x"]; then r (KL posterior sample from
    the per-step generator, module notes) and z = (r - shift) * scale on `device`."""

    def __init__(self, codec: LatentCodec, seed: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        self.codec, self.seed, self.global_batch = codec, seed, global_batch
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)

    def __call__(self, batch: dict, step: Optional[int]) -> Tensor:
        m = batch.get("moments")
        m = self.codec.moments(batch["x"]) if m is None else m
        m = m.to(self.device)
        codec = self.codec
        if codec.kind == "kl" and codec.posterior == "sample":
            c = codec.raw_shape[0]
            if step is None:  # validation: fixed noise of the chunk's own shape
                g = generator(mix_seed(self.seed, tag=b"latent-val"))
                e = torch.randn((len(m), c, *m.shape[2:]), generator=g)
            else:
                g = generator(mix_seed(self.seed, int(step), tag=b"latent-posterior"))
                e = torch.randn((self.global_batch, c, *m.shape[2:]), generator=g)[self.rank::self.world_size]
                e = e[:len(m)]
            r = m[:, :c] + m[:, c:] * e.to(m.device, m.dtype)
        else:
            r = codec.raw_from_moments(m)
        return codec.scaled(r)


class LatentCachedDataset:
    """A training set whose batches also carry the cached moments of their images ("moments" (B, C_m, h, w)):
    batch(indices) -> {"x", "label", "moments"}; everything else is the pixel data set's."""

    def __init__(self, base, moments: Tensor):
        if len(moments) != len(base):
            raise DataError(f"latent cache holds {len(moments)} images, the data {len(base)}")
        self.base, self.moments = base, moments

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        item = dict(self.base[i])
        item["moments"] = self.moments[i]
        return item

    def batch(self, indices: Tensor) -> dict:
        return {**self.base.batch(indices), "moments": self.moments[indices]}

    def __getattr__(self, name):  # x, label, channels, image_size, num_classes, ... of the pixel set
        if name in ("base", "moments"):
            raise AttributeError(name)
        return getattr(self.base, name)


# ------------------------------------------------------------------------------------------- training
def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_latent_run(cfg, train_set, stored_codec: Optional[dict], *, device: torch.device | str = "cpu",
                       is_main: bool = True):
    """For a latent run about to train: (cfg with model.codec resolved, the codec on `device`, the training set to
    iterate (a LatentCachedDataset when model.codec.cache is set)).

    stored_codec: the model.codec section of the checkpoint being resumed (None for a new run): its scale, shift
    and fingerprint are taken as they are (never re-estimated); otherwise the fingerprint is the autoencoder's
    and the scale is estimated from the first model.codec.scale_images training images."""
    from ..data import dataset_fingerprint
    from ..pipelines.latent_cache import ensure_cache

    ccfg = cfg.model.codec
    ccfg = dataclasses.replace(ccfg, run=str(Path(ccfg.run).expanduser().resolve()) if ccfg.run else "")
    fs = first_stage(ccfg.run)
    if stored_codec is not None:
        # what the config leaves unset comes from the checkpoint; an explicit value that differs stays, and the
        # trainer's resume check then names the changed key
        keep = {k: stored_codec[k] for k in ("scale", "shift", "fingerprint")
                if getattr(ccfg, k) in (None, "") and stored_codec.get(k) not in (None, "")}
        ccfg = dataclasses.replace(ccfg, **keep)
    if not ccfg.fingerprint:
        ccfg = dataclasses.replace(ccfg, fingerprint=fs.fingerprint)
    codec = build_latent_codec(ccfg).to(device)  # fingerprint checked here (resume with another AE: refused)
    codec.latent_shape(tuple(cfg.model.data_shape))  # images of another size or channel count: refused
    moments = None
    if ccfg.cache:
        moments = ensure_cache(Path(ccfg.cache), codec, train_set, dataset_fingerprint(train_set), fs.fingerprint,
                               write=is_main, say=_say if is_main else None)
    if ccfg.scale is None or (ccfg.shift is None and ccfg.estimate_shift):
        n = min(ccfg.scale_images, len(train_set))
        m = moments[:n] if moments is not None else encode_moments(codec, train_set.x[:n])
        scale, shift = estimate_scale(codec, m, cfg.seed, ccfg.estimate_shift)
        scale = ccfg.scale if ccfg.scale is not None else scale
        shift = ccfg.shift if ccfg.shift is not None else shift
        ccfg = dataclasses.replace(ccfg, scale=scale, shift=shift)
        if is_main:
            _say(f"latent scale {scale:.6g}, shift {shift:.6g} (from the first {n} training images; stored in the run)")
    elif ccfg.shift is None:
        ccfg = dataclasses.replace(ccfg, shift=0.0)
    codec.scale, codec.shift = float(ccfg.scale), float(ccfg.shift)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, codec=ccfg))
    loop_set = LatentCachedDataset(train_set, moments) if moments is not None else train_set
    return cfg, codec, loop_set


def codec_record(model_cfg) -> dict:
    """What a latent run's codec.json says (for people and the run report; the numbers that count are the config's):
    the codec run, kind, fingerprint, image and latent shapes, scale, shift and how they were estimated."""
    from .strict import to_dict
    ccfg = model_cfg.codec
    fs = first_stage(ccfg.run)
    return {"kind": _kind(ccfg), **{k: v for k, v in to_dict(ccfg).items() if k != "kind"},
            "data_shape": list(model_cfg.data_shape), "latent_shape": list(fs.latent_shape),
            "downsampling": int(model_cfg.data_shape[-1]) // int(fs.latent_shape[-1]),
            "first_stage_checkpoint": str(fs.checkpoint), "first_stage_step": int(fs.step),
            "first_stage_weights": fs.weights}


def write_codec_record(run_dir: Path, model_cfg) -> Path:
    import json
    path = Path(run_dir) / "codec.json"
    tmp = path.with_name("codec.json.tmp")
    tmp.write_text(json.dumps(codec_record(model_cfg), indent=1) + "\n")
    tmp.replace(path)
    return path

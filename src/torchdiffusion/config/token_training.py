"""Token runs: training (`torchdiffusion train-tokens`), loading and sampling through the VQ decoder
(`torchdiffusion sample-tokens`).

Why a command of its own rather than `train --preset ...`: the `train` run config is the continuous frame's
(model.process kinds with a sigma, objective densities and weightings, sigma grids and grid samplers, a
Preconditioned denoiser, in-loop FID through grid samplers); a token run shares the loop, the data and the
first-stage loader but none of those sections, so folding it in would make every one of them a two-family union.

Tokens are the VQ indices of the data, computed once when training starts (the VQ codebook never updated) and
named by a fingerprint over the data fingerprint and the VQ weights' fingerprint (pipelines.tokens); a run stores
K, the token grid, the images' shape and both fingerprints in its config, and refuses in one line a VQ run with
another codebook size or other weights (resume, sampling).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..errors import CheckpointError, ConfigError
from ..train.distributed import DistInfo
from ..train.trainer import TrainResult
from .presets_io import load_preset, preset_names
from .strict import apply_overrides, from_dict
from .token_schema import TokenRunConfig

SET_AT_START = ("num_classes", "token_grid", "data_shape", "vq_fingerprint", "token_fingerprint")


def token_preset_names() -> list[str]:
    return preset_names("tokens")


def load_token_preset(name_or_path: str) -> dict:
    """A token preset by name (token_preset_names()) or a path to a YAML file."""
    return load_preset(name_or_path, "tokens", "token preset")


def resolve_tokens(base: dict, overrides: list[str]) -> TokenRunConfig:
    """Defaults <- base (a preset or a run's saved config) <- --set overrides, strictly checked."""
    for o in overrides:
        if o.split("=", 1)[0].strip() in SET_AT_START:
            raise ConfigError(f"{o.split('=', 1)[0].strip()} is set when training starts; remove it from --set")
    return from_dict(TokenRunConfig, apply_overrides(base, overrides))


def _first_stage(cfg: TokenRunConfig, device):
    from ..pipelines.tokens import codebook_size
    from .first_stage import load_first_stage
    if not cfg.vq_run:
        raise ConfigError("vq_run is not set: give the VQ first stage's run folder (--set vq_run=RUNS/fashion-vq-f4)")
    fs = load_first_stage(cfg.vq_run, device)
    if fs.kind != "vq":
        raise ConfigError(f"vq_run {cfg.vq_run}: a {fs.kind} first stage; token models need a VQ run (ae.kind: vq)")
    K = codebook_size(fs.module)
    if cfg.num_classes and cfg.num_classes != K:
        raise ConfigError(f"vq_run {cfg.vq_run} has {K} codes but this token model has K = {cfg.num_classes}; use "
                          f"the VQ run it was trained on")
    if cfg.vq_fingerprint and cfg.vq_fingerprint != fs.fingerprint:
        raise ConfigError(f"vq_run {cfg.vq_run}: its weights (fingerprint {fs.fingerprint[:12]}) are not those the "
                          f"token model was trained on ({cfg.vq_fingerprint[:12]}); use that VQ run")
    return fs


def resolve_cond(cfg: TokenRunConfig, dataset) -> TokenRunConfig:
    """Each class conditioner's num_classes from the data's labels (as config.build.resolve_for_data does)."""
    cond = {}
    for key, ccfg in cfg.cond.items():
        if hasattr(ccfg, "num_classes"):
            k = dataset.num_classes
            if k < 1:
                raise ConfigError(f"cond.{key} (class) needs labelled data, but data.kind={cfg.data.kind} has no "
                                  f"class labels")
            if ccfg.num_classes not in (0, k):
                raise ConfigError(f"cond.{key}.num_classes={ccfg.num_classes} but the data have {k} classes")
            ccfg = dataclasses.replace(ccfg, num_classes=k)
        cond[key] = ccfg
    return dataclasses.replace(cfg, cond=cond)


def build_token_model(cfg: TokenRunConfig, conds=()):
    """(TokenModel, DiscreteProcess) of a run config whose K and token grid are set; conds: the conditioners'
    CondSpecs."""
    from ..core.discrete_objectives import TokenModel
    from ..nn.token_transformer import TokenTransformer
    from ..protocols import BackboneIO
    K, grid = int(cfg.num_classes), tuple(int(v) for v in cfg.token_grid)
    process = cfg.process.build(K)
    backbone = TokenTransformer(cfg.backbone, BackboneIO((K, *grid), K, tuple(conds)))
    return TokenModel(backbone, process.steps), process


def seed_labels(conditioning, seeds: Sequence[int], labels: Optional[Sequence[int]]) -> Optional[dict]:
    """{seed: label} of `labels` cycled over the seeds (a seed keeps its label at any batch size), checked against
    the run's class conditioner in one line; None for labels None (each seed's default, seed % K)."""
    if labels is None:
        return None
    classes = [c for c in (conditioning.items.values() if conditioning else ()) if hasattr(c, "num_classes")]
    if not classes:
        raise ConfigError("--labels needs a class-conditional token run (train with --set cond.label.kind=class); "
                          "this one takes no class condition")
    k = int(classes[0].num_classes)
    bad = [v for v in labels if not 0 <= v < k]
    if bad:
        raise ConfigError(f"--labels {bad[0]} is out of range; this token model has {k} classes (0..{k - 1})")
    return {s: int(labels[i % len(labels)]) for i, s in enumerate(seeds)}


def sample_tokens(sample_cfg, net, process, grid: Sequence[int], seeds: Sequence[int], *, device="cpu",
                  batch: int = 64, callback=None, conditioning=None, labels: Optional[dict] = None) -> torch.Tensor:
    """int64 (len(seeds), *grid) tokens, one generator per seed (a seed's tokens do not depend on the batch).
    With conditioners: each seed's condition (labels: {seed: label} from seed_labels, default seed % K) and
    classifier-free guidance at sample_cfg.guidance_scale (guidance.token_cfg)."""
    from ..guidance.token_cfg import TokenCFG
    from ..sampling.discrete import sample_ancestral, sample_maskgit
    w = sample_cfg.guidance_scale
    if w is not None and not conditioning:
        raise ConfigError("guidance scale: this token run takes no conditions (its config has no cond section)")
    label_key = next((name for name, c in conditioning.items.items() if hasattr(c, "num_classes")), None) \
        if conditioning and labels is not None else None
    if w is not None and w != 1.0:
        net = TokenCFG(net, w, conditioning.null)
    out = []
    for i in range(0, len(seeds), batch):
        chunk = list(seeds[i:i + batch])
        gens = [torch.Generator().manual_seed(int(s)) for s in chunk]
        if label_key is not None:
            cond = conditioning.for_sampling(chunk, {label_key: [labels[s] for s in chunk]})
        else:
            cond = conditioning.cond_for(chunk) if conditioning else None
        if cond is not None:
            cond = {k: v.to(device) for k, v in cond.items()}
        kw = dict(steps=sample_cfg.steps, generator=gens, temperature=sample_cfg.temperature,
                  top_p_mass=sample_cfg.top_p, device=device, cond=cond)
        with torch.no_grad():
            if sample_cfg.sampler == "maskgit":
                x = sample_maskgit(net, process, (len(chunk), *grid), choice_temperature=sample_cfg.choice_temperature,
                                   **kw)
            else:
                x = sample_ancestral(net, process, (len(chunk), *grid), **kw)
        out.append(x.cpu())
        if callback is not None:
            callback(min(i + batch, len(seeds)), len(seeds))
    return torch.cat(out)


def train_tokens_run(cfg: TokenRunConfig, run_dir: Path, *, resume: str = "latest", allow_changes: bool = False,
                     dist: DistInfo = DistInfo(), device: torch.device = torch.device("cpu"),
                     progress: bool | None = None, until_step: int | None = None,
                     should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train (or resume) a token run in run_dir: config.yaml, metrics.csv, log.txt, samples/grid_<step>.png
    (decoded through the VQ decoder), checkpoints/ (model_tokens, ema_tokens, optim_tokens)."""

    from ..data import dataset_fingerprint
    from ..data.dataset import ImageArrayDataset
    from ..pipelines.generate import make_grid, save_png
    from ..pipelines.tokens import decode_tokens, encode_tokens, token_fingerprint
    from ..train import distributed
    from ..train.schedule import LRSchedule
    from ..train.token_step import token_step
    from ..train.trainer import Trainer
    from .build import build_conditioning, build_data
    from .strict import to_dict
    from .training import complete_config, resume_checkpoint, write_run_config

    info = dist
    t = cfg.train
    if t.eval_every:
        raise ConfigError("train.eval_every: token runs have no in-loop FID yet; set train.eval_every=0 and use "
                          "`sample-tokens` then `eval` on the decoded images")
    if t.batch_size % (info.world_size * t.grad_accum):
        raise ConfigError(f"train.batch_size {t.batch_size} must split evenly over {info.world_size} process(es) x "
                          f"{t.grad_accum} accumulation rounds")
    if cfg.sample.guidance_scale is not None and not cfg.cond:
        raise ConfigError("sample.guidance_scale: this token run takes no conditions; add a conditioner "
                          "(--set cond.label.kind=class) or leave the guidance scale unset")
    resume_from = resume_checkpoint(run_dir, resume)
    fs = _first_stage(cfg, device)
    train_set = build_data(cfg.data)
    shape = (int(train_set.channels),) + tuple(int(s) for s in train_set.image_size)
    if shape != tuple(fs.data_shape):
        raise ConfigError(f"the data give images of shape {shape} (C, H, W) but vq_run {cfg.vq_run} was trained on "
                          f"{tuple(fs.data_shape)}; use the same data section as the VQ run")
    tokens = encode_tokens(fs.module, train_set.x, device=device)
    val_tokens = val_labels = None
    if cfg.data.val_split:
        val_set = build_data(cfg.data, cfg.data.val_split)
        val_tokens = encode_tokens(fs.module, val_set.x[:t.val_images], device=device)[:, 0].long()
        val_labels = val_set.label[:t.val_images] if cfg.cond else None
    token_fp = token_fingerprint(dataset_fingerprint(train_set), fs.fingerprint)
    cfg = dataclasses.replace(cfg, num_classes=int(fs.module.cfg.n_codes), token_grid=tuple(tokens.shape[2:]),
                              data_shape=shape, vq_fingerprint=fs.fingerprint, token_fingerprint=token_fp)
    cfg = resolve_cond(cfg, train_set)
    conditioning = build_conditioning(cfg.cond, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                                      device=device)
    torch.manual_seed(cfg.seed)
    model, process = build_token_model(cfg, conditioning.specs)
    step = token_step(model, process, cfg.loss, make_cond=conditioning if conditioning else None, lr=t.lr, schedule=LRSchedule(t.lr, t.warmup_steps, t.steps,
                                                                            t.lr_schedule),
                      grad_clip=t.grad_clip, betas=tuple(t.betas), weight_decay=t.weight_decay,
                      ema_halflife_images=t.ema_halflife_images, ema_rampup=t.ema_rampup, val_tokens=val_tokens,
                      val_labels=val_labels, val_seed=cfg.seed)
    resolved = to_dict(cfg)
    if info.is_main:
        write_run_config(run_dir, resolved)
    seeds = list(range(cfg.sample.grid_images))

    def sample_grid(_unused, k):
        ema = step.ema.get("tokens", step.models["tokens"])
        x = sample_tokens(cfg.sample, ema, process, cfg.token_grid, seeds, device=device, conditioning=conditioning)
        grid = make_grid(decode_tokens(fs.module, x, device=device))
        save_png(grid, run_dir / "samples" / f"grid_{k:08d}.png")
        return grid

    distributed.init(info, device)
    try:
        trainer = Trainer(t, step=step, train_set=ImageArrayDataset(tokens, train_set.label), val_set=None,
                          run_dir=run_dir, seed=cfg.seed, resolved_config=resolved, data_fingerprint=token_fp,
                          sample_grid=sample_grid, dist=info, device=device, should_stop=should_stop,
                          progress=progress, until_step=until_step,
                          complete_config=lambda stored: complete_config(TokenRunConfig, stored))
        return trainer.fit(resume_from, allow_changes)
    finally:
        distributed.shutdown(info)


@dataclass
class TokenRun:
    """A trained token run: its EMA token denoiser (eval mode), process, VQ first stage, config, conditioners."""
    model: torch.nn.Module
    process: object
    first_stage: object
    config: TokenRunConfig
    checkpoint: Path
    conditioning: object = None
    step: int = 0
    weights: str = "ema"

    @property
    def num_classes(self) -> int:
        """Classes of the run's class condition ('label'), 0 without one."""
        label = self.config.cond.get("label")
        return int(getattr(label, "num_classes", 0) or 0)


def load_token_run(path: Path | str, device="cpu", weights: str = "ema") -> TokenRun:
    """A token run folder (its latest verified checkpoint) or one of its checkpoint folders."""
    from ..train import checkpoint as ckpt
    path = Path(path)
    if (path / "checkpoints").is_dir():
        cpath = ckpt.resolve_latest(path / "checkpoints")
        if cpath is None:
            raise CheckpointError(f"{path}: no complete checkpoint in {path / 'checkpoints'}")
    elif path.exists():
        cpath = path
    else:
        raise CheckpointError(f"{path}: no such token run (train one with `torchdiffusion train-tokens`)")
    return token_run_from_checkpoint(ckpt.load_checkpoint(cpath), cpath, device, weights)


def token_run_from_checkpoint(c, cpath: Path, device="cpu", weights: str = "ema") -> TokenRun:
    """load_token_run of an already loaded (verified) checkpoint; weights: "ema" (when stored) or "raw"."""
    stored = c.meta.get("config") or {}
    if not isinstance(stored, dict) or "vq_run" not in stored:
        raise CheckpointError(f"{cpath}: not a token run's checkpoint (its config has no vq_run)")
    cfg = from_dict(TokenRunConfig, stored)
    from .build import build_conditioning
    fs = _first_stage(cfg, device)
    conditioning = build_conditioning(cfg.cond, seed=cfg.seed, device=device)
    model, process = build_token_model(cfg, conditioning.specs)
    group = "ema_tokens" if weights == "ema" and "ema_tokens" in c.tensors else "model_tokens"
    model.load_state_dict(c.tensors[group])
    return TokenRun(model.eval().requires_grad_(False).to(device), process, fs, cfg, Path(cpath), conditioning,
                    int(c.step), "ema" if group == "ema_tokens" else "raw")


def sample_token_run(run: TokenRun, seeds: Sequence[int], outdir: Path, *, sample_cfg=None, device="cpu",
                     overwrite: bool = False, callback=None, labels: Optional[Sequence[int]] = None) -> list[Path]:
    """One decoded PNG per seed (<seed>.png, as `sample` writes them, so `eval` reads the folder), grid.png and
    samples.json (what made them; seconds and CPU-seconds of sampling and decoding); labels (class-conditional
    runs): cycled over the seeds (seed_labels), default seed % K."""
    import json
    import time

    from ..pipelines.generate import make_grid, prepare_outdir, save_images, save_png
    from ..pipelines.tokens import decode_tokens
    sample_cfg = sample_cfg or run.config.sample
    per_seed = seed_labels(run.conditioning, seeds, labels)
    prepare_outdir(outdir, overwrite)
    t0, c0 = time.perf_counter(), time.process_time()
    x = sample_tokens(sample_cfg, run.model, run.process, run.config.token_grid, seeds, device=device,
                      callback=callback, conditioning=run.conditioning, labels=per_seed)
    images = decode_tokens(run.first_stage.module, x, device=device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    paths = save_images(images, outdir, seeds)
    save_png(make_grid(images[:64]), Path(outdir) / "grid.png")
    record = {"checkpoint": str(run.checkpoint), "step": run.step, "weights": run.weights,
              "vq_run": run.config.vq_run, **dataclasses.asdict(sample_cfg), "count": len(seeds),
              "seeds": f"{seeds[0]}-{seeds[-1]}" if seeds else "",
              "labels": [per_seed[s] for s in seeds] if per_seed else ("seed % num_classes" if run.num_classes
                                                                        else None),
              "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "torch": torch.__version__}
    (Path(outdir) / "samples.json").write_text(json.dumps(record, indent=1) + "\n")
    return paths

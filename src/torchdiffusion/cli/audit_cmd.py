"""`torchdiffusion audit`: is a model copying its training images? (eval/memorization.py has the maths.)

    torchdiffusion audit --run runs/mnist                                  # 256 EMA samples, pixel + Inception
    torchdiffusion audit --run runs/mnist --n 512 --sampler euler --steps 32 --features none
    torchdiffusion audit --run runs/tokens --n 256 --sampler maskgit        # a token run (decoded images)
    torchdiffusion audit --images DIR --data mnist                          # a folder of images vs MNIST
    torchdiffusion audit --images DIR --train-dir TRAIN --heldout-dir HELD   # a folder vs image folders

Writes OUT (default RUN/audit, or DIR/audit for --images): audit.json (every number), panel_<space>.png
(the closest pairs: sample | nearest training image | second nearest), val_loss.png (the run's validation-
loss curve; its rise is flagged), panel.png (all of them side by side), samples.png and samples.csv.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np
import torch

from ..errors import ConfigError, DataError
from .common import progress_for, quiet_option, resolve_device, set_threads

FEATURE_CHOICES = ("auto", "inception", "classifier", "random-conv", "none")


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


def _data_sets(run_cfg, data: str | None, train_dir: Path | None, heldout_dir: Path | None, heldout_split: str | None):
    """(train, held-out, description): from image folders, a named data set, or the run's data section."""
    from ..config.build import build_data
    from ..config.build import build_dataset

    if train_dir is not None and heldout_dir is None:
        raise ConfigError("--train-dir needs --heldout-dir (a folder of images the model never saw)")
    if heldout_dir is not None and train_dir is None and run_cfg is not None and data is None:
        # a run trained on a folder: its training images, held-out images from the given folder
        from ..config.build import build_data as _build
        return (_build(run_cfg.data), build_dataset("folder", path=str(heldout_dir), channels="auto"),
                {"train": f"{run_cfg.data.kind}:{run_cfg.data.path or run_cfg.data.split}",
                 "heldout": f"folder:{heldout_dir}"})
    if train_dir is not None:
        train = build_dataset("folder", path=str(train_dir), channels="auto")
        held = build_dataset("folder", path=str(heldout_dir), channels="auto")
        return train, held, {"train": f"folder:{train_dir}", "heldout": f"folder:{heldout_dir}"}
    if data is not None:
        name, _, split = data.partition(":")
        if name not in ("mnist", "fashion-mnist"):
            raise ConfigError(f"--data {data!r} is not valid; valid: mnist, fashion-mnist (optionally :SPLIT), "
                              f"or --train-dir/--heldout-dir for image folders")
        split = split or "train"
        held_split = heldout_split or ("val" if split == "train" else "test")
        return (build_dataset(name, split=split), build_dataset(name, split=held_split),
                {"train": f"{name}:{split}", "heldout": f"{name}:{held_split}"})
    if run_cfg is None:
        raise ConfigError("say what the images are compared with: --run RUN (its training data), --data mnist, "
                          "or --train-dir DIR --heldout-dir DIR")
    d = run_cfg.data
    held_split = heldout_split or d.val_split
    if not held_split:
        raise ConfigError("the run's data has no held-out split (data.val_split is null); give --heldout-dir DIR "
                          "(images the model never saw), or --heldout-split for a data set with splits"
                          + (" (a folder run holds out files when trained with data.val_fraction)"
                             if d.kind == "folder" else ""))
    train = build_data(d)
    held = build_data(d, held_split)
    if d.limit is not None:
        # build_data limits every split alike; held-out images need not be few
        from dataclasses import replace
        held = build_data(replace(d, limit=None), held_split)
    return train, held, {"train": f"{d.kind}:{d.split}" + (f"[:{d.limit}]" if d.limit else ""),
                         "heldout": f"{d.kind}:{held_split}"}


def _match_channels(images: torch.Tensor, channels: int, what: str) -> torch.Tensor:
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if images.shape[1] == 3 and channels == 1 and bool((images[:, :1] == images).all()):
        return images[:, :1].contiguous()
    raise DataError(f"{what} have {images.shape[1]} channel(s), the training images {channels}; audit like with like")


def _extractors(kind: str, feature_weights, classifier, channels: int, batch: int, device) -> dict:
    from .common import make_extractor

    if kind == "none":
        return {}
    if kind == "random-conv":
        from ..eval.memorization import RandomConvFeatures
        return {"random-conv": RandomConvFeatures(channels)}
    if kind == "classifier" or (kind == "auto" and classifier is not None):
        if classifier is None:
            raise ConfigError("--features classifier needs --classifier RUN (from `torchdiffusion train-classifier`)")
        return {"classifier": make_extractor(None, classifier, batch, device)}
    from ..errors import CheckpointError
    try:
        return {"inception": make_extractor(feature_weights, None, batch, device)}
    except CheckpointError as e:  # the weights are missing
        if kind == "auto" and feature_weights is None:
            _echo(f"note: no feature-space audit ({e}); pixel space only")
            return {}
        raise


@click.command("audit")
@click.option("--run", "--run-dir", "run_dir", type=click.Path(path_type=Path), default=None,
              help="Run folder (`train` or `train-tokens`): its EMA model makes the samples (decoded images), its "
                   "data section gives the training set.")
@click.option("--checkpoint", "ckpt_path", type=click.Path(path_type=Path), default=None, help="A checkpoint folder.")
@click.option("--images", "images_dir", type=click.Path(path_type=Path), default=None,
              help="Audit this folder of images instead of generating samples.")
@click.option("--data", default=None, help="Compare with a data set: mnist or fashion-mnist[:SPLIT] (default: the run's).")
@click.option("--train-dir", type=click.Path(path_type=Path), default=None, help="Training images (a folder).")
@click.option("--heldout-dir", type=click.Path(path_type=Path), default=None, help="Held-out images (a folder).")
@click.option("--heldout-split", default=None, help="Held-out split (default: the run's data.val_split, or val).")
@click.option("--n", type=int, default=256, show_default=True, help="Samples to generate (or first N images).")
@click.option("--seed", "seed0", type=int, default=0, show_default=True, help="First seed; seeds are SEED..SEED+n-1.")
@click.option("--sampler", default=None, help="Sampler (default: the run's sample.sampler; a token run's: maskgit "
                                             "or ancestral).")
@click.option("--steps", type=int, default=None, help="Sampler steps (default: the run's sample.steps).")
@click.option("--weights", type=click.Choice(["ema", "raw"]), default="ema", show_default=True)
@click.option("--heldout", "n_heldout", type=int, default=1000, show_default=True,
              help="Held-out images that calibrate the distances (drawn reproducibly).")
@click.option("--features", "feature_kind", type=click.Choice(FEATURE_CHOICES), default="auto", show_default=True,
              help="Feature space besides pixels: auto = classifier if --classifier is given, else Inception "
                   "when its weights are installed.")
@click.option("--feature-weights", type=click.Path(path_type=Path), default=None, help="Local Inception TorchScript.")
@click.option("--classifier", type=click.Path(path_type=Path), default=None,
              help="A `train-classifier` run whose features define the feature space.")
@click.option("--feature-train-limit", type=int, default=2000, show_default=True,
              help="Training images searched in feature space (0: all; Inception runs ~10-20 img/s on 2 CPU cores).")
@click.option("--ratio-threshold", type=float, default=1.0 / 3.0, show_default="1/3",
              help="Near-copy if d1/d2 is below this (Yoon et al. 2023; Gu et al. 2023).")
@click.option("--heldout-quantile", type=float, default=0.01, show_default=True,
              help="Near-copy if d1 is below this quantile of the held-out images' d1.")
@click.option("--val-tolerance", type=float, default=0.02, show_default=True,
              help="Flag the validation loss when its last value exceeds its minimum by this fraction.")
@click.option("--rows", type=int, default=12, show_default=True, help="Pairs shown in the panels.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder (default RUN/audit).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, envvar="TORCHDIFFUSION_CACHE_DIR",
              help="Where training-set features are cached (default ~/.cache/torchdiffusion/refstats).")
@click.option("--batch", type=int, default=64, show_default=True, help="Sampling and feature batch size.")
@click.option("--threads", type=int, default=None)
@click.option("--device", default="auto", show_default=True)
@quiet_option
def audit_cmd(run_dir, ckpt_path, images_dir, data, train_dir, heldout_dir, heldout_split, n, seed0, sampler, steps,
              weights, n_heldout, feature_kind, feature_weights, classifier, feature_train_limit, ratio_threshold,
              heldout_quantile, val_tolerance, rows, out, cache_dir, batch, threads, device):
    """Memorisation audit: nearest training images of generated samples, near-copy shares, panels, val-loss trend."""
    from ..eval import memorization as mem
    from ..pipelines.generate import make_grid, save_png

    if n < 1 or n_heldout < 2 or batch < 1 or rows < 1 or feature_train_limit < 0:
        raise ConfigError("--n, --batch and --rows must be >= 1, --heldout >= 2, --feature-train-limit >= 0")
    if not 0 < ratio_threshold <= 1 or not 0 < heldout_quantile < 1:
        raise ConfigError("--ratio-threshold must be in (0, 1] and --heldout-quantile in (0, 1)")
    set_threads(threads)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    record: dict = {"kind": "memorisation audit", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "torch": torch.__version__}
    run = None
    if run_dir is not None or ckpt_path is not None:
        from ..config.run_images import open_run
        run = open_run(run_dir, ckpt_path, weights=weights, sampler=sampler, steps=steps, device=dev)
    elif images_dir is None:
        raise ConfigError("give --run RUN (generate samples from its model) or --images DIR (audit a folder)")
    train_set, held_set, data_info = _data_sets(run.config if run is not None else None, data, train_dir,
                                                heldout_dir, heldout_split)
    channels = train_set.channels

    # ---- the images to audit
    if images_dir is not None:
        from ..pipelines.images import load_sample_folder
        if not Path(images_dir).is_dir():
            raise DataError(f"--images {images_dir}: not a folder of images")
        samples, info = load_sample_folder(images_dir, None)
        samples = _match_channels(samples[:n], channels, f"--images {images_dir}")
        record["source"] = {"images": str(images_dir), "count": int(len(samples)), **{k: v for k, v in info.items()
                                                                                       if k != "fake_files"}}
    else:
        seeds = list(range(seed0, seed0 + n))
        _echo(f"audit: generating {n} samples ({run.sampler}, {run.steps} steps) from {run.checkpoint}")
        tg = time.perf_counter()
        with progress_for(n, "audit: sample") as progress:
            samples = run.generate(seeds, batch=batch, on_batch=lambda chunk, images: progress.update(len(chunk)))
        record["source"] = {"run": str(run_dir) if run_dir else None, **run.record(seeds),
                            "generate_s": round(time.perf_counter() - tg, 3)}
    if tuple(samples.shape[2:]) != tuple(train_set.image_size):
        raise DataError(f"the audited images are {tuple(samples.shape[2:])} but the training images "
                        f"{tuple(train_set.image_size)}; audit against the data the model was trained on")
    held_idx = mem.sample_indices(len(held_set), n_heldout, seed=0)
    heldout = _match_channels(held_set.x[torch.from_numpy(held_idx)], channels, "held-out images")
    train = train_set.x
    from ..data import dataset_fingerprint
    record["data"] = {**data_info, "n_train": len(train), "n_heldout": len(heldout), "heldout_of": len(held_set),
                      "train_fingerprint": dataset_fingerprint(train_set)}

    # ---- features
    extractors = _extractors(feature_kind, feature_weights, classifier, channels, batch, dev)
    results = {}
    _echo(f"audit: pixel space, {len(samples)} samples vs {len(train)} training and {len(heldout)} held-out images")
    tp = time.perf_counter()
    results.update(mem.audit_images(samples, train, heldout, ratio_threshold=ratio_threshold,
                                    heldout_quantile=heldout_quantile))
    timings = {"pixel_s": round(time.perf_counter() - tp, 3)}
    feature_info = {}
    for name, ex in extractors.items():
        tf = time.perf_counter()
        limit = len(train) if feature_train_limit == 0 else min(feature_train_limit, len(train))
        sub = train[:limit]
        _echo(f"audit: {name} features of {limit} training, {len(heldout)} held-out and {len(samples)} samples")
        train_feats = _train_features(ex, sub, name, data_info["train"], cache_dir)
        sf = mem.batched_features(ex, samples, batch)
        hf = mem.batched_features(ex, heldout, batch)
        results[name] = mem.audit_features(sf, train_feats, hf, space=name, ratio_threshold=ratio_threshold,
                                           heldout_quantile=heldout_quantile)
        feature_info[name] = {"extractor": getattr(ex, "name", name), "weights_sha256": getattr(ex, "sha256", None),
                              "resize": getattr(ex, "resize", None), "train_images_searched": limit}
        timings[f"{name}_s"] = round(time.perf_counter() - tf, 3)

    # ---- validation loss
    trend = None
    metrics_csv = Path(run_dir) / "metrics.csv" if run_dir is not None else None
    if metrics_csv is not None and metrics_csv.is_file():
        trend = mem.validation_loss_trend(metrics_csv, val_tolerance)

    # ---- outputs
    out = Path(out) if out is not None else (Path(run_dir) / "audit" if run_dir is not None
                                             else Path(images_dir or ".") / "audit")
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    panels = []
    for name, r in results.items():
        t = train if name == "pixel" else train[:r.n_train]
        panel = mem.pairs_panel(samples, t, r, rows=rows)
        panel.save(out / f"panel_{name}.png")
        panels.append(panel)
        files[f"panel_{name}"] = f"panel_{name}.png"
    if trend is not None and mem.save_val_loss_plot(trend, out / "val_loss.png"):
        files["val_loss"] = "val_loss.png"
        from PIL import Image
        with Image.open(out / "val_loss.png") as im:
            panels.append(im.convert("RGB"))
    _side_by_side(panels).save(out / "panel.png")
    files["panel"] = "panel.png"
    save_png(make_grid(samples[:256]), out / "samples.png")
    files["samples"] = "samples.png"
    _write_per_sample(out / "samples.csv", results)
    files["per_sample"] = "samples.csv"

    record["criteria"] = {
        "ratio_test": f"near-copy if d1/d2 < {ratio_threshold:.4g} (Yoon et al. 2023; Gu et al. 2023)",
        "heldout_test": f"near-copy if d1 < the {heldout_quantile:g} quantile of held-out images' d1",
        "distance": "Euclidean; pixel space in model range [-1, 1]", "val_loss": f"rising if last/min - 1 > {val_tolerance:g}"}
    record["spaces"] = {name: r.summary() for name, r in results.items()}
    record["features"] = feature_info
    record["val_loss"] = trend.summary() if trend is not None else None
    record["verdict"] = mem.flags_summary(results, trend)
    record["files"] = files
    record["timings"] = {**timings, "total_s": round(time.perf_counter() - t0, 3)}
    (out / "audit.json.tmp").write_text(json.dumps(record, indent=1, default=_json_default) + "\n")
    (out / "audit.json.tmp").replace(out / "audit.json")
    for name, r in results.items():
        _echo(f"{name:>12}: near-copies by d1/d2 < {ratio_threshold:.3g}: {r.share_ratio:.1%} of samples "
              f"(held-out images: {r.heldout_share_ratio:.1%}); closer than the {heldout_quantile:g} quantile of held-out d1: "
              f"{r.share_heldout:.1%}; median d1 samples/held-out = {r.median_d1_over_heldout:.3f}")
    if trend is not None and trend.min_val_loss is not None:
        _echo(f"validation loss: min {trend.min_val_loss:.4g} at step {trend.min_step}, last {trend.last_val_loss:.4g}"
              f" ({trend.rise:+.1%}){' RISING' if trend.rising else ''}")
    click.echo(str(out / "audit.json"))


def _train_features(extractor, images: torch.Tensor, name: str, source: str, cache_dir) -> np.ndarray:
    """Training-set features through the reference-statistics cache of `eval` when the extractor follows its
    protocol (Inception, classifier), so a second audit of the same data computes only the samples' side."""
    from ..eval.extractors import FeatureExtractor
    from ..eval.memorization import batched_features
    if isinstance(extractor, FeatureExtractor):
        from ..eval import cached_reference
        ref, path, hit = cached_reference(images, extractor, source=f"audit-{source}[:{len(images)}]",
                                          cache_dir=cache_dir, progress=progress_for(None, f"audit: {name} features"))
        _echo(f"audit: training features {'from cache' if hit else 'computed and cached'}: {path}")
        return np.asarray(ref.features, dtype=np.float64)
    return batched_features(extractor, images)


def _side_by_side(images):
    from PIL import Image
    h = max(im.size[1] for im in images)
    w = sum(im.size[0] for im in images) + 8 * (len(images) - 1)
    canvas = Image.new("RGB", (w, h), "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.size[0] + 8
    return canvas


def _write_per_sample(path: Path, results) -> None:
    import csv
    names = list(results)
    cols = ["sample"] + [f"{n}_{c}" for n in names for c in ("d1", "d2", "nearest", "second", "ratio", "near_copy")]
    rows = {n: results[n].per_sample() for n in names}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for i in range(len(rows[names[0]])):
            line = [i]
            for n in names:
                r = rows[n][i]
                line += [f"{r['d1']:.6g}", f"{r['d2']:.6g}", r["nearest"], r["second"], f"{r['ratio']:.6g}",
                         int(r["near_copy_ratio"])]
            w.writerow(line)


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


__all__ = ["audit_cmd"]

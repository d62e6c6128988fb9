"""`torchdiffusion eval-cond`: per-class and overall FID/KID of a class-conditional run under a stated strategy.

    torchdiffusion eval-cond --run RUN --strategy validation --n 2000 --classifier CLS_RUN
    torchdiffusion eval-cond --run RUN --strategy empirical --metrics kid
    torchdiffusion eval-cond --run RUN --strategy fixed --label 3 --n 500 --guidance-scale 2

Strategies (eval/conditional.py): fixed (one label), empirical (labels drawn from the training labels'
frequencies), validation (the labels of reference images, resampled). The reference images are the run's
validation split (or --reference SPLIT); the result JSON records the strategy, the label counts, N per class,
the feature network and its weights hash.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np
import torch

from ..errors import ConfigError, DataError
from .common import resolve_device, set_threads


@click.command("eval-cond")
@click.option("--run", "--run-dir", "run_dir", type=click.Path(path_type=Path), default=None,
              help="A class-conditional run folder (cond.label.kind: class).")
@click.option("--checkpoint", "ckpt_path", type=click.Path(path_type=Path), default=None, help="A checkpoint folder.")
@click.option("--strategy", type=click.Choice(["fixed", "empirical", "validation"]), required=True,
              help="How the conditions are chosen.")
@click.option("--label", type=int, default=None, help="The label of the 'fixed' strategy.")
@click.option("--n", type=int, default=1000, show_default=True, help="Samples to generate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the label draw; sample seeds are 0..n-1.")
@click.option("--reference", "reference_split", default=None,
              help="Split of real images to compare with (default: the run's data.val_split, else test).")
@click.option("--reference-limit", type=int, default=None, help="Use only the first N reference images.")
@click.option("--metrics", default="fid,kid", show_default=True, help="fid, kid or both, comma separated.")
@click.option("--features", "feature_kind", type=click.Choice(["inception", "classifier", "random-conv"]),
              default=None, help="Feature network (default: classifier with --classifier, else inception).")
@click.option("--feature-weights", type=click.Path(path_type=Path), default=None, help="Local Inception TorchScript.")
@click.option("--classifier", type=click.Path(path_type=Path), default=None,
              help="A `train-classifier` run: its features ('classifier FID/KID', labelled as such).")
@click.option("--sampler", default=None, help="Sampler (default: the run's sample.sampler).")
@click.option("--steps", type=int, default=None, help="Sampler steps (default: the run's sample.steps).")
@click.option("--guidance-scale", type=float, default=None, help="Classifier-free guidance scale (1 = none).")
@click.option("--kid-subsets", type=int, default=100, show_default=True)
@click.option("--kid-subset-size", type=int, default=1000, show_default=True)
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, envvar="TORCHDIFFUSION_CACHE_DIR")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the JSON result here.")
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--device", default="auto", show_default=True)
def eval_cond_cmd(run_dir, ckpt_path, strategy, label, n, seed, reference_split, reference_limit, metrics,
                  feature_kind, feature_weights, classifier, sampler, steps, guidance_scale, kid_subsets,
                  kid_subset_size, cache_dir, out, batch, threads, device):
    """Per-class and overall FID/KID of a class-conditional model under a condition strategy."""
    import dataclasses

    from ..config.build import build_data, build_sampler, build_sigmas
    from ..config.loaders import load_run
    from ..eval.conditional import evaluate_conditional, kid_metric, plan_conditions
    from ..eval.fid import fid_from_features
    from ..pipelines.generate import codec_decoder, generate
    from ..pipelines.settings import override_sample

    names = [m.strip() for m in metrics.split(",") if m.strip()]
    if not names or any(m not in ("fid", "kid") for m in names):
        raise ConfigError(f"--metrics {metrics!r} is not valid; valid: fid, kid, or fid,kid")
    if n < 2 or batch < 1:
        raise ConfigError("--n must be >= 2 and --batch >= 1")
    if strategy == "fixed" and label is None:
        raise ConfigError("the 'fixed' strategy needs a label >= 0 (--label K)")
    set_threads(threads)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    run = load_run(run_dir, ckpt_path, "ema", dev)
    cfg = run.config
    k = run.num_classes
    if k <= 0:
        raise ConfigError(f"{run.path}: the model is not class-conditional (no class conditioner); train it "
                          f"with --set cond.label.kind=class")
    if label is not None and not 0 <= label < k:
        raise ConfigError(f"--label {label} is not a class of this model; valid: 0..{k - 1}")
    train_set = build_data(cfg.data)
    split = reference_split or cfg.data.val_split or ("test" if cfg.data.kind != "folder" else None)
    if split is None:
        raise ConfigError("eval-cond needs held-out labelled images; this folder run holds none out (data.val_split "
                          "is null): train with data.val_fraction, or give --reference train")
    ref_set = build_data(dataclasses.replace(cfg.data, limit=None), split)
    ref_x, ref_y = ref_set.x, ref_set.label.numpy()
    if reference_limit is not None:
        ref_x, ref_y = ref_x[:reference_limit], ref_y[:reference_limit]
    if not ref_set.labelled:
        raise DataError(f"the reference split {split!r} has no class labels")
    plan = plan_conditions(strategy, n, fixed_label=label, train_labels=train_set.label.numpy(), val_labels=ref_y,
                           seed=seed)

    # ---- generator: labels -> uint8 images, sample seeds 0..n-1 in order
    scfg = override_sample(cfg.sample, sampler=sampler, steps=steps)
    fn, sigmas = build_sampler(scfg), build_sigmas(scfg, run.model.process)
    denoiser = run.model
    if guidance_scale is not None and guidance_scale != 1.0:
        from ..guidance.cfg import ClassifierFreeGuidance
        denoiser = ClassifierFreeGuidance(run.model, guidance_scale, run.conditioning.null)
    done = {"next": 0}

    def generator(labels: np.ndarray) -> torch.Tensor:
        start = done["next"]
        seeds = list(range(start, start + len(labels)))
        done["next"] += len(labels)
        by_seed = dict(zip(seeds, labels.tolist()))
        return generate(denoiser, seeds, run.sample_shape, fn, sigmas, batch=batch, device=dev,
                        decode=codec_decoder(run.codec),
                        cond_for=lambda chunk: {"label": torch.tensor([by_seed[s] for s in chunk], device=dev)})

    # ---- features and metrics
    kind = feature_kind or ("classifier" if classifier is not None else "inception")
    if kind == "random-conv":
        from ..eval.memorization import RandomConvFeatures
        extractor = RandomConvFeatures(ref_x.shape[1])
        real_features = None
        feat_info = {"extractor": extractor.name}
    else:
        from ..eval import cached_reference
        from .common import make_extractor
        if kind == "classifier" and classifier is None:
            raise ConfigError("--features classifier needs --classifier RUN")
        extractor = make_extractor(feature_weights, classifier if kind == "classifier" else None, batch, dev)
        ref, path, hit = cached_reference(ref_x, extractor, source=f"{cfg.data.kind}:{split}[:{len(ref_x)}]",
                                          cache_dir=cache_dir)
        real_features = np.asarray(ref.features, dtype=np.float64)
        feat_info = {"extractor": extractor.name, "weights_sha256": extractor.sha256, "resize": extractor.resize,
                     "reference_file": str(path), "reference_cache_hit": hit}
    prefix = "classifier_" if str(feat_info["extractor"]).startswith("classifier") else ""
    metric_fns = {}
    if "fid" in names:
        metric_fns[prefix + "fid"] = fid_from_features
    if "kid" in names:
        metric_fns[prefix + "kid"] = kid_metric(kid_subsets, kid_subset_size, seed)
    click.echo(f"eval-cond: {n} samples, strategy {strategy}, {kind} features, reference {split} "
               f"({len(ref_x)} images)", err=True)
    result = evaluate_conditional(generator, plan, extractor, ref_x, ref_y, metric_fns, batch=batch,
                                  real_features=real_features)
    result.update({"run": str(run_dir) if run_dir else None, "checkpoint": str(run.path), "step": run.step,
                   "checkpoint_sha256": run.hashes(), "sampler": scfg.sampler, "steps": scfg.steps,
                   "guidance_scale": guidance_scale, "reference": f"{cfg.data.kind}:{split}",
                   "features": feat_info, "note": "per-class FID uses few samples per class and is biased upwards; "
                   "compare it only at equal N, or use KID", "seconds": round(time.perf_counter() - t0, 2),
                   "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S")})
    text = json.dumps(result, indent=1, default=str)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    click.echo(text)
    shown = ", ".join(f"{m} {v:.5g}" for m, v in result["overall"].items() if m in metric_fns)
    per = ", ".join(f"{m} {v:.5g}" for m, v in result["mean_per_class"].items() if m in metric_fns)
    click.echo(f"overall: {shown}; mean per class: {per} (strategy {strategy})", err=True)


__all__ = ["eval_cond_cmd"]

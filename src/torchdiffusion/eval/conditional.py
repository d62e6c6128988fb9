"""Evaluating a conditional generator: which conditions to sample, per-class and overall FID/KID.

A conditional model is judged on samples x ~ p(x | y) for conditions y that the evaluation chooses. The
choice changes the number, so it is part of the result. Three strategies:

  fixed       every sample gets the same label y0 (one class at a time; the reference is class y0's images)
  empirical   y ~ the empirical label distribution of the training set, i.i.d. (the model's marginal p(x)
              is then compared with the data's when the label frequencies of train and reference agree)
  validation  the labels of validation images, resampled (a random subset, or with replacement when more
              samples than images are asked): generated and reference sets then share the label
              histogram exactly, the comparison most directly tied to held-out data

Per class c the metric compares the samples generated with label c with the reference images of class c
(the "intra-class FID" of Miyato & Koyama 2018, "cGANs with projection discriminator", reported there as
the mean over classes); the overall figure compares all samples with the reference images of the planned
classes. A generator that ignores its label can have a low overall FID (the marginal is right) and a high
per-class FID (the conditionals are wrong): only the per-class figures catch it.

Everything is a callable: `generator(labels int64 (n,)) -> uint8 images (n, C, H, W)`, `features(images) ->
(n, D)`, and metrics `name -> f(real_features, fake_features) -> float | dict` (e.g. eval.fid.fid_from_features,
eval.kid.kid_from_features), so any conditional model and any feature network plug in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from torchdiffusion.errors import ConfigError, DataError

STRATEGIES = ("fixed", "empirical", "validation")
Generator = Callable[[np.ndarray], "torch.Tensor | np.ndarray"]
Metric = Callable[[np.ndarray, np.ndarray], "float | Mapping[str, float]"]


@dataclass(frozen=True)
class ConditionPlan:
    """The labels to generate with, and how they were chosen (recorded with every result)."""

    strategy: str
    labels: np.ndarray  # int64 (n,)
    seed: int
    fixed_label: int | None = None
    source_indices: np.ndarray | None = field(default=None, repr=False)  # validation: which images' labels

    def describe(self) -> dict:
        classes, counts = np.unique(self.labels, return_counts=True)
        d = {"strategy": self.strategy, "n": int(len(self.labels)), "seed": int(self.seed),
             "label_counts": {int(c): int(k) for c, k in zip(classes, counts)}}
        if self.fixed_label is not None:
            d["fixed_label"] = int(self.fixed_label)
        if self.source_indices is not None:
            d["validation_images_resampled"] = int(len(np.unique(self.source_indices)))
            d["with_replacement"] = bool(len(np.unique(self.source_indices)) < len(self.source_indices))
        return d


def _labels(values, name: str) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1 or len(a) == 0 or not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{name} must be a non-empty 1-d array of integer class labels, got shape {a.shape} {a.dtype}")
    if (a < 0).any():
        raise DataError(f"{name} contain negative labels (an unlabelled data set?); conditional evaluation needs "
                        f"class labels")
    return a.astype(np.int64)


def plan_conditions(strategy: str, n: int, *, fixed_label: int | None = None, train_labels=None, val_labels=None,
                    seed: int = 0) -> ConditionPlan:
    """Labels for n samples under `strategy` (module docstring); draws come from numpy's PCG64(seed)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown condition strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if n < 1:
        raise ConfigError(f"the number of samples must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    if strategy == "fixed":
        if fixed_label is None or int(fixed_label) < 0:
            raise ConfigError("the 'fixed' strategy needs a label >= 0 (--label K)")
        return ConditionPlan("fixed", np.full(n, int(fixed_label), dtype=np.int64), seed, fixed_label=int(fixed_label))
    if strategy == "empirical":
        if train_labels is None:
            raise ConfigError("the 'empirical' strategy needs the training labels")
        t = _labels(train_labels, "training labels")
        classes, counts = np.unique(t, return_counts=True)
        return ConditionPlan("empirical", rng.choice(classes, size=n, p=counts / counts.sum()).astype(np.int64), seed)
    if val_labels is None:
        raise ConfigError("the 'validation' strategy needs the validation labels")
    v = _labels(val_labels, "validation labels")
    idx = rng.choice(len(v), size=n, replace=n > len(v))
    return ConditionPlan("validation", v[idx], seed, source_indices=idx)


def _metric_values(name: str, value) -> dict:
    if isinstance(value, Mapping):
        return {f"{name}_{k}" if not str(k).startswith(name) else str(k): float(v) for k, v in value.items()}
    if hasattr(value, "mean") and hasattr(value, "std") and not isinstance(value, np.ndarray):  # a KIDResult
        return {name: float(value.mean), f"{name}_std": float(value.std)}
    return {name: float(value)}


def kid_metric(subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> Metric:
    """KID (eval.kid) as a metric callable returning {'kid', 'kid_std'}; the subset size adapts to small classes."""
    import warnings

    from torchdiffusion.eval.kid import SmallSampleWarning, kid_from_features

    def kid(real, fake):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SmallSampleWarning)  # per-class sets are small by design
            r = kid_from_features(real, fake, subsets=subsets, subset_size=subset_size, seed=seed)
        return {"kid": r.mean, "kid_std": r.std}
    return kid


def evaluate_conditional(generator: Generator, plan: ConditionPlan, features: Callable, real_images, real_labels,
                         metrics: Mapping[str, Metric], *, batch: int = 256, min_per_class: int = 2,
                         real_features: np.ndarray | None = None) -> dict:
    """Generate with `plan.labels`, then the metrics overall and per class against labelled real images.

    real_images: uint8 (M, C, H, W) (or `real_features` (M, D) precomputed), real_labels: (M,). Classes with
    fewer than `min_per_class` samples or reference images are listed under 'skipped_classes'. Returns a dict
    with 'plan', 'overall', 'per_class' {label: {...}}, 'mean_per_class' (the mean over evaluated classes)."""
    if not metrics:
        raise ConfigError("conditional evaluation needs at least one metric")
    labels = plan.labels
    rl = _labels(real_labels, "reference labels")
    fakes = []
    for start in range(0, len(labels), batch):
        chunk = labels[start:start + batch]
        imgs = torch.as_tensor(generator(chunk))
        if imgs.dtype != torch.uint8 or imgs.dim() != 4 or len(imgs) != len(chunk):
            raise DataError(f"the generator must return uint8 (n, C, H, W) for n = {len(chunk)} labels, "
                            f"got {imgs.dtype} {tuple(imgs.shape)}")
        fakes.append(imgs)
    fake_images = torch.cat(fakes)
    ff = np.asarray(features(fake_images), dtype=np.float64)
    if real_features is None:
        rf = np.asarray(features(torch.as_tensor(real_images)), dtype=np.float64)
    else:
        rf = np.asarray(real_features, dtype=np.float64)
    if len(rf) != len(rl):
        raise DataError(f"{len(rf)} reference images but {len(rl)} reference labels")
    planned = np.unique(labels)
    in_plan = np.isin(rl, planned)
    if in_plan.sum() < 2:
        raise DataError(f"the reference set has {int(in_plan.sum())} image(s) of the planned classes "
                        f"{planned.tolist()}; at least 2 are needed")

    def run(real, fake) -> dict:
        out = {"n_real": int(len(real)), "n_fake": int(len(fake))}
        for name, fn in metrics.items():
            out.update(_metric_values(name, fn(real, fake)))
        return out

    result = {"plan": plan.describe(), "overall": run(rf[in_plan], ff),
              "overall_reference": "reference images of the planned classes"
              if len(planned) < len(np.unique(rl)) else "all reference images",
              "per_class": {}, "skipped_classes": {}}
    for c in planned:
        fake_c, real_c = ff[labels == c], rf[rl == c]
        if len(fake_c) < min_per_class or len(real_c) < min_per_class:
            result["skipped_classes"][int(c)] = f"{len(fake_c)} samples, {len(real_c)} reference images " \
                                                f"(< {min_per_class})"
            continue
        result["per_class"][int(c)] = run(real_c, fake_c)
    keys = [k for k in next(iter(result["per_class"].values()), {}) if k not in ("n_real", "n_fake")]
    result["mean_per_class"] = {k: float(np.mean([v[k] for v in result["per_class"].values()])) for k in keys}
    return result


__all__ = ["ConditionPlan", "STRATEGIES", "evaluate_conditional", "kid_metric", "plan_conditions"]

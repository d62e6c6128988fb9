"""Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel, averaged over subsets.

Notation: real features X = {x_i}, i = 1..m, fake features Y = {y_j}, j = 1..m (one subset each), in R^d.

    k(x, y) = (x . y / d + 1)^3                                   (gamma = 1/d, coef = 1, degree 3)
    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
              - 2 sum_{i, j} k(x_i, y_j) / m^2

(Binkowski, Sutherland, Arbel & Gretton 2018, "Demystifying MMD GANs", Eq. 2 and Sec. 4: the kernel and
the estimator; their reference code, and torchmetrics after it, draw `subsets` random subsets of size m
from each set without replacement and report the mean and standard deviation of MMD^2_u over them.)
The estimator is unbiased for every m >= 2, which is why KID is usable at small N where FID is not;
the spread over subsets grows as m shrinks. m adapts to the data: min(subset_size, N_real, N_fake),
with a warning when it falls below the requested size.

Pure functions on arrays, float64; no I/O, no feature network.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from torchdiffusion.errors import DataError

DEFAULT_SUBSETS = 100  # Binkowski et al. 2018 reference code and torchmetrics
DEFAULT_SUBSET_SIZE = 1000


class SmallSampleWarning(UserWarning):
    """A metric was computed from fewer samples than it was asked for (its estimate is noisier)."""


@dataclass(frozen=True)
class KIDResult:
    mean: float  # mean of MMD^2_u over the subsets
    std: float  # standard deviation over the subsets (population std, ddof = 0, as torchmetrics)
    subset_size: int  # m actually used
    subsets: int
    requested_subset_size: int

    def as_dict(self) -> dict:
        return {"kid": self.mean, "kid_std": self.std, "kid_subset_size": self.subset_size,
                "kid_subsets": self.subsets}


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef: float = 1.0) -> np.ndarray:
    """k(x, y) = (gamma x . y + coef)^degree for all pairs; gamma defaults to 1/d."""
    if gamma is None:
        gamma = 1.0 / x.shape[1]
    return (x @ y.T * gamma + coef) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """The unbiased MMD^2 estimate from the three m x m kernel matrices (module docstring)."""
    m = k_xx.shape[0]
    if m < 2:
        raise DataError(f"MMD^2 needs at least 2 samples per set, got {m}")
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def mmd2_polynomial(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                    coef: float = 1.0) -> float:
    """Unbiased MMD^2 between two equally sized feature sets with the polynomial kernel."""
    if x.shape[0] != y.shape[0]:
        raise DataError(f"MMD^2 on subsets needs equal sizes, got {x.shape[0]} and {y.shape[0]}")
    return mmd2_unbiased(polynomial_kernel(x, x, degree, gamma, coef), polynomial_kernel(x, y, degree, gamma, coef),
                         polynomial_kernel(y, y, degree, gamma, coef))


def adaptive_subset_size(n_real: int, n_fake: int, requested: int = DEFAULT_SUBSET_SIZE) -> int:
    """min(requested, n_real, n_fake); a SmallSampleWarning when that is below the requested size."""
    m = min(int(requested), int(n_real), int(n_fake))
    if m < 2:
        raise DataError(f"KID needs at least 2 real and 2 generated samples, got {n_real} and {n_fake}")
    if m < requested:
        warnings.warn(f"KID subset size lowered from {requested} to {m} (only {n_real} real and {n_fake} "
                      f"generated samples); the estimate stays unbiased but its spread is larger",
                      SmallSampleWarning, stacklevel=3)
    return m


def _as_features(f, name: str) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2:
        raise DataError(f"{name} features must be a 2-d array (N, D), got shape {f.shape}")
    if not np.isfinite(f).all():
        raise DataError(f"{name} features contain NaN or inf; check the images and the feature network")
    return f


def kid_from_features(real, fake, *, subsets: int = DEFAULT_SUBSETS, subset_size: int = DEFAULT_SUBSET_SIZE,
                      degree: int = 3, gamma: float | None = None, coef: float = 1.0,
                      seed: int = 0) -> KIDResult:
    """KID between real (N1, D) and generated (N2, D) features: mean and std of MMD^2_u over `subsets`
    random subsets of size m = min(subset_size, N1, N2) drawn without replacement from each set.

    The subsets come from numpy's Generator(PCG64(seed)), so a result is reproducible and does not
    depend on how the features were batched. When m equals both N1 and N2 every subset is the whole
    set and the result is exact (std 0)."""
    x, y = _as_features(real, "real"), _as_features(fake, "generated")
    if x.shape[1] != y.shape[1]:
        raise DataError(f"real and generated features differ in size: {x.shape[1]} vs {y.shape[1]}")
    if subsets < 1:
        raise DataError(f"KID subsets must be >= 1, got {subsets}")
    m = adaptive_subset_size(len(x), len(y), subset_size)
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        xs = x[rng.choice(len(x), m, replace=False)] if m < len(x) else x
        ys = y[rng.choice(len(y), m, replace=False)] if m < len(y) else y
        values[s] = mmd2_polynomial(xs, ys, degree, gamma, coef)
    return KIDResult(float(values.mean()), float(values.std()), m, subsets, int(subset_size))

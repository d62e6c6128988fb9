"""Frechet distance between Gaussian fits of two feature sets (FID when the features are Inception pool3).

Notation: features f_i in R^D, i = 1..N; mu = mean, Sigma = unbiased covariance (ddof = 1, as the
TF FID code and pytorch-fid use np.cov); everything in float64.

    d^2((mu1, S1), (mu2, S2)) = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

(Frechet 1957; Dowson & Landau 1982 for Gaussians; FID: Heusel et al. 2017). The trace term is
computed by default from symmetric eigendecompositions (tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(R S2 R)),
R = S1^{1/2}; see trace_sqrt_product), which is real, exact for singular covariances and fast. The
route of the TF FID code and pytorch-fid (method="sqrtm") takes the principal square root of the
non-symmetric product S1 S2; rounding can leave a small imaginary part (discarded when negligible) or a
non-finite result for singular covariances (retried with eps * I added to both, as they do).

Pure functions on arrays: no I/O, no feature network.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from torchdiffusion.errors import DataError, TorchDiffusionError

# Largest |Im| tolerated on the diagonal of sqrtm(S1 S2) before the result is declared unreliable
# (the value used by the TF FID code and pytorch-fid).
IMAGINARY_ATOL = 1e-3


@dataclass(frozen=True)
class FeatureStatistics:
    """Gaussian fit of N feature vectors: mu (D,), sigma (D, D) unbiased, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


def _as_features(features, name: str = "features") -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise DataError(f"{name} must be a 2-d array (N, D), got shape {f.shape}")
    if not np.isfinite(f).all():
        raise DataError(f"{name} contain NaN or inf; check the images and the feature network")
    return f


def feature_statistics(features) -> FeatureStatistics:
    """(N, D) features -> FeatureStatistics (mean and unbiased covariance, float64); N >= 2."""
    return RunningStatistics().update(features).result()


class RunningStatistics:
    """Mean and covariance accumulated batch by batch, so features need not all fit in memory.

    Merging uses the pairwise update of Chan, Golub & LeVeque (1979): for parts A, B with counts
    n_a, n_b, means m_a, m_b and centred scatter matrices M_a, M_b,
        M = M_a + M_b + (m_b - m_a)(m_b - m_a)^T n_a n_b / (n_a + n_b),
    which avoids the cancellation of the naive sum-of-squares formula. The result does not depend
    on how the rows were split into batches (up to rounding)."""

    def __init__(self):
        self.n = 0
        self._mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None

    def update(self, features) -> "RunningStatistics":
        f = _as_features(features)
        n_b = f.shape[0]
        if n_b == 0:
            return self
        if self._mean is not None and f.shape[1] != self._mean.shape[0]:
            raise DataError(f"feature size changed between batches: {self._mean.shape[0]} then {f.shape[1]}")
        mean_b = f.mean(axis=0)
        centred = f - mean_b
        scatter_b = centred.T @ centred
        if self._mean is None:
            self.n, self._mean, self._scatter = n_b, mean_b, scatter_b
            return self
        n_a = self.n
        delta = mean_b - self._mean
        n = n_a + n_b
        self._scatter = self._scatter + scatter_b + np.outer(delta, delta) * (n_a * n_b / n)
        self._mean = self._mean + delta * (n_b / n)
        self.n = n
        return self

    def result(self) -> FeatureStatistics:
        if self.n < 2:
            raise DataError(f"feature statistics need at least 2 feature vectors, got {self.n}")
        sigma = self._scatter / (self.n - 1)
        sigma = 0.5 * (sigma + sigma.T)  # exact symmetry; rounding in the rank-1 updates can break it
        return FeatureStatistics(mu=self._mean.copy(), sigma=sigma, n=self.n)


def _check_pair(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise DataError(
            "Frechet distance needs means of shape (D,) and covariances (D, D) of one D; got "
            f"mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    return mu1, sigma1, mu2, sigma2


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigh; negative rounding noise -> 0)."""
    w, v = np.linalg.eigh(0.5 * (sigma + sigma.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6, *, method: str = "eigh",
                       sqrt_sigma1: np.ndarray | None = None) -> float:
    """tr((S1 S2)^{1/2}) for covariance matrices S1, S2.

    method "eigh" (default): S1 S2 is similar to R S2 R with R = S1^{1/2} symmetric PSD, so the
    eigenvalues of S1 S2 are those of the symmetric PSD matrix R S2 R and
        tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(R S2 R)).
    Two symmetric eigendecompositions (one if `sqrt_sigma1` = R is given, e.g. cached for a reference
    set), real arithmetic throughout, exact for singular covariances (N <= D) without regularisation.
    method "sqrtm": the principal square root of the non-symmetric
    product (scipy.linalg.sqrtm, Schur method) as in the TF FID code and pytorch-fid, with their
    eps * I retry for singular products."""
    if method == "eigh":
        root = psd_sqrt(sigma1) if sqrt_sigma1 is None else sqrt_sigma1
        inner = root @ sigma2 @ root
        w = np.linalg.eigvalsh(0.5 * (inner + inner.T))
        return float(np.sqrt(np.clip(w, 0.0, None)).sum())
    if method != "sqrtm":
        raise DataError(f"unknown matrix square root method {method!r}; valid: eigh, sqrtm")
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        # Singular product (e.g. N <= D): regularise both covariances, as the TF FID code does.
        offset = np.eye(sigma1.shape[0]) * eps
        root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        worst = float(np.max(np.abs(np.diagonal(root).imag)))
        if worst > IMAGINARY_ATOL:
            raise TorchDiffusionError(
                f"matrix square root in the Frechet distance has an imaginary part of {worst:.3g} "
                f"(tolerated: {IMAGINARY_ATOL}); the covariances are badly conditioned, use more samples"
            )
        root = root.real
    return float(np.trace(root))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, *, method: str = "eigh",
                     sqrt_sigma1: np.ndarray | None = None) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (see module docstring)."""
    mu1, sigma1, mu2, sigma2 = _check_pair(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    value = float(diff @ diff) + float(np.trace(sigma1)) + float(np.trace(sigma2)) \
        - 2.0 * trace_sqrt_product(sigma1, sigma2, eps, method=method, sqrt_sigma1=sqrt_sigma1)
    return value


def fid_from_statistics(a: FeatureStatistics, b: FeatureStatistics, eps: float = 1e-6, *, method: str = "eigh",
                        sqrt_sigma_a: np.ndarray | None = None) -> float:
    """FID between two Gaussian fits; `sqrt_sigma_a` (psd_sqrt(a.sigma)) may be passed when a is reused."""
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, eps, method=method, sqrt_sigma1=sqrt_sigma_a)


def fid_from_features(features1, features2, eps: float = 1e-6) -> float:
    """FID between two feature sets (N1, D) and (N2, D); N1, N2 >= 2."""
    return fid_from_statistics(feature_statistics(features1), feature_statistics(features2), eps)

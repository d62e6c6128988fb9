"""Held-out analytic problems: Gaussian mixtures the referee bench does not contain, built with the bench's
own mixture class so that they have the same exact denoiser and metrics. They check that the grid rule of
`bench/analytic_grids.py` (and the sampler choice) carries to data it was not developed on.

  fashion64  2000 isotropic modes (std 0.05) centred on the first 2000 Fashion-MNIST test images,
             average-pooled from 28x28 (padded to 32x32) to 8x8 and scaled to [-1, 1]; groups = the 10
             clothing classes. Image-like, like digits64, but other images at another resolution step.
  ring16     12 full-covariance modes in 16-d whose means lie on a closed curve (a circle of radius 1.2 in a
             random 2-plane plus a small random offset per mode), eigen-std from 0.25 down to 0.005, equal
             weights: data on thin curved sheets, thinner than gmm64's thinnest direction.
"""
from __future__ import annotations

import gzip
import math
import os

import numpy as np
import torch

FASHION_ROOT = os.environ.get("FASHION_MNIST_ROOT", "/usr/share/datasets/fashion-mnist")


def _read_idx(path: str) -> np.ndarray:
    raw = gzip.decompress(open(path, "rb").read())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def make_fashion64(analytic_problems, k: int = 2000, std: float = 0.05):
    imgs = _read_idx(os.path.join(FASHION_ROOT, "t10k-images-idx3-ubyte.gz"))[:k].astype(np.float64) / 255.0
    labels = _read_idx(os.path.join(FASHION_ROOT, "t10k-labels-idx1-ubyte.gz"))[:k].astype(np.int64)
    x = torch.nn.functional.pad(torch.from_numpy(imgs)[:, None], (2, 2, 2, 2))  # (k, 1, 32, 32)
    x = torch.nn.functional.avg_pool2d(x, 4).reshape(k, 64) * 2.0 - 1.0
    return analytic_problems.GaussianMixture("fashion64", x, torch.ones(k, dtype=torch.float64),
                                             iso_var=torch.full((k,), std ** 2, dtype=torch.float64),
                                             groups=torch.from_numpy(labels))


def make_ring16(analytic_problems):
    gen = torch.Generator().manual_seed(2024)
    K, d = 12, 16
    plane = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=torch.float64))[0]  # (d, 2)
    ang = torch.arange(K, dtype=torch.float64) * (2 * math.pi / K)
    means = 1.2 * torch.stack([ang.cos(), ang.sin()], 1) @ plane.T
    means = means + 0.1 * torch.randn(K, d, generator=gen, dtype=torch.float64)
    U = torch.stack([torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0] for _ in range(K)])
    std = torch.logspace(math.log10(0.25), math.log10(0.005), d, dtype=torch.float64)
    lam = (std ** 2).expand(K, d).clone()
    return analytic_problems.GaussianMixture("ring16", means, torch.ones(K, dtype=torch.float64), U=U, lam=lam)


def register(analytic_problems) -> list[str]:
    """Add the held-out problems to the bench's problem table; returns their names."""
    analytic_problems.PROBLEMS["fashion64"] = lambda: make_fashion64(analytic_problems)
    analytic_problems.PROBLEMS["ring16"] = lambda: make_ring16(analytic_problems)
    return ["fashion64", "ring16"]

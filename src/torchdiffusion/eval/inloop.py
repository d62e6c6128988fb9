"""In-loop evaluation: FID and KID of K samples from the EMA model against cached reference statistics.

The trainer calls, on every process at an evaluation step,

    feats = evaluator.features(ema_model, rank, world_size)   # this process's share of the K samples
    ...gathers the shares (in seed order) on the main process...
    scores = evaluator.score(all_feats)                       # {'fid', 'kid', 'kid_std', 'eval_n'}

The K seeds are the same at every evaluation (seed_offset + 0..K-1), so two evaluations differ only by the
model: the curve is not blurred by resampling noise. Process r draws seeds r, r + W, r + 2W, ...; each seed's
image does not depend on the batch or the process (per-seed generators), so the gathered set equals the
single-process one. Nothing is kept between evaluations except the extractor and the reference (and its
matrix square root), so memory stays flat over a run.

With audit_train (features of training images, train.eval_audit), score() also audits the same K samples
(eval.memorization, ratio test d1/d2 < 1/3 in the extractor's feature space): 'near_copy_share', and the same
share for the reference (held-out) images, 'heldout_near_copy_share', its false-positive rate. The training
guard (train.guard) can stop a run on it.

FID at K < 2048 is biased upwards (and comparable only at equal K): fine for tracking progress and
choosing the best checkpoint within a run, which is what it is for here; final numbers come from
`torchdiffusion eval` with more samples.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import torch

from torchdiffusion.errors import ConfigError
from torchdiffusion.eval.kid import SmallSampleWarning
from torchdiffusion.eval.metrics import score
from torchdiffusion.eval.refstats import ReferenceStats, extract_features

#: metrics.csv columns this evaluator fills
COLUMNS = ("fid", "kid", "kid_std")
SEED_OFFSET = 1_000_000  # away from the training-grid seeds 0..grid_images-1


class InLoopEvaluator:
    """sample_images(model, seeds) -> uint8 (n, C, H, W); extractor: a FeatureExtractor; reference: the real side."""

    def __init__(self, sample_images: Callable[[torch.nn.Module, Sequence[int]], torch.Tensor], extractor,
                 reference: ReferenceStats, n_images: int, *, kid_subsets: int = 20, kid_subset_size: int = 1000,
                 seed_offset: int = SEED_OFFSET, chunk: int = 250, audit_train: np.ndarray | None = None):
        if n_images < 2:
            raise ConfigError(f"train.eval_images must be >= 2, got {n_images}")
        self.sample_images, self.extractor, self.reference = sample_images, extractor, reference
        self.n_images, self.kid_subsets, self.kid_subset_size = int(n_images), int(kid_subsets), int(kid_subset_size)
        self.seeds = list(range(seed_offset, seed_offset + self.n_images))
        self.chunk = int(chunk)
        self.audit_train = None if audit_train is None else np.asarray(audit_train, np.float64)

    def rank_seeds(self, rank: int = 0, world_size: int = 1) -> list[int]:
        return self.seeds[rank::world_size]

    @torch.no_grad()
    def features(self, model: torch.nn.Module, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Features (float32 (n_r, D)) of this process's share of the samples, in seed order."""
        seeds = self.rank_seeds(rank, world_size)
        dim = self.reference.features.shape[1]
        if not seeds:
            return np.zeros((0, dim), np.float32)
        parts = []
        for start in range(0, len(seeds), self.chunk):
            images = self.sample_images(model, seeds[start:start + self.chunk])
            parts.append(extract_features(self.extractor, images, chunk=self.chunk))
            del images
        return np.concatenate(parts)

    def score(self, features: np.ndarray) -> dict:
        """{'fid', 'kid', 'kid_std', 'eval_n'} of all K features (as gathered in seed order)."""
        with warnings.catch_warnings():  # small N is the in-loop design (same K every time), not news
            warnings.simplefilter("ignore", SmallSampleWarning)
            r = score(self.reference, features, metrics=("fid", "kid"), extractor=self.extractor, allow_small_n=True,
                      min_n=0, kid_subsets=self.kid_subsets, kid_subset_size=self.kid_subset_size, seed=0)
        prefix = "classifier_" if "classifier_fid" in r else ""
        out = {"fid": r[prefix + "fid"], "kid": r[prefix + "kid"], "kid_std": r[prefix + "kid_std"],
               "eval_n": r["n_fake"], "extractor": r["extractor"], "reference_fingerprint": r["reference_fingerprint"]}
        if self.audit_train is not None:
            from torchdiffusion.eval.memorization import audit_features
            a = audit_features(features, self.audit_train, self.reference.features[:len(features)],
                               space=str(r["extractor"]))
            out.update(near_copy_share=a.share_ratio, heldout_near_copy_share=a.heldout_share_ratio)
        return out


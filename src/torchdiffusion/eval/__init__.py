"""Evaluation: feature networks (local weights only) and metrics as pure functions of features.

    feats = InceptionFeatures()(uint8_images)          # (N, 2048) float64, TF FID Inception-v3
    fid = fid_from_features(feats_real, feats_fake)
"""

from torchdiffusion.eval.fid import (
    FeatureStatistics,
    RunningStatistics,
    feature_statistics,
    fid_from_features,
    fid_from_statistics,
    frechet_distance,
    trace_sqrt_product,
)
from torchdiffusion.eval.inception import (
    KNOWN_SHA256,
    InceptionFeatures,
    packaged_weights_path,
    preprocess,
    resolve_weights_path,
    tf1_bilinear_resize,
)

__all__ = [
    "FeatureStatistics",
    "InceptionFeatures",
    "KNOWN_SHA256",
    "RunningStatistics",
    "feature_statistics",
    "fid_from_features",
    "fid_from_statistics",
    "frechet_distance",
    "packaged_weights_path",
    "preprocess",
    "resolve_weights_path",
    "tf1_bilinear_resize",
    "trace_sqrt_product",
]

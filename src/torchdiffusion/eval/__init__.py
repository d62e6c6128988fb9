"""Evaluation: feature networks (local weights only), metrics as pure functions of features, cached references.

    extractor = InceptionFeatures()                        # TF FID Inception-v3 pool3, local file
    ref, path, hit = cached_reference(real_u8, extractor, source="mnist:test")
    result = score(ref, extract_features(extractor, fake_u8), metrics="fid,kid")

Row 4 of the layering: imports only rows 0-3 (errors, data) besides torch, numpy and scipy.
"""

from torchdiffusion.eval.extractors import (
    ClassifierFeatures,
    FeatureExtractor,
    LogitsNetwork,
    check_extractor,
    is_classifier_metric,
)
from torchdiffusion.eval.fid import (
    FeatureStatistics,
    RunningStatistics,
    feature_statistics,
    fid_from_features,
    fid_from_statistics,
    frechet_distance,
    psd_sqrt,
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
from torchdiffusion.eval.inception_score import inception_score_from_logits
from torchdiffusion.eval.inloop import InLoopEvaluator
from torchdiffusion.eval.kid import KIDResult, SmallSampleWarning, kid_from_features, mmd2_polynomial, mmd2_unbiased
from torchdiffusion.eval.metrics import DEFAULT_MIN_N, inception_score, parse_metrics, score
from torchdiffusion.eval.prdc import knn_radii, precision_recall
from torchdiffusion.eval.refstats import (
    ReferenceStats,
    cached_reference,
    compute_reference,
    default_cache_dir,
    extract_features,
    images_sha256,
    load_reference,
    reference_fingerprint,
    save_reference,
)

__all__ = [
    "DEFAULT_MIN_N", "ClassifierFeatures", "FeatureExtractor", "FeatureStatistics", "InLoopEvaluator",
    "InceptionFeatures", "KIDResult", "KNOWN_SHA256", "LogitsNetwork", "ReferenceStats", "RunningStatistics",
    "SmallSampleWarning", "cached_reference", "check_extractor", "compute_reference", "default_cache_dir",
    "extract_features", "feature_statistics", "fid_from_features", "fid_from_statistics", "frechet_distance",
    "images_sha256", "inception_score", "inception_score_from_logits", "is_classifier_metric", "kid_from_features",
    "knn_radii", "load_reference", "mmd2_polynomial", "mmd2_unbiased", "packaged_weights_path", "parse_metrics",
    "precision_recall", "preprocess", "psd_sqrt", "reference_fingerprint", "resolve_weights_path",
    "save_reference", "score", "tf1_bilinear_resize", "trace_sqrt_product",
]

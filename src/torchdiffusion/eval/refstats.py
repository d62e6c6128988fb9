"""Reference statistics: the real side of FID/KID, computed once and cached on disk under a fingerprint.

A ReferenceStats holds the features of N real images (float32, for KID and precision/recall) and their
Gaussian fit (mu, Sigma in float64, for FID), plus where they came from. Its fingerprint is

    sha256( data sha256 | extractor name | extractor weights sha256 | resize mode | format version )

so a cached file is reused only for the same pixels (in the same order), the same network with the
same weights, and the same preprocessing; anything else gets a new file. Files are .npz read with
allow_pickle=False (no code in a cache file), written atomically (temporary file + rename).

Cost on the 2-core CPU: the Inception features of 10k MNIST digits take ~13 min; a cache hit reads
~80 MB in well under a second, so a second evaluation computes only the generated side.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from torchdiffusion.errors import DataError
from torchdiffusion.eval.fid import FeatureStatistics, RunningStatistics, psd_sqrt

FORMAT_VERSION = 1
CACHE_SUBDIR = "refstats"


def default_cache_dir() -> Path:
    """~/.cache/torchdiffusion/refstats (the CLI's --cache-dir / TORCHDIFFUSION_CACHE_DIR override it)."""
    return Path.home() / ".cache" / "torchdiffusion" / CACHE_SUBDIR


def images_sha256(images) -> str:
    """sha256 over the shape and the bytes of uint8 images (N, C, H, W): the identity of the pixels."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise DataError(f"reference images must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    h = hashlib.sha256(f"uint8{tuple(x.shape)};".encode())
    h.update(memoryview(x.contiguous().numpy()).cast("B"))
    return h.hexdigest()


def reference_fingerprint(data_sha256: str, extractor_name: str, weights_sha256: str, resize: str) -> str:
    key = f"v{FORMAT_VERSION}|data={data_sha256}|net={extractor_name}|weights={weights_sha256}|resize={resize}"
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ReferenceStats:
    features: np.ndarray  # float32 (N, D)
    stats: FeatureStatistics  # float64 mu (D,), sigma (D, D)
    fingerprint: str
    meta: dict = field(default_factory=dict)  # source, n, extractor, weights_sha256, resize, data_sha256, ...

    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n(self) -> int:
        return self.stats.n

    def sqrt_sigma(self) -> np.ndarray:
        """psd_sqrt(Sigma), computed once per object: later FIDs against it need one eigendecomposition."""
        if "sqrt_sigma" not in self._cache:
            self._cache["sqrt_sigma"] = psd_sqrt(self.stats.sigma)
        return self._cache["sqrt_sigma"]

    def record(self) -> dict:
        """What a result stores about its reference."""
        return {"reference_fingerprint": self.fingerprint, "reference_source": self.meta.get("source"),
                "n_real": self.n, "reference_data_sha256": self.meta.get("data_sha256")}


def extract_features(extractor: Callable, images, chunk: int = 500,
                     progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Features of uint8 images in chunks (float32 (N, D)); `progress(done, total)` after each chunk."""
    n = len(images)
    parts = []
    for start in range(0, n, chunk):
        f = np.asarray(extractor(images[start:start + chunk]), dtype=np.float64)
        if f.ndim != 2 or f.shape[0] != len(images[start:start + chunk]):
            raise DataError(f"feature extractor {getattr(extractor, 'name', '?')} returned shape {f.shape} for "
                            f"{len(images[start:start + chunk])} images; (N, D) expected")
        parts.append(f.astype(np.float32))
        if progress is not None:
            progress(min(start + chunk, n), n)
    if not parts:
        raise DataError("no images to compute features of")
    return np.concatenate(parts)


def statistics_of_features(features: np.ndarray) -> FeatureStatistics:
    return RunningStatistics().update(np.asarray(features, dtype=np.float64)).result()


def compute_reference(images, extractor, *, source: str, chunk: int = 500,
                      progress: Callable[[int, int], None] | None = None,
                      data_sha256: str | None = None) -> ReferenceStats:
    data_sha = data_sha256 or images_sha256(images)
    t0 = time.perf_counter()
    feats = extract_features(extractor, images, chunk, progress)
    stats = statistics_of_features(feats)
    meta = {"source": source, "n": int(len(feats)), "extractor": extractor.name,
            "weights_sha256": extractor.sha256, "resize": extractor.resize, "data_sha256": data_sha,
            "image_shape": list(torch.as_tensor(images).shape[1:]), "feature_dim": int(feats.shape[1]),
            "features_s": round(time.perf_counter() - t0, 3), "format": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    fp = reference_fingerprint(data_sha, extractor.name, extractor.sha256, extractor.resize)
    return ReferenceStats(feats, stats, fp, meta)


def save_reference(ref: ReferenceStats, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.npz")
    meta = {**ref.meta, "fingerprint": ref.fingerprint}
    np.savez(tmp, features=ref.features, mu=ref.stats.mu, sigma=ref.stats.sigma, meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)
    return path


def load_reference(path: str | Path) -> ReferenceStats:
    """Read a statistics file written by save_reference; a one-line DataError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such reference statistics file (make one with `torchdiffusion eval ref`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            feats, mu, sigma = z["features"], z["mu"], z["sigma"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a reference statistics file of this project ({type(e).__name__}); "
                        f"recreate it with `torchdiffusion eval ref`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or "fingerprint" not in meta:
        raise DataError(f"{path}: reference statistics of an unknown format; recreate it with `torchdiffusion eval ref`")
    n, d = feats.shape
    if mu.shape != (d,) or sigma.shape != (d, d) or meta.get("n") != n:
        raise DataError(f"{path}: inconsistent reference statistics (features {feats.shape}, mu {mu.shape}); "
                        f"recreate it with `torchdiffusion eval ref`")
    fp = meta.pop("fingerprint")
    return ReferenceStats(feats, FeatureStatistics(mu=mu, sigma=sigma, n=int(n)), fp, meta)


def cache_path(cache_dir: str | Path, label: str, fingerprint: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:60] or "ref"
    return Path(cache_dir) / f"{safe}-{fingerprint[:20]}.npz"


def cached_reference(images, extractor, *, source: str, cache_dir: str | Path | None = None,
                     chunk: int = 500, progress: Callable[[int, int], None] | None = None,
                     ) -> tuple[ReferenceStats, Path, bool]:
    """(reference, its file, cache hit?): load the file of this fingerprint, or compute and store it.

    Hashing the pixels is cheap (memory speed); the extractor runs only on a miss. Any file of the cache with this
    fingerprint is a hit, whatever its label (so `eval` reuses what `audit` stored, and the other way round). A file
    whose stored fingerprint differs from its name's (a damaged or foreign file) is recomputed and replaced."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data_sha = images_sha256(images)
    fp = reference_fingerprint(data_sha, extractor.name, extractor.sha256, extractor.resize)
    path = cache_path(cache_dir, source, fp)
    # one cache for every command: a file of this fingerprint under another label (`audit` names its files
    # audit-..., `eval` by the data set) holds the same features
    others = sorted(q for q in cache_dir.glob(f"*-{fp[:20]}.npz") if q != path) if cache_dir.is_dir() else []
    for candidate in [path] + others:
        if candidate.is_file():
            try:
                ref = load_reference(candidate)
                if ref.fingerprint == fp:
                    return ref, candidate, True
            except DataError:
                pass  # unreadable: recompute below and overwrite
    ref = compute_reference(images, extractor, source=source, chunk=chunk, progress=progress, data_sha256=data_sha)
    save_reference(ref, path)
    return ref, path, False

"""The raw-latent cache: a first stage's moments of every image of a data set, on disk, with a fingerprint.

One safetensors file: tensor "moments" float32 (N, C_m, h, w) (autoencoders/latent.py: KL [mu, std], VQ h) and
string metadata {format, key, data_fingerprint, codec_fingerprint, kind, count, shape}. key = sha256 over the
format, the data fingerprint (data.dataset_fingerprint: pixels and labels) and the autoencoder weights'
fingerprint, so a cache made from other images or another autoencoder never matches: it is recomputed, never
used (`torchdiffusion encode` rewrites it; training recomputes in memory and leaves the file alone). Files are
written atomically (temporary file + rename).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Optional

from torch import Tensor

from ..autoencoders.latent import encode_moments
from ..errors import DataError

FORMAT = "torchdiffusion-latent-cache-1"


def cache_key(data_fingerprint: str, codec_fingerprint: str, kind: str) -> str:
    h = hashlib.sha256()
    for part in (FORMAT, kind, data_fingerprint, codec_fingerprint):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def read_cache_meta(path: Path) -> Optional[dict]:
    """The metadata of a cache file; None when the file is not one (missing, or another kind of file)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception:  # not safetensors at all (safetensors raises its own error types)
        return None
    return meta if meta.get("format") == FORMAT else None


def read_cache(path: Path, key: str) -> Optional[Tensor]:
    """The cached moments if `path` is a cache whose key is `key`; None if it is stale (another key)."""
    from safetensors.torch import load_file
    meta = read_cache_meta(path)
    if meta is None:
        raise DataError(f"{path}: not a latent cache file (made by `torchdiffusion encode`); give another path")
    if meta.get("key") != key:
        return None
    try:
        moments = load_file(str(path))["moments"]
    except Exception as e:
        raise DataError(f"{path}: damaged latent cache ({str(e)[:120]}); delete it to recompute it") from None
    if int(meta.get("count", -1)) != len(moments):
        raise DataError(f"{path}: damaged latent cache ({len(moments)} rows, metadata says {meta.get('count')}); "
                        f"delete it to recompute it")
    return moments


def write_cache(path: Path, moments: Tensor, *, key: str, data_fingerprint: str, codec_fingerprint: str,
                kind: str) -> None:
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "key": key, "data_fingerprint": data_fingerprint,
            "codec_fingerprint": codec_fingerprint, "kind": kind, "count": str(len(moments)),
            "shape": ",".join(str(int(s)) for s in moments.shape[1:])}
    tmp = path.with_name(path.name + ".tmp")
    save_file({"moments": moments.contiguous().float()}, str(tmp), metadata=meta)
    tmp.replace(path)


def ensure_cache(path: Path, codec, dataset, data_fingerprint: str, codec_fingerprint: str, *, write: bool = True,
                 replace_stale: bool = False, batch: int = 256, say: Callable[[str], None] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Tensor:
    """The moments of `dataset`'s images under `codec`: read from `path` when its key matches, else computed.
    A computed cache is written to `path` when `write` and the file is missing, or stale and `replace_stale` (the
    encode command); training leaves a stale file as it is (one line says so) and uses the recomputed moments.
    A file at `path` that is not a cache is refused (DataError), never replaced."""
    key = cache_key(data_fingerprint, codec_fingerprint, codec.kind)
    path = Path(path)
    stale = False
    if path.exists():
        moments = read_cache(path, key)
        if moments is not None:
            if say is not None:
                say(f"latent cache {path}: up to date ({len(moments)} images)")
            return moments
        stale = True
        meta = read_cache_meta(path) or {}
        why = ("other images" if meta.get("data_fingerprint") != data_fingerprint else
               f"another autoencoder, fingerprint {str(meta.get('codec_fingerprint'))[:12]} vs "
               f"{codec_fingerprint[:12]}")
        if say is not None:
            say(f"latent cache {path}: stale (made from {why}); recomputing it"
                + ("" if replace_stale else " in memory and leaving the file as it is (`torchdiffusion encode` "
                                            "refreshes it)"))
    moments = encode_moments(codec, dataset.x, batch=batch, progress=progress)
    if write and (not stale or replace_stale):
        write_cache(path, moments, key=key, data_fingerprint=data_fingerprint, codec_fingerprint=codec_fingerprint,
                    kind=codec.kind)
        if say is not None:
            say(f"latent cache {path}: wrote {len(moments)} images of shape {tuple(moments.shape[1:])}")
    return moments

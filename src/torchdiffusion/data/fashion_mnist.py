"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) from the original idx files.

Debian's `dataset-fashion-mnist` installs them in /usr/share/datasets/fashion-mnist as
{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz. The idx format (LeCun's MNIST page): a big-endian
header of magic = 0x0000 | type code 0x08 (uint8) | number of dimensions, then one uint32 per
dimension, then the raw bytes. Images: magic 0x00000803 (3 dims: N, 28, 28), labels: 0x00000801.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from torchdiffusion.data.dataset import ImageArrayDataset
from torchdiffusion.data.splits import assemble_28x28, check_options
from torchdiffusion.errors import DataError

__all__ = ["load_fashion_mnist", "read_idx", "DEFAULT_ROOT", "INSTALL_HINT"]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one (optionally gzipped) idx file of uint8 data; returns the array with its header's shape."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e}); reinstall with `{INSTALL_HINT}`") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an idx header ({len(raw)} bytes)")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise DataError(f"{path}: idx magic number 0x{found:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != size:
        raise DataError(f"{path}: header declares {'x'.join(map(str, shape))} = {size} bytes of data, "
                        f"file has {len(raw) - header}")
    # copy: frombuffer over bytes is read-only, and torch wants writable memory
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _read_pair(root: Path, which: str) -> tuple[np.ndarray, np.ndarray]:
    img_name, lab_name = _FILES[which]
    for name in (img_name, lab_name):
        if not (root / name).is_file():
            raise DataError(f"Fashion-MNIST not found: no {name} in {root}; install it with "
                            f"`{INSTALL_HINT}` (or set path to a folder holding the idx files)")
    x = read_idx(root / img_name, IMAGES_MAGIC)
    y = read_idx(root / lab_name, LABELS_MAGIC)
    if x.shape[1:] != (28, 28) or x.shape[0] != y.shape[0]:
        raise DataError(f"{root}: {img_name} holds {x.shape} images but {lab_name} {y.shape[0]} labels")
    if y.size and y.max() > 9:
        raise DataError(f"{root / lab_name}: labels outside 0..9")
    return x, y.astype(np.int64)


def load_fashion_mnist(split: str = "train", *, channels: str = "L", resolution: int = 28,
                       path: Optional[str | Path] = None) -> ImageArrayDataset:
    """Fashion-MNIST as uint8 (N, C, resolution, resolution), labels 0..9 (see CLASS_NAMES).

    split: train (first 50k of the training file) | val (its last 10k) | test (t10k) | train+val;
    channels: L | RGB; resolution >= 28 pads with 0. path: folder of the idx files.
    """
    check_options("fashion-mnist", split, channels, resolution)
    root = Path(path) if path is not None else DEFAULT_ROOT
    parts = {}
    if split != "test":
        x, y = _read_pair(root, "train")
        if len(x) != 60_000:
            raise DataError(f"{root}: expected 60000 training images, found {len(x)}")
        parts["train"], parts["val"] = (x[:50_000], y[:50_000]), (x[50_000:], y[50_000:])
    else:
        parts["test"] = _read_pair(root, "test")
    return assemble_28x28(parts, name="fashion-mnist", split=split, channels=channels,
                          resolution=resolution, class_names=CLASS_NAMES,
                          info={"source": "fashion-mnist", "root": str(root)})

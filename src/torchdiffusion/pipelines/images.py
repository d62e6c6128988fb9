"""Folders of generated images read back: what `sample` wrote (000123.png per seed, grid.png) as one uint8 batch,
for scoring (eval) and auditing (audit); and uint8 batches to and from PIL images (the library's pipeline,
config.pipeline)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError

SEED_NAME = re.compile(r"^(\d+)\.(png|jpg|jpeg|webp|bmp)$", re.IGNORECASE)
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_sample_folder(folder: Path, n: int | None = None, option: str = "--fake") -> tuple[torch.Tensor, dict]:
    """Images of a folder as uint8 (N, C, H, W): seed-named files (000123.png, as `sample` writes) in seed
    order when there are any, else every image file in name order; grid.png is never a sample."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{option} {folder}: not a folder of images")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXT and p.name != "grid.png"]
    seeded = sorted((int(m.group(1)), p) for p in files if (m := SEED_NAME.match(p.name)))
    chosen = [p for _, p in seeded] if seeded else sorted(files)
    if n is not None:
        if len(chosen) < n:
            raise DataError(f"{option} {folder}: {len(chosen)} images, --n {n} asks for more")
        chosen = chosen[:n]
    if not chosen:
        raise DataError(f"{option} {folder}: no image files (png, jpg, webp, bmp)")
    arrays = []
    for p in chosen:
        try:
            with Image.open(p) as im:
                if im.mode not in ("L", "RGB"):
                    if im.mode in ("I", "I;16", "I;16B", "F"):
                        raise DataError(f"{p}: {im.mode} (high bit depth) images are not scored; write 8-bit images")
                    im = im.convert("RGB")
                a = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise DataError(f"{p}: not a readable image ({type(e).__name__})") from None
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) != 1:
        raise DataError(f"{option} {folder}: images differ in shape/channels {shapes[:3]}; all must be alike")
    x = torch.from_numpy(np.stack(arrays))
    return x, {"fake": str(folder), "fake_first": chosen[0].name, "fake_last": chosen[-1].name,
               "fake_shape": list(x.shape[1:])}


def to_pil(image: torch.Tensor):
    """uint8 (C, H, W), C in {1, 3} -> a PIL image (mode L or RGB)."""
    from PIL import Image
    arr = image.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else np.ascontiguousarray(arr))


def from_pil(images, channels: int) -> torch.Tensor:
    """PIL images -> uint8 (N, C, H, W) with C = channels (1: mode L, 3: RGB); all of one size."""
    from PIL import Image
    arrays = []
    for im in images:
        if not isinstance(im, Image.Image):
            raise ConfigError(f"images must be a uint8 tensor, PIL images or a folder; got {type(im).__name__}")
        a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    if not arrays:
        raise ConfigError("no images given")
    if len({a.shape for a in arrays}) != 1:
        raise DataError(f"the images differ in size: {sorted({a.shape for a in arrays})[:3]}")
    return torch.from_numpy(np.stack(arrays))


"""Folders of generated images read back: what `sample` wrote (000123.png per seed, grid.png) as one uint8 batch,
for scoring (eval) and auditing (audit)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

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

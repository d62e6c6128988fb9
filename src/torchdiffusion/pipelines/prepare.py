"""`torchdiffusion data prepare`: an image folder or ZIP -> a ZIP of same-size PNGs with a `dataset.json` of labels.

The layout is that of EDM's dataset_tool (Karras et al. 2022, github.com/NVlabs/edm, `dataset_tool.py`): PNG
files stored uncompressed in the archive (PNG is compressed already) and, at the root, `dataset.json` holding
{"labels": [[archive name, int], ...]} (null for an unlabelled set). Two additions that EDM's reader ignores:
"class_names" (the name of each label, e.g. the source's class subfolders) and "torchdiffusion" (how the
archive was made). File names: <class name>/img<index>.png when the set is labelled and every class name is a
safe folder name, else EDM's <index // 1000>/img<index>.png shards; both read back with data.kind=folder,
data.path=ARCHIVE and data.labels=json (or labels=folder for class folders).

Safety: the output is written to a temporary file beside it and renamed into place once complete (a crash
leaves no half archive under the final name); an existing output is kept unless overwrite=True; member names
are generated here and checked, so none is absolute or contains '..' (RELIABILITY 17). The same input and
options give a byte-identical archive (fixed member order and timestamps).
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np
from PIL import Image

from ..data.folder import LABEL_POLICIES, load_image_folder
from ..data.image_sources import LABEL_FILE, open_image_source
from ..errors import ConfigError, DataError, OutputError

__all__ = ["PrepareResult", "prepare_dataset", "LABEL_CHOICES"]

LABEL_CHOICES = ("auto",) + LABEL_POLICIES  # auto: json if the source has a dataset.json, else folder if every
#                                             image lies in a first-level subfolder, else none
_CHANNELS = {None: "auto", 1: "L", 3: "RGB"}
_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest ZIP timestamp: archives do not depend on when they were made


@dataclass(frozen=True)
class PrepareResult:
    out: Path
    count: int  # images written
    shape: tuple[int, int, int]  # (C, H, W) of every image
    labels: str  # where the labels came from: folder, json or none
    class_names: tuple[str, ...]
    skipped: str  # the source's check report in one line

    def one_line(self) -> str:
        c, h, w = self.shape
        lab = (f"labels from {self.labels}: {len(self.class_names)} classes" if self.labels != "none"
               else "unlabelled")
        return f"wrote {self.out}: {self.count} images, {h}x{w}, {c} channel(s), {lab} ({self.skipped})"


def _safe_component(name: str) -> bool:
    return (bool(name) and name not in (".", "..") and not name.startswith(".") and name != "__MACOSX"
            and not any(ch in name for ch in '/\\:\0') and name.strip() == name)


def _auto_labels(src: Path) -> str:
    with open_image_source(src) as listing:
        if listing.label_file is not None:
            return "json"
        if listing.entries and all("/" in e.relpath for e in listing.entries):
            return "folder"
    return "none"


def _png(image: np.ndarray) -> bytes:
    """uint8 (C, H, W), C in {1, 3} -> PNG bytes (Pillow's default compression, deterministic)."""
    arr = image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _member_names(labels: np.ndarray, class_names: tuple[str, ...], labelled: bool) -> list[str]:
    by_class = labelled and all(_safe_component(c) for c in class_names)
    names = [f"{class_names[int(k)]}/img{i:08d}.png" if by_class else f"{i // 1000:05d}/img{i:08d}.png"
             for i, k in enumerate(labels)]
    for n in names:  # generated here, checked anyway (RELIABILITY 17)
        p = PurePosixPath(n)
        if p.is_absolute() or ".." in p.parts:
            raise DataError(f"refusing to write archive member {n!r} (it would escape the archive)")
    return names


def prepare_dataset(src: str | os.PathLike, out: str | os.PathLike, *, resolution: int,
                    channels: Optional[int] = None, crop: str = "center", labels: str = "auto",
                    bad_files: str = "skip", overwrite: bool = False) -> PrepareResult:
    """Decode every usable image of `src` (folder or .zip), make it resolution x resolution (crop: center = the
    largest centred square, then LANCZOS; none = the whole image resized) with `channels` (1, 3, or None: 1 if
    every image is gray, else 3), and write them with their labels to the ZIP `out` (see the module docstring).
    labels: auto | folder | json | none (LABEL_CHOICES). bad_files: skip (counted in the result) | error."""
    src, out = Path(src), Path(out)
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ConfigError(f"--resolution must be a positive integer, got {resolution!r}")
    if channels not in _CHANNELS:
        raise ConfigError(f"--channels must be 1 or 3 (or unset: 1 if every image is gray, else 3), got {channels!r}")
    if labels not in LABEL_CHOICES:
        raise ConfigError(f"--labels {labels!r} is not valid; valid: {', '.join(LABEL_CHOICES)}")
    if out.suffix.lower() != ".zip":
        raise ConfigError(f"--out {out}: the output must be a .zip file (e.g. dataset.zip)")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists; give --overwrite to replace it (it is replaced only once the new "
                        "archive is complete)")
    if out.exists() and not out.is_file():
        raise OutputError(f"{out} exists and is not a file; choose another --out")
    if not src.exists():
        raise DataError(f"{src}: no such folder or ZIP file")
    if src.resolve() == out.resolve():
        raise DataError(f"--out {out} is the source itself; write to another file")
    if labels == "auto":
        labels = _auto_labels(src)
    ds = load_image_folder(src, channels=_CHANNELS[channels], resolution=resolution, bad_files=bad_files,
                           labels=labels, crop=crop, split="train+val")
    x = ds.x.numpy()  # (N, C, H, W) uint8
    if x.shape[1] not in (1, 3):  # channels auto gives 1 or 3; keep PNGs to L / RGB
        raise DataError(f"{src}: images have {x.shape[1]} channels; give --channels 1 or 3")
    y = ds.label.numpy()
    labelled = labels != "none"
    names = _member_names(y, ds.class_names, labelled)
    meta = {"labels": [[n, int(k)] for n, k in zip(names, y)] if labelled else None}
    if labelled:
        meta["class_names"] = list(ds.class_names)
    meta["torchdiffusion"] = {"resolution": resolution, "channels": int(x.shape[1]), "crop": crop,
                              "labels": labels, "count": int(x.shape[0]), "source_report": ds.info["skipped"]}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
                for name, image in zip(names, x):
                    zf.writestr(zipfile.ZipInfo(name, date_time=_DATE), _png(image))
                zf.writestr(zipfile.ZipInfo(LABEL_FILE, date_time=_DATE),
                            json.dumps(meta).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        raise DataError(f"could not write {out}: {e.strerror or e}; nothing was written (an existing file is "
                        "unchanged)") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return PrepareResult(out, int(x.shape[0]), tuple(int(v) for v in x.shape[1:]), labels, ds.class_names,
                         ds.info["skipped"])

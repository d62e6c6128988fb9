"""List the image files of a folder or a ZIP archive, in a fixed order, without extracting.

Files are found recursively and sorted by their '/'-separated path relative to the root, so
the order (and a data set's fingerprint) does not depend on the file system. Candidates are
files whose extension is one of IMAGE_EXTENSIONS (any case); hidden files and folders (name
starting with '.') and macOS '__MACOSX' folders are ignored and counted. A ZIP is read member
by member into memory: one whose member names are absolute or contain '..' is rejected whole
before anything is read (RELIABILITY 17), and a member declaring more than max_bytes bytes is
reported as a decompression bomb instead of being read.
"""
from __future__ import annotations

import contextlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Optional

from torchdiffusion.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "Entry", "Listing", "open_image_source", "MemberTooLarge",
           "DEFAULT_MAX_BYTES"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
DEFAULT_MAX_BYTES = 256 << 20  # largest single file read into memory: 256 MiB
LABEL_FILE = "dataset.json"  # labels at the root, in EDM's dataset_tool layout (read by data.folder)


class MemberTooLarge(OSError):
    """A ZIP member inflates beyond max_bytes (its header understated its size)."""


@dataclass(frozen=True)
class Entry:
    """relpath: '/'-separated path under the root; size: bytes (declared, for ZIP members);
    read(): the file's bytes (raises OSError/RuntimeError when unreadable)."""
    relpath: str
    size: int
    read: Callable[[], bytes]


@dataclass(frozen=True)
class Listing:
    root: str
    entries: list[Entry]   # image-extension files, sorted by relpath
    ignored: int           # other files, hidden files, __MACOSX
    label_file: Optional[bytes] = None  # the bytes of a root-level dataset.json (EDM's label file), if any


def _ignored_part(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _is_image_name(name: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> bool:
    return name.lower().endswith(extensions)


def _unsafe_member(name: str) -> bool:
    n = name.replace("\\", "/")
    return (n.startswith("/") or (len(n) > 1 and n[1] == ":")  # absolute, or a Windows drive
            or ".." in PurePosixPath(n).parts)


def _list_folder(root: Path, max_bytes: int, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> Listing:
    entries, ignored = [], 0
    label_file = None
    lf = root / LABEL_FILE
    if lf.is_file() and lf.stat().st_size <= max_bytes:
        label_file = lf.read_bytes()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            p = Path(dirpath) / f
            rel = p.relative_to(root).as_posix()
            if _ignored_part(tuple(rel.split("/"))) or not _is_image_name(f, extensions):
                ignored += 1
                continue
            try:
                size = p.stat().st_size
            except OSError:
                size = -1
            entries.append(Entry(rel, size, p.read_bytes))
    entries.sort(key=lambda e: e.relpath)
    return Listing(str(root), entries, ignored, label_file)


def _list_zip(zf: zipfile.ZipFile, root: str, max_bytes: int,
              extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> Listing:
    infos = zf.infolist()
    for info in infos:
        if _unsafe_member(info.filename):
            raise DataError(f"{root}: rejected: member {info.filename!r} is an absolute path or contains "
                            "'..' (it would escape the archive); nothing was read")
    entries, ignored = [], 0
    label_file = None
    for info in infos:
        if info.filename == LABEL_FILE and info.file_size <= max_bytes:
            with zf.open(info) as f:
                label_file = f.read(max_bytes + 1)
        if info.is_dir():
            continue
        rel = info.filename.replace("\\", "/")
        if _ignored_part(tuple(rel.split("/"))) or not _is_image_name(rel, extensions):
            ignored += 1
            continue

        def read(info: zipfile.ZipInfo = info) -> bytes:
            with zf.open(info) as f:  # never extracted: decompressed into memory, bounded
                data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise MemberTooLarge(f"inflates beyond {max_bytes} bytes")
            return data
        entries.append(Entry(rel, info.file_size, read))
    entries.sort(key=lambda e: e.relpath)
    return Listing(root, entries, ignored, label_file)


@contextlib.contextmanager
def open_image_source(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES,
                      extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> Iterator[Listing]:
    """Context manager giving the Listing of a folder or a .zip file (kept open while in use); `extensions`
    choose the candidate files (video clips use their own)."""
    p = Path(path)
    if p.is_dir():
        yield _list_folder(p, max_bytes, extensions)
        return
    if not p.exists():
        raise DataError(f"image folder or ZIP not found: {p}")
    if not zipfile.is_zipfile(p):
        raise DataError(f"{p} is neither a folder nor a ZIP archive; give a folder of images or a .zip of them")
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{p}: not a readable ZIP archive ({e})") from None
    with zf:
        yield _list_zip(zf, str(p), max_bytes, extensions)

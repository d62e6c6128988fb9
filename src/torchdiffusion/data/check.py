"""`check`: what is in an image folder or ZIP, counted per category (RELIABILITY 19).

The categories are those of image_decode (bad: empty, unreadable, not-an-image,
decompression-bomb, truncated, tiny, unsupported; traits of usable files: grayscale, rgb, rgba,
palette, cmyk, 16-bit). A usable file counts once in "ok" and once per trait, so the traits do
not sum to "ok"; every file counts in exactly one of "ok" or a bad category.
"""
from __future__ import annotations

import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from os import PathLike

from torchdiffusion.data.image_decode import (BAD_CATEGORIES, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE,
                                              TRAITS, Probe, probe_image)
from torchdiffusion.data.image_sources import (DEFAULT_MAX_BYTES, Entry, MemberTooLarge,
                                               open_image_source)

__all__ = ["CheckReport", "check", "probe_entry", "CATEGORIES"]

CATEGORIES = ("ok",) + BAD_CATEGORIES + TRAITS


@dataclass
class CheckReport:
    """counts: every name in CATEGORIES -> number of files; bad: (relpath, category, detail) of
    each bad file in path order; sizes: (W, H) -> number of ok files; ignored: files that were
    not examined (other extensions, hidden files, __MACOSX)."""
    source: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    bad: list[tuple[str, str, str]] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)
    ignored: int = 0

    @property
    def files(self) -> int:
        """Image files examined (ok + bad)."""
        return self.counts["ok"] + len(self.bad)

    @property
    def ok(self) -> int:
        return self.counts["ok"]

    def add(self, relpath: str, probe: Probe) -> None:
        if probe.category is None:
            self.counts["ok"] += 1
            for t in probe.traits:
                self.counts[t] += 1
            if probe.size is not None:
                self.sizes[probe.size] += 1
        else:
            self.counts[probe.category] += 1
            self.bad.append((relpath, probe.category, probe.detail))

    def one_line(self) -> str:
        """e.g. '12 image files: 5 ok, 7 bad (1 empty, 1 truncated, ...); 2 ignored'."""
        bad = ", ".join(f"{self.counts[c]} {c}" for c in BAD_CATEGORIES if self.counts[c])
        s = f"{self.files} image files: {self.ok} ok, {len(self.bad)} bad" + (f" ({bad})" if bad else "")
        return s + (f"; {self.ignored} other files ignored" if self.ignored else "")

    def lines(self) -> list[str]:
        """A multi-line text report: the one-line summary, counts per category, sizes, bad files."""
        out = [f"{self.source}: {self.one_line()}"]
        out += [f"  {c:<20s} {self.counts[c]}" for c in CATEGORIES]
        common = ", ".join(f"{w}x{h}: {n}" for (w, h), n in self.sizes.most_common(5))
        if common:
            out.append(f"  sizes (WxH) of ok files: {common}" + (" ..." if len(self.sizes) > 5 else ""))
        out += [f"  bad: {p} ({c}: {d})" for p, c, d in self.bad]
        return out


def probe_entry(entry: Entry, *, min_size: int, max_pixels: int, max_bytes: int) -> Probe:
    """Read one listed file and probe it; never raises for bad data."""
    if entry.size > max_bytes:
        return Probe("decompression-bomb", detail=f"{entry.size} bytes > limit {max_bytes}")
    try:
        data = entry.read()
    except MemberTooLarge as e:
        return Probe("decompression-bomb", detail=str(e))
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as e:
        return Probe("unreadable", detail=f"{type(e).__name__}: {e}"[:120])
    return probe_image(data, min_size=min_size, max_pixels=max_pixels)


def check(path: str | PathLike, *, min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS,
          max_bytes: int = DEFAULT_MAX_BYTES) -> CheckReport:
    """Examine every image file under `path` (folder or .zip) and count them per category.

    Decodes each file fully (that is how truncation is found) and keeps nothing.
    """
    report = CheckReport(source=str(path))
    with open_image_source(path, max_bytes=max_bytes) as listing:
        report.ignored = listing.ignored
        for entry in listing.entries:
            report.add(entry.relpath, probe_entry(entry, min_size=min_size, max_pixels=max_pixels,
                                                  max_bytes=max_bytes))
    return report

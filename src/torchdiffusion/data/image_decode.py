"""Probe and decode one image file: classify what is wrong with it, or convert it to uint8.

Every image file is put in one bad category, or is ok with one or more traits:

bad (skipped or fatal, per the bad-file policy):
  empty               0 bytes
  unreadable          the bytes cannot be read (permission, encrypted ZIP entry, I/O error)
  not-an-image        Pillow does not recognise the format (e.g. a text file named .png)
  decompression-bomb  the header declares more than max_pixels pixels (or the ZIP entry more
                      than max_bytes bytes); refused before any pixel is decoded
  truncated           the header is fine but the pixel data is cut short or corrupt
  tiny                shorter side < min_size pixels (1x1 spacers, favicons)
  unsupported         a pixel format without an agreed 0..255 mapping (32-bit float, signed int)
traits of ok images (converted as the channel policy says):
  grayscale, rgb, rgba (has alpha: RGBA, LA, PA or a palette with transparency), palette,
  cmyk, 16-bit (16 bits per sample; mapped to 8 bits as round(v * 255 / 65535), never clipped)

The pixel limit is a parameter checked against the header's size, not Pillow's global
Image.MAX_IMAGE_PIXELS, so probing changes no global state. (Pillow itself still refuses images
beyond twice its own limit while reading the header; those are reported as bombs too.) Pillow's
global ImageFile.LOAD_TRUNCATED_IMAGES is honoured as the user set it: if it is True, truncated
files decode (grey-filled) and are not detected.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["Probe", "probe_image", "image_to_array", "BAD_CATEGORIES", "TRAITS",
           "CHANNEL_POLICIES", "CROP_POLICIES", "DEFAULT_MAX_PIXELS", "DEFAULT_MIN_SIZE"]

BAD_CATEGORIES = ("empty", "unreadable", "not-an-image", "decompression-bomb", "truncated", "tiny",
                  "unsupported")
TRAITS = ("grayscale", "rgb", "rgba", "palette", "cmyk", "16-bit")
#: auto: 1 channel if every image is gray in content (R == G == B), else 3; L: 1 channel (ITU-R
#: 601-2 luma, Pillow's convert("L")); RGB: 3 channels; RGBA: 4 channels, alpha kept (opaque
#: images get alpha 255). Except under RGBA, alpha is composited onto `alpha_background`.
CHANNEL_POLICIES = ("auto", "L", "RGB", "RGBA")
DEFAULT_MAX_PIXELS = 1 << 26  # 67M pixels (8192 x 8192); Pillow's own default warns at 89M
DEFAULT_MIN_SIZE = 8

_GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True)
class Probe:
    """category: None when ok, else one of BAD_CATEGORIES (with a short `detail`).
    size: (W, H) from the header when known; image: the decoded Pillow image when ok."""
    category: Optional[str]
    traits: tuple[str, ...] = ()
    size: Optional[tuple[int, int]] = None
    detail: str = ""
    image: Optional[Image.Image] = None


def _traits(img: Image.Image, rawmodes: tuple[str, ...]) -> tuple[str, ...]:
    mode = img.mode
    t = []
    if mode in ("1", "L", "LA", "La") or mode in _GRAY16_MODES:
        t.append("grayscale")
    elif mode in ("P", "PA"):
        t.append("palette")
    elif mode == "CMYK":
        t.append("cmyk")
    else:
        t.append("rgb")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        t.append("rgba")
    if mode in _GRAY16_MODES or any(";16" in r for r in rawmodes):
        t.append("16-bit")  # e.g. a 16-bit RGB PNG, which Pillow reads as RGB;16B -> RGB
    return tuple(t)


def probe_image(data: bytes, *, min_size: int = DEFAULT_MIN_SIZE,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Probe:
    """Classify (and, when ok, fully decode) one image file's bytes. Never raises for bad data."""
    if len(data) == 0:
        return Probe("empty", detail="0 bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:  # beyond twice Pillow's global limit
            m = re.search(r"\((\d+) pixels\)", str(e))
            declared = f"{m.group(1)} pixels" if m else "a size"
            return Probe("decompression-bomb", detail=f"header declares {declared} > limit {max_pixels}")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
            return Probe("not-an-image", detail=type(e).__name__)
        w, h = img.size
        if w * h > max_pixels:
            return Probe("decompression-bomb", size=(w, h),
                         detail=f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
        rawmodes = tuple(str(t[3]) for t in (img.tile or []) if len(t) > 3)
        try:
            img.load()
        except MemoryError:
            raise
        except Exception as e:  # corrupt pixel data raises many types (OSError, SyntaxError, zlib.error, ...)
            return Probe("truncated", size=(w, h), detail=f"{type(e).__name__}: {e}"[:120])
    if min(w, h) < min_size:
        return Probe("tiny", size=(w, h), detail=f"{w}x{h} < {min_size} px")
    if img.mode == "F" or (img.mode == "I" and not _fits_uint16(img)):
        return Probe("unsupported", size=(w, h), detail=f"mode {img.mode} has no 0..255 mapping")
    return Probe(None, traits=_traits(img, rawmodes), size=(w, h), image=img)


def _fits_uint16(img: Image.Image) -> bool:
    lo, hi = img.getextrema()
    return 0 <= lo and hi <= 65535


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit gray -> L with v8 = round(v16 * 255 / 65535) (Pillow's convert("L") clips at 255)."""
    if img.mode in _GRAY16_MODES:
        v = np.asarray(img).astype(np.uint32)  # uint16 or int32, values 0..65535
        return Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if img.mode == "1":
        return img.convert("L")
    return img


def _flatten_alpha(img: Image.Image, background: int) -> Image.Image:
    """Composite an image with alpha onto an opaque gray `background`; L or RGB out."""
    gray = img.mode in ("LA", "La")
    rgba = img.convert("RGBA")
    out = Image.alpha_composite(Image.new("RGBA", rgba.size, (background,) * 3 + (255,)), rgba).convert("RGB")
    return out.convert("L") if gray else out


CROP_POLICIES = ("center", "none")


def _crop_resize(img: Image.Image, resolution: Optional[int], crop: str = "center") -> Image.Image:
    """crop="center": centre-crop the largest square, then resize it to resolution x resolution with
    LANCZOS (the filter EDM's dataset_tool uses; it antialiases when shrinking); crop="none": resize
    the whole image to resolution x resolution (the aspect ratio changes unless it is square).
    resolution None keeps the size."""
    if resolution is None:
        return img
    w, h = img.size
    if crop == "none":
        return img if (w, h) == (resolution, resolution) else img.resize((resolution, resolution),
                                                                         Image.Resampling.LANCZOS)
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if (w, h) != (s, s):
        img = img.crop((left, top, left + s, top + s))
    if s != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return img


def image_to_array(img: Image.Image, channels: str, resolution: Optional[int] = None,
                   alpha_background: int = 255, crop: str = "center") -> np.ndarray:
    """Decoded Pillow image -> uint8 (C, H, W).

    channels: one of CHANNEL_POLICIES; under "auto" the result is (1, H, W) for a gray source
    and (3, H, W) otherwise (the caller unifies a whole set). EXIF orientation is applied first.
    crop: one of CROP_POLICIES (see _crop_resize), used when resolution is given.
    """
    if channels not in CHANNEL_POLICIES:
        raise ValueError(f"unknown channels {channels!r}; valid: {', '.join(CHANNEL_POLICIES)}")
    if crop not in CROP_POLICIES:
        raise ValueError(f"unknown crop {crop!r}; valid: {', '.join(CROP_POLICIES)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow's "palette with transparency" notice
        if img.getexif().get(0x0112, 1) != 1:  # 0x0112: EXIF Orientation
            img = ImageOps.exif_transpose(img)
        img = _to_8bit(img)
        has_alpha = img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)
        if channels == "RGBA":
            img = img.convert("RGBA")
        else:
            if img.mode in ("P", "PA"):
                img = img.convert("RGBA" if has_alpha else "RGB")
            if has_alpha:
                img = _flatten_alpha(img, alpha_background)
            target = {"L": "L", "RGB": "RGB", "auto": "L" if img.mode == "L" else "RGB"}[channels]
            img = img.convert(target)  # CMYK/YCbCr/LAB -> RGB; RGB -> L uses ITU-R 601-2 luma
        img = _crop_resize(img, resolution, crop)
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else np.ascontiguousarray(a.transpose(2, 0, 1))

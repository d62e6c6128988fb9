"""Checkpoints: safetensors + JSON folders, committed atomically, verified by a manifest of hashes.

Layout of one checkpoint (RUN/checkpoints/step_00000040/):
    <group>.safetensors   one per tensor group: model, ema, optim (flattened, see state.py), rng, ...
    <name>.json           one per JSON part: config, trainer, optim (skeleton), rng, ...
    MANIFEST.json         written last: format version, versions, step, data fingerprint, and the
                          sha256 and size of every other file
and RUN/checkpoints/latest, a one-line text file naming the newest committed checkpoint.

Commit protocol (RELIABILITY 3, 10, 12): files go into step_XXXXXXXX.tmp-<pid>, each is fsynced,
MANIFEST.json comes last, then one rename makes the folder visible under its final name, then the
`latest` pointer is replaced atomically (write a temporary file, rename). A crash at any point
leaves either the old state or the new one; readers trust only folders whose manifest verifies.
Pickles are never loaded: every file is sniffed and validated before the safetensors library
sees it (RELIABILITY 4, 5, 14, 15, 16). Only one process (rank 0) may save into a folder.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch
from torch import Tensor

import torchdiffusion
from torchdiffusion.errors import CheckpointError, ConfigError

FORMAT = "torchdiffusion-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
LATEST = "latest"
HEADER_CAP = 100_000_000  # bytes; the safetensors library uses the same limit
JSON_CAP = 64_000_000  # bytes, for config/trainer/manifest JSON files
PICKLE_CAUSE = "is a pickle/torch.save file; pickles can run code and are never loaded; convert it to safetensors"

_log = logging.getLogger(__name__)
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_DEBRIS_RE = re.compile(r"^(?:step_\d{8,}|latest)\.(?:tmp|old|del)-(\d+)$")
_PART_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_FILE_RE = re.compile(r"^[a-z][a-z0-9_]*\.(?:safetensors|json)$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
# Bytes per element of each safetensors dtype.
_DTYPE_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors[group][key] from <group>.safetensors, meta[name] from <name>.json."""

    path: Path
    step: int
    manifest: dict[str, Any]
    tensors: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.meta.get("config")

    @property
    def data_fingerprint(self) -> str | None:
        return self.manifest.get("data_fingerprint")


@dataclass(frozen=True)
class LatestSearch:
    """The newest complete checkpoint (or None) and the (name, reason) of each folder passed over."""

    path: Path | None
    skipped: list[tuple[str, str]]


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------
# Reading untrusted files
# ---------------------------------------------------------------------------------------------

def _fail(path: Path | str, cause: str) -> CheckpointError:
    return CheckpointError(f"{path}: {cause}".replace("\n", " "))


def _foreign_format(head: bytes, size: int) -> str | None:
    """Name the format of a file that is not what we write, from its first bytes, or None."""
    if size == 0:
        return "empty file (0 bytes)"
    if size >= 9 and head[8:9] == b"{":
        # Looks like safetensors (8-byte length, then a JSON header). Checked before the magic
        # numbers below, because a header length can begin with the same bytes (640 = 80 02 ..).
        return None
    if head.startswith(b"version https://git-lfs"):
        return "is a Git LFS pointer, not the file's content; fetch it with `git lfs pull`"
    if (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or re.match(rb"c[\w.]+\n[\w.]+\n", head):
        return PICKLE_CAUSE
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # torch.save writes a zip holding a pickle
        return PICKLE_CAUSE
    if head.startswith(b"\x93NUMPY"):
        return "is a NumPy .npy file, not safetensors"
    if head.startswith(b"\x1f\x8b"):
        return "is gzip-compressed; decompress it first"
    if head.lstrip().startswith(b"<"):
        return "is an HTML/XML page, not weights (a failed download?)"
    return None


def _read_head(path: Path, n: int = 64) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as f:
            return f.read(n), os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except IsADirectoryError:
        raise _fail(path, "is a folder, not a file") from None
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e})") from None


def inspect_safetensors(path: Path | str) -> dict[str, Any]:
    """Validate a safetensors file's structure without reading tensor data; returns its header.

    Checks: not another format (pickle, zip, LFS pointer, ...); header length within the file
    and below HEADER_CAP; header is a JSON object of {name: {dtype, shape, data_offsets}} with
    known dtypes, non-negative shapes, dtype size * numel == offset span; spans are in the data
    area, do not overlap and cover it exactly. Memory is bounded by HEADER_CAP whatever the file says.
    """
    path = Path(path)
    head, size = _read_head(path)
    cause = _foreign_format(head, size)
    if cause:
        raise _fail(path, cause)
    if size < 8:
        raise _fail(path, f"truncated: {size} bytes, but a safetensors file starts with an 8-byte header length")
    n = int.from_bytes(head[:8], "little")
    if size > 8 and head[8:9] != b"{":
        raise _fail(path, "not a safetensors file: no JSON header after the 8-byte length (garbage or another format)")
    if n > HEADER_CAP:
        raise _fail(path, f"header length {n} exceeds the {HEADER_CAP}-byte limit; corrupt or hostile file")
    if 8 + n > size:
        raise _fail(path, f"truncated or corrupt: header length {n} is beyond the end of the file ({size} bytes)")
    try:
        with open(path, "rb") as f:
            f.seek(8)
            raw = f.read(n)
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(path, f"header is not valid JSON ({type(e).__name__}: {str(e)[:120]}); "
                          "corrupt or not safetensors") from None
    _check_header(path, header, data_len=size - 8 - n)
    return header


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_header(path: Path, header: Any, data_len: int) -> None:
    if not isinstance(header, dict):
        raise _fail(path, "header is JSON but not an object; corrupt or not safetensors")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise _fail(path, "header __metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"tensor '{name}': header entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPE_SIZE:
            raise _fail(path, f"tensor '{name}': unknown dtype {str(dtype)[:20]!r} (valid: {', '.join(_DTYPE_SIZE)})")
        if not (isinstance(shape, list) and len(shape) <= 64 and all(_is_int(d) and d >= 0 for d in shape)):
            raise _fail(path, f"tensor '{name}': shape must be a list of at most 64 non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _fail(path, f"tensor '{name}': data_offsets must be [begin, end] with 0 <= begin <= end")
        need = math.prod(shape) * _DTYPE_SIZE[dtype]
        if need != offsets[1] - offsets[0]:
            raise _fail(path, f"tensor '{name}': {dtype} {shape} needs {need} bytes but data_offsets span "
                              f"{offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    end, last = 0, None
    for begin, stop, name in spans:
        if begin < end:
            raise _fail(path, f"tensors '{last}' and '{name}' overlap in the data area (bytes {begin}..{end})")
        if begin > end:
            raise _fail(path, f"{begin - end} unaccounted bytes before tensor '{name}' in the data area")
        end, last = stop, name
    if end > data_len:
        raise _fail(path, f"truncated: tensor '{last}' ends at data byte {end} but the file holds "
                          f"{data_len} data bytes")
    if end < data_len:
        raise _fail(path, f"{data_len - end} unexpected bytes after the last tensor; corrupt file")


def read_safetensors(path: Path | str) -> dict[str, Tensor]:
    """Load a safetensors file after inspect_safetensors has validated it; CPU tensors."""
    path = Path(path)
    inspect_safetensors(path)
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise _fail(path, f"cannot be read as safetensors ({str(e)[:200]})") from None


def load_weights_file(path: Path | str) -> dict[str, Tensor]:
    """Load user-given weights: a .safetensors file only. Pickles (.pt/.ckpt/.bin) are refused unread."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.safetensors"))
        raise _fail(path, f"is a folder; pass a weights file (safetensors files here: {', '.join(found) or 'none'})")
    return read_safetensors(path)


def _read_json(path: Path) -> Any:
    head, size = _read_head(path)
    cause = _foreign_format(head, size)
    if cause:
        raise _fail(path, cause)
    if size > JSON_CAP:
        raise _fail(path, f"{size} bytes exceeds the {JSON_CAP}-byte limit for JSON files")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(path, f"not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e})") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Manifest and verification
# ---------------------------------------------------------------------------------------------

def read_manifest(ckpt: Path | str) -> dict[str, Any]:
    """Read and validate ckpt/MANIFEST.json (structure only; files are checked by verify_checkpoint)."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise _fail(ckpt, "no such checkpoint")
    if not ckpt.is_dir():
        raise _fail(ckpt, "is a file; a checkpoint is a folder holding MANIFEST.json (for a lone weights file use "
                          "a command option that takes weights)")
    mpath = ckpt / MANIFEST
    if not mpath.exists():
        inner = sorted((p for p in ckpt.iterdir() if _STEP_RE.match(p.name)), reverse=True)
        if inner:
            raise _fail(ckpt, "is a folder of checkpoints, not one checkpoint; pass one of them "
                              f"(newest: {inner[0].name})")
        raise _fail(ckpt, f"has no {MANIFEST}: an interrupted save, or not a torchdiffusion checkpoint")
    m = _read_json(mpath)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _fail(mpath, f"not a torchdiffusion checkpoint manifest (expected \"format\": \"{FORMAT}\")")
    version = m.get("format_version")
    if not _is_int(version) or version < 1:
        raise _fail(mpath, "format_version must be a positive integer")
    if version > FORMAT_VERSION:
        raise _fail(mpath, f"written by a newer torchdiffusion (format version {version}; this one reads up to "
                           f"{FORMAT_VERSION}); upgrade torchdiffusion")
    if not _is_int(m.get("step")) or m["step"] < 0:
        raise _fail(mpath, "step must be a non-negative integer")
    files = m.get("files")
    if not isinstance(files, dict):
        raise _fail(mpath, "\"files\" must map file names to {sha256, size}")
    for name, entry in files.items():
        if not _FILE_RE.match(name):
            raise _fail(mpath, f"lists an unexpected file name {name[:80]!r} "
                               "(plain names ending in .safetensors or .json)")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _SHA_RE.match(entry["sha256"])
                and _is_int(entry.get("size")) and entry["size"] >= 0):
            raise _fail(mpath, f"entry for {name} must be {{\"sha256\": 64 hex digits, \"size\": bytes}}")
    return m


def verify_checkpoint(ckpt: Path | str, *, hashes: bool = True) -> dict[str, Any]:
    """Check a checkpoint is complete: manifest valid, every listed file present, of the listed
    size and (hashes=True) sha256. Returns the manifest; raises CheckpointError naming the file."""
    ckpt = Path(ckpt)
    m = read_manifest(ckpt)
    for name, entry in m["files"].items():
        path = ckpt / name
        head, size = _read_head(path)
        cause = _foreign_format(head, size)
        if cause:
            raise _fail(path, cause)
        if size != entry["size"]:
            raise _fail(path, f"size {size} bytes but {MANIFEST} says {entry['size']} (truncated or modified)")
        if hashes:
            digest = _sha256(path)
            if digest != entry["sha256"]:
                raise _fail(path, f"checksum mismatch: sha256 {digest[:12]}..., {MANIFEST} says "
                                  f"{entry['sha256'][:12]}...; the file is corrupted or was modified")
    return m


def load_checkpoint(path: Path | str, *, verify: bool = True) -> Checkpoint:
    """Load every group and JSON part of a checkpoint folder. verify=False skips the hashes
    (sizes and file structure are still checked)."""
    path = Path(path)
    m = verify_checkpoint(path, hashes=verify)
    ckpt = Checkpoint(path=path, step=m["step"], manifest=m)
    for name in m["files"]:
        stem, ext = name.rsplit(".", 1)
        if ext == "safetensors":
            ckpt.tensors[stem] = read_safetensors(path / name)
        else:
            ckpt.meta[stem] = _read_json(path / name)
    return ckpt


# ---------------------------------------------------------------------------------------------
# Finding, saving and pruning
# ---------------------------------------------------------------------------------------------

def _step_dirs(run_ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Committed-looking step folders, newest first."""
    out = []
    for p in run_ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def _debris(run_ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in run_ckpt_dir.iterdir() if _DEBRIS_RE.match(p.name))


def find_latest(run_ckpt_dir: Path | str, *, verify: bool = True) -> LatestSearch:
    """The newest checkpoint whose manifest verifies; every folder passed over is listed with its reason."""
    run_ckpt_dir = Path(run_ckpt_dir)
    if not run_ckpt_dir.is_dir():
        return LatestSearch(None, [])
    skipped = [(p.name, "temporary folder of an interrupted save") for p in _debris(run_ckpt_dir)]
    for step, p in _step_dirs(run_ckpt_dir):
        try:
            m = verify_checkpoint(p, hashes=verify)
            if m["step"] != step:
                raise _fail(p / MANIFEST, f"says step {m['step']} but the folder is named for step {step}")
        except CheckpointError as e:
            skipped.append((p.name, str(e)))
            continue
        return LatestSearch(p, skipped)
    return LatestSearch(None, skipped)


def resolve_latest(run_ckpt_dir: Path | str, *, verify: bool = True) -> Path | None:
    """Newest complete checkpoint in run_ckpt_dir, or None; incomplete ones are logged and ignored."""
    search = find_latest(run_ckpt_dir, verify=verify)
    for name, reason in search.skipped:
        _log.warning("ignoring checkpoint %s: %s", name, reason)
    return search.path


def _os_cause(e: OSError) -> str:
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    text = e.strerror or str(e) or type(e).__name__
    return f"{text} ({code})" if code else text


def _fsync(path: Path) -> None:
    if os.name != "posix":  # folders cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors(path: Path, group: str, tensors: Mapping[str, Tensor]) -> None:
    prepared, seen = {}, set()
    for key, t in tensors.items():
        if not isinstance(key, str) or not isinstance(t, Tensor):
            raise CheckpointError(f"group '{group}': entries must be str -> Tensor, got {type(key).__name__} -> "
                                  f"{type(t).__name__} for {key!r}")
        t = t.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:  # tied weights: safetensors stores no aliases
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        prepared[key] = t
    safetensors.torch.save_file(prepared, str(path), metadata={"format": "pt"})
    _fsync(path)


def _json_bytes(name: str, value: Any) -> bytes:
    try:
        return (json.dumps(value, indent=1, allow_nan=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot save {name}.json: {e} (JSON parts hold only JSON values with finite "
                              "floats; put tensors in a tensor group)") from None


def _check_finite(run_ckpt_dir: Path, name: str, tensors: Mapping[str, Mapping[str, Tensor]]) -> None:
    """RELIABILITY 23: never write a checkpoint holding NaN or Inf."""
    for group, sd in tensors.items():
        for key, t in sd.items():
            if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
                t = t.detach()
                # Fast path: NaN/Inf propagate through a sum; a non-finite sum (also possible by
                # overflow of finite values) triggers the exact count.
                if bool(torch.isfinite(t.sum())):
                    continue
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    last = resolve_latest(run_ckpt_dir, verify=False)
                    where = f"the last good checkpoint is {last}" if last else "there is no earlier checkpoint"
                    raise CheckpointError(f"refusing to save {name}: tensor '{key}' of {group}.safetensors has "
                                          f"{bad} non-finite value(s) (NaN/Inf); {where}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers are never in use: saves in one process do not overlap
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_debris(run_ckpt_dir: Path) -> None:
    for p in _debris(run_ckpt_dir):
        if not _pid_alive(int(_DEBRIS_RE.match(p.name).group(1))):
            _discard(p)


def _discard(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass


def _replace_pointer(run_ckpt_dir: Path, name: str | None) -> None:
    """Atomically make `latest` read `name` (write a temporary file, rename over); None removes it."""
    latest = run_ckpt_dir / LATEST
    if name is None:
        latest.unlink(missing_ok=True)
        return
    tmp = run_ckpt_dir / f"{LATEST}.tmp-{os.getpid()}"
    try:
        _write_bytes(tmp, (name + "\n").encode())
        os.replace(tmp, latest)
    except OSError:
        _discard(tmp)
        raise


def _read_pointer(run_ckpt_dir: Path) -> str | None:
    try:
        return (run_ckpt_dir / LATEST).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _commit(tmp: Path, final: Path) -> None:
    """Rename tmp -> final and point `latest` at it; on failure put everything back and re-raise."""
    parent = final.parent
    old_pointer = _read_pointer(parent)
    aside = final.with_name(f"{final.name}.old-{os.getpid()}") if final.exists() else None
    if aside:  # re-saving a step: keep the old folder until the new one is in place
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except OSError:
        if aside:
            os.replace(aside, final)
        raise
    pointed = False
    try:
        _fsync(parent)
        _replace_pointer(parent, final.name)
        pointed = True
        _fsync(parent)
    except OSError:
        if pointed:
            try:
                _replace_pointer(parent, old_pointer)
            except OSError:  # cannot restore it: better no pointer than one naming a removed folder
                _discard(parent / LATEST)
        os.replace(final, tmp)  # the caller removes tmp
        if aside:
            os.replace(aside, final)
        raise
    if aside:
        _discard(aside)


def save_checkpoint(
    run_ckpt_dir: Path | str,
    step: int,
    *,
    tensors: Mapping[str, Mapping[str, Tensor]],
    meta: Mapping[str, Any],
    data_fingerprint: str | None = None,
) -> Path:
    """Write run_ckpt_dir/step_XXXXXXXX atomically and point `latest` at it; returns its path.

    tensors: {group: {key: Tensor}} -> <group>.safetensors (e.g. model, ema, optim, rng);
    meta: {name: JSON value} -> <name>.json (e.g. config, trainer, optim, rng).
    Refuses non-finite float tensors before writing anything. On an OS error (disk full, ...)
    removes its temporary files and raises a one-line CheckpointError; the previous checkpoint
    and the `latest` pointer are unchanged. Re-saving an existing step replaces it atomically.
    """
    run_ckpt_dir = Path(run_ckpt_dir)
    if not _is_int(step) or step < 0:
        raise CheckpointError(f"checkpoint step must be a non-negative integer, got {step!r}")
    for part in list(tensors) + list(meta):
        if not (isinstance(part, str) and _PART_RE.match(part)) or part.lower() == "manifest":
            raise CheckpointError(f"checkpoint part name {part!r} must be lower-case letters, digits and _ "
                                  "(e.g. model, ema, optim, config), and not 'manifest'")
    name = checkpoint_name(step)
    _check_finite(run_ckpt_dir, name, tensors)
    blobs = {f"{k}.json": _json_bytes(k, v) for k, v in meta.items()}

    final = run_ckpt_dir / name
    tmp = run_ckpt_dir / f"{name}.tmp-{os.getpid()}"
    try:
        run_ckpt_dir.mkdir(parents=True, exist_ok=True)
        _remove_debris(run_ckpt_dir)
        tmp.mkdir()
        files: dict[str, dict[str, Any]] = {}
        for group, sd in tensors.items():
            path = tmp / f"{group}.safetensors"
            _write_safetensors(path, group, sd)
            files[path.name] = {"sha256": _sha256(path), "size": path.stat().st_size}  # hash what is on disk
        for fname, blob in blobs.items():
            _write_bytes(tmp / fname, blob)
            files[fname] = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "torchdiffusion_version": torchdiffusion.__version__,
            "torch_version": torch.__version__,
            "safetensors_version": safetensors.__version__,
            "data_fingerprint": data_fingerprint,
            "files": files,
        }
        _write_bytes(tmp / MANIFEST, _json_bytes("MANIFEST", manifest))
        _fsync(tmp)
        _commit(tmp, final)
    except (OSError, safetensors.SafetensorError) as e:
        _discard(tmp)
        cause = _os_cause(e) if isinstance(e, OSError) else str(e)[:200]
        raise CheckpointError(f"{run_ckpt_dir}: could not save {name}: {cause}; nothing was changed "
                              "(the previous checkpoint is intact)") from None
    except BaseException:
        _discard(tmp)
        raise
    return final


def prune(run_ckpt_dir: Path | str, keep_last: int, *, verify: bool = True, keep_steps=()) -> list[Path]:
    """Delete committed checkpoints older than the keep_last newest complete ones; returns what was deleted.
    Checkpoints of keep_steps are neither counted nor deleted (kept for good, e.g. an autoguidance guide).

    An old checkpoint goes only once keep_last newer ones verify (RELIABILITY 10); folders without
    a manifest are left alone. Each is renamed before removal, so a crash mid-delete leaves no
    folder that looks like a checkpoint.
    """
    if not _is_int(keep_last) or keep_last < 1:
        raise ConfigError(f"keep_last must be an integer >= 1 (the number of checkpoints to keep), got {keep_last!r}")
    run_ckpt_dir = Path(run_ckpt_dir)
    if not run_ckpt_dir.is_dir():
        return []
    kept, deleted = 0, []
    for step, p in _step_dirs(run_ckpt_dir):
        if step in keep_steps:
            continue
        if kept < keep_last:
            try:
                verify_checkpoint(p, hashes=verify)
                kept += 1
            except CheckpointError as e:
                _log.warning("not counting checkpoint %s as kept: %s", p.name, e)
            continue
        if (p / MANIFEST).is_file():
            doomed = p.with_name(f"{p.name}.del-{os.getpid()}")
            try:
                os.replace(p, doomed)
            except OSError as e:
                raise CheckpointError(f"{p}: could not delete old checkpoint: {_os_cause(e)}") from None
            _discard(doomed)
            deleted.append(p)
    return deleted

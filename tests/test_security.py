"""Untrusted files: damaged or hostile weights and checkpoints fail with one line, pickles never run.

RELIABILITY 4 (truncated / empty / garbage / LFS pointer), 5 (flipped byte -> checksum mismatch),
14 (malicious pickle: the marker is never created), 15 (no unsafe loaders in the source),
16 (hostile safetensors headers: one line, bounded memory).
"""
from __future__ import annotations

import ast
import importlib
import io
import json
import os
import pickle
import random
import struct
import tracemalloc
from pathlib import Path

import pytest
import safetensors.torch
import torch

from torchdiffusion.errors import CheckpointError
from torchdiffusion.train import checkpoint as ck

SRC = Path(__file__).resolve().parents[1] / "src" / "torchdiffusion"


def _st(header: dict | str | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors-shaped file: u64 LE header length, header, data area."""
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _valid() -> bytes:
    return safetensors.torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)})


def _one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and len(msg) < 400, msg
    return msg


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HOSTILE = {
    "empty": (b"", "empty file"),
    "truncated_by_one_byte": (_valid()[:-1], "truncated: tensor"),
    "truncated_in_header": (_valid()[:20], "truncated or corrupt: header length"),
    "shorter_than_length": (b"\x05\x00\x00", "truncated: 3 bytes"),
    "garbage": (bytes(random.Random(0).randrange(256) for _ in range(4096)), "not a safetensors file"),
    "lfs_pointer": (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 1234\n", "Git LFS pointer"),
    "html_page": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "HTML"),
    "npy": (b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'}", "NumPy"),
    "length_beyond_file": (_st({"w": F32}, bytes(8), length=1000), "beyond the end of the file"),
    "huge_header_length": (_st({"w": F32}, bytes(8), length=2**62), "exceeds the 100000000-byte limit"),
    "overlapping_offsets": (_st({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, bytes(12)), "overlap"),
    "gap_in_data": (_st({"a": F32, "b": {**F32, "data_offsets": [12, 20]}}, bytes(20)), "unaccounted bytes"),
    "offsets_beyond_data": (_st({"a": {**F32, "shape": [100], "data_offsets": [0, 400]}}, bytes(8)),
                            "truncated: tensor"),
    "trailing_bytes": (_st({"a": F32}, bytes(9)), "unexpected bytes after the last tensor"),
    "span_mismatch": (_st({"a": {**F32, "shape": [3]}}, bytes(8)), "needs 12 bytes but data_offsets span 8"),
    "huge_shape": (_st({"a": {**F32, "shape": [2**62, 2**62]}}, bytes(8)), "data_offsets span 8"),
    "unknown_dtype": (_st({"a": {**F32, "dtype": "F128"}}, bytes(8)), "unknown dtype"),
    "negative_shape": (_st({"a": {**F32, "shape": [-2]}}, bytes(8)), "shape must be"),
    "bad_offsets": (_st({"a": {**F32, "data_offsets": [8, 0]}}, bytes(8)), "data_offsets must be"),
    "extra_field": (_st({"a": {**F32, "code": "x"}}, bytes(8)), "exactly dtype, shape and data_offsets"),
    "duplicate_names": (_st('{"a":' + json.dumps(F32) + ',"a":' + json.dumps(F32) + "}", bytes(8)), "duplicate key"),
    "deeply_nested": (_st('{"a":' + "[" * 200_000 + "]" * 200_000 + "}"), "not valid JSON"),
    "bad_metadata": (_st({"__metadata__": {"k": 1}}), "__metadata__"),
    "not_utf8": (_st(b"{\xff\xfe}"), "not valid JSON"),
    "broken_json": (_st("{]"), "not valid JSON"),
    "array_header": (_st("[]"), "not a safetensors file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_or_damaged_weights_file_fails_with_one_line(tmp_path, case):
    data, cause = HOSTILE[case]
    path = tmp_path / "weights.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        ck.load_weights_file(path)
    assert cause in _one_line_naming(e, path)


def test_valid_files_pass_including_a_header_length_that_starts_like_a_pickle(tmp_path):
    path = tmp_path / "ok.safetensors"
    for pad in range(0, 700, 7):  # header lengths 0x0280.. begin with the bytes 80 02 of a pickle
        data = safetensors.torch.save({"w": torch.ones(3)}, metadata={"pad": "x" * pad})
        path.write_bytes(data)
        assert torch.equal(ck.load_weights_file(path)["w"], torch.ones(3))
        if data[:2] == b"\x80\x02":
            break
    else:
        pytest.fail("no padding gave a header length starting with 80 02")
    path.write_bytes(safetensors.torch.save({}))
    assert ck.load_weights_file(path) == {}
    with pytest.raises(CheckpointError, match="is a folder"):
        ck.load_weights_file(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        ck.load_weights_file(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("claimed", [2**62, 99_000_000])
def test_hostile_header_length_costs_no_memory(tmp_path, claimed):
    path = tmp_path / "bomb.safetensors"
    path.write_bytes(_st({"w": F32}, bytes(8), length=claimed))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError):
            ck.load_weights_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak


# ---------------------------------------------------------------------------------------------
# damaged checkpoints (RELIABILITY 4, 5)
# ---------------------------------------------------------------------------------------------

@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    return ck.save_checkpoint(tmp_path / "ckpts", 4, tensors={"model": model.state_dict(), "ema": model.state_dict()},
                              meta={"config": {"width": 8}, "trainer": {"step": 4}})


def _flip_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's data, past the header
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped_byte": ("model.safetensors", _flip_data_byte, "checksum mismatch"),
    "truncated_by_one_byte": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-1]), "truncated"),
    "emptied": ("ema.safetensors", lambda p: p.write_bytes(b""), "empty file"),
    "garbage": ("ema.safetensors", lambda p: p.write_bytes(os.urandom(p.stat().st_size)), "checksum mismatch"),
    "lfs_pointer": ("model.safetensors", lambda p: p.write_bytes(b"version https://git-lfs.github.com/spec/v1\n"
                                                                 b"oid sha256:00\nsize 1\n"), "Git LFS pointer"),
    "json_edited": ("config.json", lambda p: p.write_text('{\n "width": 9\n}\n'), "checksum mismatch"),
    "manifest_garbage": ("MANIFEST.json", lambda p: p.write_bytes(b"\x00{garbage"), "not valid JSON"),
    "file_deleted": ("trainer.json", lambda p: p.unlink(), "no such file"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_fails_naming_the_file(checkpoint, case):
    name, damage, cause = DAMAGE[case]
    damage(checkpoint / name)
    with pytest.raises(CheckpointError) as e:
        ck.load_checkpoint(checkpoint)
    msg = _one_line_naming(e, checkpoint / name)
    assert cause in msg
    assert ck.resolve_latest(checkpoint.parent) is None  # and it is never taken for the latest


def test_verify_false_skips_hashes_but_not_structure(checkpoint):
    _flip_data_byte(checkpoint / "model.safetensors")
    ck.load_checkpoint(checkpoint, verify=False)  # the flip is inside data: only the hash can see it
    (checkpoint / "ema.safetensors").write_bytes((checkpoint / "ema.safetensors").read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="ema.safetensors: size"):
        ck.load_checkpoint(checkpoint, verify=False)


# ---------------------------------------------------------------------------------------------
# malicious pickles (RELIABILITY 14)
# ---------------------------------------------------------------------------------------------

class _Evil:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _evil_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    files = {}
    for proto in range(0, pickle.HIGHEST_PROTOCOL + 1):
        files[f"pickle_protocol_{proto}"] = tmp_path / f"evil_p{proto}.pkl"
        files[f"pickle_protocol_{proto}"].write_bytes(pickle.dumps(_Evil(marker), protocol=proto))
    files["torch_save_zip"] = tmp_path / "evil.pt"
    torch.save({"state_dict": _Evil(marker)}, files["torch_save_zip"])
    files["torch_save_legacy"] = tmp_path / "evil.ckpt"
    torch.save(_Evil(marker), files["torch_save_legacy"], _use_new_zipfile_serialization=False)
    files["named_safetensors"] = tmp_path / "evil.safetensors"
    files["named_safetensors"].write_bytes(pickle.dumps(_Evil(marker)))
    return files


def test_the_payload_is_live(tmp_path):
    """Control: unpickling the payload does create the marker, so the tests below can fail."""
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control)))
    assert control.exists()


def test_malicious_pickles_are_refused_unread(tmp_path):
    marker = tmp_path / "PWNED"
    for kind, path in _evil_files(tmp_path, marker).items():
        with pytest.raises(CheckpointError) as e:
            ck.load_weights_file(path)
        msg = _one_line_naming(e, path)
        assert "pickle" in msg and "never loaded" in msg, kind
    assert not marker.exists()


@pytest.mark.parametrize("verify", [True, False])
def test_pickle_inside_a_checkpoint_is_refused(checkpoint, verify):
    marker = checkpoint.parent / "PWNED"
    for name, write in [("model.safetensors", lambda p: p.write_bytes(pickle.dumps(_Evil(marker)))),
                        ("ema.safetensors", lambda p: torch.save(_Evil(marker), p))]:
        original = (checkpoint / name).read_bytes()
        write(checkpoint / name)
        with pytest.raises(CheckpointError) as e:
            ck.load_checkpoint(checkpoint, verify=verify)
        assert "pickle" in _one_line_naming(e, checkpoint / name)
        (checkpoint / name).write_bytes(original)
    ck.load_checkpoint(checkpoint)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# the source has no unsafe loaders (RELIABILITY 15)
# ---------------------------------------------------------------------------------------------

_NEVER = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "cPickle.load",
          "cPickle.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
          "marshal.load", "marshal.loads", "shelve.open", "pandas.read_pickle", "yaml.unsafe_load",
          "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all", "torch.serialization._load"}
_PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
# The one place a pickle is read: the MNIST package file, through an Unpickler subclass whose
# find_class allows only numpy's array globals (tested by behaviour below).
_RESTRICTED_UNPICKLER_DIR = "data"


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str, position: int | None = None) -> ast.AST | None:
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return call.args[position] if position is not None and len(call.args) > position else None


def unsafe_loads(source: str, relpath: str) -> list[str]:
    """Every use of a code-running loader in one module: 'path:line: what'."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    found = []
    in_data = relpath.split("/")[0] == _RESTRICTED_UNPICKLER_DIR
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.split(".")[0] in _PICKLE_MODULES and not (in_data and a.name == "pickle"):
                    found.append(f"{relpath}:{node.lineno}: imports {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            if node.module.split(".")[0] in _PICKLE_MODULES:
                found.append(f"{relpath}:{node.lineno}: imports from {node.module}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {_dotted(b, aliases) for b in node.bases}
            if bases & {"pickle.Unpickler", "_pickle.Unpickler"}:
                methods = {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
                restricted = "find_class" in methods and any(isinstance(n, ast.Raise)
                                                             for n in ast.walk(methods["find_class"]))
                if not (in_data and restricted):
                    found.append(f"{relpath}:{node.lineno}: unpickler {node.name} without a restricting find_class"
                                 f"{'' if in_data else ' (allowed only in data/)'}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if name is None:
            continue
        where = f"{relpath}:{node.lineno}: {name}("
        if name in _NEVER:
            found.append(where + ") runs code from the file")
        elif name in ("torch.load", "torch.serialization.load"):
            wo = _kw(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(where + ") without weights_only=True")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader", 1)
            loader_name = _dotted(loader, aliases) if loader is not None else None
            if not (loader_name and loader_name.split(".")[-1] in ("SafeLoader", "CSafeLoader")):
                found.append(where + ") without Loader=yaml.SafeLoader")
        elif name in ("numpy.load", "np.load"):
            ap = _kw(node, "allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                found.append(where + ") with allow_pickle")
    return found


@pytest.mark.parametrize("code, expected", [
    ("import torch\ntorch.load(f)", "without weights_only=True"),
    ("import torch\ntorch.load(f, weights_only=False)", "without weights_only=True"),
    ("import torch as th\nth.load(f)", "torch.load("),
    ("from torch import load\nload(f)", "torch.load("),
    ("import pickle\npickle.loads(b)", "imports pickle"),
    ("from pickle import loads as l\nl(b)", "pickle.loads() runs code"),
    ("import yaml\nyaml.load(s)", "without Loader"),
    ("import yaml\nyaml.load(s, Loader=yaml.FullLoader)", "without Loader"),
    ("import yaml\nyaml.unsafe_load(s)", "runs code"),
    ("import numpy as np\nnp.load(f, allow_pickle=True)", "allow_pickle"),
    ("import pickle\nclass U(pickle.Unpickler):\n    pass", "without a restricting find_class"),
])
def test_the_scanner_finds_unsafe_loaders(code, expected):
    assert any(expected in f for f in unsafe_loads(code, "train/x.py")), unsafe_loads(code, "train/x.py")


@pytest.mark.parametrize("code", [
    "import torch\ntorch.load(f, weights_only=True)",
    "import yaml\nyaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\nyaml.load(s, yaml.CSafeLoader)",
    "import numpy as np\nnp.load(f)",
    "import json\njson.load(f)",
])
def test_the_scanner_accepts_safe_loaders(code):
    assert unsafe_loads(code, "train/x.py") == []


def test_source_tree_has_no_unsafe_loaders():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        found += unsafe_loads(path.read_text(encoding="utf-8"), path.relative_to(SRC).as_posix())
    assert found == [], "\n".join(found)


def test_restricted_unpicklers_refuse_code(tmp_path):
    """Each Unpickler subclass in data/ must refuse the payload (behaviour, not just the AST check)."""
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Evil(marker))
    checked = 0
    for path in sorted((SRC / _RESTRICTED_UNPICKLER_DIR).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and any(_dotted(b, {}) == "pickle.Unpickler" for b in node.bases):
                module = "torchdiffusion." + path.relative_to(SRC).with_suffix("").as_posix().replace("/", ".")
                cls = getattr(importlib.import_module(module), node.name)
                with pytest.raises(pickle.UnpicklingError):
                    cls(io.BytesIO(payload)).load()
                checked += 1
    assert not marker.exists()
    if checked == 0:
        pytest.skip("no restricted unpickler in the data package")

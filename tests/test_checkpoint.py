"""Checkpoint storage: bit-exact round trips, atomic commits under injected failures, retention.

RELIABILITY 1 (state round trip), 3 (crash in every phase of a save), 10 (retention), 12 (disk
full), 13 (a format-1 checkpoint keeps loading), 23 (no non-finite tensors on disk).
"""
from __future__ import annotations

import base64
import errno
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchdiffusion.errors import CheckpointError, ConfigError
from torchdiffusion.train import checkpoint as ck
from torchdiffusion.train.state import (capture_rng, flatten_optimizer_state, flatten_state, restore_rng,
                                        unflatten_optimizer_state, unflatten_state)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.SiLU(),
                               torch.nn.Conv2d(4, 2, 1))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(3, 2, 5, 5, generator=g)
        loss = (model(x) - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _trained(steps: int = 3):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, amsgrad=True)
    _train(model, opt, steps, seed=1)
    ema = {k: v.detach().clone() * 0.5 for k, v in model.state_dict().items()}
    return model, opt, ema


def _save(run: Path, step: int, model, opt, ema, **extra) -> Path:
    ot, oj = flatten_optimizer_state(opt.state_dict())
    rt, rj = capture_rng()
    return ck.save_checkpoint(
        run, step,
        tensors={"model": model.state_dict(), "ema": ema, "optim": ot, "rng": rt},
        meta={"config": {"model": {"channels": 4}, "lr": 1e-2}, "trainer": {"step": step, "nan_skips": 0},
              "optim": oj, "rng": rj},
        **extra)


def _same(a, b) -> bool:
    """Structural equality that compares tensors bit for bit (dtype, shape, values, NaNs included)."""
    if isinstance(a, torch.Tensor):
        def raw(t):
            return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else t
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(raw(a), raw(b)))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict) and isinstance(b, dict):  # OrderedDict vs dict: same mapping
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _listing(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir())


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------

def test_round_trip_is_bit_exact_and_training_continues_identically(tmp_path):
    model, opt, ema = _trained()
    path = _save(tmp_path, 3, model, opt, ema, data_fingerprint="sha256:feed")
    c = ck.load_checkpoint(path)

    assert c.step == 3 and c.config == {"model": {"channels": 4}, "lr": 1e-2}
    assert c.meta["trainer"] == {"step": 3, "nan_skips": 0}
    assert c.data_fingerprint == "sha256:feed"
    assert _same(c.tensors["model"], model.state_dict())
    assert _same(c.tensors["ema"], ema)
    assert _same(unflatten_optimizer_state(c.tensors["optim"], c.meta["optim"]), opt.state_dict())

    # Resume into fresh objects; 4 more steps must match the uninterrupted run bit for bit.
    model2 = _model(seed=123)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    model2.load_state_dict(c.tensors["model"])
    opt2.load_state_dict(unflatten_optimizer_state(c.tensors["optim"], c.meta["optim"]))
    _train(model, opt, 4, seed=7)
    _train(model2, opt2, 4, seed=7)
    assert _same(model.state_dict(), model2.state_dict())
    assert _same(opt.state_dict(), opt2.state_dict())


def test_manifest_lists_every_file_with_hash_size_and_versions(tmp_path):
    model, opt, ema = _trained(1)
    path = _save(tmp_path, 40, model, opt, ema, data_fingerprint="abc")
    assert path.name == "step_00000040" and (tmp_path / "latest").read_text() == "step_00000040\n"
    m = json.loads((path / "MANIFEST.json").read_text())
    assert m["format"] == ck.FORMAT and m["format_version"] == ck.FORMAT_VERSION and m["step"] == 40
    assert m["torch_version"] == torch.__version__ and m["data_fingerprint"] == "abc"
    on_disk = {p.name for p in path.iterdir()} - {"MANIFEST.json"}
    assert set(m["files"]) == on_disk == {"model.safetensors", "ema.safetensors", "optim.safetensors",
                                          "rng.safetensors", "config.json", "trainer.json", "optim.json", "rng.json"}
    import hashlib
    for name, entry in m["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _trees():
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=5),
                       st.floats(allow_nan=True, allow_infinity=True),
                       st.builds(lambda n, d: torch.randn(n, dtype=torch.float64).to(d),
                                 st.integers(0, 3), st.sampled_from([torch.float32, torch.float16, torch.bfloat16])))
    keys = st.one_of(st.text(max_size=4), st.integers(-3, 3), st.sampled_from(["__tensor__", "__tuple__", "__dict__"]))
    return st.recursive(leaves, lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.tuples(kids, kids), st.dictionaries(keys, kids, max_size=3)), max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(_trees())
def test_flatten_state_round_trips_any_tree_through_json(tree):
    tensors, skeleton = flatten_state(tree)
    skeleton = json.loads(json.dumps(skeleton, allow_nan=False))  # strict JSON on disk
    assert _same(unflatten_state(tensors, skeleton), tree)


def test_flatten_state_names_the_path_of_an_unstorable_value():
    with pytest.raises(CheckpointError, match=r"param_groups/0/fn.*function"):
        flatten_state({"param_groups": [{"fn": lambda: 0}]})


def test_rng_streams_continue_identically_after_restore(tmp_path):
    gen = torch.Generator().manual_seed(5)
    npgen = np.random.default_rng(6)
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # leave cached Gaussians in both states

    def draw():
        return (torch.rand(4), torch.randn(3, generator=gen), random.random(), random.gauss(0, 1),
                np.random.standard_normal(2).tolist(), npgen.random(3).tolist())

    rt, rj = capture_rng({"noise": gen}, {"data": npgen})
    path = ck.save_checkpoint(tmp_path, 0, tensors={"rng": rt}, meta={"rng": rj})
    expected = draw()
    draw()  # move every stream on
    c = ck.load_checkpoint(path)
    assert restore_rng(c.tensors["rng"], c.meta["rng"], {"noise": gen}, {"data": npgen}) == []
    assert _same(draw(), expected)


def test_restore_rng_names_a_generator_that_was_not_saved():
    rt, rj = capture_rng({"noise": torch.Generator()})
    with pytest.raises(CheckpointError, match=r"no generator 'data' \(saved: noise\)"):
        restore_rng(rt, rj, {"data": torch.Generator()})
    assert restore_rng(rt, rj) == ["generator/noise"]  # saved but not restored: reported


def test_tied_weights_are_saved_once_each(tmp_path):
    w = torch.randn(3, 3)
    path = ck.save_checkpoint(tmp_path, 1, tensors={"model": {"a": w, "b": w, "c": w[1]}}, meta={})
    got = ck.load_checkpoint(path).tensors["model"]
    assert torch.equal(got["a"], w) and torch.equal(got["b"], w) and torch.equal(got["c"], w[1])


# ---------------------------------------------------------------------------------------------
# numerics guard, names
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensors_are_refused_before_anything_is_written(tmp_path, bad):
    model, opt, ema = _trained(1)
    good = _save(tmp_path, 10, model, opt, ema)
    before = _listing(tmp_path)
    broken = dict(ema)
    broken["3.bias"] = broken["3.bias"].clone()
    broken["3.bias"][1] = bad
    with pytest.raises(CheckpointError) as e:
        _save(tmp_path, 20, model, opt, broken)
    msg = str(e.value)
    assert "'3.bias'" in msg and "ema.safetensors" in msg and "non-finite" in msg and str(good) in msg
    assert "\n" not in msg
    assert _listing(tmp_path) == before


def test_finite_tensors_whose_sum_overflows_are_saved(tmp_path):
    big = {"a": torch.full((10,), 3e38), "h": torch.full((10,), 6e4, dtype=torch.float16)}
    path = ck.save_checkpoint(tmp_path, 1, tensors={"model": big}, meta={})
    assert _same(ck.load_checkpoint(path).tensors["model"], big)


def test_bad_part_names_and_json_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="part name '../x'"):
        ck.save_checkpoint(tmp_path, 1, tensors={"../x": {}}, meta={})
    with pytest.raises(CheckpointError, match="trainer.json"):
        ck.save_checkpoint(tmp_path, 1, tensors={}, meta={"trainer": {"loss": float("nan")}})
    with pytest.raises(CheckpointError, match="non-negative integer"):
        ck.save_checkpoint(tmp_path, -1, tensors={}, meta={})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# atomic commit under injected failures (RELIABILITY 3, 12)
# ---------------------------------------------------------------------------------------------

def _count_calls(monkeypatch, target, name, fn):
    calls = []
    real = getattr(target, name)

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(target, name, counting)
    fn()
    monkeypatch.setattr(target, name, real)
    return len(calls)


def _fail_nth(monkeypatch, target, name, n):
    real, seen = getattr(target, name), [0]

    def failing(*a, **k):
        seen[0] += 1
        if seen[0] == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(target, name, failing)


def _partial_save_file(tensors, filename, metadata=None):  # writes half a file, then the disk is full
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_in_every_phase_leaves_previous_checkpoint_and_no_debris(tmp_path, monkeypatch):
    model, opt, ema = _trained(1)
    first = _save(tmp_path / "probe", 1, model, opt, ema)
    n_fsync = _count_calls(monkeypatch, os, "fsync", lambda: _save(tmp_path / "probe", 2, model, opt, ema))
    n_replace = _count_calls(monkeypatch, os, "replace", lambda: _save(tmp_path / "probe", 3, model, opt, ema))
    n_mkdir = 2  # the run folder, the temporary folder
    assert n_fsync >= 10 and n_replace >= 2, (n_fsync, n_replace)
    del first

    run = tmp_path / "run"
    previous = _save(run, 10, model, opt, ema)
    cases = ([(os, "fsync", i) for i in range(1, n_fsync + 1)] + [(os, "replace", i) for i in range(1, n_replace + 1)]
             + [(Path, "mkdir", i) for i in range(1, n_mkdir + 1)] + [(safetensors.torch, "save_file", None)])
    for target, name, n in cases:
        with monkeypatch.context() as mp:
            if n is None:
                mp.setattr(target, name, _partial_save_file)
            else:
                _fail_nth(mp, target, name, n)
            with pytest.raises(CheckpointError) as e:
                _save(run, 20, model, opt, ema)
        msg = str(e.value)
        assert "step_00000020" in msg and "No space left on device (ENOSPC)" in msg and "\n" not in msg, (name, n)
        assert _listing(run) == ["latest", "step_00000010"], (name, n)
        assert (run / "latest").read_text() == "step_00000010\n", (name, n)
        assert ck.resolve_latest(run) == previous, (name, n)
    ck.load_checkpoint(previous)
    assert _save(run, 20, model, opt, ema) == ck.resolve_latest(run)  # and the disk is usable again


def test_failure_while_resaving_a_step_keeps_the_old_copy(tmp_path, monkeypatch):
    model, opt, ema = _trained(1)
    path = _save(tmp_path, 5, model, opt, ema)
    old = (path / "model.safetensors").read_bytes()
    with monkeypatch.context() as mp:
        _fail_nth(mp, os, "replace", 3)  # aside, rename into place, then the `latest` pointer fails
        with pytest.raises(CheckpointError):
            _save(tmp_path, 5, _model(seed=9), opt, ema)
    assert _listing(tmp_path) == ["latest", "step_00000005"]
    assert (path / "model.safetensors").read_bytes() == old
    _save(tmp_path, 5, _model(seed=9), opt, ema)  # re-saving a step replaces it
    assert (path / "model.safetensors").read_bytes() != old and ck.resolve_latest(tmp_path) == path


def test_latest_skips_incomplete_folders_and_names_them(tmp_path):
    model, opt, ema = _trained(1)
    _save(tmp_path, 10, model, opt, ema)
    good = _save(tmp_path, 20, model, opt, ema)
    corrupt = _save(tmp_path, 30, model, opt, ema)
    data = bytearray((corrupt / "optim.safetensors").read_bytes())
    data[-1] ^= 1  # one flipped bit in tensor data
    (corrupt / "optim.safetensors").write_bytes(bytes(data))
    no_manifest = _save(tmp_path, 40, model, opt, ema)
    (no_manifest / "MANIFEST.json").unlink()
    (tmp_path / "step_00000050.tmp-4194304").mkdir()  # a crashed save's temporary folder
    search = ck.find_latest(tmp_path)
    assert search.path == good
    reasons = dict(search.skipped)
    assert set(reasons) == {"step_00000030", "step_00000040", "step_00000050.tmp-4194304"}
    assert "optim.safetensors" in reasons["step_00000030"]
    assert "MANIFEST.json" in reasons["step_00000040"]
    assert ck.resolve_latest(tmp_path) == good
    assert ck.resolve_latest(tmp_path / "nowhere") is None


def test_next_save_removes_debris_of_dead_processes_only(tmp_path):
    model, opt, ema = _trained(1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"step_00000007.tmp-{dead.pid}").mkdir(parents=True)
    (tmp_path / f"latest.tmp-{dead.pid}").write_text("x")
    alive = tmp_path / f"step_00000008.tmp-{os.getppid()}"
    alive.mkdir()
    _save(tmp_path, 9, model, opt, ema)
    assert _listing(tmp_path) == ["latest", alive.name, "step_00000009"]


# ---------------------------------------------------------------------------------------------
# retention (RELIABILITY 10)
# ---------------------------------------------------------------------------------------------

def test_prune_keeps_the_newest_complete_ones(tmp_path):
    model, opt, ema = _trained(1)
    for step in (10, 20, 30, 40, 50):
        _save(tmp_path, step, model, opt, ema)
    # The newest is damaged: it does not count, and is not deleted either.
    (tmp_path / "step_00000050" / "ema.safetensors").write_bytes(b"")
    deleted = ck.prune(tmp_path, keep_last=2)
    assert [p.name for p in deleted] == ["step_00000020", "step_00000010"]
    assert _listing(tmp_path) == ["latest", "step_00000030", "step_00000040", "step_00000050"]
    assert ck.prune(tmp_path, keep_last=2) == []
    assert [p.name for p in ck.prune(tmp_path, keep_last=1)] == ["step_00000030"]
    with pytest.raises(ConfigError, match="keep_last"):
        ck.prune(tmp_path, keep_last=0)


def test_prune_never_deletes_when_nothing_newer_is_complete(tmp_path):
    model, opt, ema = _trained(1)
    old = _save(tmp_path, 10, model, opt, ema)
    new = _save(tmp_path, 20, model, opt, ema)
    (new / "MANIFEST.json").unlink()  # e.g. copied over without its manifest
    assert ck.prune(tmp_path, keep_last=1) == [] and old.exists()


# ---------------------------------------------------------------------------------------------
# loading errors and format compatibility
# ---------------------------------------------------------------------------------------------

def test_load_errors_are_one_line_and_name_the_path(tmp_path):
    model, opt, ema = _trained(1)
    path = _save(tmp_path, 10, model, opt, ema)
    cases = [(tmp_path / "missing", "no such checkpoint"),
             (path / "model.safetensors", "is a file"),
             (tmp_path, "folder of checkpoints.*newest: step_00000010")]
    for p, pattern in cases:
        with pytest.raises(CheckpointError, match=pattern) as e:
            ck.load_checkpoint(p)
        assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)

    m = json.loads((path / "MANIFEST.json").read_text())
    for edit, pattern in [({"format_version": 99}, "newer torchdiffusion"),
                          ({"format": "other"}, "not a torchdiffusion checkpoint"),
                          ({"files": {"../../etc/passwd": {"sha256": "0" * 64, "size": 1}}}, "unexpected file name"),
                          ({"files": {"model.safetensors": {"sha256": "x", "size": 1}}}, "64 hex digits")]:
        (path / "MANIFEST.json").write_text(json.dumps({**m, **edit}))
        with pytest.raises(CheckpointError, match=pattern):
            ck.load_checkpoint(path)
    (path / "MANIFEST.json").write_text(json.dumps(m))
    (path / "trainer.json").unlink()
    with pytest.raises(CheckpointError, match=r"trainer.json: no such file"):
        ck.load_checkpoint(path)


# A checkpoint written by format version 1 (torchdiffusion 0.1.0): a 2x2 linear model with its
# EMA, AdamW state after one step, config and trainer parts. It must keep loading (RELIABILITY 13).
V1_FIXTURE = {
    "MANIFEST.json": (
        "ewogImZvcm1hdCI6ICJ0b3JjaGRpZmZ1c2lvbi1jaGVja3BvaW50IiwKICJmb3JtYXRfdmVyc2lvbiI6IDEsCiAic3RlcCI6"
        "IDEsCiAidG9yY2hkaWZmdXNpb25fdmVyc2lvbiI6ICIwLjEuMCIsCiAidG9yY2hfdmVyc2lvbiI6ICIyLjEzLjArY3B1IiwK"
        "ICJzYWZldGVuc29yc192ZXJzaW9uIjogIjAuOC4wIiwKICJkYXRhX2ZpbmdlcnByaW50IjogbnVsbCwKICJmaWxlcyI6IHsK"
        "ICAibW9kZWwuc2FmZXRlbnNvcnMiOiB7CiAgICJzaGEyNTYiOiAiNTM1MjA4MTJjMTE2YjdjMzNiNTE1NDYzNTNlMjJkZjJh"
        "ODk2NWI5NjlmNmRkYjdjY2E3ZDYxMzA3NGE5ZTI4MyIsCiAgICJzaXplIjogMTIwCiAgfSwKICAiZW1hLnNhZmV0ZW5zb3Jz"
        "IjogewogICAic2hhMjU2IjogImZkOTIyZmZlYzNiN2UyMDVjMjc3ZjVhNzZhOWU0ZGMzZDg5ZTFkZWZkMTEzMmNiMDczZGQy"
        "ZTkwZWIxZDI0MjUiLAogICAic2l6ZSI6IDEyMAogIH0sCiAgIm9wdGltLnNhZmV0ZW5zb3JzIjogewogICAic2hhMjU2Ijog"
        "IjFhZDU0OTYxM2U4ZmE2ODBlMmU3MDhhMTQyNDRhZDM0N2VlMjExM2QwMWE2Nzk0MjBmNDJjYTQ4ZTJhYmI4Y2QiLAogICAi"
        "c2l6ZSI6IDI5MgogIH0sCiAgImNvbmZpZy5qc29uIjogewogICAic2hhMjU2IjogIjk5ZmI1MjAwNTRmMTczMGRmNTFkMThh"
        "ZWUzNDNhNzA1YjFlMzc3M2E4ZGEzY2U5ZjgxNjZlOWQ4YTk0NWYxMWQiLAogICAic2l6ZSI6IDU1CiAgfSwKICAidHJhaW5l"
        "ci5qc29uIjogewogICAic2hhMjU2IjogImYwOTI2NmJhYWMzMWZlY2Y5YWE5ZTY0MzE5NDgwNWFkMjM0NTJmYTEwNWE1MjUx"
        "ZmVmNjE0ZDUxYzVkZTBjNWQiLAogICAic2l6ZSI6IDE1CiAgfSwKICAib3B0aW0uanNvbiI6IHsKICAgInNoYTI1NiI6ICI2"
        "NDU4MThmYjRkOGZlYmE1ZmJlNzIxYWU0OGM2MmEwODA5MzA2MDY5NjNkMGUwZjM1OGY3YTJhYjZhNjdlNTdhIiwKICAgInNp"
        "emUiOiA2MDgKICB9CiB9Cn0K"
    ),
    "config.json": (
        "ewogIm1vZGVsIjogewogICJraW5kIjogImxpbmVhciIsCiAgImZlYXR1cmVzIjogMgogfQp9Cg=="
    ),
    "ema.safetensors": (
        "YAAAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJmb3JtYXQiOiJwdCJ9LCJ3ZWlnaHQiOnsiZHR5cGUiOiJGMzIiLCJzaGFwZSI6"
        "WzIsMl0sImRhdGFfb2Zmc2V0cyI6WzAsMTZdfX0gICAAAIA+AAAAvwAAgD8AAAA+"
    ),
    "model.safetensors": (
        "YAAAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJmb3JtYXQiOiJwdCJ9LCJ3ZWlnaHQiOnsiZHR5cGUiOiJGMzIiLCJzaGFwZSI6"
        "WzIsMl0sImRhdGFfb2Zmc2V0cyI6WzAsMTZdfX0gICAAAAA/AACAvwAAAEAAAIA+"
    ),
    "optim.json": (
        "ewogInN0YXRlIjogewogICJfX2RpY3RfXyI6IFsKICAgWwogICAgMCwKICAgIHsKICAgICAic3RlcCI6IHsKICAgICAgIl9f"
        "dGVuc29yX18iOiAic3RhdGUvMC9zdGVwIgogICAgIH0sCiAgICAgImV4cF9hdmciOiB7CiAgICAgICJfX3RlbnNvcl9fIjog"
        "InN0YXRlLzAvZXhwX2F2ZyIKICAgICB9LAogICAgICJleHBfYXZnX3NxIjogewogICAgICAiX190ZW5zb3JfXyI6ICJzdGF0"
        "ZS8wL2V4cF9hdmdfc3EiCiAgICAgfQogICAgfQogICBdCiAgXQogfSwKICJwYXJhbV9ncm91cHMiOiBbCiAgewogICAibHIi"
        "OiAwLjAwMSwKICAgImJldGFzIjogewogICAgIl9fdHVwbGVfXyI6IFsKICAgICAwLjksCiAgICAgMC45OTkKICAgIF0KICAg"
        "fSwKICAgImVwcyI6IDFlLTA4LAogICAid2VpZ2h0X2RlY2F5IjogMC4wMSwKICAgImFtc2dyYWQiOiBmYWxzZSwKICAgIm1h"
        "eGltaXplIjogZmFsc2UsCiAgICJmb3JlYWNoIjogbnVsbCwKICAgImNhcHR1cmFibGUiOiBmYWxzZSwKICAgImRpZmZlcmVu"
        "dGlhYmxlIjogZmFsc2UsCiAgICJmdXNlZCI6IG51bGwsCiAgICJkZWNvdXBsZWRfd2VpZ2h0X2RlY2F5IjogdHJ1ZSwKICAg"
        "InBhcmFtcyI6IFsKICAgIDAKICAgXQogIH0KIF0KfQo="
    ),
    "optim.safetensors": (
        "+AAAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJmb3JtYXQiOiJwdCJ9LCJzdGF0ZS8wL2V4cF9hdmciOnsiZHR5cGUiOiJGMzIi"
        "LCJzaGFwZSI6WzIsMl0sImRhdGFfb2Zmc2V0cyI6WzAsMTZdfSwic3RhdGUvMC9leHBfYXZnX3NxIjp7ImR0eXBlIjoiRjMy"
        "Iiwic2hhcGUiOlsyLDJdLCJkYXRhX29mZnNldHMiOlsxNiwzMl19LCJzdGF0ZS8wL3N0ZXAiOnsiZHR5cGUiOiJGMzIiLCJz"
        "aGFwZSI6W10sImRhdGFfb2Zmc2V0cyI6WzMyLDM2XX19ICAgICAgIM3MzD3NzMw9zczMPc3MzD1vEoM6bxKDOm8SgzpvEoM6"
        "AACAPw=="
    ),
    "trainer.json": (
        "ewogInN0ZXAiOiAxCn0K"
    ),
}


def _v1_fixture_files() -> dict[str, bytes]:
    return {name: base64.b64decode(data) for name, data in V1_FIXTURE.items()}


def test_format_version_1_checkpoint_still_loads(tmp_path):
    files = _v1_fixture_files()
    path = tmp_path / "step_00000001"
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)
    c = ck.load_checkpoint(path)
    assert c.step == 1 and c.manifest["format_version"] == 1
    assert c.config == {"model": {"kind": "linear", "features": 2}}
    w = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    assert torch.equal(c.tensors["model"]["weight"], w) and torch.equal(c.tensors["ema"]["weight"], w / 2)
    model = torch.nn.Linear(2, 2, bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(unflatten_optimizer_state(c.tensors["optim"], c.meta["optim"]))
    assert opt.state_dict()["state"][0]["step"].item() == 1.0


# ---------------------------------------------------------------------------------------------
# a real kill (no cleanup runs) in every phase of a save (RELIABILITY 3)
# ---------------------------------------------------------------------------------------------

def _killed_save(run: Path, model, opt, ema, target, name: str, n: int) -> None:
    """Fork; the child SIGKILLs itself at the n-th call of target.name while saving step 20."""
    import signal
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork in a threaded process: the child only saves
        pid = os.fork()
    if pid == 0:
        try:
            real, seen = getattr(target, name), [0]

            def dying(*a, **k):
                seen[0] += 1
                if seen[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*a, **k)

            setattr(target, name, dying)
            _save(run, 20, model, opt, ema)
        finally:
            os._exit(0)  # reached only when the kill point was never hit
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), (name, n)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_in_every_phase_of_a_save_leaves_a_complete_latest(tmp_path, monkeypatch):
    model, opt, ema = _trained(1)
    probe = tmp_path / "probe"
    _save(probe, 1, model, opt, ema)
    n_fsync = _count_calls(monkeypatch, os, "fsync", lambda: _save(probe, 2, model, opt, ema))
    n_replace = _count_calls(monkeypatch, os, "replace", lambda: _save(probe, 3, model, opt, ema))
    for target, name, count in [(os, "fsync", n_fsync), (os, "replace", n_replace)]:
        for n in range(1, count + 1):
            run = tmp_path / f"{name}{n}"
            previous = _save(run, 10, model, opt, ema)
            _killed_save(run, model, opt, ema, target, name, n)
            search = ck.find_latest(run)
            assert search.path in (previous, run / "step_00000020"), (name, n, search)
            ck.load_checkpoint(search.path)
            debris = [p.name for p in run.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
            assert sorted(debris) == sorted(s for s, _ in search.skipped), (name, n)  # each one named
            pointer = (run / "latest").read_text().strip()
            assert (run / pointer / "MANIFEST.json").is_file(), (name, n)  # never dangling
            _save(run, 30, model, opt, ema)  # the next save clears the dead process's debris
            assert _listing(run) == sorted(["latest", previous.name, "step_00000030"]
                                           + (["step_00000020"] if search.path.name == "step_00000020" else []))

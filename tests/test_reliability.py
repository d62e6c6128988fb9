"""RELIABILITY 12 (a real full disk: a small tmpfs, when root), 24 (simulated out-of-memory in training and in
sampling) and the run lock (one `train` process per run folder). Promises 3 and 12 under injected failures are in
test_checkpoint.py, 13 in test_legacy_runs.py and test_checkpoint.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tiny_runs import SHORT_RUN, invoke
from torchdiffusion.errors import CheckpointError
from torchdiffusion.nn.unet import UNet
from torchdiffusion.train import checkpoint as ck
from torchdiffusion.train.runlock import LOCK_FILE, RunLock

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = SHORT_RUN + ["data.val_split=null", "data.kind=folder", "data.channels=L", "model.backbone.model_channels=8",
                    "model.backbone.channel_mult=[1,2]", "model.backbone.num_res_blocks=1",
                    "model.backbone.attn_resolutions=[]", "model.backbone.norm_groups=4"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """16 noise images of 8 x 8 (a data set that loads in milliseconds)."""
    import numpy as np
    from PIL import Image
    d = tmp_path_factory.mktemp("images")
    g = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(g.integers(0, 256, (8, 8), dtype=np.uint8)).save(d / f"{i:02d}.png")
    return d


def _args(images, run, steps, extra=()):
    args = ["train", "--run", run, "--no-progress", "--threads", "1"]
    for s in TINY + [f"data.path={images}", f"train.steps={steps}"] + list(extra):
        args += ["--set", s]
    return args


def _oom_at(monkeypatch, k: int):
    """Make the k-th U-Net forward call (1-based) raise torch.OutOfMemoryError, as CUDA does."""
    real, calls = UNet.forward, [0]

    def forward(self, *a, **kw):
        calls[0] += 1
        if calls[0] == k:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *a, **kw)
    monkeypatch.setattr(UNet, "forward", forward)
    return calls


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# --------------------------------------------------------------------------------------------- 24: out of memory
def test_out_of_memory_while_training_is_one_line_and_keeps_the_checkpoint(images, tmp_path, monkeypatch):
    run = tmp_path / "run"
    invoke(_args(images, run, 2))  # step_00000002
    ckpts = run / "checkpoints"
    before = {p: p.read_bytes() for p in (ckpts / "step_00000002").iterdir()}
    _oom_at(monkeypatch, 2)  # the 2nd training step after resuming: step 4
    r = invoke(_args(images, run, 6), expect=1)
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error: out of memory at step 4;") and "Traceback" not in r.output
    for knob in ("train.batch_size", "train.grad_accum", "train.precision=bf16", "model.backbone.model_channels",
                 "step_00000002"):
        assert knob in line, knob
    assert ck.resolve_latest(ckpts) == ckpts / "step_00000002"  # step 3 was not a checkpoint step; 2 is latest
    assert {p: p.read_bytes() for p in (ckpts / "step_00000002").iterdir()} == before
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002"]  # no debris
    assert not (run / LOCK_FILE).exists()  # the lock went with the failed run
    monkeypatch.undo()
    invoke(_args(images, run, 4))  # and it resumes
    assert ck.resolve_latest(ckpts) == ckpts / "step_00000004"


def test_out_of_memory_while_sampling_is_one_line(images, tmp_path, monkeypatch):
    run = tmp_path / "run"
    invoke(_args(images, run, 2))
    ckpt = ck.resolve_latest(run / "checkpoints")
    hashes = ck.verify_checkpoint(ckpt)["files"]
    _oom_at(monkeypatch, 1)
    r = invoke(["sample", "--run", run, "--seeds", "0-3", "--outdir", tmp_path / "s", "--steps", "2", "--threads",
                "1"], expect=1)
    line = r.output.strip()
    assert line.count("\n") == 0 and line.startswith("error: out of memory;") and "--batch" in line
    assert "train.batch_size" in line and "train.precision=bf16" in line
    assert ck.verify_checkpoint(ckpt)["files"] == hashes
    assert not list((tmp_path / "s").glob("*.png"))


# --------------------------------------------------------------------------------------------- the run lock
def test_a_held_lock_refuses_a_second_train_in_one_line(images, tmp_path):
    run = tmp_path / "run"
    lock = RunLock.acquire(run)
    try:
        r = invoke(_args(images, run, 2), expect=1)
        assert r.output.strip() == (f"error: {run} is in use by another train process (pid {os.getpid()}, lock file "
                                    f"{run / LOCK_FILE}); wait for it to finish, or train into another --run folder")
        assert _tree(run) == [LOCK_FILE]  # the refused process wrote nothing
    finally:
        lock.release()
    assert not run.exists()  # the lock made the folder and nothing else was written: no folder left
    invoke(_args(images, run, 2))
    assert ck.resolve_latest(run / "checkpoints") is not None and not (run / LOCK_FILE).exists()


def test_lock_of_another_process_refuses_and_its_stale_file_is_taken_over(images, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = ("import fcntl, os, sys, time\n"
              "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
              "fcntl.flock(fd, fcntl.LOCK_EX)\n"
              "os.write(fd, b'%d\\n' % os.getpid())\n"
              "print('held', flush=True)\n"
              "time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", holder, str(run / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        r = invoke(_args(images, run, 2), expect=1)
        assert f"in use by another train process (pid {p.pid}," in r.output and r.output.count("\n") == 1
    finally:
        p.kill()
        p.wait()
    assert (run / LOCK_FILE).read_text().strip() == str(p.pid)  # a dead process's lock file is left behind
    invoke(_args(images, run, 2))  # and taken over: the kernel released the dead process's lock
    assert ck.resolve_latest(run / "checkpoints") is not None


def test_a_run_that_fails_before_writing_leaves_no_folder(images, tmp_path):
    run = tmp_path / "run"
    r = invoke(_args(images, run, 2, [f"data.path={tmp_path / 'missing'}"]),
               expect=1)
    assert "not found" in r.output and not run.exists()


def test_lock_survives_the_removal_race(tmp_path):
    """A taker that opened the lock file before its holder removed it must not hold a lock on the removed file."""
    run = tmp_path / "run"
    first = RunLock.acquire(run)
    stale_fd = os.open(run / LOCK_FILE, os.O_RDWR)  # opened while `first` holds it
    first.release()
    run.mkdir(exist_ok=True)
    second = RunLock.acquire(run)  # a fresh file
    try:
        import fcntl
        fcntl.flock(stale_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the removed inode is free to lock ...
        assert os.fstat(stale_fd).st_ino != os.stat(run / LOCK_FILE).st_ino  # ... and is not the lock
        with pytest.raises(Exception, match="in use"):
            RunLock.acquire(run)
    finally:
        os.close(stale_fd)
        second.release()


# --------------------------------------------------------------------------------------------- 12: a real full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 320 KiB tmpfs (root only; skipped where mount is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount for a real small file system")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()[:80]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_on_a_real_file_system(small_disk):
    g = torch.Generator().manual_seed(0)
    tensors = {"model": {"w": torch.randn(30_000, generator=g)}, "ema": {"w": torch.randn(10_000, generator=g)}}
    first = ck.save_checkpoint(small_disk / "ckpt", 1, tensors=tensors, meta={"config": {"a": 1}})  # ~160 KB
    listing = _tree(small_disk)
    with pytest.raises(CheckpointError) as e:
        ck.save_checkpoint(small_disk / "ckpt", 2, tensors=tensors, meta={"config": {"a": 1}})  # does not fit
    msg = str(e.value)
    assert "could not save step_00000002" in msg and "previous checkpoint is intact" in msg and "\n" not in msg
    assert _tree(small_disk) == listing  # no debris
    assert ck.resolve_latest(small_disk / "ckpt") == first
    assert torch.equal(ck.load_checkpoint(first).tensors["model"]["w"], tensors["model"]["w"])
    shutil.rmtree(first)  # space again: saving works
    assert ck.save_checkpoint(small_disk / "ckpt", 2, tensors=tensors, meta={}) == ck.resolve_latest(small_disk / "ckpt")

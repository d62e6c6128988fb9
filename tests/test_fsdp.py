"""train.parallel=fsdp (FSDP2, train/fsdp.py) beside DDP on two gloo processes: the same loss curve, consolidated
checkpoints in the DDP layout (same keys, shapes and values up to reduction order), and resumption across the two
options. One torchrun job of each kind is shared by the tests of this module."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from torchdiffusion.train.checkpoint import load_checkpoint, resolve_latest
from test_train_cli import TINY, metrics

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

STEPS = ["train.steps=8", "train.val_every=1000", "train.ckpt_every=4", "train.grad_accum=2"]


def _torchrun(run_dir, sets, parallel):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
            str(port), "-m", "torchdiffusion.cli.main", "train", "--no-progress", "--threads", "1",
            "--run-dir", str(run_dir)]
    for s in TINY + sets + [f"train.parallel={parallel}"]:
        args += ["--set", s]
    r = subprocess.run([sys.executable] + args, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    _torchrun(d / "ddp", STEPS, "ddp")
    _torchrun(d / "fsdp", STEPS, "fsdp")
    return d


def _latest(run_dir):
    return load_checkpoint(resolve_latest(run_dir / "checkpoints"))


def test_fsdp_loss_curve_matches_ddp(runs):
    la = [float(r["loss"]) for r in metrics(runs / "ddp")]
    lb = [float(r["loss"]) for r in metrics(runs / "fsdp")]
    assert len(la) == len(lb) == 8
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-4, atol=1e-6)
    ga = [float(r["grad_norm"]) for r in metrics(runs / "ddp")]
    gb = [float(r["grad_norm"]) for r in metrics(runs / "fsdp")]
    torch.testing.assert_close(torch.tensor(gb), torch.tensor(ga), rtol=1e-4, atol=1e-6)


def test_fsdp_checkpoint_is_consolidated_in_the_ddp_layout(runs):
    a, b = _latest(runs / "ddp"), _latest(runs / "fsdp")
    for group in ("model", "ema", "optim"):
        assert set(b.tensors[group]) == set(a.tensors[group]), group
        for k, v in a.tensors[group].items():
            assert b.tensors[group][k].shape == v.shape and b.tensors[group][k].dtype == v.dtype, (group, k)
            torch.testing.assert_close(b.tensors[group][k], v, rtol=1e-3, atol=1e-5, msg=f"{group}/{k}")
    assert b.meta["optim"] == a.meta["optim"]  # same optimiser skeleton (torch.optim's positional layout)
    assert all(not hasattr(v, "device_mesh") for v in b.tensors["model"].values())


@pytest.mark.slow  # make test-slow: multi-process, ~10-25 s
def test_fsdp_resumes_a_ddp_checkpoint_and_follows_the_same_curve(runs, tmp_path):
    """Stop a DDP run at step 4, resume it under FSDP: steps 5-8 match the uninterrupted DDP run's."""
    d = tmp_path / "mixed"
    _torchrun(d, ["train.steps=4"] + STEPS[1:], "ddp")
    _torchrun(d, STEPS, "fsdp")
    la = [float(r["loss"]) for r in metrics(runs / "ddp")]
    lb = [float(r["loss"]) for r in metrics(d)]
    assert len(lb) == 8
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-4, atol=1e-6)


def test_fsdp_is_refused_for_steps_without_it_in_one_line():
    """Classifier and multi-model steps do not gather their state collectively yet: refused before training."""
    from torchdiffusion.errors import ConfigError
    from torchdiffusion.train.distributed import DistInfo
    from torchdiffusion.train.multi_step import ModelSpec, MultiModelStep, Update
    from torchdiffusion.train.schedule import LRSchedule
    from torchdiffusion.train.step import LoopContext
    ctx = LoopContext(seed=0, batch_size=4, grad_accum=1, dist=DistInfo(0, 2, 0), parallel="fsdp")
    assert ctx.sharded and not LoopContext(seed=0, batch_size=4, grad_accum=1, parallel="fsdp").sharded
    step = MultiModelStep({"a": ModelSpec(torch.nn.Linear(2, 2))},
                          [Update("a", "a", lambda nets, b, k, g: nets["a"](b["x"]).sum(), LRSchedule(1e-3, 0, 10))])
    with pytest.raises(ConfigError, match="train.parallel=fsdp .* valid here: ddp"):
        step.setup(ctx)

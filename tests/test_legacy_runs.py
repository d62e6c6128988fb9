"""RELIABILITY 13: run folders written by release 0.1.0 (tests/fixtures/release_0_1_0, made before the model spec
moved to model.backbone / model.codec and conditioning to cond.<key>) load, sample, restore, evaluate and resume.

The fixtures are never rewritten; each test works on a copy."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tiny_runs import write_noise_pngs
from torchdiffusion.cli.main import cli
from torchdiffusion.config.loaders import load_run
from torchdiffusion.core.processes import EDM, VPDiscrete
from torchdiffusion.nn.unet import UNetConfig
from torchdiffusion.train.checkpoint import load_checkpoint, resolve_latest

FIXTURES = Path(__file__).parent / "fixtures" / "release_0_1_0"
KINDS = ("uncond", "class", "iddpm")


def invoke(args, expect=0):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == expect, r.output
    return r


@pytest.fixture
def legacy(tmp_path):
    def copy(kind: str) -> Path:
        dst = tmp_path / kind
        shutil.copytree(FIXTURES / kind, dst)
        return dst
    return copy


def test_fixture_configs_are_the_old_layout():
    """The fixtures really hold release 0.1.0's layout (so the tests below exercise the migration)."""
    for kind in KINDS:
        stored = json.loads((FIXTURES / kind / "checkpoints" / "step_00000004" / "config.json").read_text())
        stored = stored.get("config", stored)
        assert "unet" in stored["model"] and "backbone" not in stored["model"]
        assert set(stored["cond"]) == {"kind", "p_uncond"}


def test_old_configs_migrate_to_todays_layout(legacy):
    dirs = {k: legacy(k) for k in KINDS}
    runs = {k: load_run(d) for k, d in dirs.items()}
    for run in runs.values():
        assert isinstance(run.config.model.backbone, UNetConfig)
        assert run.config.model.backbone.model_channels == 8 and run.config.model.backbone.channel_mult == (1, 2)
        assert run.config.model.data_shape == (1, 28, 28) and run.sample_shape == (1, 28, 28)
    assert isinstance(runs["uncond"].config.model.process, EDM) and runs["uncond"].config.cond == {}
    assert runs["class"].num_classes == 10 and runs["class"].config.cond["label"].p_uncond == 0.1
    assert runs["uncond"].num_classes == 0
    p = runs["iddpm"].config.model.process
    assert isinstance(p, VPDiscrete) and p.schedule == "cosine" and p.T == 1000  # nulls took the defaults
    assert runs["iddpm"].config.model.variance == "learned"
    # the weights are the stored ones (strict load_state_dict: every parameter name still matches)
    c = load_checkpoint(resolve_latest(dirs["uncond"] / "checkpoints"))
    sd = runs["uncond"].model.state_dict()
    assert set(sd) == set(c.tensors["ema"]) and all(torch.equal(sd[k], c.tensors["ema"][k]) for k in sd)


@pytest.mark.parametrize("kind", KINDS)
def test_old_runs_sample(legacy, tmp_path, kind):
    run_dir = legacy(kind)
    out = tmp_path / "out"
    extra = ["--labels", "3", "--guidance-scale", "2"] if kind == "class" else []
    invoke(["sample", "--run", run_dir, "--outdir", out, "--seeds", "0-2", "--steps", "2", "--threads", "1"] + extra)
    assert sorted(p.name for p in out.glob("0*.png")) == ["000000.png", "000001.png", "000002.png"]
    img = np.asarray(Image.open(out / "000000.png"))
    assert img.shape == (28, 28) and img.dtype == np.uint8


@pytest.mark.parametrize("kind", KINDS)
def test_old_runs_restore(legacy, tmp_path, kind):
    run_dir = legacy(kind)
    images = write_noise_pngs(tmp_path / "images", 2)
    out = tmp_path / "out"
    invoke(["restore", "--run", run_dir, "--task", "inpaint", "--method", "replacement", "--input", images,
            "--outdir", out, "--steps", 3, "--threads", 1])
    restored = sorted((out / "restored").iterdir())  # a class-conditional run restores with its null label
    assert len(restored) == 2
    # replacement ends with the known half equal to the input (measurement consistency, to uint8 rounding)
    a, b = np.asarray(Image.open(restored[0])), np.asarray(Image.open(images / "0.png"))
    assert np.abs(a[:14].astype(int) - b[:14].astype(int)).max() <= 1


def test_old_class_run_evaluates(legacy, tmp_path):
    pytest.importorskip("mnist")
    out = tmp_path / "eval.json"
    invoke(["eval-cond", "--run", legacy("class"), "--features", "random-conv", "--reference-limit", "200",
            "--kid-subsets", "2", "--steps", "2", "--strategy", "fixed", "--label", "4", "--n", "4", "--out", out])
    rec = json.loads(out.read_text())
    assert list(rec["per_class"]) == ["4"] and np.isfinite(rec["overall"]["fid"])


def test_old_iddpm_run_evaluates_its_likelihood(legacy, tmp_path):
    pytest.importorskip("mnist")
    out = tmp_path / "bpd.json"
    invoke(["likelihood", "--run", legacy("iddpm"), "--estimator", "vlb", "--n", "2", "--split", "val",
            "--vlb-timesteps", "20", "--threads", "1", "--out", out])
    rec = json.loads(out.read_text())
    assert np.isfinite(rec["bits_per_dim"]) and rec["bits_per_dim"] > 0 and len(rec["per_image"]) == 2


@pytest.mark.parametrize("kind", KINDS)
def test_old_runs_resume(legacy, kind):
    """Training continues from the old checkpoint (same config, no --allow-config-change): 2 more steps."""
    pytest.importorskip("mnist")
    run_dir = legacy(kind)
    invoke(["train", "--run", run_dir, "--no-progress", "--threads", "1", "--set", "train.steps=6"])
    c = load_checkpoint(resolve_latest(run_dir / "checkpoints"))
    assert c.meta["trainer"]["step"] == 6
    assert "backbone" in c.meta["config"]["model"]  # new checkpoints are written in today's layout

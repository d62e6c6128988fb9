"""End to end: `train --set cond.label.kind=class`, `train-classifier`, and `sample` with guidance and rejection."""
import json

import pytest
import torch
from click.testing import CliRunner
from fixtures_images import assert_same_seed_image

from torchdiffusion.cli.main import cli
from torchdiffusion.config.loaders import load_run
from torchdiffusion.train.checkpoint import load_checkpoint, resolve_latest

TINY = [
    "data.limit=128", "data.val_split=val", "model.backbone.model_channels=8", "model.backbone.channel_mult=[1,2]",
    "model.backbone.num_res_blocks=1", "model.backbone.attn_resolutions=[14]", "model.backbone.norm_groups=4",
    "model.backbone.num_heads=2", "train.batch_size=8", "train.warmup_steps=2", "train.log_every=5", "train.val_every=5",
    "train.val_images=16", "train.sample_every=1000", "train.ckpt_every=6", "sample.steps=2", "sample.grid_images=4",
    "train.max_minutes=0", "train.precision=fp32", "cond.label.kind=class",
]


def invoke(args, expect=0):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == expect, r.output
    return r


def train_args(run_dir, steps, extra=()):
    args = ["train", "--run", run_dir, "--no-progress", "--threads", "1"]
    for s in TINY + [f"train.steps={steps}"] + list(extra):
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("guided")
    invoke(train_args(d / "model", 6))
    invoke(["train-classifier", "--run", d / "clf", "--noisy", "--steps", "3", "--batch-size", "16", "--width", "8",
            "--set", "data.limit=64", "--threads", "1"])
    return d


def test_class_conditional_training(runs, tmp_path):
    run = load_run(runs / "model")
    assert run.num_classes == 10 and run.config.cond["label"].num_classes == 10  # set from the data
    # resuming the same run with the same settings is not a config change, and dropout is deterministic:
    # 3 + 3 resumed steps give the same weights as 6 uninterrupted ones
    split = tmp_path / "split"
    invoke(train_args(split, 6) + ["--until-step", "3"])
    invoke(train_args(split, 6))
    a = load_checkpoint(resolve_latest(runs / "model" / "checkpoints"))
    b = load_checkpoint(resolve_latest(split / "checkpoints"))
    for k in a.tensors["model"]:
        assert torch.equal(a.tensors["model"][k], b.tensors["model"][k]), k


def test_class_conditioning_errors(tmp_path):
    r = invoke(train_args(tmp_path / "a", 2, ["cond.label.num_classes=7"]), expect=2)
    assert "num_classes=7" in r.output and "10 classes" in r.output
    r = invoke(train_args(tmp_path / "b", 2, ["model.backbone.num_classes=10"]), expect=2)
    assert "model.backbone.num_classes is set from the conditioners" in r.output
    # the layout of release 0.1.0 is still read: an unconditional cond with a class count is refused
    r = invoke(train_args(tmp_path / "c", 2, ["cond={kind: none}", "model.unet.num_classes=10"]), expect=2)
    assert "cond.kind=class" in r.output


def test_sample_with_cfg_classifier_guidance_and_rejection(runs, tmp_path):
    common = ["sample", "--run", runs / "model", "--seeds", "0-5", "--batch", "4", "--threads", "1", "--steps", "2"]
    invoke(common + ["--outdir", tmp_path / "a", "--labels", "3", "--guidance-scale", "1"])
    invoke(common + ["--outdir", tmp_path / "b", "--labels", "3", "--guidance-scale", "1", "--batch", "6"])
    for s in range(6):  # a seed's image does not depend on the batch, with labels too
        assert_same_seed_image(tmp_path / "a" / f"{s:06d}.png", tmp_path / "b" / f"{s:06d}.png")
    invoke(common + ["--outdir", tmp_path / "c", "--labels", "0-2", "--guidance-scale", "3", "--guidance-interval",
                     "0.5,20", "--classifier", runs / "clf", "--classifier-scale", "2", "--reject",
                     "--reject-budget", "4"])
    rec = json.loads((tmp_path / "c" / "samples.json").read_text())
    assert rec["guidance_scale"] == 3.0 and rec["guidance_interval"] == [0.5, 20.0]
    assert rec["label_per_seed"] == [0, 1, 2, 0, 1, 2]
    rej = rec["rejection"]
    assert rej["generated"] <= 6 + 4 and rej["count"] == 6 and len(rej["final_seeds"]) == 6
    assert sorted(p.name for p in (tmp_path / "c").glob("0*.png")) == [f"{s:06d}.png" for s in range(6)]


@pytest.mark.parametrize("extra,message", [
    (["--labels", "12"], "out of range"),
    (["--labels", "x"], "--labels 'x' is not valid"),
    (["--guidance-interval", "3,1"], "LO < HI"),
    (["--reject"], "--reject needs a classifier"),
])
def test_sample_option_errors(runs, tmp_path, extra, message):
    r = invoke(["sample", "--run", runs / "model", "--outdir", tmp_path, "--seeds", "0-1", "--steps", "1",
                "--guidance-scale", "2"] + extra, expect=2)
    assert message in r.output and r.output.count("\n") == 1

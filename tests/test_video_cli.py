"""Video from the command line: train --preset moving-mnist (resumed bit-exactly), sample writes GIFs and a frame
grid at any frame count, restore --task extend|interpolate|superres, eval fd-motion; bad input in one line."""
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import TINY_RUN, invoke

from torchdiffusion.data.moving_mnist import load_moving_mnist
from torchdiffusion.errors import EXIT_REFUSED, EXIT_USAGE
from torchdiffusion.eval.video_metrics import MOTION_METRIC, save_motion_net, train_motion_net

VIDEO_RUN = ["data.clips=16", "data.val_split=null", "data.frames=4", "data.image_frames=2",
             "model.backbone.model_channels=8", "model.backbone.channel_mult=[1,2]", "model.backbone.norm_groups=4",
             "model.backbone.attn_resolutions=[]", "model.backbone.temporal_resolutions=[]", "train.batch_size=4",
             "train.warmup_steps=1", "train.log_every=1", "train.sample_every=1000", "train.ckpt_every=2",
             "train.val_every=1000", "train.precision=fp32", "sample.steps=2", "sample.grid_images=2",
             "train.steps=4"]


def _train(run, until=None):
    args = ["train", "--preset", "moving-mnist", "--run", run, "--no-progress", "--threads", "1"]
    args += ["--until-step", until] if until else []
    for s in VIDEO_RUN:
        args += ["--set", s]
    return invoke(args)


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    _train(root / "a")
    return root


def test_training_resumes_bit_exactly(video_run):
    b = video_run / "b"
    _train(b, until=2)
    _train(b)
    for name in ("model.safetensors", "ema.safetensors"):
        wa = load_file(str(video_run / "a" / "checkpoints" / "step_00000004" / name))
        wb = load_file(str(b / "checkpoints" / "step_00000004" / name))
        assert wa.keys() == wb.keys() and any(k.startswith("backbone.temporal") or ".temporal." in k for k in wa)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (video_run / "a" / "samples" / "clips_00000004.gif").is_file()
    cfg = (video_run / "a" / "config.yaml").read_text()
    assert "kind: unet3d" in cfg and "data_shape:\n  - 1\n  - 4\n  - 32\n  - 32" in cfg


def test_sample_writes_clips_at_any_frame_count_and_restore_runs(video_run, tmp_path):
    out = tmp_path / "s"
    r = invoke(["sample", "--run", video_run / "a", "--outdir", out, "--seeds", "0-1", "--steps", "2",
                "--frames", "8", "--threads", "1"])
    assert "wrote 2 clips" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["000000.gif", "000001.gif", "frames.png", "grid.gif",
                                                     "samples.json"]
    from torchdiffusion.data.video_folder import load_video_folder
    assert load_video_folder(out, frames=8).x.shape == (2, 1, 8, 32, 32)      # 2x the training length
    for task, extra in (("extend", ["--given", "2", "--new-frames", "3"]), ("interpolate", ["--given", "3"]),
                        ("superres", ["--scale", "2", "--method", "replacement"])):
        o = tmp_path / task
        invoke(["restore", "--run", video_run / "a", "--task", task, "--input", "moving-mnist:test", "--limit", "2",
                "--steps", "2", "--outdir", o, "--threads", "1"] + extra)
        rec = json.loads((o / "restore.json").read_text())
        assert rec["conditioning_rms_error_mean"] < 1e-3 and len(list((o / "restored").glob("*.gif"))) == 2
    assert json.loads((tmp_path / "extend" / "restore.json").read_text())["frames"] == 5
    assert json.loads((tmp_path / "interpolate" / "restore.json").read_text())["given_frames"] == [0, 2, 4]
    # the motion metric of the sampled clips against Moving MNIST
    net, rec = train_motion_net(load_moving_mnist("train", resolution=32, frames=8, clips=32), steps=2, width=4)
    save_motion_net(net, rec, tmp_path / "net")
    r = invoke(["eval", "fd-motion", "--fake", out, "--frames", "8", "--net", tmp_path / "net",
                "--out", tmp_path / "fd.json"])
    res = json.loads((tmp_path / "fd.json").read_text())
    assert res[MOTION_METRIC] >= 0 and res["protocol"]["clip_length"] == 8 and res["protocol"]["n_real"] == 2
    assert "FVD" not in r.output


def test_bad_video_input_is_one_line(video_run, tiny_run, tmp_path):
    cases = [
        (["restore", "--run", tiny_run, "--task", "extend", "--input", tmp_path, "--outdir", tmp_path / "o"],
         "video task"),
        (["restore", "--run", video_run / "a", "--task", "inpaint", "--input", "moving-mnist", "--outdir",
          tmp_path / "o"], "extend, interpolate or superres"),
        (["sample", "--run", tiny_run, "--outdir", tmp_path / "s", "--frames", "4"], "video runs"),
        (["train", "--run", tmp_path / "t", "--set", "data.frames=4"] + sum((["--set", s] for s in TINY_RUN), []),
         "video data sets"),
        (["eval", "fd-motion", "--fake", tmp_path / "none", "--frames", "4", "--net", tmp_path / "n"],
         "no such folder"),
    ]
    for args, match in cases:
        r = invoke(args, expect=EXIT_REFUSED if "fd-motion" in args else EXIT_USAGE)
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], r.output

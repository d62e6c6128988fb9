"""sample.guidance_scale: a class-conditional run's default classifier-free guidance (the mnist preset's).

`sample --run` must guide exactly as `--guidance-scale W` does, `--guidance-scale 1` must be the conditional model
alone, the record must say which, `eval --fake RUN` / `audit --run` (config.run_images) must judge the very images
`sample` writes, and an unconditional run with the setting is one line."""
import json

import torch

from tiny_runs import TINY_RUN, invoke


def _train(run, extra=()):
    args = ["train", "--run", run, "--no-progress"]
    for s in TINY_RUN + ["train.steps=3", *extra]:
        args += ["--set", s]
    invoke(args)


def _sample(run, out, *extra):
    invoke(["sample", "--run", run, "--outdir", out, "--seeds", "0-3", "--batch", "4", "--quiet", *extra])
    return (out / "grid.png").read_bytes()


def test_run_default_cfg_scale_is_the_explicit_one_and_run_images_agree(tmp_path):
    from torchdiffusion.config.run_images import open_run
    from torchdiffusion.pipelines.images import load_sample_folder

    run = tmp_path / "run"
    _train(run, ["cond.label.kind=class", "cond.label.p_uncond=0.5", "sample.guidance_scale=3",
                 "sample.autoguide_step=null", "train.keep_steps=[]"])
    default = _sample(run, tmp_path / "default")
    assert json.loads((tmp_path / "default" / "samples.json").read_text())["guidance_scale"] == 3.0
    assert _sample(run, tmp_path / "explicit", "--guidance-scale", "3") == default
    plain = _sample(run, tmp_path / "plain", "--guidance-scale", "1")
    assert plain != default
    src = open_run(run)
    assert src.record([0, 1, 2, 3])["guidance_scale"] == 3.0
    assert torch.equal(src.generate([0, 1, 2, 3], batch=4), load_sample_folder(tmp_path / "default")[0])


def test_unconditional_run_with_a_default_cfg_scale_is_one_line(tmp_path):
    run = tmp_path / "run"
    _train(run, ["sample.guidance_scale=2", "sample.autoguide_step=null", "train.keep_steps=[]"])
    r = invoke(["sample", "--run", run, "--outdir", tmp_path / "s", "--seeds", "0-1", "--quiet"], expect=2)
    assert "sample.guidance_scale 2" in r.output and "unconditional" in r.output and "Traceback" not in r.output


def test_bad_default_cfg_scale_is_one_line(tmp_path):
    r = invoke(["train", "--run", tmp_path / "r", "--no-progress", "--set", "sample.guidance_scale=-1"], expect=2)
    assert "sample.guidance_scale must be a number >= 0" in r.output and "Traceback" not in r.output

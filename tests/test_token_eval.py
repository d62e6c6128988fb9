"""`eval --fake RUN`, `audit --run RUN` and `report RUN` on token runs (decoded images), and `sample-tokens
--labels`, on tiny token runs over a randomly initialised VQ run (tests/latent_runs.py). The images a command
generates from a run must be those `sample-tokens` writes for the same seeds (one path: config.run_images)."""
import json

import numpy as np
import pytest
import torch
from latent_runs import make_ae_run
from test_token_cli import TINY_TOKENS
from tiny_runs import invoke

from torchdiffusion.pipelines.images import load_sample_folder


def _train(tmp, name, extra=()):
    vq = tmp / "vq"
    if not vq.exists():
        make_ae_run(vq, "vq")
    run = tmp / name
    args = ["train-tokens", "--preset", "fashion-vq-tokens", "--run", run, "--no-progress", "--threads", "1",
            "--set", f"vq_run={vq}"]
    for s in TINY_TOKENS + list(extra):
        args += ["--set", s]
    invoke(args)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokruns")
    return {"plain": _train(tmp, "tok"), "cond": _train(tmp, "tokc", ["cond.label.kind=class"]), "tmp": tmp}


def _sample(run, out, seeds, *extra):
    invoke(["sample-tokens", "--run", run, "--seeds", seeds, "--outdir", out, "--sampler", "ancestral", "--steps",
            "3", "--threads", "1", *extra])
    return load_sample_folder(out)[0]


def test_audit_of_a_token_run_audits_the_decoded_samples(runs, tmp_path):
    run = runs["plain"]
    ref = _sample(run, tmp_path / "s", "0-3")
    out = tmp_path / "audit"
    invoke(["audit", "--run", run, "--n", "4", "--heldout", "8", "--features", "none", "--sampler", "ancestral",
            "--steps", "3", "--batch", "3", "--out", out, "--threads", "1"])
    rec = json.loads((out / "audit.json").read_text())
    src = rec["source"]
    assert src["family"] == "tokens" and src["sampler"] == "ancestral" and src["steps"] == 3 and src["count"] == 4
    assert src["seeds"] == "0-3" and src["step"] == 2 and src["weights"] == "ema"
    assert rec["data"]["n_train"] == 32 and "pixel" in rec["spaces"]
    # the audited samples (samples.png, batch 3) are sample-tokens' images of seeds 0-3 (batch 64)
    from torchdiffusion.pipelines.generate import make_grid
    from PIL import Image
    with Image.open(out / "samples.png") as im:
        grid = np.asarray(im.convert("L"))
    assert np.array_equal(grid, make_grid(ref)[0].numpy())
    # a sampler a token run does not have is one line
    r = invoke(["audit", "--run", run, "--n", "2", "--features", "none", "--sampler", "heun"], expect=2)
    assert "sample.sampler 'heun' is not valid" in r.output and "Traceback" not in r.output


def test_eval_of_a_token_run_scores_the_images_sample_tokens_writes(runs, tmp_path):
    from torchdiffusion.eval.inception import packaged_weights_path
    if packaged_weights_path() is None:
        pytest.skip("FID Inception weights not installed")
    run = runs["plain"]
    folder = tmp_path / "s"
    _sample(run, folder, "0-3")
    args = ["eval", "all", "--real", folder, "--cache-dir", tmp_path / "cache", "--allow-small-n",
            "--kid-subsets", "3", "--pr-k", "2", "--threads", "1", "--quiet"]
    from_folder = json.loads(invoke(args + ["--fake", folder]).stdout)
    from_run = json.loads(invoke(args + ["--fake", run, "--n", "4", "--sampler", "ancestral", "--steps", "3",
                                         "--batch", "3"]).stdout)
    assert from_run["n_fake"] == 4 and from_run["fake_generated"]["family"] == "tokens"
    assert from_run["fake_generated"]["seeds"] == "0-3" and from_run["fake_generated"]["steps"] == 3
    for k in ("fid", "kid", "precision", "recall"):  # the same images: the same numbers
        assert from_run[k] == pytest.approx(from_folder[k], rel=1e-9, abs=1e-12), k
    # what --fake RUN generates: sample-tokens' images of the same seeds; other steps, other images
    from torchdiffusion.cli.eval_cmd import generate_fake
    images, info = generate_fake(run, 4, "ancestral", 3, 3, "cpu")
    assert torch.equal(images, load_sample_folder(folder)[0]) and info["fake_run"] == str(run)
    assert not torch.equal(generate_fake(run, 4, "ancestral", 1, 4, "cpu")[0], images)
    r = invoke(["eval", "kid", "--real", folder, "--fake", folder, "--steps", "3"], expect=2)
    assert "--sampler / --steps are for --fake RUN" in r.output


def test_eval_of_a_run_checks_its_count_before_generating(runs, tmp_path):
    from torchdiffusion.errors import DataError
    r = invoke(["eval", "fid", "--real", "nowhere.npz", "--fake", runs["plain"], "--n", "4"],
               expect=DataError.exit_code)
    assert "fewer than the minimum 2048" in r.output and "Traceback" not in r.output


def test_report_of_a_token_run_shows_the_first_stage_and_the_decoded_grids(runs, tmp_path):
    run = runs["plain"]
    index = invoke(["report", run, "--out", tmp_path / "rep"]).output.strip().splitlines()[-1]
    page = open(index).read()
    assert "First stage and token model (discrete diffusion)" in page
    assert "codebook size K</td><td>16" in page and "absorbing, T = 10" in page and "8x8" in page
    assert "decoded through the VQ decoder" in page and "grid_00000002.png" in page
    assert (tmp_path / "rep" / "grid_00000002.png").is_file()
    # a diffusion-run report has no token section
    from torchdiffusion.pipelines.report import _token_section
    assert _token_section({"model": {}}, tmp_path) == ""


def test_sample_tokens_labels_are_cycled_over_the_seeds(runs, tmp_path):
    run = runs["cond"]
    both = _sample(run, tmp_path / "a", "0-3", "--labels", "3,5")  # seeds 0..3 get labels 3, 5, 3, 5
    even = _sample(run, tmp_path / "b", "0,2", "--labels", "3")
    odd = _sample(run, tmp_path / "c", "1,3", "--labels", "5")
    assert torch.equal(both[0::2], even) and torch.equal(both[1::2], odd)
    default = _sample(run, tmp_path / "d", "3,13")  # default labels seed % 10 = 3
    assert torch.equal(default, _sample(run, tmp_path / "e", "3,13", "--labels", "3"))


@pytest.mark.parametrize("labels, message", [("10", "--labels 10 is out of range; this token model has 10 classes"),
                                             ("x", "--labels 'x' is not valid")])
def test_sample_tokens_bad_labels_are_one_line(runs, tmp_path, labels, message):
    r = invoke(["sample-tokens", "--run", runs["cond"], "--outdir", tmp_path / "o", "--labels", labels], expect=2)
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and not (tmp_path / "o").exists()


def test_sample_tokens_labels_need_a_class_conditional_run(runs, tmp_path):
    r = invoke(["sample-tokens", "--run", runs["plain"], "--outdir", tmp_path / "o", "--labels", "1"], expect=2)
    assert "--labels needs a class-conditional token run" in r.output and "Traceback" not in r.output


def test_eval_fake_run_of_a_diffusion_run_generates_the_images_sample_writes(tiny_run, runs, tmp_path):
    from torchdiffusion.cli.eval_cmd import generate_fake
    invoke(["sample", "--run", tiny_run, "--seeds", "0-2", "--outdir", tmp_path / "s", "--steps", "2", "--batch", "3"])
    images, info = generate_fake(tiny_run, 3, None, 2, 2, "cpu")
    assert torch.equal(images, load_sample_folder(tmp_path / "s")[0])
    assert info["fake_generated"]["family"] == "diffusion" and info["fake_generated"]["steps"] == 2
    # a diffusion run's loader refuses a token run in one line
    from torchdiffusion.config.loaders import load_run
    from torchdiffusion.errors import ConfigError
    with pytest.raises(ConfigError, match="is a token run's checkpoint"):
        load_run(runs["plain"])

"""`torchdiffusion restore` end to end on a tiny model: outputs, measurement consistency, per-seed determinism,
one-line errors (RELIABILITY 28)."""
import json

import numpy as np
import pytest
from PIL import Image
from tiny_runs import invoke


@pytest.fixture(scope="module")
def tiny(tiny_run, tmp_path_factory):
    """The shared tiny run (tests/conftest.py) and a folder of 4 random 28x28 images."""
    root = tmp_path_factory.mktemp("restore")
    images = root / "images"
    images.mkdir()
    g = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(g.integers(0, 256, (28, 28), dtype=np.uint8)).save(images / f"{i}.png")
    return tiny_run, images


def read_png(path):
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("task,method,extra", [
    ("inpaint", "replacement", []),
    ("superres", "repaint", ["--jump", "1", "--resample", "2"]),
    ("superres", "dps", ["--down", "bicubic", "--scale", "2"]),
])
def test_restore_writes_consistent_restorations(tiny, tmp_path, task, method, extra):
    run_dir, images = tiny
    out = tmp_path / "out"
    invoke(["restore", "--run", run_dir, "--task", task, "--method", method, "--input", images, "--outdir", out,
            "--steps", 3, "--threads", 1] + extra)
    rec = json.loads((out / "restore.json").read_text())
    assert rec["count"] == 4 and rec["method"] == method
    assert sorted(p.name for p in (out / "restored").iterdir()) == [f"{i}.png" for i in range(4)]  # the input names
    assert (out / "grid.png").exists() and len(list((out / "measurement").iterdir())) == 4
    if method != "dps":  # projection methods end on A x = y
        assert rec["measurement_rms_error_max"] < 1e-5
    if method == "repaint":
        assert rec["nfe"] == 3 + 1 * 1 * 2  # jump points 1 and 2, one extra pass each


def test_restore_is_the_same_at_any_batch(tiny, tmp_path):
    run_dir, images = tiny
    outs = []
    for batch in (1, 4):
        out = tmp_path / f"b{batch}"
        invoke(["restore", "--run", run_dir, "--task", "inpaint", "--mask", "random", "--method", "repaint",
                "--jump", 1, "--resample", 2, "--noise", 0.05, "--input", images, "--outdir", out, "--steps", 3,
                "--batch", batch, "--seeds", "10-13", "--threads", 1])
        outs.append([read_png(out / "restored" / f"{s}.png") for s in range(4)])
    for a, b in zip(*outs):
        assert np.array_equal(a, b)


def test_bad_restore_inputs_are_one_line(tiny, tmp_path):
    run_dir, images = tiny
    base = ["restore", "--run", run_dir, "--input", images, "--outdir", tmp_path / "o", "--steps", 2]
    r = invoke(base + ["--task", "superres", "--scale", 3, "--method", "replacement"], expect=2)
    assert "(4, 1, 28, 28)" in r.output or "(1, 1, 28, 28)" in r.output
    assert "factor 3" in r.output and r.output.strip().count("\n") == 0
    r = invoke(base + ["--task", "colorize", "--method", "replacement"], expect=2)
    assert "at least 2 channels" in r.output
    r = invoke(base + ["--task", "inpaint", "--method", "ilvr"], expect=2)
    assert "ILVR" in r.output and r.output.strip().count("\n") == 0
    r = invoke(base + ["--task", "inpaint", "--method", "dsp"], expect=2)
    assert "did you mean 'dps'" in r.output
    big = tmp_path / "big"
    big.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(big / "a.png")
    r = invoke(["restore", "--run", run_dir, "--input", big, "--outdir", tmp_path / "o2", "--task", "inpaint",
                "--method", "replacement"], expect=1)
    assert "(1, 32, 32)" in r.output and "(1, 28, 28)" in r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()  # refusals leave nothing behind


@pytest.mark.parametrize("method,sampler,opts", [
    ("pocs", "heun", []),
    ("reconstruction", "ddim", ["--sampler-opt", "eta=1"]),
    ("ccdf", "dpmpp_2m", []),
])
def test_restore_runs_a_correction_on_any_sampler(tiny, tmp_path, method, sampler, opts):
    """--sampler puts a correction method on another sampler; the projection still ends on A x = y, and the NFE
    recorded is the sampler's (heun: 2n - 1)."""
    run_dir, images = tiny
    out = tmp_path / "out"
    invoke(["restore", "--run", run_dir, "--task", "inpaint", "--method", method, "--sampler", sampler, "--input",
            images, "--outdir", out, "--steps", 3, "--threads", 1] + opts)
    rec = json.loads((out / "restore.json").read_text())
    assert rec["sampler"] == sampler and rec["measurement_rms_error_max"] < 1e-5
    assert rec["method"] == ("replacement" if method == "pocs" else method)
    assert rec["nfe"] == (5 if sampler == "heun" else 3)
    if opts:
        assert rec["sampler_options"] == {"eta": 1.0}


def test_bad_sampler_combinations_are_one_line(tiny, tmp_path):
    run_dir, images = tiny
    base = ["restore", "--run", run_dir, "--input", images, "--outdir", tmp_path / "o", "--steps", 2,
            "--task", "inpaint"]
    for extra, needles in (
        (["--method", "repaint", "--sampler", "heun"], ["own schedule", "replacement", "dps"]),
        (["--method", "replacement", "--sampler", "dpm_adaptive"], ["per-step correction", "heun"]),
        (["--method", "replacement", "--sampler", "hune"], ["did you mean 'heun'"]),
        (["--method", "replacement", "--sampler-opt", "eta=1"], ["needs --sampler"]),
        (["--method", "replacement", "--sampler", "ddim", "--sampler-opt", "eat=1"], ["valid: eta"]),
        (["--method", "posc"], ["did you mean 'pocs'", "pocs (= replacement)"]),
    ):
        r = invoke(base + extra, expect=2)
        assert all(n in r.output for n in needles), r.output
        assert r.output.strip().count("\n") == 0, r.output

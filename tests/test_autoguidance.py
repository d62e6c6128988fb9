"""Autoguidance (guidance.autoguidance): identities at w = 0 and 1, the interval, and the closed form on Gaussian
data, where D_w must be the exact denoiser of p_1^w p_0^(1-w)."""
import re

import pytest
import torch

from torchdiffusion.guidance.autoguidance import AutoGuidance


def gaussian_denoiser(mean: float, var: float):
    """Exact E[x0 | x] for x0 ~ N(mean, var) per coordinate, x = x0 + sigma n."""

    def d(x, sigma, cond=None):
        s2 = sigma.reshape((-1,) + (1,) * (x.ndim - 1)).double() ** 2
        return (mean + var / (var + s2) * (x.double() - mean)).to(x.dtype)

    return d


class Counting:
    def __init__(self, d):
        self.d, self.calls = d, 0

    def __call__(self, *a):
        self.calls += 1
        return self.d(*a)


def test_scale_one_is_the_good_model_and_zero_the_bad_one():
    good, bad = Counting(gaussian_denoiser(0.3, 1.0)), Counting(gaussian_denoiser(-0.2, 2.0))
    x, sigma = torch.randn(4, 1, 3, 3), torch.full((4,), 0.7)
    assert torch.equal(AutoGuidance(good, bad, 1.0)(x, sigma), good.d(x, sigma)) and bad.calls == 0
    assert torch.equal(AutoGuidance(good, bad, 0.0)(x, sigma), bad.d(x, sigma))


def test_matches_the_exact_denoiser_of_the_tilted_gaussian():
    """Scores add: w grad log p_1 + (1 - w) grad log p_0 with p_i = N(m_i, v_i + sigma^2) is the score of a Gaussian
    of precision w / (v_1 + s2) + (1 - w) / (v_0 + s2); D = x + sigma^2 score."""
    m1, v1, m0, v0, w = 0.4, 0.5, -0.3, 1.5, 2.5
    x = torch.randn(6, 2, 4, dtype=torch.float64) * 2
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 5.0, 20.0], dtype=torch.float64)
    d = AutoGuidance(gaussian_denoiser(m1, v1), gaussian_denoiser(m0, v0), w)(x, sigma)
    s2 = sigma.reshape(-1, 1, 1) ** 2
    score = -w * (x - m1) / (v1 + s2) - (1 - w) * (x - m0) / (v0 + s2)
    torch.testing.assert_close(d, x + s2 * score, rtol=1e-12, atol=1e-12)


def test_interval_falls_back_to_the_good_model_outside():
    good, bad = gaussian_denoiser(0.3, 1.0), gaussian_denoiser(-0.2, 2.0)
    x, sigma = torch.randn(3, 1, 2, 2), torch.tensor([0.1, 1.0, 10.0])
    out = AutoGuidance(good, bad, 2.0, interval=(0.5, 5.0))(x, sigma)
    full = AutoGuidance(good, bad, 2.0)(x, sigma)
    assert torch.equal(out[1], full[1])
    assert torch.equal(out[0], good(x, sigma)[0]) and torch.equal(out[2], good(x, sigma)[2])
    assert not torch.equal(out[1], good(x, sigma)[1])


def _sample(run, out, *extra):
    from tiny_runs import invoke

    invoke(["sample", "--run", run, "--outdir", out, "--seeds", "0-1", "--batch", "2", "--quiet", *extra])
    return (out / "grid.png").read_bytes()


def test_sample_command_autoguide(tiny_run, tmp_path):
    """A guide equal to the model changes nothing at any scale (D_0 + w (D_1 - D_0) = D_1 exactly when D_0 = D_1);
    a guide trained on other data, or a missing one, is refused in one line."""
    from tiny_runs import TINY_RUN, invoke

    plain = _sample(tiny_run, tmp_path / "plain")
    assert _sample(tiny_run, tmp_path / "self", "--autoguide", tiny_run, "--autoguide-scale", "3") == plain
    other = tmp_path / "other"
    args = ["train", "--run", other, "--no-progress"]
    for s in TINY_RUN + ["data.limit=32"]:
        args += ["--set", s]
    invoke(args)
    r = invoke(["sample", "--run", tiny_run, "--outdir", tmp_path / "x", "--autoguide", other], expect=2)
    assert "its data differs" in r.output and "Traceback" not in r.output
    r = invoke(["sample", "--run", tiny_run, "--outdir", tmp_path / "y", "--autoguide", tmp_path / "nope"], expect=2)
    assert "no such run or checkpoint folder" in r.output


def test_run_default_guide_kept_checkpoint_and_samples_json(tmp_path):
    """A run with sample.autoguide_step = 1 and train.keep_steps = [1]: the step-1 checkpoint survives keep_last = 1
    (off the ckpt_every cadence); `sample` then guides with it by default, exactly as `--autoguide` naming it at the
    run's autoguide_scale does, and says so in samples.json; `--autoguide none` is plain sampling; sampling the guide
    checkpoint itself is plain; a run whose guide checkpoint is gone is refused in one line."""
    import json
    import shutil

    from tiny_runs import TINY_RUN, invoke

    run = tmp_path / "run"
    args = ["train", "--run", run, "--no-progress"]
    for s in TINY_RUN + ["train.steps=4", "train.keep_last=1", "train.keep_steps=[1]", "sample.autoguide_step=1",
                         "sample.autoguide_scale=3"]:
        args += ["--set", s]
    invoke(args)
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert steps == ["step_00000001", "step_00000004"]
    guide = run / "checkpoints" / "step_00000001"
    default = _sample(run, tmp_path / "default")
    record = json.loads((tmp_path / "default" / "samples.json").read_text())
    assert record["autoguidance"] == {"guide": str(guide), "scale": 3.0, "networks_per_nfe": 2}
    assert _sample(run, tmp_path / "explicit", "--autoguide", guide, "--autoguide-scale", "3") == default
    plain = _sample(run, tmp_path / "plain", "--autoguide", "none")
    assert plain != default and "autoguidance" not in json.loads((tmp_path / "plain" / "samples.json").read_text())
    assert _sample(run, tmp_path / "w1", "--autoguide-scale", "1") == plain  # w = 1: the model alone
    invoke(["sample", "--checkpoint", guide, "--outdir", tmp_path / "g", "--seeds", "0-1", "--quiet"])
    assert "autoguidance" not in json.loads((tmp_path / "g" / "samples.json").read_text())
    # eval --fake RUN and audit --run make their images through config.run_images: the same default guide
    from torchdiffusion.config.run_images import open_run
    from torchdiffusion.pipelines.images import load_sample_folder
    src = open_run(run)
    assert src.record([0, 1])["autoguidance"] == {"guide": str(guide), "scale": 3.0, "networks_per_nfe": 2}
    assert torch.equal(src.generate([0, 1], batch=2), load_sample_folder(tmp_path / "default")[0])
    shutil.rmtree(guide)
    r = invoke(["sample", "--run", run, "--outdir", tmp_path / "gone"], expect=2)
    assert "no checkpoint step_00000001" in r.output and "Traceback" not in r.output


def test_guide_as_a_fraction_of_the_run_follows_its_planned_length(tmp_path):
    """train.keep_fractions = [0.25] on an 8-step run keeps step 2 (off the cadence, past keep_last = 1) and
    sample.autoguide_fraction = 0.25 guides with it, as --autoguide naming it does; with a planned length in the
    checkpoint (train.fit_minutes) the fraction is of that length, not of train.steps; a missing guide names the key."""
    from types import SimpleNamespace

    from tiny_runs import TINY_RUN, invoke

    from torchdiffusion.config.autoguide import default_guide
    from torchdiffusion.errors import ConfigError
    from torchdiffusion.train.budget import fraction_step

    assert [fraction_step(0.3, n) for n in (661, 1600, 1, 3)] == [198, 480, 1, 1]
    run = tmp_path / "run"
    args = ["train", "--run", run, "--no-progress"]
    for s in TINY_RUN + ["train.steps=8", "train.ckpt_every=8", "train.keep_last=1", "train.keep_fractions=[0.25]",
                         "train.keep_steps=[]", "sample.autoguide_step=null",
                         "sample.autoguide_fraction=0.25", "sample.autoguide_scale=3"]:
        args += ["--set", s]
    invoke(args)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000008"]
    guide = run / "checkpoints" / "step_00000002"
    assert _sample(run, tmp_path / "default") == _sample(run, tmp_path / "explicit", "--autoguide", guide,
                                                         "--autoguide-scale", "3")
    assert _sample(run, tmp_path / "plain", "--autoguide", "none") != _sample(run, tmp_path / "d2")

    def fake(planned, step):
        sample = SimpleNamespace(autoguide_step=None, autoguide_fraction=0.25)
        cfg = SimpleNamespace(sample=sample, train=SimpleNamespace(steps=1600))
        meta = {"trainer": {"step": step, **({"planned_steps": planned} if planned else {})}}
        return SimpleNamespace(config=cfg, checkpoint=SimpleNamespace(meta=meta), step=step, path=tmp_path)

    (tmp_path / "r2" / "checkpoints" / "step_00000165").mkdir(parents=True)
    assert default_guide(fake(660, 660), tmp_path / "r2", None) == tmp_path / "r2" / "checkpoints" / "step_00000165"
    assert default_guide(fake(660, 100), tmp_path / "r2", None) is None  # not later than the guide: the model alone
    with pytest.raises(ConfigError, match=r"autoguide_fraction 0.25 \(step 400\).*train.keep_fractions"):
        default_guide(fake(None, 1600), tmp_path / "r2", None)  # unplanned: a quarter of train.steps


@pytest.mark.parametrize("sets, words", [
    ({"autoguide_fraction": 1.0}, "in (0, 1)"),
    ({"autoguide_fraction": 0.3, "autoguide_step": 200}, "both name a guide"),
])
def test_autoguide_fraction_config_errors(sets, words):
    from torchdiffusion.config.schema import SampleConfig
    with pytest.raises(ValueError, match=re.escape(words)):
        SampleConfig(**sets)


def test_keep_fractions_config_errors():
    from torchdiffusion.train.trainer import TrainConfig
    for bad in ((0.0,), (1.5,), (True,)):
        with pytest.raises(ValueError, match=r"train.keep_fractions must be fractions of the run in \(0, 1\)"):
            TrainConfig(keep_fractions=bad)

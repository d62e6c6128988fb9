"""The library side of `sample` (pipelines.settings, pipelines.guided, pipelines.generate.sample_run) and the
shared command-line parsers (cli.common), without a trained model: a closed-form Gaussian denoiser stands in."""
import json

import pytest
import torch

from torchdiffusion.cli.common import parse_labels, parse_seeds
from torchdiffusion.config.schema import SampleConfig
from torchdiffusion.core import grids
from torchdiffusion.errors import ConfigError
from torchdiffusion.guidance.cfg import ClassifierFreeGuidance
from torchdiffusion.pipelines.generate import sample_run
from torchdiffusion.pipelines.guided import GuidedSampling
from torchdiffusion.pipelines.settings import override_sample
from torchdiffusion.sampling.ode import sample_euler

GRIDS = ("karras", "loglinear")


def test_override_sample_applies_only_the_given_flags():
    base = SampleConfig(sampler="heun", steps=18, grid="karras", eta=0.0)
    out = override_sample(base, sampler="ddim", steps=5, eta=0.5, grid_file="g.json", grids=GRIDS)
    assert (out.sampler, out.steps, out.eta, out.grid, out.grid_file) == ("ddim", 5, 0.5, "karras", "g.json")
    assert override_sample(base) == base


@pytest.mark.parametrize("kwargs,message", [
    ({"steps": 0}, "--steps must be >= 1, got 0"),
    ({"steps": 0, "steps_name": "train.eval_steps"}, "train.eval_steps must be >= 1"),
    ({"grid": "cosine", "grids": GRIDS}, "--grid 'cosine' is not valid; valid: karras, loglinear"),
])
def test_override_sample_errors_name_the_flag(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        override_sample(SampleConfig(), **kwargs)


def test_an_unknown_grid_passes_when_no_kinds_are_given():
    assert override_sample(SampleConfig(), grid="cosine").grid == "cosine"  # build_sigmas reports it then


def test_seed_and_label_lists():
    assert parse_seeds("0-3,9") == [0, 1, 2, 3, 9] and parse_labels("3") == [3] and parse_labels(None) is None
    for text, message in (("5-2", "--seeds '5-2' is not valid"), (",", "--seeds is empty"), ("-1", "not valid")):
        with pytest.raises(ConfigError, match=message):
            parse_seeds(text)
    with pytest.raises(ConfigError, match="--labels 'x' is not valid"):
        parse_labels("x")


def zero_denoiser(x, sigma, cond=None):
    """E[x0 | x] of data concentrated at 0: samples are 0 (uint8 128) whatever the noise."""
    return torch.zeros_like(x)


def test_guided_sampling_plain_and_labelled():
    plain = GuidedSampling(0, zero_denoiser, [0, 1, 2], "cpu")
    assert plain.denoiser is zero_denoiser and plain.labels is None and plain.record() == {}
    cond = GuidedSampling(3, zero_denoiser, [5, 6, 7, 8], "cpu", labels=[2, 0], labels_text="2,0", guidance_scale=2.0)
    assert isinstance(cond.denoiser, ClassifierFreeGuidance)
    assert cond.labels == [2, 0, 2, 0] and cond.label_of == {5: 2, 6: 0, 7: 2, 8: 0}  # cycled over the seeds
    rec = cond.record()
    assert rec["labels"] == "2,0" and rec["guidance_scale"] == 2.0 and rec["label_per_seed"] == [2, 0, 2, 0]
    assert GuidedSampling(3, zero_denoiser, [0], "cpu", guidance_scale=1.0).denoiser is zero_denoiser  # w = 1: D_c


@pytest.mark.parametrize("k,kwargs,message", [
    (0, {"labels": [1]}, "--labels needs a class-conditional model"),
    (3, {"labels": [3]}, "--labels 3 is out of range; this model/classifier has 3 classes"),
    (0, {"guidance_scale": 2.0}, "--guidance-scale needs a class-conditional model"),
    (3, {"interval": (0.1, 1.0)}, "--guidance-interval applies to"),
    (3, {"reject": True}, "--reject needs a classifier"),
])
def test_guided_sampling_errors(k, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GuidedSampling(k, zero_denoiser, [0, 1], "cpu", **kwargs)


class _Run:
    """What sample_run reads of a config.loaders.LoadedRun."""
    sample_shape = (1, 4, 4)
    path, step, weights = "ckpt", 7, "ema"
    codec = None  # pixel space

    def hashes(self):
        return {"model.safetensors": "0" * 64}


@pytest.mark.parametrize("world_size", [1, 2])
def test_sample_run_writes_this_process_share(tmp_path, world_size):
    seeds = [0, 1, 2, 3, 4]
    sigmas = grids.karras(3, 0.01, 10.0)
    guided = GuidedSampling(0, zero_denoiser, seeds, "cpu")
    records = [sample_run(_Run(), guided, seeds, tmp_path, sample_config=SampleConfig(sampler="euler", steps=3),
                          sampler=sample_euler, sampler_options={}, sigmas=sigmas, nfe=3, seeds_text="0-4", batch=2,
                          rank=rank, world_size=world_size) for rank in range(world_size)]
    assert sorted(p.name for p in tmp_path.glob("0*.png")) == [f"{s:06d}.png" for s in seeds]
    assert (tmp_path / "grid.png").exists() == (world_size == 1)  # a grid only from a single process
    rec = json.loads((tmp_path / "samples.json").read_text())
    assert rec == {**records[0], "sigmas": pytest.approx(rec["sigmas"])}
    assert (rec["seeds"], rec["count"], rec["processes"], rec["step"], rec["nfe"]) == ("0-4", 5, world_size, 7, 3)

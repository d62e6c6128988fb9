"""The library's one-call API (`torchdiffusion.load` -> config.pipeline.DiffusionPipeline): the same images as the
`sample` and `restore` commands for the same seeds and settings (bit for bit), the run's attributes, the codec
round trip, PIL output, saving, and bad input as one-line ConfigErrors."""
import re

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_runs import TINY_RUN, invoke, write_noise_pngs

import torchdiffusion
from torchdiffusion.errors import ConfigError, DataError
from torchdiffusion.train.checkpoint import load_checkpoint, resolve_latest

pytestmark = pytest.mark.usefixtures("one_thread")


def read_png(path) -> torch.Tensor:
    a = np.asarray(Image.open(path))
    return torch.from_numpy((a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).copy())


def pngs(folder) -> list:
    """The PNGs of a folder in natural name order (0.png < 2.png < 10.png; 000001.png alike)."""
    def key(p):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]
    return sorted((p for p in folder.iterdir() if p.suffix == ".png" and p.name != "grid.png"), key=key)


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    """TINY_RUN trained class-conditionally (2 steps; 10 classes, null label 10)."""
    d = tmp_path_factory.mktemp("api_cond")
    args = ["train", "--run", d, "--no-progress"]
    for s in TINY_RUN + ["cond.label.kind=class"]:
        args += ["--set", s]
    invoke(args)
    return d


def test_sample_is_the_sample_command_bit_for_bit(tiny_run, tmp_path):
    out = tmp_path / "cli"
    invoke(["sample", "--run", tiny_run, "--outdir", out, "--seeds", "3-7", "--batch", "2", "--sampler", "dpmpp_2m",
            "--steps", "3", "--quiet"])
    pipe = torchdiffusion.load(tiny_run)
    # the command's batch: across batch sizes a seed's floats agree to ~1e-7 (the network's GEMM/conv kernels differ
    # by batch shape), which can flip an 8-bit level; test_seeds_do_not_depend_on_the_batch covers batching
    images = pipe.sample(range(3, 8), sampler="dpmpp_2m", steps=3, batch=2)
    assert images.dtype == torch.uint8 and images.shape == (5, *pipe.data_shape)
    assert torch.equal(images, torch.stack([read_png(out / f"{s:06d}.png") for s in range(3, 8)]))
    written = pipe.save(images, tmp_path / "api", seeds=range(3, 8))  # the same PNG bytes as the command's
    assert [p.name for p in written] == [f"{s:06d}.png" for s in range(3, 8)]
    assert all(p.read_bytes() == (out / p.name).read_bytes() for p in written)
    # a stochastic sampler with an option, seeds as text: still the command's images
    out2 = tmp_path / "cli2"
    invoke(["sample", "--run", tiny_run, "--outdir", out2, "--seeds", "0,2", "--sampler", "edm", "--steps", "2",
            "--sampler-opt", "S_churn=20", "--quiet"])
    got = pipe.sample("0,2", sampler="edm", steps=2, sampler_options={"S_churn": 20})
    assert torch.equal(got, torch.stack([read_png(out2 / f"{s:06d}.png") for s in (0, 2)]))


def test_labels_and_guidance_match_the_command(cond_run, tmp_path):
    out = tmp_path / "cli"
    invoke(["sample", "--run", cond_run, "--outdir", out, "--seeds", "0-3", "--labels", "7,2", "--guidance-scale",
            "2.5", "--steps", "2", "--quiet"])
    pipe = torchdiffusion.load(cond_run)
    assert pipe.num_classes == 10 and pipe.conditioners == {"label": {"kind": "class", "num_classes": 10}}
    got = pipe.sample(range(4), labels=[7, 2], guidance_scale=2.5, steps=2)
    assert torch.equal(got, torch.stack([read_png(out / f"{s:06d}.png") for s in range(4)]))
    # the guidance changes the images (the comparison above can fail), and labels in text form are the same
    assert not torch.equal(got, pipe.sample(range(4), labels=[7, 2], steps=2))
    assert torch.equal(got, pipe.sample(range(4), labels="7,2", guidance_scale=2.5, steps=2, batch=1))
    with pytest.raises(ConfigError, match="out of range.*10 classes"):
        pipe.sample(range(2), labels=[10])
    # class names, where a run records them (a folder run's data.class_names): a name is its label
    pipe.class_names = tuple(f"digit{k}" for k in range(10))
    assert torch.equal(got, pipe.sample(range(4), labels="digit7, DIGIT2", guidance_scale=2.5, steps=2))
    assert torch.equal(got, pipe.sample(range(4), labels=["digit7", 2], guidance_scale=2.5, steps=2))
    with pytest.raises(ConfigError, match="label 'cat' is not valid; use class names digit0"):
        pipe.sample(range(2), labels="cat")
    # restore: the null label by default, or labels (one for all, or one per image), which change the result
    x = pipe.sample(range(2), steps=2)
    null = pipe.restore(x, method="replacement", steps=2)
    three = pipe.restore(x, method="replacement", steps=2, labels=3)
    assert torch.equal(three, pipe.restore(x, method="replacement", steps=2, labels=[3, 3], batch=1))
    assert not torch.equal(null, three)
    with pytest.raises(ConfigError, match="3 labels for 2 images"):
        pipe.restore(x, steps=2, labels=[1, 2, 3])


def test_restore_is_the_restore_command_bit_for_bit(tiny_run, tmp_path):
    images = write_noise_pngs(tmp_path / "in", 3)
    out = tmp_path / "cli"
    invoke(["restore", "--run", tiny_run, "--task", "inpaint", "--method", "dps", "--input", images, "--outdir", out,
            "--steps", "3", "--seeds", "5-7", "--noise", "0.05", "--quiet"])
    pipe = torchdiffusion.load(tiny_run)
    restored, shown = pipe.restore(images, task="inpaint", method="dps", steps=3, seeds=range(5, 8), noise=0.05,
                                   batch=2, return_measurement=True)
    assert torch.equal(restored, torch.stack([read_png(p) for p in pngs(out / "restored")]))
    assert torch.equal(shown, torch.stack([read_png(p) for p in pngs(out / "measurement")]))
    # the input as a tensor or as PIL images gives the same restorations
    x = torch.stack([read_png(images / f"{i}.png") for i in range(3)])
    assert torch.equal(pipe.restore(x, method="dps", steps=3, seeds=[5, 6, 7], noise=0.05), restored)
    pil = [Image.open(images / f"{i}.png") for i in range(3)]
    assert torch.equal(pipe.restore(pil, method="dps", steps=3, seeds=[5, 6, 7], noise=0.05), restored)


def test_attributes_describe_the_run(tiny_run):
    pipe = torchdiffusion.load(tiny_run)
    proc = pipe.model.process
    assert (pipe.sigma_min, pipe.sigma_max) == (float(proc.sigma_min), float(proc.sigma_max))
    assert pipe.sigma_min < pipe.sigma_max
    assert pipe.process == "edm" and pipe.shape == pipe.data_shape == (1, 28, 28)
    assert pipe.conditioners == {} and pipe.num_classes == 0
    assert pipe.step == 2 and pipe.weights == "ema" and "step 2" in repr(pipe)


def test_checkpoint_folder_and_raw_weights(tiny_run):
    ckpt = resolve_latest(tiny_run / "checkpoints")
    a, b = torchdiffusion.load(tiny_run), torchdiffusion.load(ckpt)
    assert b.checkpoint == ckpt and torch.equal(a.sample([1], steps=2), b.sample([1], steps=2))
    raw = torchdiffusion.load(tiny_run, ema=False)
    stored = load_checkpoint(ckpt).tensors["model"]
    assert raw.weights == "raw"
    assert all(torch.equal(v, stored[k]) for k, v in raw.model.state_dict().items())


def test_a_diffusers_folder_loads_as_a_pipeline(tmp_path):
    """A local diffusers UNet2DModel folder (the interop fixture) is a pipeline too: its samples are those of
    `sample` on the run folder `convert-diffusers` writes from it."""
    from pathlib import Path
    fixture = Path(__file__).parent / "fixtures" / "diffusers_unet_tiny"
    pipe = torchdiffusion.load(fixture)
    assert pipe.process == "vp_discrete" and pipe.checkpoint == fixture and pipe.shape == pipe.data_shape
    invoke(["convert-diffusers", fixture, "--run", tmp_path / "run"])
    invoke(["sample", "--run", tmp_path / "run", "--outdir", tmp_path / "s", "--seeds", "0-1", "--sampler", "ddim",
            "--steps", "3", "--quiet"])
    got = pipe.sample(range(2), sampler="ddim", steps=3)
    assert torch.equal(got, torch.stack([read_png(tmp_path / "s" / f"{s:06d}.png") for s in range(2)]))


def test_seeds_do_not_depend_on_the_batch(tiny_run):
    pipe = torchdiffusion.load(tiny_run)
    one = pipe.sample(range(5), steps=2, batch=1)
    assert torch.equal(one, pipe.sample(range(5), steps=2, batch=5))
    assert torch.equal(one[2:3], pipe.sample(2, steps=2))  # an int is one seed
    assert not torch.equal(one[0], one[1])


def test_encode_decode_round_trip_and_pil(tiny_run, tmp_path):
    pipe = torchdiffusion.load(tiny_run)
    x = torch.randint(0, 256, (3, *pipe.data_shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    z = pipe.encode(x)
    assert z.shape == (3, *pipe.shape) and z.dtype == torch.float32 and -1 <= float(z.min()) <= float(z.max()) <= 1
    assert torch.equal(pipe.decode(z), x)
    ims = pipe.decode(z, output="pil")
    assert [im.mode for im in ims] == ["L"] * 3 and torch.equal(torch.from_numpy(np.array(ims[1]))[None], x[1])
    samples = pipe.sample(range(2), steps=2, output="pil")
    assert len(samples) == 2 and samples[0].size == (28, 28)
    # save: PIL in, a grid file for a .png path
    grid = pipe.save(samples, tmp_path / "g" / "grid.png")[0]
    assert read_png(grid).shape == (1, 2 + 30, 2 + 2 * 30)  # 2 columns of 28 px + 2 px borders
    assert torch.equal(pipe.decode(pipe.encode(samples)), pipe.sample(range(2), steps=2))


def test_bad_input_is_one_line(tiny_run, tmp_path):
    pipe = torchdiffusion.load(tiny_run)
    cases = [
        (lambda: pipe.sample(range(2), sampler="heunn"), ConfigError, "unknown sampler 'heunn'.*did you mean 'heun'"),
        (lambda: pipe.sample(range(2), labels=[3]), ConfigError, "unconditional"),
        (lambda: pipe.sample(range(2), guidance_scale=2.0), ConfigError, "class-conditional"),
        (lambda: pipe.sample(range(2), steps=0), ConfigError, "steps must be >= 1"),
        (lambda: pipe.sample([-1]), ConfigError, "non-negative"),
        (lambda: pipe.sample("0-x"), ConfigError, "seeds '0-x' is not valid"),
        (lambda: pipe.sample(range(2), output="numpy"), ConfigError, "output 'numpy'.*tensor, pil"),
        (lambda: pipe.sample(range(2), sampler="edm", sampler_options={"S_crn": 1}), ConfigError,
         "no such option.*S_churn"),
        (lambda: pipe.restore(torch.zeros(1, 1, 8, 8, dtype=torch.uint8)), DataError, r"\(1, 28, 28\)"),
        (lambda: pipe.restore(torch.zeros(1, 1, 28, 28)), ConfigError, "uint8"),
        (lambda: pipe.restore(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), method="magic"), ConfigError,
         "unknown restore method"),
        (lambda: pipe.restore(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), task="superres", scale=5), ConfigError,
         "factor 5 does not divide"),
        (lambda: pipe.restore(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), method="dps",
                              method_options={"jump": 3}), ConfigError, "method_options for 'dps'"),
        (lambda: pipe.restore(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), labels=1), ConfigError,
         "no class condition"),
        (lambda: pipe.decode(torch.zeros(1, 3, 28, 28)), ConfigError, r"decode takes \(N, 1, 28, 28\)"),
        (lambda: torchdiffusion.load(tmp_path / "nothing"), ConfigError, "no such run folder"),
        (lambda: torchdiffusion.load(tiny_run, device="tpu"), ConfigError, "device 'tpu' is not valid"),
    ]
    for call, err, pattern in cases:
        with pytest.raises(err, match=pattern) as e:
            call()
        assert "\n" not in str(e.value)

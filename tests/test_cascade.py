"""Cascaded diffusion and super resolution (docs/cascade.md): the one down-sampler, the low_res conditioner's
augmentation, the cascade's hand-offs (an exact Gaussian base model), per-seed determinism, resume, one-line errors."""
from __future__ import annotations

import math

import pytest
import torch

from analytic import GaussianData
from tiny_runs import invoke
from torchdiffusion.conditioners.base import Conditioning
from torchdiffusion.conditioners.low_res import (LEVEL_SCALE, LowResConditioner, LowResConfig, LowResInput,
                                                 parse_level, sigma_of_time, time_of_sigma)
from torchdiffusion.config.build import build_data, build_model
from torchdiffusion.config.schema import DataConfig, ModelConfig
from torchdiffusion.core.processes import EDM
from torchdiffusion.data.convert import to_model_range, to_uint8
from torchdiffusion.data.resize import downsample, downsample_uint8, gaussian_blur, upsample
from torchdiffusion.errors import ConfigError
from torchdiffusion.nn.unet import UNetConfig
from torchdiffusion.pipelines.cascade import Stage, cascade_generate, stage_generators, truncate_grid
from torchdiffusion.pipelines.generate import generate
from torchdiffusion.sampling.ancestral import sample_ddpm
from torchdiffusion.sampling.ode import sample_heun
from torchdiffusion.train.checkpoint import load_checkpoint, resolve_latest


def conditioner(size=(4, 4), factor=2, channels=1, seed=0, rank=0, world_size=1, **kw) -> LowResConditioner:
    cfg = LowResConfig(factor=factor, **kw).for_data(channels, size)
    return LowResConditioner("low_res", cfg, seed=seed, rank=rank, world_size=world_size)


def random_unet(shape, conds, seed=0):
    """A tiny U-Net denoiser with random (not zero-initialised) weights, so every input reaches the output."""
    torch.manual_seed(seed)
    cfg = ModelConfig(process=EDM(), head="edm", data_shape=tuple(shape),
                      backbone=UNetConfig(model_channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                                          norm_groups=4, num_heads=2, mid_attention=False))
    model = build_model(cfg, "fp32", conds)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    return model.eval()


def _karras(n, smin=0.002, smax=80.0, rho=7.0):
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    s = (smax ** (1 / rho) + i * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


class GaussianImages:
    """An exact denoiser of Gaussian images N(mu, diag v) of shape (C, H, W) (analytic.GaussianData, flattened)."""

    def __init__(self, shape, mean=0.1, var=0.04):
        d = math.prod(shape)
        self.shape = shape
        self.data = GaussianData(mu=torch.full((d,), mean, dtype=torch.float64),
                                 v=torch.full((d,), var, dtype=torch.float64))

    def __call__(self, x, sigma, cond=None):
        out = self.data.denoise(x.reshape(x.shape[0], -1).double(), sigma.double())
        return out.reshape(x.shape).to(x.dtype)


class Recorder:
    """An SR 'denoiser' that returns 0 and keeps the cond of its first call per batch (the hand-off)."""

    def __init__(self):
        self.concat, self.level = [], []

    def __call__(self, x, sigma, cond=None):
        if float(sigma[0]) == self._first:
            self.concat.append(cond["concat"].clone())
            self.level.append(cond["aug_level"].clone())
        return torch.zeros_like(x)

    _first = 80.0


# --------------------------------------------------------------------------------------------- the down-sampler
def test_down_and_up_sampling_identities():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(3, 2, 5, 7, generator=g) * 2 - 1
    assert torch.allclose(downsample(upsample(y, 4), 4), y, atol=1e-6)  # up is the pseudo-inverse of the box mean
    x = torch.rand(3, 2, 10, 14, generator=g)
    assert torch.allclose(downsample(2 * x - 1, 2), 2 * downsample(x, 2) - 1, atol=1e-6)  # linear, affine-commuting
    assert torch.allclose(downsample(x, 2).mean(dim=(-1, -2)), x.mean(dim=(-1, -2)), atol=1e-6)  # keeps the mean
    u8 = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=g)
    assert torch.equal(downsample_uint8(u8, 2), to_uint8(downsample(to_model_range(u8), 2)))
    with pytest.raises(ConfigError, match="does not divide"):
        downsample(x, 3)


def test_the_same_down_sampler_in_training_and_in_the_cascade():
    """The base stage's training images (data.downsample), the SR conditioner's low-res input and the inverse
    solvers' measurement (AvgPoolDown) are one down-sampler; replacing any of them breaks this test."""
    from torchdiffusion.inverse.operators import AvgPoolDown
    full = build_data(DataConfig(kind="mnist", limit=16))
    base = build_data(DataConfig(kind="mnist", limit=16, downsample=2))
    assert tuple(base.x.shape[-2:]) == (14, 14)
    c = conditioner(size=(28, 28))
    low = c.low_res_of({"x": full.x})
    assert torch.equal(low, to_model_range(base.x))  # the SR stage conditions on exactly the base's images
    clean = c.for_sampling(list(range(16)), LowResInput(to_model_range(base.x), time=0.0))["concat"]
    assert torch.equal(clean, upsample(low, 2))
    measured = AvgPoolDown(2)(to_model_range(full.x))
    assert torch.allclose(to_model_range(to_uint8(measured)), low, atol=1e-6)


@pytest.mark.parametrize("factor,shape", [(2, (3, 1, 28, 28)), (2, (2, 3, 8, 12)), (4, (2, 2, 16, 8))])
def test_avgpool_operator_is_the_area_down_sampler_on_random_images(factor, shape):
    """The inverse solvers' super-resolution operator is data.resize's down-sampler on any float image (not only
    on data-set images after quantisation), and its pseudo-inverse is data.resize's up-sampler; so a comparison of
    an SR stage with zero-shot solvers measures both with one A."""
    from torchdiffusion.inverse.operators import AvgPoolDown
    g = torch.Generator().manual_seed(factor + shape[1])
    x = torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1
    op = AvgPoolDown(factor)
    y = op(x)
    assert torch.allclose(y, downsample(x, factor), atol=1e-12, rtol=0)
    # block means computed by hand: the reshape of each f x f block
    b, c, h, w = shape
    blocks = x.reshape(b, c, h // factor, factor, w // factor, factor).mean(dim=(3, 5))
    assert torch.allclose(y, blocks, atol=1e-12, rtol=0)
    assert torch.equal(op.pinv(y), upsample(y, factor))
    assert torch.allclose(op(upsample(y, factor)), y, atol=1e-12, rtol=0)


def test_blur_preserves_constants_and_sigma_zero_is_the_identity():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 6, 6, generator=g)
    assert torch.equal(gaussian_blur(x, torch.zeros(2), 3), x)
    const = torch.full((2, 1, 5, 5), 0.7)
    assert torch.allclose(gaussian_blur(const, torch.tensor([0.5, 2.0]), 5), const, atol=1e-6)  # replicate padding
    blurred = gaussian_blur(x, torch.tensor([0.0, 1.0]), 3)
    assert torch.equal(blurred[0], x[0]) and not torch.allclose(blurred[1], x[1])


# --------------------------------------------------------------------------------------------- levels
def test_levels_snr_time_and_sigma_agree():
    assert parse_level("snr=3") == pytest.approx(1 / 3)
    assert 1 / float(sigma_of_time(parse_level("snr=5"))) ** 2 == pytest.approx(5.0)
    assert parse_level("none") == 0.0 and parse_level("t=0.25") == 0.25
    assert float(time_of_sigma(sigma_of_time(0.4))) == pytest.approx(0.4)
    assert parse_level("sigma=1") == pytest.approx(0.5)
    for bad in ("snr=0", "t=1.5", "foo=1", "abc"):
        with pytest.raises(ConfigError):
            parse_level(bad)


def test_level_zero_is_clean_conditioning_exactly():
    c = conditioner(blur_prob=1.0)
    g = torch.Generator().manual_seed(2)
    x_lr = torch.rand(4, 1, 2, 2, generator=g) * 2 - 1
    out = c.for_sampling([0, 1, 2, 3], LowResInput(x_lr, time=0.0, blur=0.0))
    assert torch.equal(out["concat"], upsample(x_lr, 2)) and torch.equal(out["aug_level"], torch.zeros(4))
    noisy = c.for_sampling([0, 1, 2, 3], LowResInput(x_lr, time=0.3))
    assert not torch.allclose(noisy["concat"], out["concat"])
    # training without augmentation: clean conditioning at level 0, exactly
    u8 = torch.randint(0, 256, (4, 1, 4, 4), dtype=torch.uint8, generator=g)
    plain = conditioner(noise="none").from_batch({"x": u8}, step=7)
    assert torch.equal(plain["concat"], upsample(to_model_range(downsample_uint8(u8, 2)), 2))
    assert torch.equal(plain["aug_level"], torch.zeros(4))


def test_training_draws_depend_on_seed_step_and_position_only():
    g = torch.Generator().manual_seed(3)
    u8 = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8, generator=g)
    c = conditioner(seed=5, blur_prob=0.5)
    a, b = c.from_batch({"x": u8}, step=11), c.from_batch({"x": u8}, step=11)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["aug_level"], c.from_batch({"x": u8}, step=12)["aug_level"])
    # two processes take rows r, r + 2, ... of the global batch: the same draws as one process
    halves = [conditioner(seed=5, blur_prob=0.5, rank=r, world_size=2).from_batch({"x": u8[r::2]}, step=11)
              for r in (0, 1)]
    for k in a:
        assert torch.allclose(halves[0][k], a[k][0::2]) and torch.allclose(halves[1][k], a[k][1::2])
    assert float(a["aug_level"].max()) <= LEVEL_SCALE and float(a["aug_level"].min()) >= 0


def test_sr_output_depends_on_the_augmentation_level():
    c = conditioner()
    model = random_unet((1, 4, 4), c.specs)
    g = torch.Generator().manual_seed(4)
    x_lr = torch.rand(2, 1, 2, 2, generator=g) * 2 - 1
    x = torch.randn(2, 1, 4, 4, generator=g)
    sigma = torch.full((2,), 1.0)
    with torch.no_grad():
        d0 = model(x, sigma, c.for_sampling([0, 1], LowResInput(x_lr, time=0.0)))
        d0b = model(x, sigma, c.for_sampling([0, 1], LowResInput(x_lr, time=0.0)))
        clean = c.for_sampling([0, 1], LowResInput(x_lr, time=0.0))
        level_only = model(x, sigma, {"concat": clean["concat"], "aug_level": torch.full((2,), 400.0)})
        d4 = model(x, sigma, c.for_sampling([0, 1], LowResInput(x_lr, time=0.4)))
    assert torch.equal(d0, d0b)
    assert (level_only - d0).abs().max() > 1e-4  # the embedded level alone changes the output
    assert (d4 - d0).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------- hand-offs
def _gaussian_cascade(handoff, t, n=3000, steps=40):
    base = Stage("base", GaussianImages((1, 2, 2)), (1, 2, 2), sample_heun, _karras(steps))
    rec = Recorder()
    sr = Stage("sr", rec, (1, 4, 4), lambda d, noise, s, cond=None, generator=None: d(noise * s[0], s[:1].expand(
        noise.shape[0]).float(), cond), _karras(2), Conditioning([conditioner()]))
    cascade_generate([base, sr], list(range(n)), levels=t, handoff=handoff, batch=1000)
    concat = torch.cat(rec.concat)
    alpha = math.cos(0.5 * math.pi * t)
    return downsample(concat, 2) / alpha, torch.cat(rec.level)  # z = x_lr + sigma n, (N, 1, 2, 2)


@pytest.mark.parametrize("handoff", ["truncated", "full"])
def test_handoff_has_the_marginal_of_q_z_given_x_lr(handoff):
    """Exact Gaussian base N(0.1, 0.04): the z the SR stage sees is N(0.1, 0.04 + sigma_s^2) for both hand-offs."""
    t = 1 / 3  # SNR 3
    s = float(sigma_of_time(t))
    z, level = _gaussian_cascade(handoff, t)
    n = z.shape[0]
    flat = z.reshape(n, -1).double()
    var = 0.04 + s * s
    assert torch.allclose(level, torch.full_like(level, LEVEL_SCALE * t))
    assert (flat.mean(0) - 0.1).abs().max() < 4 * math.sqrt(var / n)
    assert (flat.var(0) / var - 1).abs().max() < 4 * math.sqrt(2 / n) + 0.01  # + heun's discretisation error


def test_truncated_grid_stops_at_the_level():
    sig = _karras(10)
    cut = truncate_grid(sig, 0.5)
    assert float(cut[-1]) == 0.5 and bool((cut[:-1] > 0.5).all()) and bool((cut[:-1] == sig[sig > 0.5]).all())
    assert torch.equal(truncate_grid(sig, 0.0), sig)
    with pytest.raises(ConfigError, match="sigma_max"):
        truncate_grid(sig, 100.0)


def _tiny_cascade(three=False):
    c1 = conditioner(size=(4, 4))
    stages = [Stage("base", random_unet((1, 2, 2), (), seed=1), (1, 2, 2), sample_ddpm, _karras(4)),
              Stage("sr", random_unet((1, 4, 4), c1.specs, seed=2), (1, 4, 4), sample_ddpm, _karras(3),
                    Conditioning([c1]))]
    if three:
        c2 = conditioner(size=(8, 8))
        stages.append(Stage("sr2", random_unet((1, 8, 8), c2.specs, seed=3), (1, 8, 8), sample_heun, _karras(3),
                            Conditioning([c2])))
    return stages


def test_full_handoff_at_level_zero_equals_no_augmentation():
    stages = _tiny_cascade()
    seeds = [0, 1, 2]
    out = cascade_generate(stages, seeds, levels=0.0, handoff="full")
    base_u8 = out["images"][0]
    gens = stage_generators(seeds, 1)
    noise = torch.cat([torch.randn((1, 1, 4, 4), generator=g) for g in gens])
    cond = {"concat": upsample(to_model_range(base_u8), 2), "aug_level": torch.zeros(3)}  # clean, no augmentation
    with torch.no_grad():
        direct = to_uint8(sample_ddpm(stages[1].denoiser, noise, stages[1].sigmas, cond=cond, generator=gens))
    assert torch.equal(out["images"][1], direct)
    assert torch.equal(cascade_generate(stages, seeds, levels=0.0, handoff="truncated")["images"][1], direct)
    noisy = cascade_generate(stages, seeds, levels=0.3, handoff="full")["images"][1]
    assert not torch.equal(noisy, direct)


@pytest.mark.parametrize("handoff", ["full", "truncated"])
def test_per_seed_determinism_through_the_whole_cascade(handoff):
    stages = _tiny_cascade(three=True)
    a = cascade_generate(stages, [0, 1, 2, 3, 4], levels=[0.3, 0.2], handoff=handoff, batch=5)["images"]
    b = cascade_generate(stages, [0, 1, 2, 3, 4], levels=[0.3, 0.2], handoff=handoff, batch=2)["images"]
    c = cascade_generate(stages, [3, 1], levels=[0.3, 0.2], handoff=handoff, batch=1)["images"]
    for k in range(3):
        assert torch.equal(a[k], b[k])
        assert torch.equal(c[k], a[k][[3, 1]])
    assert a[2].shape == (5, 1, 8, 8)
    # the base stage is `generate` of the base model with the same seeds (stage 0 draws from the seed itself)
    if handoff == "full":
        ref = generate(stages[0].denoiser, [0, 1, 2, 3, 4], (1, 2, 2), sample_ddpm, stages[0].sigmas, batch=3)
        assert torch.equal(ref, a[0])


def test_cascade_refuses_stages_that_do_not_fit():
    stages = _tiny_cascade(three=True)
    with pytest.raises(ConfigError, match="first stage must be a base model"):
        cascade_generate(stages[1:], [0])
    with pytest.raises(ConfigError, match="no low-resolution conditioner"):
        cascade_generate([stages[0], stages[0]], [0])
    with pytest.raises(ConfigError, match="takes 4x4 images"):
        cascade_generate([stages[0], stages[2]], [0])
    with pytest.raises(ConfigError, match="takes 2x2 images with 1 channel"):
        cascade_generate(stages[1:2], [0], low_res=torch.zeros(1, 3, 2, 2))
    with pytest.raises(ConfigError, match="levels"):
        cascade_generate(stages, [0], levels=[0.1, 0.2, 0.3])
    c = conditioner()
    with pytest.raises(ConfigError, match="needs a low-resolution input"):
        c.for_sampling([0], None)
    with pytest.raises(ConfigError, match="does not divide"):
        LowResConfig(factor=3).for_data(1, (28, 28))


# --------------------------------------------------------------------------------------------- runs
TINY = ["data.limit=32", "data.val_split=null", "model.backbone.model_channels=8", "model.backbone.channel_mult=[1,2]",
        "model.backbone.num_res_blocks=1", "model.backbone.attn_resolutions=[]", "model.backbone.norm_groups=4",
        "model.backbone.num_heads=2", "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1",
        "train.sample_every=1000", "train.ckpt_every=2", "sample.steps=2", "sample.grid_images=2",
        "train.max_minutes=0", "train.precision=fp32"]


def train(preset, run_dir, steps, extra=(), until=None, expect=0):
    args = ["train", "--preset", preset, "--run", run_dir, "--no-progress", "--threads", "1"]
    if until:
        args += ["--until-step", until]
    for s in TINY + [f"train.steps={steps}"] + list(extra):
        args += ["--set", s]
    return invoke(args, expect)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cascade")
    train("mnist-cascade-base", d / "base", 2)
    train("mnist-cascade-sr", d / "sr", 4, ["cond.low_res.blur_prob=0.5"])
    return d


def test_sr_training_resumes_bit_exactly(runs, tmp_path):
    d = tmp_path / "split"
    train("mnist-cascade-sr", d, 4, ["cond.low_res.blur_prob=0.5"], until=2)
    train("mnist-cascade-sr", d, 4, ["cond.low_res.blur_prob=0.5"])
    a = load_checkpoint(resolve_latest(runs / "sr" / "checkpoints"))
    b = load_checkpoint(resolve_latest(d / "checkpoints"))
    assert a.meta["trainer"]["step"] == b.meta["trainer"]["step"] == 4
    for group in ("model", "ema"):
        for k in a.tensors[group]:
            assert torch.equal(a.tensors[group][k], b.tensors[group][k]), (group, k)


def test_cascade_sample_command_writes_every_stage(runs, tmp_path):
    out = tmp_path / "out"
    invoke(["cascade", "sample", "--stage", runs / "base", "--stage", runs / "sr", "--outdir", out, "--seeds", "0-3",
            "--steps", "3,2", "--aug-level", "snr=3", "--threads", "1"])
    for stage, size in (("stage1", 14), ("stage2", 28)):
        from PIL import Image
        assert (out / stage / "grid.png").is_file()
        assert Image.open(out / stage / "000003.png").size == (size, size)
    import json
    rec = json.loads((out / "cascade.json").read_text())
    assert rec["aug_levels_t"] == [pytest.approx(1 / 3)] and rec["stages"][1]["steps"] == 2
    again = tmp_path / "again"
    invoke(["cascade", "sample", "--stage", runs / "base", "--stage", runs / "sr", "--outdir", again, "--seeds", "2-3",
            "--steps", "3,2", "--aug-level", "snr=3", "--threads", "1", "--batch", "1"])
    assert (again / "stage2" / "000003.png").read_bytes() == (out / "stage2" / "000003.png").read_bytes()
    # an SR stage on given low-res images (the base stage's PNGs)
    lr = tmp_path / "lr"
    invoke(["cascade", "sample", "--low-res", out / "stage1", "--stage", runs / "sr", "--outdir", lr, "--seeds", "0-3",
            "--steps", "2", "--aug-level", "none", "--threads", "1"])
    assert (lr / "stage1" / "000000.png").is_file()


def test_bad_cascade_inputs_are_one_line(runs, tmp_path):
    cases = [
        (["cascade", "sample", "--stage", runs / "sr", "--outdir", tmp_path / "a"], "first stage must be a base"),
        (["cascade", "sample", "--stage", runs / "base", "--stage", runs / "base", "--outdir", tmp_path / "b"],
         "no low-resolution conditioner"),
        (["cascade", "sample", "--stage", runs / "base", "--stage", runs / "sr", "--stage", runs / "sr",
          "--outdir", tmp_path / "c"], "takes 14x14 images"),
        (["cascade", "sample", "--stage", runs / "base", "--stage", runs / "sr", "--aug-level", "snr=-2",
          "--outdir", tmp_path / "d"], "SNR must be > 0"),
        (["sample", "--run", runs / "sr", "--outdir", tmp_path / "e"], "needs a low-resolution input"),
    ]
    for args, msg in cases:
        r = invoke(args, expect=2)
        assert msg in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    import torchdiffusion
    with pytest.raises(ConfigError, match="super-resolution stage"):
        torchdiffusion.load(runs / "sr").sample(range(2))
    r = train("mnist-cascade-sr", tmp_path / "f", 2, ["cond.low_res.factor=3"], expect=2)
    assert "does not divide the image size 28x28" in r.output
    r = train("mnist-cascade-base", tmp_path / "g", 2, ["data.downsample=5"], expect=2)
    assert "data.downsample 5 does not divide" in r.output


def test_sweep_reuses_the_base_and_gives_the_cascade_images(tmp_path):
    """cascade sweep (full hand-off) samples the base once; each level's images equal `cascade sample`'s."""
    from torchdiffusion.pipelines.cascade_sweep import plot_sweep, sweep_levels, sweep_table
    stages = _tiny_cascade()
    seeds = [0, 1, 2, 3]
    seen = []

    def score(images):
        seen.append(images)
        return {"fid": float(images.double().mean()), "kid": 0.0, "kid_std": 0.0, "n": len(images)}

    rows = sweep_levels(stages, seeds, [0.0, 0.3], score, handoff="full", outdir=tmp_path)
    for t, images in zip([0.0, 0.3], seen):
        assert torch.equal(images, cascade_generate(stages, seeds, levels=t)["images"][-1])
    trunc = sweep_levels(stages, seeds, [0.3], score, handoff="truncated")
    assert torch.equal(seen[-1], cascade_generate(stages, seeds, levels=0.3, handoff="truncated")["images"][-1])
    assert [r["t"] for r in rows] == [0.0, 0.3] and len(trunc) == 1
    table = sweep_table({"handoff": "full", "real": "x", "extractor": "e", "count": 4, "seeds": "0-3", "rows": rows})
    assert "t=0 (clean)" in table and "t=0.3 (SNR 3.85)" in table
    plot_sweep(rows, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0 and (tmp_path / "grid_t0.300.png").is_file()

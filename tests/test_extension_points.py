"""The seams a new model family plugs into, used from outside the library exactly as a contributor would: a backbone
and a conditioner defined in this file, registered with one line each, then trained, sampled, resumed and restored
through the public API and the CLI without touching a library file."""
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tiny_runs import invoke, train_short as train, write_noise_pngs
from torchdiffusion.config import registry
from torchdiffusion.config.loaders import load_run
from torchdiffusion.core import grids
from torchdiffusion.errors import ConfigError
from torchdiffusion.guidance.cfg import ClassifierFreeGuidance
from torchdiffusion.protocols import BackboneIO, CondSpec
from torchdiffusion.sampling.ode import sample_heun
from torchdiffusion.train.checkpoint import load_checkpoint, resolve_latest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --------------------------------------------------------------------------------------------- a tiny backbone
@dataclass(frozen=True)
class TinyConvConfig:
    width: int = 8
    depth: int = 2


class TinyConv(nn.Module):
    """Conv net with the noise level (and a class label, if declared) added as a per-channel bias."""

    def __init__(self, cfg: TinyConvConfig, io: BackboneIO):
        super().__init__()
        c = io.shape[0]
        self.noise = nn.Sequential(nn.Linear(1, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width))
        labels = [s for s in io.conds if s.kind == "class"]
        self.label = nn.Embedding(labels[0].size + 1, cfg.width) if labels else None
        self.inp = nn.Conv2d(c, cfg.width, 3, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(cfg.width, cfg.width, 3, padding=1) for _ in range(cfg.depth))
        self.out = nn.Conv2d(cfg.width, io.out_channels, 3, padding=1)

    def forward(self, x, c_noise, cond=None):
        e = self.noise(c_noise[:, None].float())
        if self.label is not None:
            e = e + self.label(cond["label"])
        h = torch.nn.functional.silu(self.inp(x) + e[:, :, None, None])
        for conv in self.body:
            h = h + torch.nn.functional.silu(conv(h))
        return self.out(h)


# --------------------------------------------------------------------------------------------- a tiny conditioner
@dataclass(frozen=True)
class BrightnessConfig:
    p_uncond: float = 0.0


class Brightness:
    """cond[key] = mean pixel value in [0, 1] of each training image (B,) float; the null value is -1."""

    def __init__(self, name, cfg, *, seed=0, rank=0, world_size=1):
        self.name, self.cfg = name, cfg

    @property
    def specs(self):
        return (CondSpec(self.name, "scalar"),)

    def from_batch(self, batch, step):
        return {self.name: batch["x"].float().mean(dim=(1, 2, 3)) / 255.0}

    def for_sampling(self, seeds, values=None):
        return {self.name: torch.full((len(seeds),), 0.2 if values is None else float(values))}

    def null(self, cond):
        return {self.name: torch.full_like(cond[self.name], -1.0)}


@pytest.fixture
def plugins(monkeypatch):
    """Register the two kinds for one test (monkeypatch removes them afterwards)."""
    monkeypatch.setitem(registry.KINDS, "backbone", dict(registry.KINDS["backbone"]))
    monkeypatch.setitem(registry.KINDS, "conditioner", dict(registry.KINDS["conditioner"]))
    registry.register_backbone("tiny-conv", TinyConvConfig, TinyConv)           # the one registration line
    registry.register_conditioner("brightness", BrightnessConfig, Brightness)  # the one registration line


TINY_CONV = ["model.backbone={kind: tiny-conv, width: 8}"]


def test_unknown_backbone_kind_is_one_line(tmp_path):
    r = invoke(["train", "--run", tmp_path / "x", "--set", "model.backbone={kind: tiny-conv}"], expect=2)
    assert "unknown backbone kind 'tiny-conv'" in r.output and "valid: unet" in r.output
    assert r.output.count("\n") == 1


def test_plugin_backbone_trains_resumes_samples_and_restores(plugins, tmp_path):
    pytest.importorskip("mnist")
    full, split = tmp_path / "full", tmp_path / "split"
    train(full, 4, TINY_CONV + ["cond.label.kind=class"])
    train(split, 4, TINY_CONV + ["cond.label.kind=class"], until=2)
    train(split, 4, TINY_CONV + ["cond.label.kind=class"])  # resumes at step 2
    a = load_checkpoint(resolve_latest(full / "checkpoints"))
    b = load_checkpoint(resolve_latest(split / "checkpoints"))
    assert a.meta["config"]["model"]["backbone"] == {"kind": "tiny-conv", "width": 8, "depth": 2}
    for group in ("model", "ema"):
        assert set(a.tensors[group]) == set(b.tensors[group])
        for k in a.tensors[group]:
            assert torch.equal(a.tensors[group][k], b.tensors[group][k]), (group, k)

    # public API: the loaded run is a denoiser with the plugin backbone; every sampler works on it
    run = load_run(full)
    assert isinstance(run.model.backbone, TinyConv) and run.num_classes == 10 and run.sample_shape == (1, 28, 28)
    cond = run.conditioning.for_sampling([0, 1], {"label": [3, 4]})
    sigmas = grids.karras(3, run.model.process.sigma_min, run.model.process.sigma_max)
    x = sample_heun(run.model, torch.randn(2, *run.sample_shape), sigmas, cond=cond)
    assert x.shape == (2, 1, 28, 28) and torch.isfinite(x).all()
    guided = ClassifierFreeGuidance(run.model, 1.0, run.conditioning.null)
    torch.testing.assert_close(guided(x, torch.full((2,), 1.0), cond), run.model(x, torch.full((2,), 1.0), cond))

    # CLI: sample (guided) and restore
    out = tmp_path / "samples"
    invoke(["sample", "--run", full, "--outdir", out, "--seeds", "0-3", "--steps", "2", "--labels", "0-3",
            "--guidance-scale", "2", "--threads", "1"])
    assert len(list(out.glob("00000*.png"))) == 4
    uncond = tmp_path / "uncond"
    train(uncond, 2, TINY_CONV)
    images = write_noise_pngs(tmp_path / "images", 2)
    invoke(["restore", "--run", uncond, "--task", "inpaint", "--method", "replacement", "--input", images,
            "--outdir", tmp_path / "restored", "--steps", "2", "--threads", "1"])
    assert len(list((tmp_path / "restored" / "restored").iterdir())) == 2


def test_plugin_conditioner_is_embedded_by_the_unet(plugins, tmp_path):
    """A scalar condition declared by a conditioner reaches the U-Net's embedding sum: the trained model's output
    depends on it, and classifier-free guidance uses the conditioner's own null."""
    pytest.importorskip("mnist")
    run_dir = tmp_path / "run"
    train(run_dir, 2, ["model.backbone.model_channels=8", "model.backbone.channel_mult=[1,2]",
                       "model.backbone.num_res_blocks=1", "model.backbone.attn_resolutions=[]",
                       "model.backbone.norm_groups=4", "cond.bright={kind: brightness}"])
    run = load_run(run_dir)
    assert run.model.backbone.cfg.embed_conds == (("bright", "scalar", 1),)
    with torch.no_grad():  # the embedding's output layer is trained from zero: give it weight to see the effect
        for p in run.model.backbone.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x, s = torch.randn(2, 1, 28, 28), torch.full((2,), 2.0)
    d1 = run.model(x, s, {"bright": torch.tensor([0.1, 0.1])})
    d2 = run.model(x, s, {"bright": torch.tensor([0.9, 0.9])})
    assert (d1 - d2).abs().max() > 1e-4
    null = run.conditioning.null({"bright": torch.tensor([0.1, 0.1])})
    assert torch.equal(null["bright"], torch.tensor([-1.0, -1.0]))
    w0 = ClassifierFreeGuidance(run.model, 0.0, run.conditioning.null)(x, s, {"bright": torch.tensor([0.1, 0.1])})
    torch.testing.assert_close(w0, run.model(x, s, null))
    with pytest.raises(ConfigError, match="unknown condition"):
        run.conditioning.for_sampling([0], {"label": 3})


def test_non_square_images_train_and_sample(tmp_path):
    """The diffusion-space shape comes from the data: 16x24 images give a (1, 16, 24) model and 16x24 samples."""
    data = write_noise_pngs(tmp_path / "data", 16, (16, 24))
    run_dir = tmp_path / "run"
    sets = ["data.kind=folder", f"data.path={data}", "data.channels=L", "data.resolution=null", "data.val_split=null",
            "model.backbone.model_channels=8", "model.backbone.channel_mult=[1,2]", "model.backbone.num_res_blocks=1",
            "model.backbone.attn_resolutions=[8]", "model.backbone.norm_groups=4", "train.batch_size=4",
            "train.steps=2", "train.warmup_steps=1", "train.log_every=1", "train.sample_every=1000",
            "train.ckpt_every=2", "train.max_minutes=0", "train.precision=fp32", "sample.grid_images=2"]
    args = ["train", "--run", run_dir, "--no-progress", "--threads", "1", "--preset", "folder"]
    for s in sets:
        args += ["--set", s]
    invoke(args)
    run = load_run(run_dir)
    assert run.config.model.data_shape == (1, 16, 24) and run.sample_shape == (1, 16, 24)
    assert run.model.backbone.cfg.resolutions == (16, 8)  # attention at the level whose smaller side is 8
    out = tmp_path / "out"
    invoke(["sample", "--run", run_dir, "--outdir", out, "--seeds", "0-1", "--steps", "2", "--threads", "1"])
    assert np.asarray(Image.open(out / "000001.png")).shape == (16, 24)


# --------------------------------------------------------------------------------------------- a tiny codec
@dataclass(frozen=True)
class Pool2Config:
    pass


class Pool2(nn.Module):
    """A fixed (weightless) 'latent space': 2x2 average pooling of the model-range image; decoding repeats each
    value over its 2x2 block."""

    def __init__(self, cfg):
        super().__init__()

    def encode(self, x_u8):
        return torch.nn.functional.avg_pool2d(x_u8.float() / 127.5 - 1.0, 2)

    def decode(self, z):
        return torch.nn.functional.interpolate(z, scale_factor=2, mode="nearest")

    def latent_shape(self, data_shape):
        c, h, w = data_shape
        return (c, h // 2, w // 2)


def test_plugin_codec_trains_in_its_latent_space_and_decodes_samples(monkeypatch, tmp_path):
    """The codec seam: training encodes (the denoiser learns 14x14 'latents' of 28x28 digits), sampling decodes
    (28x28 PNGs whose 2x2 blocks are constant), and restore refuses a latent model in one line."""
    pytest.importorskip("mnist")
    monkeypatch.setitem(registry.KINDS, "codec", dict(registry.KINDS["codec"]))
    registry.register_codec("pool2", Pool2Config, Pool2)  # the one registration line
    run_dir = tmp_path / "run"
    train(run_dir, 2, ["model.codec={kind: pool2}", "model.backbone.model_channels=8",
                       "model.backbone.channel_mult=[1,2]", "model.backbone.num_res_blocks=1",
                       "model.backbone.attn_resolutions=[]", "model.backbone.norm_groups=4"])
    run = load_run(run_dir)
    assert run.image_shape == (1, 28, 28) and run.sample_shape == (1, 14, 14)
    assert run.model.backbone.cfg.hw == (14, 14)
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[5] == "val_loss" and rows[2].split(",")[5] != ""  # validation encodes too
    out = tmp_path / "out"
    invoke(["sample", "--run", run_dir, "--outdir", out, "--seeds", "0-1", "--steps", "2", "--threads", "1"])
    img = np.asarray(Image.open(out / "000000.png")).astype(int)
    assert img.shape == (28, 28)
    assert (img[0::2, 0::2] == img[1::2, 1::2]).all() and (img[0::2, 0::2] == img[0::2, 1::2]).all()
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(images / "0.png")
    r = invoke(["restore", "--run", run_dir, "--task", "inpaint", "--method", "replacement", "--input", images,
                "--outdir", tmp_path / "r", "--steps", "2"], expect=2)
    assert "pixel space" in r.output and "model.codec.kind=pool2" in r.output and r.output.count("\n") == 1

"""Latent diffusion (docs/latent.md): the kl / vq codecs on a first-stage run, the latent scale estimated once and
read back, the weights fingerprint, the raw-latent cache, DPS through the decoder, and the bad-input lines."""
import json
import shutil

import pytest
import safetensors.torch
import torch
import yaml
from latent_runs import make_ae_run
from tiny_runs import TINY_RUN, invoke, write_noise_pngs

from torchdiffusion.autoencoders.latent import KLCodecConfig, VQCodecConfig, encode_moments
from torchdiffusion.config import codecs
from torchdiffusion.config.build import build_data, diffusion_shape
from torchdiffusion.config.codecs import LatentEncoder, build_latent_codec, estimate_scale, first_stage
from torchdiffusion.config.schema import DataConfig, ModelConfig
from torchdiffusion.config.strict import from_dict
from torchdiffusion.errors import ConfigError
from torchdiffusion.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT = ["data.resolution=32", "model.sigma_data=1.0"]


@pytest.fixture(scope="module")
def ae_kl(tmp_path_factory):
    return make_ae_run(tmp_path_factory.mktemp("ae_kl"), "kl")


@pytest.fixture(scope="module")
def ae_vq(tmp_path_factory):
    return make_ae_run(tmp_path_factory.mktemp("ae_vq"), "vq")


@pytest.fixture(scope="module")
def mnist32():
    return build_data(DataConfig(kind="mnist", split="train", val_split=None, limit=64, resolution=32))


def train_args(run, ae, extra=(), kind="kl"):
    args = ["train", "--run", run, "--no-progress", "--threads", "1"]
    for s in TINY_RUN + LATENT + [f"model.codec.kind={kind}", f"model.codec.run={ae}"] + list(extra):
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, ae_kl):
    d = tmp_path_factory.mktemp("latent_run") / "run"
    invoke(train_args(d, ae_kl))
    return d


def stored_codec(run):
    return yaml.safe_load((run / "config.yaml").read_text())["model"]["codec"]


# ------------------------------------------------------------------------------------------- the scale
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_scaled_training_latents_have_unit_std_and_zero_mean_with_shift(kind, ae_kl, ae_vq, mnist32):
    run = ae_kl if kind == "kl" else ae_vq
    cls = KLCodecConfig if kind == "kl" else VQCodecConfig
    extra = {"posterior": "mean"} if kind == "kl" else {}
    codec = build_latent_codec(cls(run=str(run), **extra))
    m = encode_moments(codec, mnist32.x)
    for shift in (False, True):
        scale, s = estimate_scale(codec, m, seed=0, estimate_shift=shift)
        codec.scale, codec.shift = scale, s
        z = codec.encode(mnist32.x).double()
        assert abs(float(z.std()) - 1.0) < 1e-5
        raw = codec.encode_raw(mnist32.x).double()
        assert scale == pytest.approx(1 / float(raw.std()), rel=1e-9)
        if shift:
            assert abs(float(z.mean())) < 1e-5 and s == pytest.approx(float(raw.mean()), abs=1e-9)
        else:
            assert s == 0.0 and abs(float(z.mean())) > 1e-3  # not centred: LDM's scale-only form


def test_kl_posterior_samples_at_estimation_and_training_are_seeded(ae_kl, mnist32):
    codec = build_latent_codec(KLCodecConfig(run=str(ae_kl)))
    m = encode_moments(codec, mnist32.x)
    assert estimate_scale(codec, m, 0, False) == estimate_scale(codec, m, 0, False)
    assert estimate_scale(codec, m, 0, False) != estimate_scale(codec, m, 1, False)
    codec.scale = 1.0
    batch = {"x": mnist32.x[:8], "moments": m[:8]}
    enc = LatentEncoder(codec, seed=0, global_batch=8)
    a, b, c = enc(batch, 3), enc(batch, 3), enc(batch, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    mean = m[:8, :3]
    # on the fly == from the cache, up to the last bits a convolution rounds differently at another batch size
    torch.testing.assert_close(enc({"x": mnist32.x[:8]}, 3), a, rtol=1e-5, atol=1e-5)
    # two processes each draw their rows of the global batch: together the single process's noise
    halves = [LatentEncoder(codec, 0, 8, r, 2)({"x": mnist32.x[r::2], "moments": m[:8][r::2]}, 3) for r in (0, 1)]
    torch.testing.assert_close(torch.stack(halves, 1).flatten(0, 1), a, rtol=0, atol=1e-6)
    assert not torch.allclose(a, mean)


def test_run_stores_scale_and_fingerprint_and_sampling_reads_them_back(latent_run, ae_kl, monkeypatch, tmp_path):
    c = stored_codec(latent_run)
    fs = first_stage(ae_kl)
    assert c["kind"] == "kl" and c["fingerprint"] == fs.fingerprint and c["run"] == str(ae_kl.resolve())
    assert c["scale"] > 0 and c["shift"] == 0.0
    ck = ckpt.load_checkpoint(ckpt.resolve_latest(latent_run / "checkpoints"))
    assert ck.meta["config"]["model"]["codec"]["scale"] == c["scale"]
    # never recomputed after training starts: sampling with the estimate disabled uses the stored number
    monkeypatch.setattr(codecs, "estimate_scale", lambda *a, **k: pytest.fail("scale re-estimated"))
    from torchdiffusion.config.loaders import load_run
    run = load_run(latent_run)
    assert run.codec.scale == c["scale"] and run.sample_shape == (3, 8, 8) and run.image_shape == (1, 32, 32)
    z = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(run.codec.decode(z), fs.module.decode(z / c["scale"]), rtol=0, atol=0)
    invoke(["sample", "--run", latent_run, "--seeds", "0-1", "--steps", "2", "--outdir", tmp_path / "s"])
    assert sorted(p.name for p in (tmp_path / "s").glob("0*.png")) == ["000000.png", "000001.png"]


def test_stored_scale_is_used_for_other_data_and_on_resume(tmp_path, ae_kl, monkeypatch):
    run = tmp_path / "run"
    invoke(train_args(run, ae_kl, ["train.steps=4", "train.ckpt_every=2"]) + ["--until-step", "2"])
    scale = stored_codec(run)["scale"]
    calls = []
    real = codecs.estimate_scale
    monkeypatch.setattr(codecs, "estimate_scale", lambda *a, **k: calls.append(1) or real(*a, **k))
    # resume from the preset-style config (scale null): the checkpoint's scale is taken, nothing re-estimated
    invoke(train_args(run, ae_kl, ["train.steps=4", "train.ckpt_every=2"]))
    assert calls == [] and stored_codec(run)["scale"] == scale
    # an explicit other scale on resume is a config change, refused naming the key
    r = invoke(train_args(run, ae_kl, ["train.steps=6", "train.ckpt_every=2", "model.codec.scale=0.5"]), expect=1)
    assert "config changed in: model.codec.scale" in r.output
    # another data set's latents have another std: a fresh run would estimate another scale
    other = tmp_path / "other"
    invoke(train_args(other, ae_kl, ["data.kind=fashion-mnist", "data.limit=64"]))
    assert calls == [1] and stored_codec(other)["scale"] != scale


# ------------------------------------------------------------------------------------------- round trips, shapes
def test_vq_decode_of_encode_is_the_vq_forward_and_kl_round_trips(ae_vq, ae_kl, mnist32):
    from torchdiffusion.data.convert import to_model_range
    x = mnist32.x[:4]
    vq = build_latent_codec(VQCodecConfig(run=str(ae_vq), scale=0.5, shift=0.25))
    fs = first_stage(ae_vq)
    with torch.no_grad():
        x_hat = fs.module(to_model_range(x))[0]
        torch.testing.assert_close(vq.decode(vq.encode(x)), x_hat, rtol=0, atol=1e-5)
    kl = build_latent_codec(KLCodecConfig(run=str(ae_kl), scale=2.0, shift=-0.5, posterior="mean"))
    fs = first_stage(ae_kl)
    with torch.no_grad():
        post = fs.module.encode(to_model_range(x))
        z = kl.encode(x)
        torch.testing.assert_close(z, (post.mean + 0.5) * 2.0, rtol=0, atol=1e-6)
        torch.testing.assert_close(kl.decode(z), fs.module.decode(post.mean), rtol=0, atol=1e-5)
        torch.testing.assert_close(kl.unscaled(kl.scaled(post.mean)), post.mean, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["kl", "vq"])
@pytest.mark.parametrize("ch_mult,f", [([1, 2, 2], 4), ([1, 2, 2, 2], 8)])
def test_latent_shapes_for_f4_f8_and_non_square_images(tmp_path, kind, ch_mult, f):
    run = make_ae_run(tmp_path / "ae", kind, data_shape=(1, 16, 24), ch_mult=ch_mult)
    cls = KLCodecConfig if kind == "kl" else VQCodecConfig
    codec = build_latent_codec(cls(run=str(run), scale=1.0))
    shape = codec.latent_shape((1, 16, 24))
    assert shape == (3, 16 // f, 24 // f)
    x = torch.randint(0, 256, (2, 1, 16, 24), dtype=torch.uint8)
    z = codec.encode(x)
    assert tuple(z.shape) == (2, *shape) and tuple(codec.decode(z).shape) == (2, 1, 16, 24)
    model = from_dict(ModelConfig, {"codec": {"kind": kind, "run": str(run), "scale": 1.0},
                                    "data_shape": [1, 16, 24]})
    assert diffusion_shape(model) == shape


# ------------------------------------------------------------------------------------------- the command line
def test_latent_run_end_to_end_sample_restore_report_audit(latent_run, tmp_path):
    invoke(["sample", "--run", latent_run, "--seeds", "0-3", "--steps", "2", "--outdir", tmp_path / "s"])
    from PIL import Image
    assert Image.open(tmp_path / "s" / "000000.png").size == (32, 32)
    inputs = write_noise_pngs(tmp_path / "in", 2, (32, 32))
    for task in ("inpaint", "superres"):
        out = tmp_path / task
        r = invoke(["restore", "--run", latent_run, "--task", task, "--method", "dps", "--input", inputs,
                    "--outdir", out, "--steps", "2"])
        assert "dps" in r.output
        rec = json.loads((out / "restore.json").read_text())
        assert rec["method"] == "dps" and rec["count"] == 2
        assert Image.open(out / "restored" / "0.png").size == (32, 32)
    r = invoke(["restore", "--run", latent_run, "--task", "inpaint", "--method", "repaint", "--input", inputs,
                "--outdir", tmp_path / "no", "--steps", "2"], expect=2)
    assert "valid: dps" in r.output and len(r.output.strip().splitlines()) == 1 and not (tmp_path / "no").exists()
    invoke(["audit", "--run", latent_run, "--n", "8", "--heldout", "8", "--features", "none", "--steps", "2",
            "--heldout-split", "val",
            "--feature-train-limit", "16", "--out", tmp_path / "audit"])
    assert (tmp_path / "audit" / "audit.json").is_file()
    r = invoke(["likelihood", "--run", latent_run, "--n", "2"], expect=2)
    assert "bits/dim of pixels" in one_line(r)
    invoke(["report", latent_run, "--out", tmp_path / "report"])
    page = (tmp_path / "report" / "index.html").read_text()
    c = stored_codec(latent_run)
    assert "First stage (latent diffusion)" in page and c["run"] in page and "3x8x8 (f = 4)" in page
    assert f"{c['scale']:.4g}" in page


def test_resume_of_a_latent_run_is_bit_exact(tmp_path, ae_kl):
    extra = ["train.steps=4", "train.ckpt_every=2"]
    invoke(train_args(tmp_path / "a", ae_kl, extra))
    invoke(train_args(tmp_path / "b", ae_kl, extra) + ["--until-step", "2"])
    invoke(train_args(tmp_path / "b", ae_kl, extra))
    a = ckpt.load_checkpoint(ckpt.resolve_latest(tmp_path / "a" / "checkpoints"))
    b = ckpt.load_checkpoint(ckpt.resolve_latest(tmp_path / "b" / "checkpoints"))
    for group in ("model", "ema"):
        for k in a.tensors[group]:
            assert torch.equal(a.tensors[group][k], b.tensors[group][k]), (group, k)


@pytest.mark.parametrize("posterior", ["mean", "sample"])
def test_training_on_the_cache_gives_the_losses_of_encoding_on_the_fly(tmp_path, ae_kl, posterior):
    cache = tmp_path / "cache.safetensors"
    r = invoke(["encode", "--codec-run", ae_kl, "--out", cache])
    assert "64 images" in r.output
    extra = ["train.steps=3", f"model.codec.posterior={posterior}"]
    invoke(train_args(tmp_path / "fly", ae_kl, extra))
    r = invoke(train_args(tmp_path / "cached", ae_kl, extra + [f"model.codec.cache={cache}"]))
    assert "up to date (64 images)" in r.output  # the cached run read the file

    def losses(run):
        import csv
        return [float(row["loss"]) for row in csv.DictReader(open(run / "metrics.csv"))]
    # the same up to float rounding: the cache was encoded 256 images at a time, the batches on the fly 8 at a
    # time, and a convolution's last bits depend on the batch size (CPU kernels); one step with other latents
    # (e.g. a stale cache, posterior noise of another step) moves the loss by orders of magnitude more
    fly, cached = losses(tmp_path / "fly"), losses(tmp_path / "cached")
    assert len(fly) == 3 and fly == pytest.approx(cached, rel=1e-4)
    assert stored_codec(tmp_path / "fly")["scale"] == stored_codec(tmp_path / "cached")["scale"]


def test_encode_cache_is_fingerprinted_and_a_stale_one_recomputed(tmp_path, mnist32):
    ae = make_ae_run(tmp_path / "ae", "vq")
    cache = tmp_path / "c.safetensors"
    invoke(["encode", "--codec-run", ae, "--out", cache])
    moments = safetensors.torch.load_file(str(cache))["moments"]
    codec = build_latent_codec(VQCodecConfig(run=str(ae)))
    torch.testing.assert_close(moments, encode_moments(codec, mnist32.x), rtol=0, atol=0)
    r = invoke(["encode", "--codec-run", ae, "--out", cache])
    assert "up to date" in r.output
    shutil.rmtree(ae)
    make_ae_run(ae, "vq", seed=1)  # another autoencoder's weights at the same place
    r = invoke(["encode", "--codec-run", ae, "--out", cache])
    assert "stale (made from another autoencoder" in r.output
    codec = build_latent_codec(VQCodecConfig(run=str(ae)))
    torch.testing.assert_close(safetensors.torch.load_file(str(cache))["moments"], encode_moments(codec, mnist32.x))
    r = invoke(["encode", "--codec-run", ae, "--set", "data.limit=32", "--out", cache])
    assert "stale (made from other images" in r.output and "32 images" in r.output
    other = tmp_path / "notes.safetensors"
    other.write_bytes(b"not a cache")
    r = invoke(["encode", "--codec-run", ae, "--out", other], expect=1)
    assert "not a latent cache file" in r.output and other.read_bytes() == b"not a cache"


# ------------------------------------------------------------------------------------------- bad input
def one_line(r):
    lines = [line for line in r.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def test_images_of_another_size_or_channel_count_are_refused(tmp_path, ae_kl):
    for bad, what in (("data.resolution=28", "28x28 with 1 channel"), ("data.channels=RGB", "32x32 with 3 channel")):
        args = train_args(tmp_path / "r", ae_kl) + ["--set", bad]
        line = one_line(invoke(args, expect=2))
        assert what in line and "was trained on 32x32 with 1 channel" in line
        assert not (tmp_path / "r").exists()


def test_missing_or_damaged_codec_run_is_one_line(tmp_path, ae_kl):
    line = one_line(invoke(train_args(tmp_path / "r", tmp_path / "nowhere"), expect=2))
    assert "no such autoencoder run folder" in line and not (tmp_path / "r").exists()
    broken = tmp_path / "broken"
    shutil.copytree(ae_kl, broken)
    (weights,) = (broken / "checkpoints").glob("step_*/model_ae.safetensors")
    weights.write_bytes(weights.read_bytes()[:-100])
    line = one_line(invoke(train_args(tmp_path / "r", broken), expect=1))
    assert "cannot load the autoencoder" in line and not (tmp_path / "r").exists()
    line = one_line(invoke(train_args(tmp_path / "r", ae_kl, ["model.codec.kind=vq"]), expect=2))
    assert "holds a kl autoencoder" in line


def test_a_codec_run_with_other_weights_is_refused_nothing_overwritten(tmp_path):
    ae = make_ae_run(tmp_path / "ae", "kl")
    run = tmp_path / "run"
    invoke(train_args(run, ae, ["train.steps=4", "train.ckpt_every=2"]) + ["--until-step", "2"])
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    shutil.rmtree(ae)
    make_ae_run(ae, "kl", seed=1)
    line = one_line(invoke(["sample", "--run", run, "--seeds", "0-1", "--outdir", tmp_path / "s"], expect=1))
    assert "are not the ones this run was trained with" in line and not (tmp_path / "s").exists()
    line = one_line(invoke(train_args(run, ae, ["train.steps=4", "train.ckpt_every=2"]), expect=1))
    assert "are not the ones this run was trained with" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    inputs = write_noise_pngs(tmp_path / "in", 1, (32, 32))
    one_line(invoke(["restore", "--run", run, "--task", "inpaint", "--method", "dps", "--input", inputs,
                     "--outdir", tmp_path / "r"], expect=1))
    assert not (tmp_path / "r").exists()


def test_training_with_a_stale_cache_recomputes_it_and_leaves_the_file(tmp_path, ae_kl, mnist32):
    other = make_ae_run(tmp_path / "other", "kl", seed=1)
    cache = tmp_path / "c.safetensors"
    invoke(["encode", "--codec-run", other, "--out", cache])
    before = cache.read_bytes()
    extra = ["train.steps=2", "model.codec.posterior=mean"]
    r = invoke(train_args(tmp_path / "cached", ae_kl, extra + [f"model.codec.cache={cache}"]))
    assert "stale (made from another autoencoder" in r.output
    assert cache.read_bytes() == before
    invoke(train_args(tmp_path / "fly", ae_kl, extra))
    import csv
    fly, cached = ([float(row["loss"]) for row in csv.DictReader(open(tmp_path / d / "metrics.csv"))]
                   for d in ("fly", "cached"))
    assert fly == pytest.approx(cached, rel=1e-4)  # the recomputed latents, not the stale file's


def test_codec_config_errors():
    with pytest.raises(ConfigError, match="model.codec.run is not set"):
        first_stage("")
    with pytest.raises(ConfigError, match="scale must be a positive number"):
        from_dict(ModelConfig, {"codec": {"kind": "kl", "run": "x", "scale": -1.0}})
    with pytest.raises(ConfigError, match="valid: sample, mean"):
        from_dict(ModelConfig, {"codec": {"kind": "kl", "run": "x", "posterior": "mode"}})


def test_on_a_train_ae_run_the_report_shows_its_reconstruction_metrics(tmp_path):
    ae = tmp_path / "ae"
    args = ["train-ae", "--preset", "mnist-vq-f4", "--run", ae, "--no-progress", "--threads", "1"]
    for s in ["data.limit=32", "data.resolution=32", "recon.val_images=8", "recon.grid_images=4",
              "ae.base_channels=4", "ae.ch_mult=[1,2]", "ae.norm_groups=2", "ae.mid_attn=false",
              "loss.disc.base_channels=4", "loss.disc.n_layers=1", "train.batch_size=8", "train.warmup_steps=1",
              "train.log_every=1", "train.val_every=2", "train.sample_every=2", "train.ckpt_every=2",
              "train.max_minutes=0", "train.steps=2"]:
        args += ["--set", s]
    invoke(args)
    run = tmp_path / "run"
    invoke(train_args(run, ae, kind="vq"))
    codec = json.loads((run / "codec.json").read_text())
    assert codec["latent_shape"] == [3, 16, 16] and codec["downsampling"] == 2 and codec["kind"] == "vq"
    invoke(["report", run])
    page = (run / "report" / "index.html").read_text()
    assert "PSNR dB (held-out)" in page and "code usage (held-out)" in page and "first_stage_recon_" in page


def test_the_library_pipeline_samples_and_restores_a_latent_run_as_the_commands(latent_run, tmp_path):
    import numpy as np
    from PIL import Image

    import torchdiffusion
    pipe = torchdiffusion.load(latent_run)
    assert pipe.shape == (3, 8, 8) and pipe.data_shape == (1, 32, 32)
    images = pipe.sample(range(2), steps=2)
    invoke(["sample", "--run", latent_run, "--seeds", "0-1", "--steps", "2", "--outdir", tmp_path / "s"])
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "s" / f"{i:06d}.png")), images[i, 0].numpy())
    inputs = write_noise_pngs(tmp_path / "in", 2, (32, 32))
    invoke(["restore", "--run", latent_run, "--task", "superres", "--method", "dps", "--input", inputs,
            "--outdir", tmp_path / "r", "--steps", "2"])
    restored = pipe.restore(inputs, task="superres", method="dps", steps=2)
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "r" / "restored" / f"{i}.png")), restored[i, 0].numpy())
    with pytest.raises(ConfigError, match="valid: dps"):
        pipe.restore(inputs, method="replacement", steps=2)
    z = pipe.encode(images)
    assert tuple(z.shape) == (2, 3, 8, 8) and tuple(pipe.decode(z).shape) == (2, 1, 32, 32)

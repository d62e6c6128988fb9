"""The adversarial first-stage step and `train-ae`: each update leaves the other model bit-identical, the
discriminator sees detached inputs, the GAN term is off before its start step, both updates resume bit-exactly,
the run loads back (load_first_stage) and bad input is one line."""
import shutil

import pytest
import torch

from torchdiffusion.autoencoders.discriminator import DiscriminatorConfig, PatchDiscriminator
from torchdiffusion.autoencoders.kl import KLAutoencoder, KLConfig
from torchdiffusion.autoencoders.losses import AELossConfig
from torchdiffusion.autoencoders.vq import VQAutoencoder, VQConfig
from torchdiffusion.config.first_stage import load_first_stage, weights_fingerprint
from torchdiffusion.data import ImageArrayDataset
from torchdiffusion.errors import CheckpointError
from torchdiffusion.train import checkpoint as ckpt
from torchdiffusion.train.ae_step import build_ae_step
from torchdiffusion.train.logger import TIMING_COLUMNS, read_metrics
from torchdiffusion.train.step import LoopContext
from torchdiffusion.train.trainer import TrainConfig, Trainer

from tiny_runs import invoke

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(base_channels=4, num_res_blocks=1, z_channels=2, norm_groups=2, mid_attn=False, ch_mult=(1, 2))


def data(n=32, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return ImageArrayDataset(torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8))


def models(kind):
    torch.manual_seed(0)
    ae = KLAutoencoder(KLConfig(**SMALL), 1) if kind == "kl" else \
        VQAutoencoder(VQConfig(n_codes=8, codebook="ema", restart_every=3, **SMALL), 1)
    return ae, PatchDiscriminator(DiscriminatorConfig(base_channels=4, n_layers=1), 1)


def make_step(kind, disc_start=2, steps=6, ema=0.0, val=True):
    ae, d = models(kind)
    loss = AELossConfig(disc_start=disc_start, disc_weight=0.5, disc=DiscriminatorConfig(base_channels=4, n_layers=1))
    return build_ae_step(ae, d, loss, lr=1e-3, steps=steps, warmup_steps=1, ema_halflife_images=ema,
                         val_x=data(8, 1).x if val else None)


def setup(step):
    step.setup(LoopContext(seed=0, batch_size=8, grad_accum=1))
    return step


def state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_each_update_leaves_the_other_model_bit_identical_and_the_disc_sees_detached_inputs(kind):
    step = setup(make_step(kind, disc_start=0))
    ae, d = step.models["ae"], step.models["disc"]
    seen, snaps = [], {}
    active = {"u": None}
    d.register_forward_pre_hook(lambda m, inp: seen.append((active["u"], inp[0].requires_grad)))
    ae_loss, disc_loss = step.updates[0].loss, step.updates[1].loss

    def wrapped_ae(nets, batch, k, g):
        active["u"] = "ae"
        snaps["disc_before_ae"] = state(d)
        return ae_loss(nets, batch, k, g)

    def wrapped_disc(nets, batch, k, g):
        active["u"] = "disc"
        snaps["disc_after_ae"] = state(d)
        snaps["ae_before_disc"] = state(ae)
        return disc_loss(nets, batch, k, g)

    step.updates[0].loss, step.updates[1].loss = wrapped_ae, wrapped_disc
    ae_start = state(ae)
    out = step.train_step(data(8).batch(torch.arange(8)), 0)
    assert out is not None and "disc_loss" in out and "ae_lambda" in out
    # the generator update moved the autoencoder but not the discriminator, and vice versa
    assert not same(ae_start, snaps["ae_before_disc"])
    assert same(snaps["disc_before_ae"], snaps["disc_after_ae"])
    assert same(snaps["ae_before_disc"], state(ae))
    assert not same(snaps["disc_after_ae"], state(d))
    # the generator's pass feeds x_hat with its graph; every discriminator-update pass gets detached inputs
    assert ("ae", True) in seen
    assert [r for u, r in seen if u == "disc"] == [False]
    assert all(p.grad is None for p in list(ae.parameters()) + list(d.parameters()))


def test_no_gan_term_and_no_discriminator_update_before_the_start_step():
    step = setup(make_step("kl", disc_start=3))
    d = step.models["disc"]
    before = state(d)
    calls = []
    d.register_forward_pre_hook(lambda m, inp: calls.append(1))
    out = step.train_step(data(8).batch(torch.arange(8)), 2)
    assert "ae_lambda" not in out and "ae_gan" not in out and "disc_loss" not in out
    assert not calls and same(before, state(d))
    # the loss is exactly the reconstruction plus the weighted KL
    assert out["ae_loss"] == pytest.approx(out["ae_rec"] + 1e-6 * out["ae_reg"], rel=1e-6)
    out = step.train_step(data(8).batch(torch.arange(8)), 3)
    assert out["ae_lambda"] > 0 and "disc_loss" in out


def run(kind, run_dir, until=None, resume=False, steps=6):
    cfg = TrainConfig(steps=steps, batch_size=8, grad_accum=2, log_every=1, val_every=3, sample_every=100,
                      ckpt_every=100, keep_last=3, ema_halflife_images=0.0)
    t = Trainer(cfg, step=make_step(kind, disc_start=2, steps=steps, ema=40.0 if kind == "kl" else 0.0),
                train_set=data(), val_set=None, run_dir=run_dir, seed=3, resolved_config={"ae": {"kind": kind}},
                data_fingerprint="f", progress=False, until_step=until)
    return t.fit(ckpt.resolve_latest(run_dir / "checkpoints") if resume else None)


def rows(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in read_metrics(run_dir / "metrics.csv")]


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_both_updates_resume_bit_exactly(tmp_path, kind):
    assert run(kind, tmp_path / "ref").step == 6
    assert run(kind, tmp_path / "cut", until=3).stopped == "until"
    assert run(kind, tmp_path / "cut", resume=True).step == 6
    a = ckpt.load_checkpoint(ckpt.resolve_latest(tmp_path / "ref" / "checkpoints"))
    b = ckpt.load_checkpoint(ckpt.resolve_latest(tmp_path / "cut" / "checkpoints"))
    groups = ["model_ae", "model_disc", "optim_ae", "optim_disc", "rng"] + (["ema_ae"] if kind == "kl" else [])
    assert sorted(a.tensors) == sorted(groups)
    for g in a.tensors:
        assert same(a.tensors[g], b.tensors[g]), g
    r = rows(tmp_path / "ref")
    assert r == rows(tmp_path / "cut")
    assert [x["ae_lambda"] == "" for x in r] == [True, True] + [False] * 4
    assert r[2]["val_rec_l1"] != "" and r[2]["val_psnr"] != ""
    if kind == "vq":
        assert r[2]["val_code_usage"] != "" and r[2]["train_code_usage"] != ""
        assert int(a.tensors["model_ae"]["quantizer.calls"]) == 12  # 6 steps x 2 micro-batches


# ------------------------------------------------------------------------------ the command and the run format
TINY_AE = ["data.limit=32", "data.resolution=28", "recon.val_images=8", "recon.grid_images=4", "ae.base_channels=4",
           "ae.ch_mult=[1,2]", "ae.norm_groups=2", "ae.mid_attn=false", "loss.disc.base_channels=4",
           "loss.disc.n_layers=1", "loss.disc_start=1", "train.batch_size=8", "train.warmup_steps=1",
           "train.log_every=1", "train.val_every=2", "train.sample_every=2", "train.ckpt_every=2",
           "train.max_minutes=0", "train.steps=2"]


def train_ae(run_dir, preset="mnist-kl-f4", extra=(), expect=0):
    args = ["train-ae", "--preset", preset, "--run", run_dir, "--no-progress", "--threads", "1"]
    for s in TINY_AE + list(extra):
        args += ["--set", s]
    return invoke(args, expect)


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ae_run") / "kl"
    train_ae(d, extra=["train.ema_halflife_images=100"])
    return d


def test_train_ae_writes_the_run_format_and_load_first_stage_reads_it(kl_run):
    assert (kl_run / "config.yaml").is_file() and (kl_run / "samples" / "recon_00000002.png").is_file()
    r = read_metrics(kl_run / "metrics.csv")
    assert r[-1]["val_psnr"] != "" and float(r[-1]["val_ssim"]) <= 1
    fs = load_first_stage(kl_run)
    assert fs.kind == "kl" and fs.data_shape == (1, 28, 28) and fs.latent_shape == (3, 14, 14) and fs.weights == "ema"
    assert not fs.module.training and not any(p.requires_grad for p in fs.module.parameters())
    again = load_first_stage(ckpt.resolve_latest(kl_run / "checkpoints"))
    assert again.fingerprint == fs.fingerprint == weights_fingerprint(fs.module.state_dict())
    c = ckpt.load_checkpoint(fs.checkpoint)
    assert same(c.tensors["ema_ae"], fs.module.state_dict()) and not same(c.tensors["model_ae"], c.tensors["ema_ae"])
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    assert fs.module.decode(fs.module.encode(x).mode()).shape == x.shape


def test_vq_run_reports_code_usage(tmp_path):
    train_ae(tmp_path / "vq", "mnist-vq-f4", ["ae.n_codes=16"])
    last = read_metrics(tmp_path / "vq" / "metrics.csv")[-1]
    assert 0 < float(last["val_code_usage"]) <= 1 and float(last["val_code_perplexity"]) >= 1
    fs = load_first_stage(tmp_path / "vq")
    assert fs.kind == "vq" and fs.weights == "model" and fs.latent_shape == (3, 14, 14)


def test_missing_damaged_or_foreign_runs_are_one_line(kl_run, tmp_path, tiny_run):
    with pytest.raises(CheckpointError, match="no such autoencoder run"):
        load_first_stage(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(kl_run, broken)
    latest = ckpt.resolve_latest(broken / "checkpoints")
    (latest / "model_ae.safetensors").write_bytes(b"\0" * 40)
    with pytest.raises(CheckpointError):
        load_first_stage(latest)
    for p in (broken / "checkpoints").glob("step_*"):
        (p / "ema_ae.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_first_stage(broken)
    with pytest.raises(CheckpointError, match="holds no autoencoder"):
        load_first_stage(tiny_run)


def test_bad_input_is_one_line(tmp_path):
    r = invoke(["train-ae", "--preset", "mnist-kl-f5", "--run", tmp_path / "a"], expect=2)
    assert "unknown autoencoder preset 'mnist-kl-f5' (did you mean 'mnist-kl-f4'?)" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    r = train_ae(tmp_path / "b", extra=["ae.z_chanels=4"], expect=2)
    assert "unknown config key 'ae.z_chanels' (did you mean 'z_channels'?)" in r.output
    r = train_ae(tmp_path / "c", extra=["ae.kind=vae"], expect=2)
    assert "unknown autoencoder kind 'vae'" in r.output
    r = train_ae(tmp_path / "d", extra=["loss.perceptual=lpips"], expect=2)
    assert "needs loss.perceptual_path" in r.output
    r = train_ae(tmp_path / "e", extra=["ae.ch_mult=[1,1,1,1,1]"], expect=2)
    assert "height and width must be multiples of 16" in r.output
    r = invoke(["train-ae", "--run", tmp_path / "f"], expect=2)
    assert "train-ae needs --preset" in r.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "e" / "checkpoints").exists()


def test_classifier_perceptual_trains_and_a_mismatched_classifier_is_one_line(tmp_path):
    clf = tmp_path / "clf"
    invoke(["train-classifier", "--preset", "mnist", "--run", clf, "--steps", "2", "--width", "8", "--batch-size", "8",
            "--threads", "1", "--set", "data.limit=32", "--set", "data.resolution=28", "--set", "data.val_split=null"])
    train_ae(tmp_path / "p", extra=["loss.perceptual=classifier", f"loss.perceptual_path={clf}"])
    fs = load_first_stage(tmp_path / "p")
    assert fs.config.loss.perceptual_label == "classifier-perceptual"
    r = train_ae(tmp_path / "q", extra=["loss.perceptual=classifier", f"loss.perceptual_path={clf}",
                                        "data.resolution=32"], expect=2)
    assert "the classifier takes 1x28x28 images, the autoencoder's data are 1x32x32" in r.output


class PixelFeatures:
    """A stand-in feature network: the images' pixels, downsampled (float64 (N, D))."""
    name, sha256, resize = "pixels", "", "none"

    def __call__(self, images):
        x = torch.as_tensor(images).double()
        return torch.nn.functional.avg_pool2d(x, 7).flatten(1).numpy()


def test_reconstruction_metrics_match_the_validation_metrics_and_rfid_of_a_set_with_itself_is_zero(kl_run):
    from torchdiffusion.config.first_stage import reconstruction_metrics
    from torchdiffusion.eval import fid_from_features
    from torchdiffusion.train.ae_step import validation_metrics
    fs = load_first_stage(kl_run)
    x = data(40, 2, 28).x
    m = reconstruction_metrics(fs.module, x, extractor=PixelFeatures(), batch=16)
    v = validation_metrics(fs.module, x, 16)
    assert m["psnr"] == pytest.approx(v["val_psnr"], rel=1e-5) and m["ssim"] == pytest.approx(v["val_ssim"], rel=1e-5)
    assert m["rfid"] > 0 and m["extractor"] == "pixels" and m["n"] == 40
    f = PixelFeatures()(x)
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-6)


def test_gan_start_gives_the_discriminator_a_head_start():
    ae, d = models("kl")
    loss = AELossConfig(disc_start=1, gan_start=2, disc=DiscriminatorConfig(base_channels=4, n_layers=1))
    step = setup(build_ae_step(ae, d, loss, lr=1e-3, steps=4))
    x = data(8).batch(torch.arange(8))
    out = step.train_step(x, 1)
    assert "disc_loss" in out and "ae_lambda" not in out
    assert "ae_lambda" in step.train_step(x, 2)
    with pytest.raises(ValueError, match="gan_start"):
        AELossConfig(disc_start=3, gan_start=2)


def test_train_ae_resumes_from_the_run_folder_alone(kl_run, tmp_path):
    d = tmp_path / "kl"
    shutil.copytree(kl_run, d)
    invoke(["train-ae", "--run", d, "--no-progress", "--threads", "1", "--set", "train.steps=3"])
    assert ckpt.load_checkpoint(ckpt.resolve_latest(d / "checkpoints")).step == 3
    assert "resumed from" in (d / "log.txt").read_text()
    r = invoke(["train-ae", "--run", d, "--no-progress", "--set", "ae.z_channels=4", "--set", "train.steps=4"],
               expect=1)
    assert "cannot resume, the config changed in: ae.z_channels" in r.output


@pytest.mark.slow  # make test-slow: multi-process, ~10-25 s
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_train_ae_runs_under_torchrun_with_two_processes(tmp_path, kind):
    """The adaptive weight's autograd.grad and the no-grad reconstructions work through DDP (each process weighs
    its own micro-batch's gradients, as LDM under DDP); a VQ codebook's EMA and restarts stay in step."""
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(port), "-m", "torchdiffusion.cli.main", "train-ae", "--preset", f"mnist-{kind}-f4",
            "--run-dir", str(tmp_path / "ddp"), "--no-progress"]
    extra = ["ae.codebook=ema", "ae.restart_every=1", "ae.n_codes=16"] if kind == "vq" else []
    for s in TINY_AE + ["train.steps=3", "loss.gan_start=2"] + extra:
        args += ["--set", s]
    r = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_metrics(tmp_path / "ddp" / "metrics.csv")
    assert [x["ae_lambda"] != "" for x in rows] == [False, False, True]
    fs = load_first_stage(tmp_path / "ddp")
    assert fs.step == 3
    if kind == "vq":
        assert int(fs.module.quantizer.restarts) > 0


def test_an_ema_codebook_on_two_processes_follows_the_global_batch(tmp_path):
    """Without the GAN and restarts, VQ with an EMA codebook has no randomness: two processes (each half the batch,
    statistics summed) must end where one process does."""
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = TINY_AE + ["train.steps=3", "loss.disc_start=100", "ae.codebook=ema", "ae.restart_every=0",
                      "ae.n_codes=16"]
    cmd = ["-m", "torchdiffusion.cli.main", "train-ae", "--preset", "mnist-vq-f4", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launcher in (("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                    "--master-addr", "127.0.0.1", "--master-port", str(port)])):
        args = launcher + cmd + ["--run-dir", str(tmp_path / name)]
        for s in sets:
            args += ["--set", s]
        r = subprocess.run(args, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = (load_first_stage(tmp_path / n).module.quantizer for n in ("one", "two"))
    assert torch.equal(a.usage, b.usage) and torch.allclose(a.cluster_size, b.cluster_size, atol=1e-6)
    assert torch.allclose(a.codebook, b.codebook, atol=1e-5)

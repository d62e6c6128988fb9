"""The training loop with its steps (train.step): the multi-model step (autoencoder + discriminator), classifier
resume and DDP, the one lr schedule and the one seed mixer."""
import json
import socket
import subprocess
import sys

import math

import pytest
import torch
from torch import nn

from torchdiffusion.core.objectives import Objective
from torchdiffusion.errors import ConfigError
from torchdiffusion.nn.classifier import Classifier, ClassifierConfig
from torchdiffusion.seeding import linear_step_seed, mix_seed
from torchdiffusion.train import checkpoint as ckpt
from torchdiffusion.train.classifier import ClassifierTrainConfig, lr_at as classifier_lr_at, train_classifier
from torchdiffusion.train.diffusion_step import DiffusionStep
from torchdiffusion.train.logger import TIMING_COLUMNS, read_metrics
from torchdiffusion.train.multi_step import ModelSpec, MultiModelStep, Update
from torchdiffusion.train.schedule import LRSchedule, lr_at_step
from torchdiffusion.train.step import TrainStep
from torchdiffusion.train.trainer import TrainConfig, Trainer, TrainingError, lr_at

from test_classifier import TINY, planted_set
from test_trainer import tiny_data, tiny_model


# ------------------------------------------------------------------------------ seeds and schedules
def test_seed_streams_are_those_of_the_previous_release():
    """Values of the four mixers before they were merged (epoch order, condition dropout, classifier, diffusion)."""
    from torchdiffusion.data.order import epoch_seed
    from torchdiffusion.guidance.dropout import dropout_seed
    from torchdiffusion.train.classifier import step_generator
    from torchdiffusion.train.trainer import step_seed
    assert (epoch_seed(0, 0), epoch_seed(3, 7), epoch_seed(-1, 2**40)) == \
        (6169212374517040951, 6064617546342538102, 6690541971542772001) == \
        (mix_seed(0, 0), mix_seed(3, 7), mix_seed(-1, 2**40))
    assert dropout_seed(5, 11) == mix_seed(5, 11, tag=b"cond-dropout") == 4414687617362596227
    assert step_generator(2, 9).initial_seed() == mix_seed(2, 9, tag=b"classifier") == 1927630290353527734
    assert (step_seed(1, 2), step_seed(7, -1)) == (linear_step_seed(1, 2), linear_step_seed(7, -1)) == \
        (3582704001961253234, 2953330427866484933)
    assert mix_seed(1, 0) != mix_seed(0, 1) and mix_seed(1, 2, tag=b"a") != mix_seed(1, 2, tag=b"b")


def test_one_lr_schedule_for_every_step():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, steps=100, lr_schedule="cosine")
    # linear warm-up to lr at step warmup - 1, then cosine from lr to 0 over the remaining steps (closed form)
    want = [0.1, 1.0, 0.5, 0.5 * (1 + math.cos(math.pi * 89 / 90))]
    assert [lr_at_step(k, 1.0, 10, 100, "cosine") for k in (0, 9, 55, 99)] == pytest.approx(want, abs=1e-12)
    assert [lr_at(cfg, k) for k in (0, 9, 55, 99)] == [lr_at_step(k, 1.0, 10, 100, "cosine") for k in (0, 9, 55, 99)]
    ccfg = ClassifierTrainConfig(steps=40, lr=0.5, warmup_steps=4)
    assert [classifier_lr_at(ccfg, k) for k in range(40)] == [lr_at_step(k, 0.5, 4, 40, "cosine") for k in range(40)]
    late = LRSchedule(2.0, warmup_steps=4, total_steps=20, shape="constant", start_step=6)
    assert [late(k) for k in (6, 7, 9, 10, 19)] == [0.5, 1.0, 2.0, 2.0, 2.0]  # warm-up from its own start
    with pytest.raises(ConfigError, match="shape must be one of constant, cosine"):
        LRSchedule(1.0, shape="linear")


def test_diffusion_step_is_a_train_step_and_bad_construction_is_one_error(tmp_path):
    step = DiffusionStep.from_config(TrainConfig(), tiny_model(), Objective("lognormal", "edm"))
    assert isinstance(step, TrainStep)
    with pytest.raises(TrainingError, match="either a step or a model and an objective"):
        Trainer(TrainConfig(), step=step, model=tiny_model(), train_set=tiny_data(), val_set=None, run_dir=tmp_path,
                seed=0, resolved_config={}, data_fingerprint="f")
    with pytest.raises(TrainingError, match="needs a training step"):
        Trainer(TrainConfig(), train_set=tiny_data(), val_set=None, run_dir=tmp_path, seed=0, resolved_config={},
                data_fingerprint="f")


def test_diffusion_step_uses_the_injected_encode(tmp_path):
    """The pixel mapping is the step's encode: a different mapping gives a different loss at step 1."""
    from torchdiffusion.data.convert import to_model_range
    rows = []
    for i, enc in enumerate((to_model_range, lambda x: 0.5 * to_model_range(x))):
        t = Trainer(TrainConfig(steps=1, batch_size=8, warmup_steps=1, log_every=1, val_every=1, sample_every=9,
                                ckpt_every=9), model=tiny_model(), objective=Objective("lognormal", "edm"),
                    train_set=tiny_data(), val_set=None, run_dir=tmp_path / str(i), seed=0, resolved_config={},
                    data_fingerprint="f", progress=False, encode=enc)
        t.fit()
        rows.append(read_metrics(tmp_path / str(i) / "metrics.csv")[0]["loss"])
    assert rows[0] != rows[1]


def test_diffusion_checkpoint_groups_and_metric_columns_are_unchanged(tmp_path):
    from torchdiffusion.train.logger import METRIC_COLUMNS
    t = Trainer(TrainConfig(steps=2, batch_size=8, warmup_steps=1, log_every=1, val_every=1, sample_every=9,
                            ckpt_every=9), model=tiny_model(), objective=Objective("lognormal", "edm"),
                train_set=tiny_data(), val_set=tiny_data(16), run_dir=tmp_path, seed=0, resolved_config={},
                data_fingerprint="f", progress=False)
    t.fit()
    c = ckpt.load_checkpoint(ckpt.resolve_latest(tmp_path / "checkpoints"))
    assert sorted(c.tensors) == ["ema", "model", "optim", "rng"]
    assert {"config", "optim", "rng", "trainer", "data_fingerprint"} <= set(c.meta)
    trainer = dict(c.meta["trainer"])
    assert trainer.pop("wall_s") >= 0  # training time so far (accumulates across resumes)
    assert trainer == {"step": 2, "nan_skips": 0, "images_seen": 16}
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == ",".join(METRIC_COLUMNS)


# ------------------------------------------------------------------------------ autoencoder + discriminator
class TinyAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(1, 2, 3, stride=2, padding=1)
        self.dec = nn.ConvTranspose2d(2, 1, 4, stride=2, padding=1)

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


class TinyD(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(64, 1))

    def forward(self, x):
        return self.net(x).squeeze(1)


D_START = 3


def ae_loss(nets, batch, step, g):
    """Reconstruction + (from D_START on) the hinge generator loss -D(x_hat) (Lim & Ye 2017)."""
    x = batch["x"]
    x_hat = nets["ae"](x)
    rec = (x_hat - x).abs().mean()
    return rec - 0.1 * nets["disc"](x_hat).mean() if step >= D_START else rec


def disc_loss(nets, batch, step, g):
    """Hinge discriminator loss on real images (with a little noise from the step's generator) and reconstructions."""
    x = batch["x"]
    real = x + 0.01 * torch.randn(x.shape, generator=g)
    fake = nets["ae"](x).detach()
    return torch.relu(1 - nets["disc"](real)).mean() + torch.relu(1 + nets["disc"](fake)).mean()


def gan_step(steps):
    torch.manual_seed(0)
    ae, d = TinyAE(), TinyD()

    def validate(models):
        x = tiny_data(16).batch(torch.arange(16))["x"].float() / 127.5 - 1
        return {"val_rec": float((models["ae"](x) - x).abs().mean())}

    return MultiModelStep(
        {"ae": ModelSpec(ae, ema_halflife_images=40.0), "disc": ModelSpec(d)},
        [Update("ae", "ae", ae_loss, LRSchedule(3e-3, 2, steps, "cosine"), grad_clip=1.0),
         Update("disc", "disc", disc_loss, LRSchedule(1e-3, 2, steps, "constant", start_step=D_START),
                optimizer=lambda p: torch.optim.Adam(p, betas=(0.5, 0.9)), start_step=D_START)],
        validate=validate, validation_columns=("val_rec",))


def run_gan(run_dir, steps=8, until=None, resume=False):
    cfg = TrainConfig(steps=steps, batch_size=8, grad_accum=2, log_every=2, val_every=4, sample_every=100,
                      ckpt_every=100, keep_last=3)
    t = Trainer(cfg, step=gan_step(steps), train_set=tiny_data(), val_set=None, run_dir=run_dir, seed=3,
                resolved_config={"gan": 1}, data_fingerprint="f", progress=False, until_step=until)
    return t, t.fit(ckpt.resolve_latest(run_dir / "checkpoints") if resume else None)


def metric_rows(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in read_metrics(run_dir / "metrics.csv")]


def test_autoencoder_with_discriminator_trains_and_resumes_bit_exactly(tmp_path):
    ref, res = run_gan(tmp_path / "ref")
    assert res.stopped == "done" and res.step == 8
    first, res = run_gan(tmp_path / "cut", until=4)
    assert res.stopped == "until" and res.step == 4
    resumed, res = run_gan(tmp_path / "cut", resume=True)
    assert res.step == 8
    a = ckpt.load_checkpoint(ckpt.resolve_latest(tmp_path / "ref" / "checkpoints"))
    b = ckpt.load_checkpoint(ckpt.resolve_latest(tmp_path / "cut" / "checkpoints"))
    assert sorted(a.tensors) == ["ema_ae", "model_ae", "model_disc", "optim_ae", "optim_disc", "rng"]
    for group in a.tensors:
        assert a.tensors[group].keys() == b.tensors[group].keys()
        for k in a.tensors[group]:
            assert torch.equal(a.tensors[group][k], b.tensors[group][k]), (group, k)
    assert a.meta["optim"] == b.meta["optim"]
    rows = metric_rows(tmp_path / "ref")
    assert rows == metric_rows(tmp_path / "cut") and [r["step"] for r in rows] == [str(k) for k in range(1, 9)]
    # the discriminator starts at step D_START (0-based): no row of it before, its own warm-up after
    assert [r["disc_loss"] == "" for r in rows] == [True] * D_START + [False] * (8 - D_START)
    assert [float(r["disc_lr"]) for r in rows[D_START:D_START + 3]] == [5e-4, 1e-3, 1e-3]
    assert rows[3]["val_rec"] != "" and rows[7]["val_rec"] != "" and rows[0]["val_rec"] == ""
    assert ref.train_step_obj.optimizers()["disc"].state_dict()["state"][0]["step"] == 8 - D_START
    # the EMA of the autoencoder moved away from both its start and the raw weights
    ema, raw = a.tensors["ema_ae"]["enc.weight"], a.tensors["model_ae"]["enc.weight"]
    torch.manual_seed(0)
    assert not torch.equal(ema, raw) and not torch.equal(ema, TinyAE().state_dict()["enc.weight"])


def test_multi_model_step_rejects_bad_specs():
    spec = {"ae": ModelSpec(TinyAE())}
    sched = LRSchedule(1e-3)
    with pytest.raises(ConfigError, match="update 'd' trains model 'disc', which is not one of ae"):
        MultiModelStep(spec, [Update("d", "disc", disc_loss, sched)])
    with pytest.raises(ConfigError, match="lower-case letters"):
        MultiModelStep({"AE": ModelSpec(TinyAE())}, [Update("g", "AE", ae_loss, sched)])
    with pytest.raises(ConfigError, match="distinct"):
        MultiModelStep(spec, [Update("g", "ae", ae_loss, sched), Update("g", "ae", ae_loss, sched)])


# ------------------------------------------------------------------------------ classifier on the loop
def classifier_run(run_dir, until=None, resume=False, steps=6, ema=20.0):
    torch.manual_seed(0)
    m = Classifier(ClassifierConfig(**TINY))
    cfg = ClassifierTrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=2, shift=1, noisy=True,
                                sigma_min=0.01, sigma_max=10.0, val_images=32, log_every=2, val_every=3,
                                ema_halflife_images=ema, ema_rampup=0.5)
    return train_classifier(m, cfg, planted_set(96), planted_set(32, 1), run_dir, seed=4, until_step=until,
                            resume_from=ckpt.resolve_latest(run_dir / "checkpoints") if resume else None)


def test_classifier_training_resumes_bit_exactly(tmp_path):
    from torchdiffusion.config.loaders import load_classifier
    ref = classifier_run(tmp_path / "ref")
    assert ref["stopped"] == "done" and 0 <= ref["val_accuracy"] <= 1 and "val_accuracy_at_sigma" in ref
    assert classifier_run(tmp_path / "cut", until=3)["stopped"] == "until"
    assert classifier_run(tmp_path / "cut", resume=True) == ref
    a = ckpt.load_checkpoint(ckpt.resolve_latest(tmp_path / "ref" / "checkpoints"))
    b = ckpt.load_checkpoint(ckpt.resolve_latest(tmp_path / "cut" / "checkpoints"))
    assert sorted(a.tensors) == ["ema", "model", "optim", "rng"]
    for group in ("model", "ema", "optim"):
        for k in a.tensors[group]:
            assert torch.equal(a.tensors[group][k], b.tensors[group][k]), (group, k)
    assert metric_rows(tmp_path / "ref") == metric_rows(tmp_path / "cut")
    assert [r["val_accuracy"] != "" for r in metric_rows(tmp_path / "ref")] == [False, False, True] * 2
    assert (tmp_path / "ref" / "log.txt").is_file()
    m = load_classifier(tmp_path / "cut")
    assert m.noisy and m.summary["val_accuracy"] == ref["val_accuracy"] and m.summary["step"] == 6
    with pytest.raises(ConfigError, match="already holds a trained classifier"):
        classifier_run(tmp_path / "ref")


def test_classifier_cli_resumes_and_refuses_a_missing_checkpoint(tmp_path):
    from click.testing import CliRunner
    from torchdiffusion.cli.main import cli
    args = ["train-classifier", "--run", str(tmp_path / "c"), "--batch-size", "16", "--width", "8",
            "--set", "data.limit=64", "--set", "data.val_split=null", "--threads", "1"]
    r = CliRunner().invoke(cli, args + ["--steps", "2"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, args + ["--steps", "3", "--resume", "latest"])
    assert r.exit_code == 0, r.output
    assert [row["step"] for row in read_metrics(tmp_path / "c" / "metrics.csv")] == ["1", "2", "3"]
    assert "resumed from" in (tmp_path / "c" / "log.txt").read_text()
    r = CliRunner().invoke(cli, args + ["--resume", str(tmp_path / "nowhere")])
    assert r.exit_code != 0 and "does not exist" in r.output and r.output.count("\n") == 1


DDP_CLASSIFIER = '''
import os, sys, torch
sys.path.insert(0, TESTS)
from test_classifier import TINY, planted_set
from torchdiffusion.nn.classifier import Classifier, ClassifierConfig
from torchdiffusion.train import distributed
from torchdiffusion.train.classifier import ClassifierTrainConfig, train_classifier
from torchdiffusion.train.distributed import DistInfo
torch.set_num_threads(1)
info = DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
distributed.init(info, torch.device("cpu"))
torch.manual_seed(0)
m = Classifier(ClassifierConfig(**TINY))
cfg = ClassifierTrainConfig(steps=4, batch_size=16, lr=3e-3, warmup_steps=1, shift=1, noisy=True, sigma_min=0.01,
                            sigma_max=10.0, val_images=32, log_every=2, ema_halflife_images=20.0)
train_classifier(m, cfg, planted_set(96), planted_set(32, 1), sys.argv[1], seed=4, dist=info)
distributed.shutdown(info)
'''


@pytest.mark.slow  # make test-slow: multi-process, ~10-25 s
def test_classifier_trains_under_torchrun_with_two_processes(tmp_path):
    import os
    script = tmp_path / "ddp_classifier.py"
    script.write_text(DDP_CLASSIFIER.replace("TESTS", repr(os.path.dirname(__file__))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, str(script), str(one)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(port), str(script), str(two)], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a = ckpt.load_checkpoint(ckpt.resolve_latest(one / "checkpoints"))
    b = ckpt.load_checkpoint(ckpt.resolve_latest(two / "checkpoints"))
    assert json.dumps(a.meta["config"], sort_keys=True) == json.dumps(b.meta["config"], sort_keys=True)
    for group in ("model", "ema"):  # the same global batches and noise; only the all-reduce rounds differently
        for k, v in a.tensors[group].items():
            assert torch.allclose(v, b.tensors[group][k], atol=1e-5, rtol=1e-4), (group, k)
    la = [float(r["loss"]) for r in read_metrics(one / "metrics.csv")]
    lb = [float(r["loss"]) for r in read_metrics(two / "metrics.csv")]
    assert len(lb) == 4 and lb == pytest.approx(la, rel=1e-4)

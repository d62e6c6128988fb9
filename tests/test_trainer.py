"""Trainer behaviour on a tiny model: non-finite losses (RELIABILITY 23), preemption (11), accumulation, EMA."""
import math

import pytest
import torch

from torchdiffusion.core.objectives import Objective
from torchdiffusion.core.precond import Preconditioned, Preconditioner
from torchdiffusion.core.processes import EDM
from torchdiffusion.data import ImageArrayDataset
from torchdiffusion.nn.unet import UNet, UNetConfig
from torchdiffusion.train import checkpoint as ckpt
from torchdiffusion.train.ema import ema_beta, ema_update
from torchdiffusion.train.logger import read_metrics
from torchdiffusion.train.trainer import TrainConfig, Trainer, TrainingError, lr_at


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = UNetConfig(image_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                     norm_groups=4, num_heads=2)
    return Preconditioned(UNet(cfg), EDM(), Preconditioner("edm"))


def tiny_data(n=64):
    g = torch.Generator().manual_seed(0)
    return ImageArrayDataset(torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8))


def make_trainer(tmp_path, objective=None, **cfg):
    base = dict(steps=6, batch_size=8, warmup_steps=2, log_every=2, val_every=3, sample_every=100, ckpt_every=2,
                keep_last=5)
    base.update(cfg)
    data = tiny_data()
    return Trainer(TrainConfig(**base), model=tiny_model(), objective=objective or Objective("lognormal", "edm"),
                   train_set=data, val_set=tiny_data(16), run_dir=tmp_path, seed=0, resolved_config={"x": 1},
                   data_fingerprint="f", progress=False)


class NaNAt(Objective):
    """An objective whose loss is NaN at chosen call numbers (injected fault)."""

    def __init__(self, bad_calls):
        super().__init__("lognormal", "edm")
        object.__setattr__(self, "_bad", set(bad_calls))
        object.__setattr__(self, "_n", [0])

    def loss(self, model, x0, cond=None, **kw):
        out = super().loss(model, x0, cond, **kw)
        if model.training:
            self._n[0] += 1
            if self._n[0] in self._bad:
                return out * float("nan")
        return out


def test_nan_loss_stops_and_names_last_good_checkpoint(tmp_path):
    t = make_trainer(tmp_path, NaNAt({4}))
    with pytest.raises(TrainingError) as e:
        t.fit()
    assert "step 3" in str(e.value) and "step_00000002" in str(e.value)
    latest = ckpt.resolve_latest(tmp_path / "checkpoints")
    assert latest.name == "step_00000002"
    for group in ckpt.load_checkpoint(latest).tensors.values():
        assert all(torch.isfinite(v).all() for v in group.values() if v.is_floating_point())


def test_nan_skip_policy_counts_and_limits(tmp_path):
    t = make_trainer(tmp_path / "a", NaNAt({2, 4}), nan_policy="skip", max_nan_skips=5)
    res = t.fit()
    assert res.step == 6 and t.nan_skips == 2
    rows = read_metrics(tmp_path / "a" / "metrics.csv")
    assert [math.isnan(float(r["loss"])) for r in rows] == [False, True, False, True, False, False]
    t = make_trainer(tmp_path / "b", NaNAt({1, 2}), nan_policy="skip", max_nan_skips=1)
    with pytest.raises(TrainingError):
        t.fit()


def test_stop_request_saves_a_resumable_checkpoint(tmp_path):
    """RELIABILITY 11: a stop request (SIGTERM) saves at the next step boundary; resuming finishes the run
    exactly as an uninterrupted run would."""
    calls = {"n": 0}

    def stop_after_3():
        calls["n"] += 1
        return calls["n"] >= 3

    t = make_trainer(tmp_path / "a", ckpt_every=100)
    t.should_stop = stop_after_3
    res = t.fit()
    assert res.stopped == "signal" and res.step == 3
    assert ckpt.resolve_latest(tmp_path / "a" / "checkpoints").name == "step_00000003"
    t2 = make_trainer(tmp_path / "a", ckpt_every=100)
    t2.fit(ckpt.resolve_latest(tmp_path / "a" / "checkpoints"))
    ref = make_trainer(tmp_path / "b", ckpt_every=100)
    ref.fit()
    for (k, a), b in zip(ref.model.state_dict().items(), t2.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_gradient_accumulation_matches_full_batch(tmp_path):
    a = make_trainer(tmp_path / "a", steps=3, grad_accum=1)
    b = make_trainer(tmp_path / "b", steps=3, grad_accum=4)
    a.fit()
    b.fit()
    la = [float(r["loss"]) for r in read_metrics(tmp_path / "a" / "metrics.csv")]
    lb = [float(r["loss"]) for r in read_metrics(tmp_path / "b" / "metrics.csv")]
    assert la == pytest.approx(lb, rel=1e-4)
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_ema_halflife_and_rampup():
    # without ramp-up, after `halflife` images the old weights count half
    beta = ema_beta(1000, 10, halflife_images=500, rampup=None)
    assert beta ** (500 / 10) == pytest.approx(0.5)
    # with ramp-up the half-life is capped by rampup * images seen
    assert ema_beta(0, 10, 500, 0.05) == pytest.approx(0.5 ** (10 / 0.5))
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    ema_update(a, b, 0.75)
    torch.testing.assert_close(a.weight, 0.75 * before + 0.25 * b.weight.detach())


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, lr_schedule="cosine")
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 55) == pytest.approx(0.5, abs=1e-9)
    assert lr_at(cfg, 99) < 0.001
    assert lr_at(TrainConfig(lr=2.0, warmup_steps=1), 500) == 2.0


def test_bad_train_config_values():
    with pytest.raises(ValueError, match="divisible"):
        TrainConfig(batch_size=10, grad_accum=3)
    with pytest.raises(ValueError, match="train.lr"):
        TrainConfig(lr=0)

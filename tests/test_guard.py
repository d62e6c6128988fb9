"""The training guard (train.guard): stop on a rising validation loss or on near-copies, keep the best-validation
weights, log the stop, show it in the report."""
import json

import pytest
import torch

from torchdiffusion.core.objectives import Objective
from torchdiffusion.core.precond import Preconditioned, Preconditioner
from torchdiffusion.core.processes import EDM
from torchdiffusion.data import ImageArrayDataset
from torchdiffusion.nn.unet import UNet, UNetConfig
from torchdiffusion.pipelines.report import write_report
from torchdiffusion.train import checkpoint as ckpt
from torchdiffusion.train.guard import TrainingGuard
from torchdiffusion.train.logger import read_metrics
from torchdiffusion.train.trainer import TrainConfig, Trainer


def guard_run(values, patience=2, tol=0.02):
    g = TrainingGuard(patience, tol)
    for i, v in enumerate(values):
        g.observe_val((i + 1) * 10, v)
        if g.reason:
            return (i + 1) * 10, g
    return None, g


def test_rule_fires_on_a_rise_and_not_on_flat_or_noise_within_tolerance():
    step, g = guard_run([1.0, 0.9, 0.8, 0.85, 0.9, 0.95])  # minimum 0.8 at step 30, then above 1.02 x 0.8 twice
    assert step == 50 and g.best_val_step == 30 and g.reason == "val_loss"
    assert guard_run([0.5] * 20)[0] is None  # flat
    assert guard_run([0.5, 0.505, 0.498, 0.507, 0.503, 0.509] * 3)[0] is None  # within 2 % of the best
    assert guard_run([1.0, 0.9, 0.95, 0.8, 0.85, 0.7, 0.75])[0] is None  # rises, each followed by a new best
    assert guard_run([1.0, 0.9, 0.95, 0.8], patience=1)[0] == 30
    assert guard_run([1.0, float("nan"), float("nan")])[0] == 30  # a non-finite validation counts as risen
    assert guard_run([1.0, 1.1, 1.2], patience=0)[0] is None  # off


def tiny_trainer(run_dir, evaluator=None, **cfg):
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(), norm_groups=4, mid_attention=False))
    data = ImageArrayDataset(torch.randint(0, 256, (32, 1, 8, 8), generator=torch.Generator().manual_seed(0),
                                           dtype=torch.uint8))
    base = dict(steps=12, batch_size=8, warmup_steps=1, log_every=100, val_every=1, sample_every=100, ckpt_every=100,
                val_tolerance=0.0)
    base.update(cfg)
    return Trainer(TrainConfig(**base), model=Preconditioned(net, EDM(), Preconditioner("edm")),
                   objective=Objective("lognormal", "edm"), train_set=data, val_set=data, run_dir=run_dir, seed=0,
                   resolved_config={"x": 1}, data_fingerprint="f", progress=False, evaluator=evaluator)


def planted(trainer, curve):
    """Replace the validation with a planted loss curve (value at the trainer's step)."""
    trainer.train_step_obj.validation = lambda: {"val_loss": float(curve(trainer.step))}


def test_planted_rising_validation_stops_and_keeps_the_best_checkpoint(tmp_path):
    t = tiny_trainer(tmp_path, val_patience=3)
    planted(t, lambda s: (s - 5) ** 2 + 1.0)  # minimum at step 5, then rising
    res = t.fit()
    assert res.stopped == "guard" and res.step == 8  # steps 6, 7, 8 are above the best
    best = ckpt.resolve_latest(tmp_path / "checkpoints" / "best_val")
    assert best.name == "step_00000005"
    assert ckpt.load_checkpoint(best).meta["val_loss"] == 1.0
    record = json.loads((tmp_path / "eval" / "guard.json").read_text())
    assert record["reason"] == "val_loss" and record["stopped_at"] == 8 and record["best_val_step"] == 5
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows if r["guard"]] == ["8"] and rows[-1]["guard"] == "1"
    assert "training guard" in (tmp_path / "log.txt").read_text()
    page = write_report(tmp_path).read_text()
    assert "Memorisation over training" in page and "Training guard stopped the run at step 8" in page
    # resuming a run the guard stopped returns at once while the rule is on
    t2 = tiny_trainer(tmp_path, val_patience=3)
    assert t2.fit(ckpt.resolve_latest(tmp_path / "checkpoints")).stopped == "guard"


def test_flat_validation_runs_to_the_end(tmp_path):
    t = tiny_trainer(tmp_path, val_patience=2)
    planted(t, lambda s: 0.5)
    res = t.fit()
    assert res.stopped == "done" and res.step == 12
    assert not (tmp_path / "eval" / "guard.json").exists()
    assert ckpt.resolve_latest(tmp_path / "checkpoints" / "best_val").name == "step_00000001"


class PlantedAudit:
    """An Evaluator whose near-copy share rises with the number of evaluations."""

    def __init__(self):
        self.calls = 0

    def features(self, model, rank, world_size):
        self.calls += 1
        return self.calls

    def score(self, calls):
        return {"fid": 10.0, "kid": 0.1, "kid_std": 0.01, "near_copy_share": 0.1 * calls}


def test_near_copy_share_stops_the_run(tmp_path):
    t = tiny_trainer(tmp_path, evaluator=PlantedAudit(), eval_every=2, eval_audit=16, stop_near_copy_share=0.25,
                     val_every=100)
    res = t.fit()
    assert res.stopped == "guard" and res.step == 6  # shares 0.1, 0.2, 0.3 at steps 2, 4, 6
    assert json.loads((tmp_path / "eval" / "guard.json").read_text())["reason"] == "near_copy"
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [float(r["near_copy_share"]) for r in rows if r["near_copy_share"]] == pytest.approx([0.1, 0.2, 0.3])
    assert rows[-1]["guard"] == "2"


class FlatFeatures:
    name, sha256, resize = "flat-pixels", "0" * 64, "none"

    def __call__(self, images):
        return torch.as_tensor(images).flatten(1).to(torch.float64).numpy() / 255


def test_inloop_audit_counts_copies_of_training_images():
    from torchdiffusion.eval import InLoopEvaluator, compute_reference
    from torchdiffusion.eval.refstats import extract_features
    g = torch.Generator().manual_seed(0)
    train, fresh, real = (torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8) for n in (40, 30, 50))
    ex = FlatFeatures()
    ref = compute_reference(real, ex, source="real")
    for samples, lo, hi in ((train[:30], 1.0, 1.0), (fresh, 0.0, 0.1)):
        ev = InLoopEvaluator(lambda m, seeds, s=samples: s[:len(seeds)], ex, ref, 30, kid_subsets=2,
                             audit_train=extract_features(ex, train))
        scores = ev.score(ev.features(None))
        assert lo <= scores["near_copy_share"] <= hi and scores["heldout_near_copy_share"] <= 0.1

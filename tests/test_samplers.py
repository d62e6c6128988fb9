"""Samplers against exact denoisers: convergence to the exact ODE solution with the measured order,
ancestral moments against the exact law of the sampler's own Markov chain, identities between samplers,
per-seed reproducibility, denoiser-call counts and argument errors.

Gaussian data N(mu, diag(v)) makes every sampler here a linear Gaussian chain per coordinate, so its
output law is known exactly (see `chain_moments`): sampling tests compare with it, and its convergence
to the data law is a deterministic statement.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from analytic import GaussianData, gaussian_3d, mixture_2d

from torchdiffusion.core import grids
from torchdiffusion.errors import ConfigError
from torchdiffusion.sampling import (NoiseError, SamplerError, randn, sample_ddim, sample_ddpm, sample_euler,
                                     sample_heun)

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ddpm_table(T: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)  # Ho et al. 2020
    abar = torch.cumprod(1 - betas, 0)
    return ((1 - abar) / abar).sqrt()


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def loglog_slope(ns, errs) -> float:
    return float(np.polyfit(np.log(ns), np.log(errs), 1)[0])


# ---------------------------------------------------------------------------------------------------------
# Deterministic samplers: endpoint error against the exact probability-flow solution, and its order.

def gaussian_reference(data: GaussianData, noise: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
    """Exact flow from sigmas[0] to sigmas[-2], then the posterior mean: what any sampler's last step
    (from sigmas[-2] to 0, which is x' = D for every sampler here) would give from the exact state."""
    x = data.flow(noise * float(sig[0]), float(sig[0]), float(sig[-2]))
    return data.denoise(x, float(sig[-2]))


ORDERS = [(sample_euler, 1.0), (sample_heun, 2.0), (sample_ddim, 1.0)]
NS = [16, 32, 64, 128]


@pytest.mark.parametrize("sampler,order", ORDERS, ids=["euler", "heun", "ddim"])
def test_gaussian_endpoint_converges_with_order(sampler, order):
    data = gaussian_3d()
    noise = randn((64, 3), torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = []
    for n in NS:
        sig = grids.karras(n, SIGMA_MIN, SIGMA_MAX)
        errs.append((sampler(data, noise, sig) - gaussian_reference(data, noise, sig)).norm(dim=1).mean().item())
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    slope = loglog_slope(NS, errs)
    assert abs(-slope - order) < 0.25, (slope, errs)  # measured: euler/ddim -0.99, heun -2.1


def test_gaussian_heun_endpoint_is_accurate():
    # Heun at 128 steps (255 NFE): mean endpoint error ~1e-3 (|x| ~ 2); Euler at the same steps ~4e-2.
    data = gaussian_3d()
    noise = randn((64, 3), torch.Generator().manual_seed(1), dtype=torch.float64)
    sig = grids.karras(128, SIGMA_MIN, SIGMA_MAX)
    err = (sample_heun(data, noise, sig) - gaussian_reference(data, noise, sig)).norm(dim=1).mean().item()
    assert err < 3e-3


@pytest.fixture(scope="module")
def gmm_reference():
    """Fine Heun (1024 steps) from SIGMA_MAX to SIGMA_MIN, then the posterior mean; every Karras grid with
    these end points shares this reference."""
    data = mixture_2d()
    noise = randn((64, 2), torch.Generator().manual_seed(2), dtype=torch.float64)
    fine = grids.karras(1024, SIGMA_MIN, SIGMA_MAX)
    return data, noise, sample_heun(data, noise, fine)


@pytest.mark.parametrize("sampler,order", ORDERS[:2], ids=["euler", "heun"])
def test_gmm_endpoint_converges_with_order(gmm_reference, sampler, order):
    data, noise, ref = gmm_reference
    errs = [(sampler(data, noise, grids.karras(n, SIGMA_MIN, SIGMA_MAX)) - ref).norm(dim=1).mean().item()
            for n in NS]
    slope = loglog_slope(NS, errs)
    assert abs(-slope - order) < 0.35, (slope, errs)  # measured: euler -1.06, heun -2.2


# ---------------------------------------------------------------------------------------------------------
# Identities.

@pytest.mark.parametrize("sig", [grids.karras(12, SIGMA_MIN, SIGMA_MAX), grids.discrete(ddpm_table(), 12, "trailing")],
                         ids=["karras", "ddpm-trailing"])
def test_deterministic_ddim_is_euler(sig):
    # DDIM (eta = 0) in this frame: x' = D + (s'/s)(x - D) = x + (s' - s)(x - D)/s (Karras et al. 2022, sec. 3).
    data = mixture_2d()
    noise = randn((32, 2), torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(sample_ddim(data, noise, sig), sample_euler(data, noise, sig), rtol=1e-12, atol=1e-12)


def test_ddim_eta_one_is_ddpm_small():
    data = mixture_2d()
    sig = grids.discrete(ddpm_table(), 20, "leading")
    noise = randn((32, 2), torch.Generator().manual_seed(4), dtype=torch.float64)
    a = sample_ddim(data, noise, sig, eta=1.0, generator=torch.Generator().manual_seed(5))
    b = sample_ddpm(data, noise, sig, variance="small", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_one_step_to_zero_is_the_posterior_mean():
    data = mixture_2d()
    noise = randn((8, 2), torch.Generator().manual_seed(6), dtype=torch.float64)
    sig = torch.tensor([3.0, 0.0], dtype=torch.float64)
    expect = data.denoise(noise * 3.0, 3.0)
    for sampler in (sample_euler, sample_heun, sample_ddim, sample_ddpm):
        torch.testing.assert_close(sampler(data, noise, sig, generator=torch.Generator()), expect)


# ---------------------------------------------------------------------------------------------------------
# Stochastic samplers: the law of the chain, and its convergence to the data.

def chain_moments(data: GaussianData, sig: torch.Tensor, kind: str, eta: float = 0.0):
    """Exact mean and variance per coordinate of the sampler's output for Gaussian data, written out
    independently of the library: with D = mu + k (x - mu), k = v / (v + s^2), each step is
    x' - mu = (k + c (1 - k)) (x - mu) + sqrt(q) z, starting from x = sigma_0 * noise."""
    mu, v = data.mu, data.v
    mean, var = -mu.clone(), torch.full_like(v, float(sig[0]) ** 2)  # moments of x - mu
    for s, t in zip(sig[:-1].tolist(), sig[1:].tolist()):
        post = t * t * (s * s - t * t) / (s * s)
        if kind == "ddim":
            q = eta * eta * post
            c = math.sqrt(max(t * t - q, 0.0)) / s
        else:
            c = t * t / (s * s)
            q = post if kind == "small" or t == 0 else (s * s - t * t) * (1 + t * t) / (1 + s * s)
        a = v / (v + s * s) * (1 - c) + c
        mean, var = a * mean, a * a * var + q
    return mu + mean, var


STOCHASTIC = [
    ("ddpm-small", lambda d, x, s, g: sample_ddpm(d, x, s, generator=g), dict(kind="small")),
    ("ddpm-large", lambda d, x, s, g: sample_ddpm(d, x, s, generator=g, variance="large"), dict(kind="large")),
    ("ddim-0.5", lambda d, x, s, g: sample_ddim(d, x, s, generator=g, eta=0.5), dict(kind="ddim", eta=0.5)),
]


def assert_moments(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, z: float = 4.5):
    """Sample mean and variance within z standard errors (SE_mean = sqrt(var/N), SE_var = var sqrt(2/(N-1)))."""
    n = x.shape[0]
    se_m, se_v = (var / n).sqrt(), var * math.sqrt(2 / (n - 1))
    assert ((x.mean(0) - mean).abs() < z * se_m).all(), (x.mean(0), mean, se_m)
    assert ((x.var(0) - var).abs() < z * se_v).all(), (x.var(0), var, se_v)


@pytest.mark.parametrize("name,run,law", STOCHASTIC, ids=[s[0] for s in STOCHASTIC])
def test_ancestral_samples_follow_the_exact_chain_law(name, run, law):
    data = gaussian_3d()
    sig = grids.discrete(ddpm_table(), 50, "trailing")
    noise = randn((20000, 3), torch.Generator().manual_seed(7), dtype=torch.float64)
    out = run(data, noise, sig, torch.Generator().manual_seed(8))
    assert_moments(out, *chain_moments(data, sig, **law))


@pytest.mark.parametrize("kind", ["small", "large"])
def test_ddpm_chain_law_converges_to_the_data(kind):
    data = gaussian_3d()
    errs = []
    for n in (100, 1000, 10000):
        mean, var = chain_moments(data, grids.karras(n, SIGMA_MIN, SIGMA_MAX), kind)
        errs.append((var / data.v - 1).abs().max().item())
        assert ((mean - data.mu).abs() < 2e-3).all()
    assert errs[0] > 4 * errs[1] > 16 * errs[2] and errs[2] < 2e-3, errs  # ~1/n


def test_ddpm_reproduces_the_data_variance_on_the_ddpm_grid():
    # The 1000-step DDPM of Ho et al. 2020 ("small" variance) with the exact denoiser. Tolerance: the chain's
    # own bias at T = 1000 (3.7% for the v = 0.04 coordinate, see chain_moments) plus 4 SE (4.5% at N = 16000).
    data = gaussian_3d()
    n = 16000
    sig = grids.discrete(ddpm_table(), 1000, "leading")
    out = sample_ddpm(data, randn((n, 3), torch.Generator().manual_seed(9), dtype=torch.float64), sig,
                      generator=torch.Generator().manual_seed(10))
    assert ((out.var(0) / data.v - 1).abs() < 0.037 + 4 * math.sqrt(2 / n)).all(), out.var(0) / data.v
    assert ((out.mean(0) - data.mu).abs() < 4 * (data.v / n).sqrt()).all()


def test_ddpm_large_is_exact_for_unit_gaussian_data_on_any_grid():
    # For N(0, I) data every VP marginal is N(0, I), i.e. x ~ N(0, (1 + sigma^2) I) in this frame, and the
    # reverse step's variance is beta_t exactly: the walk is exact down to the last positive sigma.
    data = GaussianData(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    noise = randn((20000, 3), torch.Generator().manual_seed(11), dtype=torch.float64)
    for sig in (grids.discrete(ddpm_table(), 3, "trailing"), grids.karras(5, SIGMA_MIN, SIGMA_MAX)):
        stop = sig[:-1]  # a grid may end above 0: the sampler returns x at its last sigma
        out = sample_ddpm(data, noise, stop, variance="large", generator=torch.Generator().manual_seed(12))
        assert_moments(out, data.mu, data.v + float(stop[-1]) ** 2)


def mode_fractions(data, x: torch.Tensor) -> torch.Tensor:
    """Share of points whose most likely mode (weighted density at sigma = 0) is k."""
    var = data.variances[None]
    log_p = torch.log(data.weights) - 0.5 * (((x[:, None] - data.means[None]) ** 2 / var) + var.log()).sum(-1)
    return torch.bincount(log_p.argmax(1), minlength=len(data.weights)).double() / x.shape[0]


@pytest.mark.parametrize("sampler", [sample_ddpm, sample_heun], ids=["ddpm", "heun"])
def test_gmm_mode_weights(sampler):
    data = mixture_2d()
    n = 4000
    noise = randn((n, 2), torch.Generator().manual_seed(13), dtype=torch.float64)
    out = sampler(data, noise, grids.karras(40, SIGMA_MIN, SIGMA_MAX), generator=torch.Generator().manual_seed(14))
    p_out = mode_fractions(data, out)
    p_ref = mode_fractions(data, data.sample(n, torch.Generator().manual_seed(15)))
    se = (2 * p_ref * (1 - p_ref) / n).sqrt()  # two-sample SE of a difference of proportions
    assert ((p_out - p_ref).abs() < 4.5 * se).all(), (p_out, p_ref)


# ---------------------------------------------------------------------------------------------------------
# Per-seed reproducibility.

@pytest.mark.parametrize("sampler,opts", [(sample_ddpm, {}), (sample_ddim, {"eta": 0.7}), (sample_heun, {})],
                         ids=["ddpm", "ddim", "heun"])
def test_rows_do_not_depend_on_the_batch(sampler, opts):
    data = gaussian_3d()  # elementwise denoiser: its rows cannot mix
    sig = grids.discrete(ddpm_table(), 25, "leading")
    seeds = list(range(100, 108))
    batch = sampler(data, randn((8, 3), gens(seeds)), sig, generator=gens([s + 1 for s in seeds]), **opts)
    assert batch.dtype == torch.float32
    for b, s in enumerate(seeds):
        single = sampler(data, randn((1, 3), gens([s])), sig, generator=gens([s + 1]), **opts)
        assert torch.equal(batch[b:b + 1], single)


def test_a_single_generator_is_reproducible_and_seeds_differ():
    data = gaussian_3d()
    sig = grids.karras(10, SIGMA_MIN, SIGMA_MAX)
    noise = randn((4, 3), torch.Generator().manual_seed(0))
    a = sample_ddpm(data, noise, sig, generator=torch.Generator().manual_seed(1))
    b = sample_ddpm(data, noise, sig, generator=torch.Generator().manual_seed(1))
    c = sample_ddpm(data, noise, sig, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------
# The calling convention: NFE, what the denoiser and the callback see, shapes of any rank.

class Counting:
    """Standard normal data of any shape: D(x, s) = x / (1 + s^2); records what it is called with."""

    def __init__(self):
        self.sigmas = []

    def __call__(self, x, sigma, cond=None):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        self.sigmas.append(sigma)
        return x / (1 + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2)


@pytest.mark.parametrize("sampler,nfe", [(sample_euler, lambda n: n), (sample_heun, lambda n: 2 * n - 1),
                                         (sample_ddim, lambda n: n), (sample_ddpm, lambda n: n)],
                         ids=["euler", "heun", "ddim", "ddpm"])
def test_nfe_callback_and_any_rank(sampler, nfe):
    n = 7
    sig = grids.karras(n, SIGMA_MIN, SIGMA_MAX)
    noise = randn((2, 3, 4, 5, 6), torch.Generator().manual_seed(0))  # video-shaped (B, C, T, H, W)
    before = noise.clone()
    den, seen = Counting(), []
    out = sampler(den, noise, sig, generator=torch.Generator().manual_seed(1), callback=seen.append)
    assert len(den.sigmas) == nfe(n)
    assert torch.equal(noise, before) and out.shape == noise.shape and out.dtype == noise.dtype
    assert [c["i"] for c in seen] == list(range(n))
    assert [c["sigma"] for c in seen] == sig[:-1].tolist() and [c["sigma_next"] for c in seen] == sig[1:].tolist()
    assert all(set(c) == {"i", "x", "sigma", "sigma_next", "denoised"} for c in seen)
    torch.testing.assert_close(seen[0]["x"], noise * SIGMA_MAX)
    # a grid that stops above 0 makes Heun's last step a full 2nd-order step
    if sampler is sample_heun:
        den2 = Counting()
        sampler(den2, noise, sig[:-1])
        assert len(den2.sigmas) == 2 * (n - 1)


def test_any_rank_matches_exact_flow():
    # For N(0, I) data the flow from sigma_0 to 0 is x / sqrt(1 + sigma_0^2).
    noise = randn((2, 3, 4, 5), torch.Generator().manual_seed(0), dtype=torch.float64)
    sig = grids.karras(64, SIGMA_MIN, SIGMA_MAX)
    out = sample_heun(Counting(), noise, sig)
    # last step from sigma_min to 0 ends on D: x(sigma_min) / (1 + sigma_min^2)
    x_min = noise * SIGMA_MAX * math.sqrt((1 + SIGMA_MIN**2) / (1 + SIGMA_MAX**2))
    torch.testing.assert_close(out, x_min / (1 + SIGMA_MIN**2), rtol=0, atol=2e-2)  # measured max 0.009


# ---------------------------------------------------------------------------------------------------------
# Errors teach.

ok_sig = grids.karras(4, SIGMA_MIN, SIGMA_MAX)
ok_noise = torch.zeros(2, 3)


@pytest.mark.parametrize("call,err,needle", [
    (lambda: sample_euler(Counting(), ok_noise, ok_sig.flip(0)), SamplerError, "strictly descending"),
    (lambda: sample_euler(Counting(), ok_noise, ok_sig[None]), SamplerError, "1-D"),
    (lambda: sample_euler(Counting(), ok_noise, ok_sig[:1]), SamplerError, "n >= 1"),
    (lambda: sample_euler(Counting(), ok_noise, torch.tensor([1.0, -0.5])), SamplerError, ">= 0"),
    (lambda: sample_euler(Counting(), ok_noise, [80.0, 0.0]), SamplerError, "core.grids"),
    (lambda: sample_euler(Counting(), torch.zeros(2, 3, dtype=torch.long), ok_sig), SamplerError, "noise"),
    (lambda: sample_ddpm(Counting(), ok_noise, ok_sig, generator=gens([0])), NoiseError, "one per batch row"),
    (lambda: sample_ddpm(Counting(), ok_noise, ok_sig, generator=123), NoiseError, "torch.Generator"),
    (lambda: sample_ddpm(Counting(), ok_noise, ok_sig, variance="medium"), SamplerError, "valid: small, large"),
    (lambda: sample_ddim(Counting(), ok_noise, ok_sig, eta=1.5), SamplerError, "eta must be in"),
    (lambda: sample_euler(lambda x, s, c: x[:, :1], ok_noise, ok_sig), SamplerError, "denoiser returned shape"),
])
def test_errors_teach(call, err, needle):
    with pytest.raises(err, match=needle) as info:
        call()
    assert isinstance(info.value, ValueError) and isinstance(info.value, ConfigError)
    assert "\n" not in str(info.value)

"""Inverse-problem solvers against the exact Gaussian posterior.

Data x0 ~ N(mu, Sigma) on (1, 4, 4) "images" (d = 16), y = A x0 + sigma_y e with a linear A. The exact denoiser
is D(x, s) = mu + Sigma (Sigma + s^2 I)^{-1} (x - mu), and the posterior is Gaussian:
    noisy:     P = (Sigma^-1 + A^T A / sigma_y^2)^-1,  m = P (Sigma^-1 mu + A^T y / sigma_y^2);
    noiseless: m = mu + K (y - A mu), P = Sigma - K A Sigma, K = Sigma A^T (A Sigma A^T)^+.
Sample moments of N = 3000 restorations (fixed seeds) are compared with (m, P). Tolerances: every mean entry
within 0.03 (the standard error is sqrt(0.25 / 3000) = 0.009, so about 3 of them, the largest of 16; DPS with
twice or half the right gradient weight misses it) and
every covariance entry within 0.04 (the standard error of a covariance entry of variance 0.25 is about
0.25 sqrt(2 / 3000) = 0.0065; the rest is the discretisation of the ancestral walk).
"""
import math

import pytest
import torch

from torchdiffusion.core.grids import karras
from torchdiffusion.errors import ConfigError
from torchdiffusion.inverse import (AvgPoolDown, Colorize, Inpaint, Measurement, OperatorError, dps, half_mask,
                                    random_mask, reconstruction_guidance, repaint_nfe, repaint_schedule,
                                    restore_ccdf, restore_dps, restore_ilvr, restore_mcg, restore_reconstruction,
                                    restore_repaint, restore_replacement)

F64 = torch.float64
SHAPE = (1, 4, 4)
D = 16
N = 3000
MEAN_TOL, COV_TOL = 0.03, 0.04


class GaussianPrior:
    """Exact denoiser of N(mu, Sigma) on (B, 1, 4, 4), via Sigma = U diag(lam) U^T."""

    def __init__(self, mu: torch.Tensor, cov: torch.Tensor):
        self.mu, self.cov = mu, cov
        self.lam, self.u = torch.linalg.eigh(cov)

    def __call__(self, x, sigma, cond=None):
        b = x.shape[0]
        s2 = torch.as_tensor(sigma, dtype=F64).reshape(-1).expand(b)[:, None] ** 2
        z = (x.reshape(b, -1).to(F64) - self.mu) @ self.u  # (B, d) in the eigenbasis
        out = self.mu + (z * self.lam / (self.lam + s2)) @ self.u.T
        return out.reshape(x.shape).to(x.dtype)

    def sample(self, n, g):
        return (self.mu + torch.randn(n, D, generator=g, dtype=F64) @ torch.linalg.cholesky(self.cov).T).reshape(
            n, *SHAPE)


def isotropic(std=0.5):
    return GaussianPrior(torch.linspace(-0.5, 0.5, D, dtype=F64), std * std * torch.eye(D, dtype=F64))


def correlated():
    g = torch.Generator().manual_seed(11)
    a = torch.randn(D, D, generator=g, dtype=F64) * 0.3
    return GaussianPrior(torch.linspace(-0.5, 0.5, D, dtype=F64),
                         a @ a.T / D * 4 + 0.05 * torch.eye(D, dtype=F64))


def dense(op) -> torch.Tensor:
    basis = torch.eye(D, dtype=F64).reshape(D, *SHAPE)
    return op(basis).reshape(D, -1).T  # (m, d)


def exact_posterior(prior, op, y, noise_std):
    a, mu, cov = dense(op), prior.mu, prior.cov
    y = y.reshape(-1)
    if noise_std == 0:
        k = cov @ a.T @ torch.linalg.pinv(a @ cov @ a.T)
        return mu + k @ (y - a @ mu), cov - k @ a @ cov
    p = torch.linalg.inv(torch.linalg.inv(cov) + a.T @ a / noise_std ** 2)
    return p @ (torch.linalg.solve(cov, mu) + a.T @ y / noise_std ** 2), p


def problem(prior, op, noise_std, seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    x0 = prior.sample(1, g)
    y1 = op(x0)
    y1 = y1 + noise_std * torch.randn(y1.shape, generator=g, dtype=F64)
    meas = Measurement(op, y1.expand(n, *y1.shape[1:]).clone(), (n, *SHAPE), noise_std)
    return meas, exact_posterior(prior, op, y1, noise_std)


def restore(fn, prior, meas, steps=100, sigma_max=20.0, seed=1, **options):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(meas.shape, generator=g, dtype=F64)
    return fn(prior, meas, noise, karras(steps, 0.002, sigma_max), generator=g, **options)


def moment_errors(x, post):
    m, p = post
    flat = x.reshape(x.shape[0], -1)
    return float((flat.mean(0) - m).abs().max()), float((torch.cov(flat.T) - p).abs().max())


# --------------------------------------------------------------------------------------------- exact posteriors
def test_replacement_with_exact_denoiser_samples_the_noiseless_inpainting_posterior():
    """Isotropic prior: the observed and missing pixels are independent, so projecting after every step of an
    exact ancestral walk samples the posterior exactly (up to discretisation)."""
    prior = isotropic()
    meas, post = problem(prior, Inpaint(random_mask(4, 0.5, torch.Generator().manual_seed(3))[None]), 0.0)
    x = restore(restore_replacement, prior, meas)
    em, ec = moment_errors(x, post)
    assert em < MEAN_TOL and ec < COV_TOL, (em, ec)


def test_dps_with_the_tweedie_variance_samples_the_noisy_posterior():
    """Isotropic prior N(mu, g^2 I), 2x average pooling (A A^T = I / 4), sigma_y = 0.1: with prior_std = g the
    DPS likelihood N(y; A D, sigma_y^2 + lambda Cov[x0 | x]) is exact, so the posterior denoiser is exact and
    the ancestral walk samples the posterior in the small-step limit."""
    prior = isotropic(0.5)
    meas, post = problem(prior, AvgPoolDown(2), 0.1, seed=4)
    x = restore(restore_dps, prior, meas, steps=100, prior_std=0.5)
    em, ec = moment_errors(x, post)
    assert em < MEAN_TOL and ec < COV_TOL, (em, ec)
    # the error shrinks with the step size (small-step limit): 10 steps are visibly worse than 100
    em10, ec10 = moment_errors(restore(restore_dps, prior, meas, steps=10, prior_std=0.5), post)
    assert em10 + ec10 > em + ec


def test_the_posterior_denoiser_composes_with_a_deterministic_sampler():
    """gradients.dps is a plain Denoiser: Heun on the posterior's probability-flow ODE samples the same
    posterior (isotropic prior, noisy 2x average pooling), with no stochastic step anywhere."""
    from torchdiffusion.sampling import sample_heun

    prior = isotropic(0.5)
    meas, post = problem(prior, AvgPoolDown(2), 0.1, seed=4)
    noise = torch.randn(meas.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    x = sample_heun(dps(prior, meas, prior_std=0.5), noise, karras(40, 0.002, 20.0))
    em, ec = moment_errors(x, post)
    assert em < MEAN_TOL and ec < COV_TOL, (em, ec)


def test_dps_posterior_denoiser_equals_the_exact_posterior_mean():
    """The wrapper itself, without any sampler: D_y(x, s) == E[x0 | x_s = x, y] for Gaussian data."""
    op = Colorize(2)
    shape = (1, 2, 2, 2)
    d = 8
    mu = torch.linspace(-0.3, 0.3, d, dtype=F64)
    prior8 = GaussianPrior(mu, 0.25 * torch.eye(d, dtype=F64))
    den = lambda x, s, c=None: prior8(x.reshape(x.shape[0], 1, 2, 4), s).reshape(x.shape)  # noqa: E731
    g = torch.Generator().manual_seed(5)
    y = torch.randn(3, 1, 2, 2, generator=g, dtype=F64)
    meas = Measurement(op, y, (3, *shape[1:]), 0.2)
    x = torch.randn(3, *shape[1:], generator=g, dtype=F64) * 2
    a = op(torch.eye(d, dtype=F64).reshape(d, *shape[1:])).reshape(d, -1).T
    for s in (0.05, 0.7, 5.0):
        got = dps(den, meas, prior_std=0.5)(x, torch.full((3,), s, dtype=F64))
        # joint Gaussian of (x0, x_s, y): E[x0 | x_s, y] with precision Sigma^-1 + I / s^2 + A^T A / sigma_y^2
        prec = torch.eye(d, dtype=F64) * (1 / 0.25 + 1 / s ** 2) + a.T @ a / 0.04
        rhs = mu / 0.25 + x.reshape(3, -1) / s ** 2 + y.reshape(3, -1) @ a / 0.04
        want = torch.linalg.solve(prec, rhs.T).T.reshape(x.shape)
        assert torch.allclose(got, want, atol=1e-9), s


def test_reconstruction_guidance_keeps_the_exact_posterior_and_reduces_replacement_bias():
    """Isotropic prior: the gradient only touches observed pixels, which the projection replaces, so the
    posterior stays exact. Correlated prior: replacement alone is biased (the missing pixels never see y except
    through its noised copy); the gradient correction of Ho et al. (2022) pulls them towards the posterior mean."""
    prior = isotropic()
    mask = half_mask(4)[None]
    meas, post = problem(prior, Inpaint(mask), 0.0, seed=6)
    em, ec = moment_errors(restore(restore_reconstruction, prior, meas, weight=2.0), post)
    assert em < MEAN_TOL and ec < COV_TOL, (em, ec)

    prior = correlated()
    meas, post = problem(prior, Inpaint(mask), 0.0, seed=6, n=1000)
    e_repl, _ = moment_errors(restore(restore_replacement, prior, meas, steps=50), post)
    e_rg, _ = moment_errors(restore(restore_reconstruction, prior, meas, steps=50, weight=4.0), post)
    assert e_repl > 3 * MEAN_TOL, e_repl  # the known bias is real at this size
    assert e_rg < 0.6 * e_repl, (e_rg, e_repl)


def test_repaint_resampling_reduces_replacement_bias_on_a_correlated_prior():
    prior = correlated()
    meas, post = problem(prior, Inpaint(half_mask(4)[None]), 0.0, seed=7, n=1000)
    e1, _ = moment_errors(restore(restore_repaint, prior, meas, steps=40, jump=5, resample=1), post)
    e_repl, _ = moment_errors(restore(restore_replacement, prior, meas, steps=40), post)
    e10, _ = moment_errors(restore(restore_repaint, prior, meas, steps=40, jump=5, resample=10), post)
    assert abs(e1 - e_repl) < 1e-12  # resample = 1 is replacement
    assert e10 < 0.6 * e_repl, (e10, e_repl)


# --------------------------------------------------------------------------------------------- consistency
@pytest.mark.parametrize("name", ["replacement", "ilvr", "ccdf", "mcg", "repaint", "reconstruction"])
def test_projection_methods_are_measurement_consistent(name):
    prior = correlated()
    op = AvgPoolDown(2)
    meas, _ = problem(prior, op, 0.0, seed=8, n=64)
    fn = {"replacement": restore_replacement, "ilvr": restore_ilvr, "ccdf": restore_ccdf, "mcg": restore_mcg,
          "repaint": restore_repaint, "reconstruction": restore_reconstruction}[name]
    options = {"repaint": dict(jump=3, resample=3)}.get(name, {})
    smax = 2.0 if name == "ccdf" else 20.0
    x = restore(fn, prior, meas, steps=12, sigma_max=smax, **options)
    assert float(meas.error(x).max()) < 1e-10


def test_dps_stays_within_the_noise_level():
    prior = isotropic()
    meas, _ = problem(prior, AvgPoolDown(2), 0.1, seed=9, n=256)
    err = meas.error(restore(restore_dps, prior, meas, steps=30))
    # a posterior sample's residual y - A x has per-entry variance below sigma_y^2 + its own spread; 2 sigma_y
    # is a generous bound that prior samples (error ~ 0.26 here) fail
    assert float(err.mean()) < 2 * 0.1, float(err.mean())
    free = prior.sample(256, torch.Generator().manual_seed(0))
    assert float(meas.error(free).mean()) > 2 * 0.1


def test_ilvr_conditioning_range_leaves_the_last_steps_free():
    prior = correlated()
    meas, _ = problem(prior, AvgPoolDown(2), 0.0, seed=10, n=128)
    x_all = restore(restore_ilvr, prior, meas, steps=20)
    x_coarse = restore(restore_ilvr, prior, meas, steps=20, sigma_stop=0.5)
    assert float(meas.error(x_all).max()) < 1e-10
    e = float(meas.error(x_coarse).mean())
    assert 1e-3 < e < 0.5, e


def test_ccdf_from_a_good_start_needs_few_steps():
    """CCDF from sigma_0 = 1 with 10 steps lands near the exact posterior on the isotropic prior (its start
    x_init + sigma_0 n is close to the true marginal at sigma_0 once sigma_0 dominates the prior std)."""
    prior = isotropic(0.3)
    meas, post = problem(prior, Inpaint(half_mask(4)[None]), 0.0, seed=12)
    x = restore(restore_ccdf, prior, meas, steps=10, sigma_max=3.0)
    em, ec = moment_errors(x, post)
    assert em < 0.1 and ec < 0.05, (em, ec)


# --------------------------------------------------------------------------------------------- RePaint walk
def test_repaint_schedule():
    assert repaint_schedule(5, 2, 1) == [0, 1, 2, 3, 4, 5]
    path = repaint_schedule(6, 2, 3)
    assert path[0] == 0 and path[-1] == 6
    assert all(abs(b - a) == 1 for a, b in zip(path, path[1:]))
    # each jump point i < n (here 2 and 4) is left upwards resample - 1 = 2 times, by `jump` = 2 positions
    starts = [a for i, (a, b) in enumerate(zip(path, path[1:])) if b < a and (i == 0 or path[i - 1] < a)]
    assert sorted(starts) == [2, 2, 4, 4]
    assert repaint_nfe(6, 2, 3) == 6 + 2 * 2 * 2
    assert repaint_nfe(250, 10, 10) == 250 + 24 * 9 * 10  # Lugmayr et al.'s setting


# --------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_are_one_line():
    prior = isotropic()
    meas, _ = problem(prior, AvgPoolDown(2), 0.0, n=4)
    with pytest.raises(OperatorError) as e:
        Measurement(AvgPoolDown(2), torch.zeros(4, 1, 3, 3), (4, *SHAPE))
    assert "(4, 1, 3, 3)" in str(e.value) and "(4, 1, 4, 4)" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(OperatorError) as e:
        restore_replacement(prior, meas, torch.zeros(4, 1, 8, 8), karras(3, 0.1, 1.0))
    assert "(4, 1, 8, 8)" in str(e.value) and "(4, 1, 4, 4)" in str(e.value)
    with pytest.raises(OperatorError, match="ILVR"):
        m2, _ = problem(prior, Inpaint(half_mask(4)), 0.0, n=4)
        restore_ilvr(prior, m2, torch.zeros(4, *SHAPE), karras(3, 0.1, 1.0))
    with pytest.raises(ConfigError, match="noise_std"):
        dps(prior, meas, prior_std=0.0)
    with pytest.raises(ConfigError):
        reconstruction_guidance(prior, meas, weight=math.nan)

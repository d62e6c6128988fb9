"""The one walk with per-step corrections: the correction-type inverse methods on many samplers against the exact
Gaussian posterior, measurement consistency on every grid sampler, what a multistep sampler sees after a
correction, the shared ancestral split, CCDF's shifted start and RePaint as samplers.

The Gaussian problems, the exact denoiser and the posterior moments come from tests/test_inverse.py (d = 16,
N = 3000 restorations, every mean entry within 0.03 and every covariance entry within 0.04 of the exact
posterior, see there for the standard errors).
"""
import math

import pytest
import torch

from test_inverse import (COV_TOL, MEAN_TOL, SHAPE, correlated, isotropic, moment_errors, problem,
                          restore as restore_with)
from torchdiffusion.config.registry import SAMPLERS
from torchdiffusion.core.grids import karras
from torchdiffusion.errors import ConfigError
from torchdiffusion.inverse import (ILVR, MCG, AvgPoolDown, Inpaint, ReconstructionGuidance, Replacement,
                                    half_mask, random_mask, restore_ccdf, restore_ilvr, restore_mcg,
                                    restore_reconstruction, restore_replacement, solve)
from torchdiffusion.sampling.ccdf import sample_from
from torchdiffusion.sampling.kdiff import AncestralNoise
from torchdiffusion.sampling.repaint import sample_repaint
from torchdiffusion.sampling.steps import SamplerError

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small (3000, 16) float64 tensors: one thread is faster, and far faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

#: stochastic samplers for which replacement / ILVR / MCG / reconstruction sample the exact posterior in the
#: small-step limit: each one's walk samples the prior marginals in that limit (an ancestral DDPM step and
#: ancestral Euler with eta = 1 are the same posterior step, written two ways (DDIM with eta = 1 is a third way,
#: left out to keep the suite fast); SDE-DPM-Solver++(2M) solves the reverse SDE (fresh Gaussian noise here, the
#: per-row Brownian tree is slow for 3000 rows); DPM-Solver++(2S) takes a second-order step to s_down and adds the
#: ancestral noise; EDM's
#: churn adds exact forward noise and its Heun step follows the probability-flow ODE), and for the isotropic
#: prior the projected part A x is independent of the rest given y, so resampling it at every level keeps the
#: joint law. The remaining error is the walk's discretisation (100 Karras steps), well inside the tolerances.
STOCHASTIC = {
    "ddpm": ("ddpm", {}),
    "euler_ancestral": ("euler_ancestral", {}),
    "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", {}),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {"noise_kind": "gaussian"}),
    "edm_churn": ("edm", {"S_churn": 40.0}),
}
DETERMINISTIC = {"euler": ("euler", {}), "heun": ("heun", {}), "dpmpp_2m": ("dpmpp_2m", {}),
                 "ddim_eta0": ("ddim", {"eta": 0.0})}
#: every sampler that walks a grid (the adaptive ones, dpm_adaptive and pf_ode, take no per-step correction)
GRID_SAMPLERS = [name for name, (_, nfe) in SAMPLERS.items() if nfe(4) is not None]


def _problem(method):
    """(restore function, prior, measurement, posterior, options) of an exact case for each correction method."""
    prior = isotropic(0.5)
    if method == "replacement":
        meas, post = problem(prior, Inpaint(random_mask(4, 0.5, torch.Generator().manual_seed(3))[None]), 0.0)
        return restore_replacement, prior, meas, post, {}
    if method == "ilvr":  # block means of an isotropic prior are independent of the within-block parts
        meas, post = problem(prior, AvgPoolDown(2), 0.0, seed=5)
        return restore_ilvr, prior, meas, post, {}
    if method == "mcg":  # prior_std = the prior's std: the DPS posterior denoiser is exact (test_inverse)
        meas, post = problem(prior, Inpaint(half_mask(4)[None]), 0.0, seed=6)
        return restore_mcg, prior, meas, post, {"prior_std": 0.5}
    meas, post = problem(prior, Inpaint(half_mask(4)[None]), 0.0, seed=6)
    return restore_reconstruction, prior, meas, post, {"weight": 2.0}


@pytest.mark.parametrize("sampler", list(STOCHASTIC))
@pytest.mark.parametrize("method", ["replacement", "ilvr", "mcg", "reconstruction"])
def test_correction_methods_sample_the_exact_posterior_on_stochastic_samplers(method, sampler):
    """Each correction on each stochastic sampler samples the exact Gaussian posterior (tolerance reasoning in
    STOCHASTIC and the module docstring); the same run without the correction (the prior) fails the check."""
    fn, prior, meas, post, options = _problem(method)
    name, sopts = STOCHASTIC[sampler]
    x = restore_with(fn, prior, meas, sampler=SAMPLERS[name][0], sampler_options=sopts, **options)
    em, ec = moment_errors(x, post)
    assert em < MEAN_TOL and ec < COV_TOL, (em, ec)
    assert float(meas.error(x).max()) < 1e-10  # the last projection, at s' = 0, sets A x = y


def test_the_posterior_check_can_fail():
    """The unconditional walk (no correction) of the same sampler misses the posterior by far."""
    _, prior, meas, post, _ = _problem("replacement")
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(meas.shape, generator=g, dtype=F64)
    x = SAMPLERS["ddpm"][0](prior, noise, karras(100, 0.002, 20.0), generator=g)
    em, ec = moment_errors(x, post)
    assert em > 3 * MEAN_TOL and ec > 3 * COV_TOL, (em, ec)


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m_sde", "edm", "heun"])
def test_reconstruction_guidance_reduces_the_replacement_bias_on_any_sampler(sampler):
    """Correlated prior, half the pixels missing: replacement alone is biased (the missing pixels see y only through
    its noised copy); the gradient correction of Ho et al. (2022) pulls them towards the posterior mean, on
    stochastic and deterministic walks alike (test_inverse has the DDPM case)."""
    prior = correlated()
    meas, post = problem(prior, Inpaint(half_mask(4)[None]), 0.0, seed=6, n=1000)
    fn = SAMPLERS[sampler][0]
    sopts = {"S_churn": 40.0} if sampler == "edm" else {"noise_kind": "gaussian"} if sampler == "dpmpp_2m_sde" else {}
    e_repl, _ = moment_errors(restore_with(restore_replacement, prior, meas, steps=50, sampler=fn,
                                           sampler_options=sopts), post)
    e_rg, _ = moment_errors(restore_with(restore_reconstruction, prior, meas, steps=50, weight=4.0, sampler=fn,
                                         sampler_options=sopts), post)
    assert e_repl > 3 * MEAN_TOL, e_repl
    assert e_rg < 0.7 * e_repl, (e_rg, e_repl)


CORRECTIONS = ["replacement", "pocs", "ilvr", "ccdf", "mcg", "reconstruction"]


def _consistency(method, sampler_name, sopts, steps=8):
    prior = correlated()
    meas, _ = problem(prior, AvgPoolDown(2), 0.0, seed=8, n=16)
    fn = {"replacement": restore_replacement, "pocs": restore_replacement, "ilvr": restore_ilvr,
          "ccdf": restore_ccdf, "mcg": restore_mcg, "reconstruction": restore_reconstruction}[method]
    x = restore_with(fn, prior, meas, steps=steps, sigma_max=2.0 if method == "ccdf" else 20.0,
                     sampler=SAMPLERS[sampler_name][0], sampler_options=sopts)
    assert x.shape == meas.shape and torch.isfinite(x).all()
    return meas, x


@pytest.mark.parametrize("sampler", list(DETERMINISTIC))
@pytest.mark.parametrize("method", CORRECTIONS)
def test_deterministic_samplers_end_measurement_consistent_with_every_correction(method, sampler):
    """The projection at s' = 0 makes A x = y exactly, whatever the deterministic walk before it did."""
    meas, x = _consistency(method, *DETERMINISTIC[sampler])
    assert float(meas.error(x).max()) < 1e-10


@pytest.mark.parametrize("sampler", GRID_SAMPLERS)
def test_every_grid_sampler_runs_with_the_projection(sampler):
    meas, x = _consistency("replacement", sampler, {})
    assert float(meas.error(x).max()) < 1e-10
    # without the correction the same sampler is far from the measurement (the check can fail)
    g = torch.Generator().manual_seed(1)
    free = SAMPLERS[sampler][0](correlated(), torch.randn(meas.shape, generator=g, dtype=F64),
                                karras(8, 0.002, 20.0), generator=g)
    assert float(meas.error(free).mean()) > 1e-2


# --------------------------------------------------------------------------------------------- the hook itself
class Shift:
    """A correction that adds a constant and records what it was called with."""

    def __init__(self, c=0.01):
        self.c, self.calls, self.out = c, [], []

    def __call__(self, x, s, i):
        self.calls.append((i, s))
        y = x + self.c
        self.out.append(y)
        return y


@pytest.mark.parametrize("sampler", GRID_SAMPLERS)
def test_the_corrected_x_is_what_the_next_step_sees(sampler):
    """correct(x, s', i) is called once per grid step with that step's index and s' (dpm_fast: once per step of
    its own lambda grid), and the x the next step records is exactly the corrected one (multistep history
    included: the samplers evaluate D at that x)."""
    data = isotropic(0.5)
    sig = karras(6, 0.002, 20.0)
    noise = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)
    seen, hook = [], Shift()
    fn = SAMPLERS[sampler][0]
    fn(data, noise, sig, generator=torch.Generator().manual_seed(1), callback=seen.append, correct=hook)
    n = len(seen)
    assert [i for i, _ in hook.calls] == list(range(n)) and [r["i"] for r in seen] == list(range(n))
    assert [s for _, s in hook.calls] == [r["sigma_next"] for r in seen]
    if sampler not in ("dpm_fast",):
        assert [s for _, s in hook.calls] == sig[1:].tolist()
    churn = sampler in ("edm", "dpm2")  # their x is recorded after the churn, which is off by default
    for k in range(n - 1):
        assert churn or seen[k + 1]["x"] is hook.out[k] or torch.equal(seen[k + 1]["x"], hook.out[k])


@pytest.mark.parametrize("sampler", GRID_SAMPLERS)
def test_an_identity_correction_changes_nothing(sampler):
    """correct returning its input is bit-identical to no correction, and one returning a copy (UniPC's corrector
    then adds its change instead of replacing x) agrees to round-off."""
    data = correlated()
    sig = karras(7, 0.002, 20.0)
    noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)
    fn = SAMPLERS[sampler][0]

    def run(correct):
        return fn(data, noise, sig, generator=torch.Generator().manual_seed(1), correct=correct)

    plain = run(None)
    assert torch.equal(run(lambda x, s, i: x), plain)
    torch.testing.assert_close(run(lambda x, s, i: x.clone()), plain, atol=1e-12, rtol=0)


def test_adaptive_samplers_refuse_a_correction_in_one_line():
    data = isotropic()
    noise = torch.randn(2, *SHAPE, dtype=F64)
    for name in ("dpm_adaptive", "pf_ode"):
        with pytest.raises(SamplerError) as e:
            SAMPLERS[name][0](data, noise, karras(4, 0.002, 20.0), correct=lambda x, s, i: x)
        assert "correct" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SamplerError, match="callable"):
        SAMPLERS["euler"][0](data, noise, karras(4, 0.002, 20.0), correct=3)


def test_corrections_are_objects_usable_with_any_sampler():
    """solve(correction, sampler, ...) is what restore_* run: the same numbers for the same generator."""
    prior = correlated()
    meas, _ = problem(prior, AvgPoolDown(2), 0.0, seed=8, n=32)
    sig = karras(10, 0.002, 20.0)
    for correction_of, fn, options in ((lambda g: Replacement(meas, g), restore_replacement, {}),
                                       (lambda g: ILVR(meas, g, 0.5), restore_ilvr, {"sigma_stop": 0.5}),
                                       (lambda g: MCG(meas, g, 1.0, 0.5), restore_mcg, {}),
                                       (lambda g: ReconstructionGuidance(meas, g, 2.0), restore_reconstruction,
                                        {"weight": 2.0})):
        noise = torch.randn(meas.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        a = solve(correction_of(g1), SAMPLERS["heun"][0], prior, noise, sig, generator=g1)
        b = fn(prior, meas, noise, sig, generator=g2, sampler=SAMPLERS["heun"][0], **options)
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="ILVR"):
        m2, _ = problem(prior, Inpaint(half_mask(4)), 0.0, n=4)
        ILVR(m2)
    with pytest.raises(ConfigError, match="sampler must be a sampler function"):
        restore_replacement(prior, meas, torch.zeros(meas.shape, dtype=F64), sig, sampler="heun")


# --------------------------------------------------------------------------------------------- shared helpers
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ancestral_split_keeps_the_noise_level_and_the_ddim_variance(eta):
    """s_down^2 + s_up^2 = s'^2 and s_up^2 = eta^2 s'^2 (s^2 - s'^2) / s^2 (DDIM's eta step) for eta <= 1."""
    noise = AncestralNoise("t", eta, 1.0, "gaussian", None)
    for s, sn in ((10.0, 3.0), (1.0, 0.9), (0.5, 0.01)):
        down, up = noise.split(s, sn)
        assert math.isclose(down ** 2 + up ** 2, sn ** 2, rel_tol=1e-12)
        assert math.isclose(up ** 2, eta ** 2 * sn ** 2 * (s ** 2 - sn ** 2) / s ** 2, rel_tol=1e-12, abs_tol=1e-300)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "unipc", "ddpm", "euler_ancestral"])
def test_a_shifted_start_is_the_same_walk_shifted(sampler):
    """Samplers are shift-equivariant (their updates are affine in x and D with weights summing to 1): starting
    at x_init + s0 n for data N(mu, Sigma) equals mu + the walk of the centred data N(0, Sigma) started at
    (x_init - mu) + s0 n. With x_init = mu: CCDF's start for a perfect estimate."""
    prior = correlated()
    centred = type(prior)(torch.zeros_like(prior.mu), prior.cov)
    noise = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)
    mu = prior.mu.reshape(1, *SHAPE).expand(5, *SHAPE)
    sig = karras(8, 0.002, 2.0)
    fn = SAMPLERS[sampler][0]
    got = sample_from(fn, prior, mu, noise, sig, generator=torch.Generator().manual_seed(1))
    want = mu + fn(centred, noise, sig, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    with pytest.raises(SamplerError, match="does not match"):
        sample_from(fn, prior, mu[:2], noise, sig)


def test_repaint_without_a_correction_samples_the_prior():
    """RePaint's re-noising moves are the forward process, so without a correction every pass keeps the prior
    marginals: samples of N(mu, Sigma) have its moments (tolerances as for the posterior tests). resample = 1 is
    the DDPM walk itself."""
    prior = isotropic(0.5)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(3000, *SHAPE, generator=g, dtype=F64)
    x = sample_repaint(prior, noise, karras(100, 0.002, 20.0), generator=g, jump=10, resample=2)
    em, ec = moment_errors(x, (prior.mu, prior.cov))
    assert em < MEAN_TOL and ec < COV_TOL, (em, ec)
    sig = karras(6, 0.002, 20.0)
    one = sample_repaint(prior, noise[:8], sig, generator=torch.Generator().manual_seed(4), jump=2, resample=1)
    ddpm = SAMPLERS["ddpm"][0](prior, noise[:8], sig, generator=torch.Generator().manual_seed(4))
    assert torch.equal(one, ddpm)

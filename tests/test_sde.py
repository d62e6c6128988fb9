"""Score SDEs: forward marginals of VE / VP / sub-VP, the one-frame identity, predictor-corrector sampling and the
adaptive probability-flow ODE, all against closed forms of Gaussian data."""
import math

import pytest
import torch

from analytic import GaussianData, gaussian_3d, mixture_2d
from torchdiffusion.config.registry import SAMPLERS
from torchdiffusion.core import grids
from torchdiffusion.core.objectives import Objective
from torchdiffusion.core.processes import VE, SubVP, VPContinuous
from torchdiffusion.errors import ConfigError
from torchdiffusion.sampling.adaptive import integrate, sample_pf_ode
from torchdiffusion.sampling.sde import langevin_correct, sample_pc, sample_pc_em
from torchdiffusion.sampling.steps import bind

SDES = [VE(sigma_min=0.01, sigma_max=50.0), VPContinuous(), SubVP()]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ----------------------------------------------------------------------------------------------- processes
@pytest.mark.parametrize("p", SDES, ids=lambda p: type(p).__name__)
def test_forward_sde_marginals_match_closed_forms(p):
    """Euler-Maruyama on dx_t = f x_t dt + g dw in the original variable from x_0 = 2: the mean coefficient is s(t) and
    the variance s(t)^2 sigma(t)^2 (minus sigma(0)^2 for VE, which starts at sigma_min)."""
    g = torch.Generator().manual_seed(0)
    n_paths, n_steps, x0 = 20000, 2000, 2.0
    times = torch.linspace(0, 1, n_steps + 1, dtype=torch.float64)
    x = torch.full((n_paths,), x0, dtype=torch.float64)
    checks = {500: 0.25, 1000: 0.5, 2000: 1.0}
    sig0 = float(p.sigma(torch.tensor(0.0)))
    for i in range(n_steps):
        t, dt = times[i], float(times[i + 1] - times[i])
        f, g2 = p.sde(t)
        x = x + float(f) * x * dt + math.sqrt(float(g2) * dt) * torch.randn(n_paths, generator=g, dtype=torch.float64)
        if i + 1 in checks:
            t1 = torch.tensor(checks[i + 1], dtype=torch.float64)
            sig = p.sigma(t1)
            s = float(p.scale(sig))
            var = s**2 * (float(sig) ** 2 - sig0**2)
            se_mean = math.sqrt(var / n_paths)
            assert float(x.mean()) == pytest.approx(s * x0, abs=5 * se_mean + 0.01 * s * x0)
            assert float(x.var()) == pytest.approx(var, rel=5 * math.sqrt(2 / n_paths) + 0.01)


@pytest.mark.parametrize("p", SDES, ids=lambda p: type(p).__name__)
def test_scaled_frame_is_the_ve_sde(p):
    """x_t = s(t) (x0 + sigma(t) n) with s' = f s and g^2 = s^2 d(sigma^2)/dt: the scaled variable obeys
    dx = sqrt(d sigma^2 / dt) dw for all three SDEs (the reason one denoiser contract serves them)."""
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    sig2 = lambda u: p.sigma(u) ** 2  # noqa: E731
    s = lambda u: p.scale(p.sigma(u))  # noqa: E731
    dsig2 = (sig2(t + h) - sig2(t - h)) / (2 * h)
    ds = (s(t + h) - s(t - h)) / (2 * h)
    f, g2 = p.sde(t)
    torch.testing.assert_close(ds, f * s(t), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g2, s(t) ** 2 * dsig2, rtol=1e-6, atol=1e-9)


def test_sub_vp_closed_forms():
    """Song et al. 2021, eq. 34: mean exp(-B/2), variance (1 - exp(-B))^2, below the VP variance 1 - exp(-B)."""
    p, vp = SubVP(), VPContinuous()
    t = torch.linspace(0.01, 1.0, 40, dtype=torch.float64)
    B = 0.1 * t + 0.5 * 19.9 * t**2
    sig = p.sigma(t)
    torch.testing.assert_close(p.scale(sig), torch.exp(-B / 2), rtol=1e-12, atol=0)
    torch.testing.assert_close((p.scale(sig) * sig) ** 2, (1 - torch.exp(-B)) ** 2, rtol=1e-10, atol=0)
    vp_var = (vp.scale(vp.sigma(t)) * vp.sigma(t)) ** 2
    assert bool(((p.scale(sig) * sig) ** 2 < vp_var).all())
    torch.testing.assert_close(p.t_of_sigma(sig), t, rtol=1e-10, atol=1e-12)
    s = Objective("uniform_t").sample_sigma(1000, p, torch.Generator().manual_seed(0))
    assert float(s.min()) >= p.sigma_min * 0.999 and float(s.max()) <= p.sigma_max * 1.001
    with pytest.raises(ValueError, match="sub_vp"):
        Objective("uniform_t").sample_sigma(4, object())


# ----------------------------------------------------------------------------------------------- PC sampling
def _gaussian(d=128):
    v = torch.logspace(math.log10(0.25), 0.0, d, dtype=torch.float64)
    return GaussianData(torch.linspace(-1, 1, d, dtype=torch.float64), v)


@pytest.mark.parametrize("fn", [sample_pc, sample_pc_em])
def test_pc_predictors_converge_to_the_gaussian_variance(fn):
    """Predictor only (n_corrector = 0), exact score of a 64-d Gaussian: the sample variance / true variance tends to 1
    at first order in the step (error at 25 steps > 4x the error at 200 steps) and is within 7% at 200 steps."""
    g = _gaussian(64)
    noise = torch.randn(400, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = []
    for n in (25, 200):
        x = fn(g, noise, grids.karras(n, 0.002, 80.0), generator=torch.Generator().manual_seed(1), n_corrector=0)
        errs.append(abs(float((x.var(0) / g.v).mean()) - 1))
        assert float((x.mean(0) - g.mu).abs().max()) < 5 * math.sqrt(1.0 / 400)
    assert errs[1] < 0.07 and errs[0] > 4 * errs[1], errs


def test_langevin_corrector_fixed_point_follows_the_snr_rule():
    """At a fixed level, the corrector's stationary variance for N(0, V I) in D dims is V (1 + 2/D) / (1 - snr^2):
    step eps = 2 snr^2 V (unadjusted Langevin bias 1 / (1 - eps / 2V)) and the per-row step's (1 + 2/D). A wrong
    step rule (e.g. eps without the factor 2: 1.063 here) misses it by > 4%."""
    d, V, snr = 128, 0.51, 0.3
    g = GaussianData(torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.5, dtype=torch.float64))
    x = 2 * torch.randn(400, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = langevin_correct(x, 0.1, bind(g, None), torch.Generator().manual_seed(1), snr, 40)
    expect = (1 + 2 / d) / (1 - snr**2)  # 1.116
    assert float(y.var() / V) == pytest.approx(expect, abs=0.02)


@pytest.mark.parametrize("fn", [sample_pc, sample_pc_em])
def test_pc_sampler_recovers_the_gaussian_variance(fn):
    """Predictor + one Langevin step per level (snr 0.16), exact score of a 128-d Gaussian: the corrector pulls a
    coarse walk (25 steps) towards the right marginal, and at 200 steps the variance is within 7% (the corrector's
    own fixed point at D = 128, snr 0.16 is +4%, see the test above)."""
    g = _gaussian()
    noise = torch.randn(400, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def ratio(n, nc):
        x = fn(g, noise, grids.karras(n, 0.002, 80.0), generator=torch.Generator().manual_seed(1), n_corrector=nc)
        return float((x.var(0) / g.v).mean())

    assert abs(ratio(25, 1) - 1) < 0.7 * abs(ratio(25, 0) - 1)
    assert ratio(200, 1) == pytest.approx(1.0, abs=0.07)


@pytest.mark.parametrize("name", ["pc", "pc_em"])
def test_pc_nfe_formula_and_batch_independence(name):
    fn, nfe = SAMPLERS[name]
    mix = mixture_2d()
    calls = []

    def counting(x, sigma, cond=None):
        calls.append(x.shape[0])
        return mix(x, sigma)

    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sig = grids.karras(6, 0.01, 20.0)
    batch = fn(counting, noise, sig, generator=_gens([10, 11, 12, 13]))
    assert len(calls) == nfe(6) == 11
    for b in range(4):
        single = fn(mix, noise[b:b + 1], sig, generator=_gens([10 + b]))
        torch.testing.assert_close(single, batch[b:b + 1], rtol=1e-12, atol=1e-12)
    calls.clear()
    fn(counting, noise, sig, generator=_gens([1, 2, 3, 4]), n_corrector=3)
    assert len(calls) == 6 + 3 * 5


def test_pc_bad_options_are_one_line_errors():
    mix = mixture_2d()
    noise = torch.randn(2, 2, dtype=torch.float64)
    sig = grids.karras(3, 0.01, 20.0)
    for kwargs, match in (({"snr": -1.0}, "snr"), ({"n_corrector": 1.5}, "n_corrector"),
                          ({"predictor": "heun"}, "valid: reverse_diffusion"), ({"alpha": 2.0}, "alpha")):
        with pytest.raises(ConfigError, match=match):
            sample_pc(mix, noise, sig, **kwargs)


# ----------------------------------------------------------------------------------------------- adaptive ODE
def test_adaptive_solver_converges_with_tolerance():
    """Exact PF-ODE map of an anisotropic Gaussian (variances 0.04 .. 4) from sigma 80 to 0.002: the error falls with
    the tolerance (dopri5: 1e-3 -> 1e-7 gains > 1000x) and stays within 20x the tolerance; bosh3 converges too."""
    g = gaussian_3d()
    noise = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sig = torch.tensor([80.0, 0.002], dtype=torch.float64)
    exact = g.flow(noise * 80.0, 80.0, 0.002)
    for method, tols in (("dopri5", (1e-3, 1e-5, 1e-7)), ("bosh3", (1e-3, 1e-6))):
        errs, nfes = [], []
        for tol in tols:
            info = {}
            x = sample_pf_ode(g, noise, sig, rtol=tol, atol=tol, method=method, info=info)
            errs.append(float((x - exact).abs().max()))
            nfes.append(float(info["nfe"].double().mean()))
            assert errs[-1] < 20 * tol * float(exact.abs().max())
        assert errs[0] > 1000 * errs[-1] if method == "dopri5" else errs[0] > 100 * errs[-1]
        assert nfes == sorted(nfes)


def test_integrate_matches_a_linear_ode_and_counts_evaluations():
    """dy/dt = A y with per-row rates (rows independent): y(1) = exp(a t) y0, and the reported NFE equals the calls."""
    a = torch.tensor([[-1.0], [0.5], [-20.0]], dtype=torch.float64)
    per_row = torch.zeros(3, dtype=torch.int64)

    def f(t, y, rows):
        per_row[rows] += 1
        return a[rows] * y

    y, info = integrate(f, torch.ones(3, 1, dtype=torch.float64), 0.0, 1.0, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(y, torch.exp(a), rtol=1e-6, atol=1e-9)
    assert torch.equal(info.nfe, per_row)
    assert int(info.nfe[2]) > int(info.nfe[0])  # the stiff row took more steps; the others were not held back
    y2, _ = integrate(f, torch.ones(3, 1, dtype=torch.float64), 1.0, 0.0, rtol=1e-8, atol=1e-10)  # backwards
    torch.testing.assert_close(y2, torch.exp(-a), rtol=1e-6, atol=1e-9)


def test_pf_ode_sampler_is_batch_independent_and_registered():
    fn, nfe = SAMPLERS["pf_ode"]
    assert nfe(10) is None
    mix = mixture_2d()
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sig = grids.karras(4, 0.01, 20.0)
    info = {}
    batch = fn(mix, noise, sig, info=info)
    for b in range(5):
        one = {}
        single = fn(mix, noise[b:b + 1], sig, info=one)
        torch.testing.assert_close(single, batch[b:b + 1], rtol=1e-12, atol=1e-12)
        assert int(one["nfe"][0]) == int(info["nfe"][b])
    with pytest.raises(ConfigError, match="rtol"):
        fn(mix, noise, sig, rtol=0.0)
    with pytest.raises(ConfigError, match="valid: dopri5, bosh3"):
        fn(mix, noise, sig, method="rk4")

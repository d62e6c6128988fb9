"""Multistep samplers (UniPC, iPNDM, PLMS, DEIS) and DDIM inversion against exact denoisers: measured order,
convergence on a Gaussian mixture, identities with one-step methods, NFE and the calling convention, errors.

Reference for a grid that stops at its last positive sigma s_min: the exact probability-flow map of the
Gaussian data from sigma_max to s_min (analytic.GaussianData.flow), so the error is the sampler's alone.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from analytic import gaussian_3d, mixture_2d

from torchdiffusion.config.registry import SAMPLERS
from torchdiffusion.core import grids
from torchdiffusion.errors import ConfigError
from torchdiffusion.sampling import SamplerError, randn, sample_ddim, sample_euler, sample_heun
from torchdiffusion.sampling.inversion import ddim_invert
from torchdiffusion.sampling.multistep import (deis_coefficients, nfe_plms, sample_deis, sample_ipndm,
                                               sample_plms, sample_unipc)

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
P = functools.partial


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def slope(ns, errs) -> float:
    return -float(np.polyfit(np.log(ns), np.log(errs), 1)[0])


def flow_errors(sampler, make_grid, ns, seed=0):
    """Mean endpoint error against the exact flow, for grids stopping at their last positive sigma."""
    data = gaussian_3d()
    noise = randn((64, 3), torch.Generator().manual_seed(seed), dtype=torch.float64)
    errs = []
    for n in ns:
        sig = make_grid(n)[:-1]
        ref = data.flow(noise * float(sig[0]), float(sig[0]), float(sig[-1]))
        errs.append((sampler(data, noise, sig) - ref).norm(dim=1).mean().item())
    return errs


KARRAS = lambda n: grids.karras(n, SIGMA_MIN, SIGMA_MAX)  # noqa: E731
UNIFORM = lambda n: grids.karras(n, 0.5, 10.0, rho=1.0)  # noqa: E731  uniform in sigma
NS = [16, 32, 64, 128]

# (id, sampler, grid, expected order, tolerance). Measured slopes in the comments.
ORDER_CASES = [
    ("unipc1", P(sample_unipc, order=1), KARRAS, 2.0, 0.3),  # UniP-1 + UniC: order 2 (Zhao et al. Thm 3.1); 1.99
    ("unipc2", P(sample_unipc, order=2), KARRAS, 3.0, 0.35),  # 3.11
    ("unipc3", P(sample_unipc, order=3), KARRAS, 4.0, 0.5),  # 4.27
    ("unipc3_bh1", P(sample_unipc, order=3, variant="bh1"), KARRAS, 4.0, 0.5),  # 4.32
    ("unip3", P(sample_unipc, order=3, corrector=False), KARRAS, 3.0, 0.5),  # predictor only: 3.38
    ("deis2_x0", P(sample_deis, order=2, target="x0"), KARRAS, 2.0, 0.35),  # 2.22
    ("deis3_x0", P(sample_deis, order=3, target="x0"), KARRAS, 3.0, 0.5),  # 3.41
    ("deis3_eps", P(sample_deis, order=3), KARRAS, 2.6, 0.4),  # 2.63 (3 asymptotically; pre-asymptotic here)
    ("ipndm_uniform", P(sample_ipndm, lower_order_final=False), UNIFORM, 2.9, 0.4),  # 2.88: AB1 warm start
    ("plms_uniform", sample_plms, UNIFORM, 2.9, 0.4),  # 2.88: pseudo improved Euler warm start
]


@pytest.mark.parametrize("sampler,make_grid,order,tol", [c[1:] for c in ORDER_CASES], ids=[c[0] for c in ORDER_CASES])
def test_measured_order(sampler, make_grid, order, tol):
    errs = flow_errors(sampler, make_grid, NS)
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert abs(slope(NS, errs) - order) < tol, (slope(NS, errs), errs)


def test_equal_step_coefficients_lose_order_on_a_karras_grid():
    # iPNDM/PLMS use equal-step Adams-Bashforth weights: on the strongly graded Karras grid they are second
    # order (measured 2.18 / 2.17), still well ahead of Euler (1).
    for sampler in (sample_ipndm, sample_plms):
        errs = flow_errors(sampler, KARRAS, NS)
        assert 1.8 < slope(NS, errs) < 2.6, errs


def test_higher_order_is_more_accurate_at_equal_nfe():
    base = flow_errors(sample_euler, KARRAS, [32])[0]
    for sampler in (sample_unipc, P(sample_unipc, order=3), sample_deis, sample_ipndm, P(sample_deis, target="x0")):
        assert flow_errors(sampler, KARRAS, [32])[0] < 0.2 * base


@pytest.fixture(scope="module")
def gmm_reference():
    data = mixture_2d()
    noise = randn((64, 2), torch.Generator().manual_seed(2), dtype=torch.float64)
    return data, noise, sample_heun(data, noise, grids.karras(1024, SIGMA_MIN, SIGMA_MAX))


@pytest.mark.parametrize("sampler", [sample_unipc, P(sample_unipc, order=3), P(sample_unipc, order=3, variant="bh1"),
                                     sample_ipndm, sample_plms, sample_deis, P(sample_deis, target="x0")],
                         ids=["unipc", "unipc_3", "unipc_3_bh1", "ipndm", "plms", "deis", "deis_x0"])
def test_gmm_converges(gmm_reference, sampler):
    data, noise, ref = gmm_reference
    errs = [(sampler(data, noise, grids.karras(n, SIGMA_MIN, SIGMA_MAX)) - ref).norm(dim=1).mean().item()
            for n in (8, 16, 32, 64)]
    assert all(b < a for a, b in zip(errs, errs[1:])) and errs[-1] < 5e-3 and errs[-1] < 0.02 * errs[0], errs


# ---------------------------------------------------------------------------------------------------------
# Identities.

def dpmpp_2m_by_hand(data, noise, sig):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) written out independently: first step and step to 0 first order."""
    s = sig.tolist()
    x, old, h_old = noise * s[0], None, None
    for i in range(len(s) - 1):
        d = data(x, torch.full((x.shape[0],), s[i], dtype=x.dtype))
        if s[i + 1] == 0:
            return d
        h = math.log(s[i] / s[i + 1])
        dd = d if old is None else d + (h / (2 * h_old)) * (d - old)
        x = (s[i + 1] / s[i]) * x + (1 - s[i + 1] / s[i]) * dd
        old, h_old = d, h
    return x


def test_unip2_bh2_is_dpmpp_2m():
    data = mixture_2d()
    noise = randn((16, 2), torch.Generator().manual_seed(3), dtype=torch.float64)
    sig = grids.karras(9, SIGMA_MIN, SIGMA_MAX)
    out = sample_unipc(data, noise, sig, order=2, corrector=False, lower_order_final=False)
    torch.testing.assert_close(out, dpmpp_2m_by_hand(data, noise, sig), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sampler", [P(sample_unipc, order=1, corrector=False), P(sample_ipndm, order=1),
                                     P(sample_deis, order=1), P(sample_deis, order=1, target="x0"),
                                     P(sample_deis, order=1, variable="sigma")],
                         ids=["unip1", "ipndm1", "deis1_eps", "deis1_x0", "deis1_sigma"])
def test_first_order_variants_are_ddim(sampler):
    data = mixture_2d()
    noise = randn((16, 2), torch.Generator().manual_seed(4), dtype=torch.float64)
    sig = grids.karras(7, SIGMA_MIN, SIGMA_MAX)
    torch.testing.assert_close(sampler(data, noise, sig), sample_ddim(data, noise, sig), rtol=1e-10, atol=1e-10)


def test_deis_coefficients_integrate_polynomials_exactly():
    # eps form in sigma: sum_j c_j p(sigma_j) = int_s^s' p for any p of degree <= 2 (three nodes)
    nodes, s_next = [2.0, 3.0, 5.0], 1.2
    c = deis_coefficients(nodes, s_next, "eps", "sigma")
    for p, integral in ((lambda v: 1.0, s_next - 2.0), (lambda v: v, (s_next**2 - 4.0) / 2),
                        (lambda v: v * v, (s_next**3 - 8.0) / 3)):
        assert math.isclose(sum(cj * p(v) for cj, v in zip(c, nodes)), integral, rel_tol=1e-12)
    # x0 form: a constant D gives DDIM's weight 1 - s'/s
    c = deis_coefficients(nodes, s_next, "x0", "sigma")
    assert math.isclose(sum(c), 1 - s_next / 2.0, rel_tol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Calling convention.

class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, cond=None):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        self.calls += 1
        return x / (1 + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2)


@pytest.mark.parametrize("name", ["unipc", "ipndm", "plms", "deis"])
def test_registry_nfe_callback_and_rank(name):
    fn, nfe = SAMPLERS[name]
    for n in (1, 2, 7):
        sig = grids.karras(n, SIGMA_MIN, SIGMA_MAX)
        noise = randn((2, 3, 4, 5), torch.Generator().manual_seed(0))
        before, den, seen = noise.clone(), Counting(), []
        out = fn(den, noise, sig, callback=seen.append)
        assert den.calls == nfe(n) and out.shape == noise.shape and out.dtype == noise.dtype
        assert torch.equal(noise, before) and [c["i"] for c in seen] == list(range(n))
    assert nfe_plms(7) == 8 and nfe_plms(1) == 1


def test_rows_do_not_depend_on_the_batch():
    data = gaussian_3d()
    sig = grids.karras(6, SIGMA_MIN, SIGMA_MAX)
    noise = randn((5, 3), torch.Generator().manual_seed(1))
    for fn in (sample_unipc, sample_ipndm, sample_plms, sample_deis):
        full = fn(data, noise, sig)
        for b in range(5):
            assert torch.equal(full[b:b + 1], fn(data, noise[b:b + 1], sig))


@pytest.mark.parametrize("call,needle", [
    (lambda: sample_unipc(Counting(), torch.zeros(2, 3), KARRAS(4), order=4), "order must be an integer in"),
    (lambda: sample_unipc(Counting(), torch.zeros(2, 3), KARRAS(4), variant="bh3"), "valid: bh1, bh2"),
    (lambda: sample_ipndm(Counting(), torch.zeros(2, 3), KARRAS(4), order=0), "order"),
    (lambda: sample_deis(Counting(), torch.zeros(2, 3), KARRAS(4), target="v"), "valid: eps, x0"),
    (lambda: sample_deis(Counting(), torch.zeros(2, 3), KARRAS(4), variable="t"), "valid: sigma, log_sigma"),
    (lambda: sample_plms(Counting(), torch.zeros(2, 3), KARRAS(4).flip(0)), "descending"),
    (lambda: ddim_invert(Counting(), torch.zeros(2, 3), KARRAS(4)[:-1]), "ends in 0"),
    (lambda: ddim_invert(Counting(), torch.zeros(2, 3), KARRAS(4), order=3), "order"),
])
def test_errors_teach(call, needle):
    with pytest.raises(SamplerError, match=needle) as info:
        call()
    assert isinstance(info.value, ConfigError) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# DDIM inversion.

@pytest.mark.parametrize("order,decode,rate", [(1, sample_ddim, 1.0), (2, sample_heun, 2.0)])
def test_inversion_round_trip_error_shrinks_with_nfe(order, decode, rate):
    # measured: order 1 halves per doubling (slope 1.0); order 2 falls with slope ~3 on these grids
    data = mixture_2d()
    x0 = data.sample(64, torch.Generator().manual_seed(5))
    ns = [16, 32, 64, 128]
    errs = []
    for n in ns:
        sig = grids.karras(n, SIGMA_MIN, SIGMA_MAX)
        errs.append((decode(data, ddim_invert(data, x0, sig, order=order), sig) - x0).norm(dim=1).mean().item())
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert slope(ns, errs) > rate - 0.2, errs
    if order == 2:
        assert errs[-1] < 1e-4


def test_inversion_follows_the_exact_flow_for_gaussian_data():
    # For Gaussian data the encoded state at sigma_max is the exact flow of x0 from 0 to sigma_max.
    data = gaussian_3d()
    x0 = data.sample(32, torch.Generator().manual_seed(6))
    sig = grids.karras(256, SIGMA_MIN, SIGMA_MAX)
    z = ddim_invert(data, x0, sig, order=2)
    exact = data.flow(x0, 0.0, SIGMA_MAX) / SIGMA_MAX
    assert (z - exact).norm(dim=1).mean() < 1e-3 * exact.norm(dim=1).mean()

"""Sigma grids: shapes, endpoints, monotonicity, formulas and the respacing conventions."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchdiffusion.core import grids
from torchdiffusion.errors import ConfigError


def ddpm_table(T: int = 1000) -> torch.Tensor:
    """Frame sigmas of DDPM's linear schedule (Ho et al. 2020): sigma_t = sqrt((1 - abar_t) / abar_t)."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    return ((1 - abar) / abar).sqrt()


def assert_grid(sig: torch.Tensor, n: int):
    assert sig.dtype == torch.float64 and sig.shape == (n + 1,)
    assert sig[-1] == 0 and (sig[:-1] > 0).all()
    assert (sig[1:] < sig[:-1]).all()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), lo=st.floats(1e-4, 1.0), ratio=st.floats(1.01, 1e5), rho=st.floats(0.5, 20.0))
def test_continuous_grids_are_descending_with_exact_endpoints(n, lo, ratio, rho):
    hi = lo * ratio
    for sig in (grids.karras(n, lo, hi, rho), grids.loglinear(n, lo, hi)):
        assert_grid(sig, n)
        assert math.isclose(sig[0].item(), hi, rel_tol=1e-12)
        if n > 1:
            assert math.isclose(sig[-2].item(), lo, rel_tol=1e-12)


def test_karras_matches_eq5_by_hand():
    # n = 3, rho = 2: sigma_i = (sqrt(9) + i/2 (sqrt(1) - sqrt(9)))^2 = 9, 4, 1
    assert torch.allclose(grids.karras(3, 1.0, 9.0, rho=2.0), torch.tensor([9.0, 4.0, 1.0, 0.0], dtype=torch.float64))
    # rho = 1 is uniform in sigma
    assert torch.allclose(grids.karras(5, 1.0, 5.0, rho=1.0), torch.tensor([5.0, 4, 3, 2, 1, 0], dtype=torch.float64))


def test_karras_tends_to_loglinear_as_rho_grows():
    k = grids.karras(10, 0.002, 80.0, rho=1e6)
    ll = grids.loglinear(10, 0.002, 80.0)
    assert torch.allclose(k, ll, rtol=1e-4, atol=0)


def test_loglinear_has_constant_ratio():
    sig = grids.loglinear(6, 0.01, 100.0)
    ratios = sig[1:-1] / sig[:-2]
    assert torch.allclose(ratios, torch.full_like(ratios, (0.01 / 100.0) ** (1 / 5)), rtol=1e-12)


def test_one_step_grid_starts_at_sigma_max():
    assert torch.equal(grids.karras(1, 0.1, 10.0), torch.tensor([10.0, 0.0], dtype=torch.float64))
    assert torch.equal(grids.loglinear(1, 0.1, 10.0), torch.tensor([10.0, 0.0], dtype=torch.float64))


def test_continuous_uniform_t():
    sig = grids.continuous_uniform_t(4, lambda t: 2 * t, 0.25, 1.0)  # t = 1, .75, .5, .25
    assert torch.allclose(sig, torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0], dtype=torch.float64))
    # VP SDE of Song et al. 2021 (EDM Table 1): beta_d = 19.9, beta_min = 0.1, t in [1e-3, 1]
    vp = lambda t: torch.sqrt(torch.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1)  # noqa: E731
    sig = grids.continuous_uniform_t(18, vp, 1e-3, 1.0)
    assert_grid(sig, 18)
    assert math.isclose(sig[0].item(), math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel_tol=1e-12)


# T = 10, n = 5 by hand (the conventions of DDIM / diffusers' timestep_spacing):
#   leading:  k = 10 // 5 = 2, t = 0, 2, 4, 6, 8
#   trailing: round(10 - j * 2) - 1 = 9, 7, 5, 3, 1
#   linspace: round(linspace(0, 9, 5)) = round(0, 2.25, 4.5, 6.75, 9) = 0, 2, 4 (half to even), 7, 9
@pytest.mark.parametrize("spacing,expected", [
    ("leading", [8, 6, 4, 2, 0]),
    ("trailing", [9, 7, 5, 3, 1]),
    ("linspace", [9, 7, 4, 2, 0]),
])
def test_discrete_timesteps_by_hand(spacing, expected):
    assert grids.discrete_timesteps(10, 5, spacing).tolist() == expected
    table = torch.arange(1, 11, dtype=torch.float64) / 10  # sigma_t = (t + 1) / 10
    sig = grids.discrete(table, 5, spacing)
    assert_grid(sig, 5)
    assert torch.equal(sig, torch.tensor([(t + 1) / 10 for t in expected] + [0.0], dtype=torch.float64))


def test_discrete_non_dividing_and_offset():
    assert grids.discrete_timesteps(10, 3, "leading").tolist() == [6, 3, 0]
    assert grids.discrete_timesteps(10, 3, "leading", offset=1).tolist() == [7, 4, 1]  # Stable Diffusion's offset
    assert grids.discrete_timesteps(10, 3, "trailing").tolist() == [9, 6, 2]  # round(10, 6.67, 3.33) - 1
    assert grids.discrete_timesteps(10, 3, "linspace").tolist() == [9, 4, 0]  # round(0, 4.5, 9)


def test_discrete_ddpm_1000():
    table = ddpm_table()
    assert grids.discrete_timesteps(1000, 10, "leading").tolist() == list(range(900, -1, -100))
    assert grids.discrete_timesteps(1000, 10, "trailing").tolist() == list(range(999, 0, -100))
    full = grids.discrete(table, 1000, "leading")
    assert_grid(full, 1000)
    assert torch.equal(full[:-1], table.flip(0))  # n = T visits every timestep, under every spacing
    for spacing in grids.SPACINGS:
        assert torch.equal(grids.discrete(table, 1000, spacing), full)
        assert_grid(grids.discrete(table, 7, spacing), 7)


@pytest.mark.parametrize("call,needle", [
    (lambda: grids.karras(0, 0.1, 1.0), "n must be an integer >= 1"),
    (lambda: grids.karras(2.5, 0.1, 1.0), "n must be an integer >= 1"),
    (lambda: grids.karras(5, 1.0, 0.1), "sigma_min < sigma_max"),
    (lambda: grids.loglinear(5, 0.0, 1.0), "sigma_min < sigma_max"),
    (lambda: grids.karras(5, 0.1, float("inf")), "finite"),
    (lambda: grids.karras(5, 0.1, 1.0, rho=0), "rho"),
    (lambda: grids.continuous_uniform_t(5, lambda t: t, 1.0, 0.5), "t_min < t_max"),
    (lambda: grids.continuous_uniform_t(5, lambda t: -t, 0.1, 1.0), "sigmas > 0"),
    (lambda: grids.continuous_uniform_t(5, lambda t: 1 / t, 0.1, 1.0), "increasing"),
    (lambda: grids.discrete(ddpm_table(10), 5, "middle"), "valid: leading, trailing, linspace"),
    (lambda: grids.discrete(ddpm_table(10), 11), "n <= 10"),
    (lambda: grids.discrete(ddpm_table(10).flip(0), 5), "increasing"),
    (lambda: grids.discrete(ddpm_table(10)[None], 5), "1-D"),
    (lambda: grids.discrete(ddpm_table(10), 5, "trailing", offset=1), "leading"),
    (lambda: grids.discrete(ddpm_table(10), 5, "leading", offset=2), "offset"),
])
def test_errors_teach(call, needle):
    with pytest.raises(grids.GridError, match=needle) as info:
        call()
    assert isinstance(info.value, ValueError) and isinstance(info.value, ConfigError)
    assert "\n" not in str(info.value)

"""Optimised sigma grids (sampling/gridopt.py): the dynamic programme against brute force, the search
against the Karras grid with exact mixture denoisers on seeds it never saw, determinism, and the JSON cache."""
from __future__ import annotations

import functools
import itertools

import pytest
import torch
from analytic import GaussianMixture, mixture_2d

from torchdiffusion.core import grids
from torchdiffusion.sampling import randn, sample_euler, sample_heun
from torchdiffusion.sampling.gridopt import GridSearchConfig, GridSearchError, dp_path, optimize_grid
from torchdiffusion.sampling.multistep import sample_unipc

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
FAST = GridSearchConfig(candidates=32, substeps=2, pilot_seeds=tuple(range(1_000_000, 1_000_048)),
                        refine_sweeps=2, refine_steps=(0.3, 0.1))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def brute_force(c1, c2, last, n):
    M = c1.shape[0]
    best, arg = float("inf"), None
    for mid in itertools.combinations(range(1, M), n - 1):
        path = (0,) + mid
        cost = float(c1[path[0], path[1]]) if n > 1 else 0.0
        for k in range(2, len(path)):
            cost += float(c2[path[k - 2], path[k - 1], path[k]] if c2 is not None else c1[path[k - 1], path[k]])
        cost += float(last[path[-1]])
        if cost < best:
            best, arg = cost, list(path)
    return arg


@pytest.mark.parametrize("history", [1, 2])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_dynamic_programme_matches_brute_force(history, n):
    g = torch.Generator().manual_seed(10 * n + history)
    M = 8
    c1 = torch.rand(M, M, generator=g, dtype=torch.float64)  # entries for backward steps must be ignored
    c2 = torch.rand(M, M, M, generator=g, dtype=torch.float64) if history == 2 else None
    last = torch.rand(M, generator=g, dtype=torch.float64)
    assert dp_path(c1, c2, last, n) == brute_force(c1, c2, last, n)


def wide_mixture() -> GaussianMixture:
    """Well separated, thin modes: few-step samplers land between them on a generic grid."""
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5], [0.5, -2.0]], dtype=torch.float64)
    return GaussianMixture(means=means, variances=torch.full((4, 2), 0.01, dtype=torch.float64),
                           weights=torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64))


@pytest.mark.parametrize("data_fn", [mixture_2d, wide_mixture], ids=["mixture_2d", "wide_mixture"])
@pytest.mark.parametrize("sampler,n", [(functools.partial(sample_unipc, order=3), 5), (sample_euler, 6)],
                         ids=["unipc3-5", "euler-6"])
def test_optimized_grid_beats_karras_on_unseen_seeds(data_fn, sampler, n):
    data = data_fn()
    res = optimize_grid(data, (2,), n, sampler, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, config=FAST)
    sig = res.sigmas
    assert sig.shape == (n + 1,) and sig[0] == SIGMA_MAX and sig[-1] == 0 and (sig[1:] < sig[:-1]).all()
    assert sig[-2] >= SIGMA_MIN and res.pilot_error <= res.dp_error
    noise = randn((256, 2), torch.Generator().manual_seed(7), dtype=torch.float64)  # not pilot seeds
    ref = sample_heun(data, noise, grids.karras(512, SIGMA_MIN, SIGMA_MAX))
    err = lambda s: (sampler(data, noise, s) - ref).norm(dim=1).mean().item()  # noqa: E731
    e_opt, e_dp, e_karras = err(sig), err(res.dp_sigmas), err(grids.karras(n, SIGMA_MIN, SIGMA_MAX))
    assert e_opt < 0.6 * e_karras, (e_opt, e_dp, e_karras)
    assert e_dp < e_karras, (e_opt, e_dp, e_karras)


def test_search_is_deterministic_and_round_trips_through_json(tmp_path):
    data = mixture_2d()
    a = optimize_grid(data, (2,), 4, sample_unipc, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, config=FAST)
    b = optimize_grid(data, (2,), 4, sample_unipc, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, config=FAST)
    assert torch.equal(a.sigmas, b.sigmas) and a.pilot_error == b.pilot_error
    path = grids.save_grid(tmp_path / "g" / "unipc_n4.json", a.sigmas, {"pilot_rms_error": a.pilot_error})
    sig, meta = grids.load_grid(path, 4)
    assert torch.equal(sig, a.sigmas) and meta["pilot_rms_error"] == a.pilot_error


@pytest.mark.parametrize("content,needle", [
    (None, "does not exist"),
    ("{not json", "not readable JSON"),
    ('{"format": "other", "sigmas": [1, 0]}', "not a torchdiffusion sigma grid"),
    ('{"format": "torchdiffusion-sigma-grid/1", "sigmas": [1, 2, 0]}', "descending"),
    ('{"format": "torchdiffusion-sigma-grid/1", "sigmas": [2, 1, 0.5]}', "end in 0"),
    ('{"format": "torchdiffusion-sigma-grid/1", "sigmas": [2, 1, 0]}', "holds a 2-step grid"),
])
def test_grid_file_errors_teach(tmp_path, content, needle):
    path = tmp_path / "grid.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(grids.GridError, match=needle) as info:
        grids.load_grid(path, 5)
    assert "\n" not in str(info.value)


def test_search_arguments_are_checked():
    data = mixture_2d()
    with pytest.raises(GridSearchError, match="n must be"):
        optimize_grid(data, (2,), 0, sample_euler, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    with pytest.raises(GridSearchError, match="sigma_min < sigma_max"):
        optimize_grid(data, (2,), 3, sample_euler, sigma_min=1.0, sigma_max=0.5)


def test_uniform_t_for_each_process():
    from torchdiffusion.core import processes

    # VE: sigma(t) geometric -> uniform in t is log-linear; EDM: sigma = t -> uniform in sigma (rho = 1)
    torch.testing.assert_close(grids.uniform_t(6, processes.VE()), grids.loglinear(6, 0.02, 100.0), rtol=1e-12, atol=0)
    torch.testing.assert_close(grids.uniform_t(6, processes.EDM()), grids.karras(6, 0.002, 80.0, rho=1.0),
                               rtol=1e-12, atol=0)
    vp = processes.VPContinuous()
    t = vp.t_of_sigma(torch.tensor([vp.sigma_min, vp.sigma_max], dtype=torch.float64))
    torch.testing.assert_close(grids.uniform_t(9, vp), grids.continuous_uniform_t(9, vp.sigma, float(t[0]), float(t[1])),
                               rtol=1e-10, atol=0)
    # discrete VP: on integer timesteps it visits the table (n - 1 must divide T - 1 = 999: n = 4 -> 999, 666, 333, 0)
    ddpm = processes.VPDiscrete()
    table = ddpm.sigmas()
    torch.testing.assert_close(grids.uniform_t(4, ddpm)[:-1], table[[999, 666, 333, 0]], rtol=1e-10, atol=0)
    with pytest.raises(grids.GridError, match="t_of_sigma"):
        grids.uniform_t(4, object())

"""The discrete variational bound (Ho et al. 2020; Nichol & Dhariwal 2021) in bits/dim, checked against the
closed-form -log p of Gaussian data, and the 8-bit decoder's conventions.

Data here are continuous (Gaussian), so the bound is the continuous-data version (`data="continuous"`: a Gaussian
decoder density at timestep 0). For Gaussian data the true reverse conditional q(x_{t-1} | x_t) is Gaussian for any
step size, so a model with the exact posterior mean and the exact step variance (a learned v) makes the bound tight:
its expectation is -log p(x0) per point, up to the prior mismatch KL(q(x_T) || N(0, I)) (about 1e-6 bits here).
"""
import math

import pytest
import torch

from analytic import GaussianData
from torchdiffusion.core import vlb
from torchdiffusion.core.precond import reverse_step_variances
from torchdiffusion.core.processes import VPDiscrete
from torchdiffusion.errors import DataError, TorchDiffusionError


class ExactVP:
    """Exact denoiser of Gaussian data on a VPDiscrete table, with the v that makes every reverse step exact
    (under the bound's conventions: step i goes from sigma_i to sigma_{i-1}; the decoder's "small" is clipped to the
    posterior variance of step 1)."""

    def __init__(self, data: GaussianData, process: VPDiscrete):
        self.data, self.process = data, process
        self.table = process.sigmas()

    learned_variance = True  # answers return_variance=True with (D, v) (core.precond.denoise_with_variance)

    def __call__(self, x, sigma, cond=None, return_variance=False):
        if return_variance:
            return self.with_variance(x, sigma, cond)
        return self.data.denoise(x.double(), sigma.double()).float()

    def with_variance(self, x, sigma, cond=None):
        s = sigma.double()
        i = torch.argmin((self.table[None] - s[:, None]).abs(), 1)
        below = torch.cat([self.table.new_zeros(1), self.table[:-1]])
        sn = below[i]
        small, large = reverse_step_variances(s, sn)
        small = torch.where(sn > 0, small, reverse_step_variances(self.table[1], self.table[0])[0])
        var0 = self.data.v * s[:, None] ** 2 / (self.data.v + s[:, None] ** 2)  # Var[x0 | x_t], (B, d)
        r = (1 - sn**2 / s**2)[:, None]
        true = torch.where(sn[:, None] > 0, small[:, None] + r**2 * var0, var0)
        v = (true.log() - small.log()[:, None]) / (large.log() - small.log())[:, None]
        return self(x, sigma), v.float()


def _nll_bpd(data: GaussianData, x: torch.Tensor) -> torch.Tensor:
    logp = -0.5 * ((x.double() - data.mu) ** 2 / data.v + torch.log(2 * math.pi * data.v)).sum(1)
    return -logp / (x.shape[1] * math.log(2))


DATA = GaussianData(mu=torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64),
                    v=torch.tensor([1e-3, 4e-3, 1.6e-2, 6.4e-2], dtype=torch.float64))


def test_discrete_vlb_with_exact_posterior_equals_gaussian_nll():
    p = VPDiscrete(16, "cosine")
    model = ExactVP(DATA, p)
    g = torch.Generator().manual_seed(0)
    x = DATA.sample(20000, g).float()
    nll = _nll_bpd(DATA, x)
    terms = vlb.discrete_vlb_terms(model, x, g, data="continuous")  # variance: learned (the model has one)
    d = terms.total - nll  # paired per image: removes the spread of -log p over the data
    se = float(d.std() / math.sqrt(d.numel()))
    assert abs(float(d.mean())) < 0.01 * abs(float(nll.mean())), (float(terms.total.mean()), float(nll.mean()), se)
    assert se < 0.004 * abs(float(nll.mean()))  # the check above has power
    assert float(terms.prior.mean()) < 1e-4
    # the stratified estimate (4 of 16 timesteps per image) is unbiased for the same sum
    strat = vlb.discrete_vlb_bpd(model, x, g, data="continuous", timesteps=4) - nll
    assert abs(float(strat.mean())) < 4 * float(strat.std() / math.sqrt(strat.numel())) + 0.002


@pytest.mark.parametrize("variance", ["small", "large"])
def test_fixed_variances_give_an_upper_bound(variance):
    """With a fixed variance the reverse steps are not exact: the bound exceeds -log p (it is a bound)."""
    p = VPDiscrete(16, "cosine")
    model = ExactVP(DATA, p)
    g = torch.Generator().manual_seed(1)
    x = DATA.sample(4000, g).float()
    d = vlb.discrete_vlb_bpd(model, x, g, data="continuous", variance=variance) - _nll_bpd(DATA, x)
    se = float(d.std() / math.sqrt(d.numel()))
    assert float(d.mean()) > 5 * se


def test_discretized_decoder_is_a_probability_mass():
    """Ho et al. eq. 13: the 256 bin masses sum to 1 for any mean and variance; a narrow decoder puts all mass on the
    nearest level; a wide one gives density x bin width."""
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_var in ((0.13, math.log(0.05**2)), (-0.97, math.log(0.3**2)), (0.999, math.log(2.0**2)),
                          (0.5, math.log(1e-6**2))):
        m = torch.full_like(levels, mean)
        logp = vlb.discretized_gaussian_log_likelihood(levels, m, torch.full_like(levels, log_var))
        assert float(torch.logsumexp(logp, 0).exp()) == pytest.approx(1.0, abs=1e-9)
    # narrow: the level nearest the mean has probability ~1
    k = int(round((0.5 + 1) * 127.5))
    m = torch.full_like(levels, levels[k].item() + 1e-4)
    logp = vlb.discretized_gaussian_log_likelihood(levels, m, torch.full_like(levels, math.log(1e-4**2)))
    assert float(logp[k]) == pytest.approx(0.0, abs=1e-9)
    # wide, away from the edges: P(bin) ~ N(x; m, s^2) * 2/255
    s = 0.2
    logp = vlb.discretized_gaussian_log_likelihood(levels[100:150], torch.zeros(50, dtype=torch.float64),
                                                   torch.full((50,), math.log(s * s), dtype=torch.float64))
    dens = -0.5 * (levels[100:150] / s) ** 2 - math.log(s * math.sqrt(2 * math.pi)) + math.log(2 / 255)
    torch.testing.assert_close(logp, dens, atol=2e-4, rtol=0)


def test_8bit_inputs_uint8_and_float_agree():
    p = VPDiscrete(8, "cosine")
    model = ExactVP(GaussianData(torch.zeros(3, dtype=torch.float64), torch.full((3,), 0.3, dtype=torch.float64)), p)
    u8 = torch.randint(0, 256, (5, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    a = vlb.discrete_vlb_bpd(model, u8, torch.Generator().manual_seed(2), variance="small")
    b = vlb.discrete_vlb_bpd(model, u8.float() / 127.5 - 1, torch.Generator().manual_seed(2), data="8bit",
                             variance="small")
    torch.testing.assert_close(a, b)
    assert (a > 0).all()  # a probability mass: bits are non-negative
    with pytest.raises(DataError, match="8-bit grid"):
        vlb.discrete_vlb_bpd(model, torch.rand(2, 3), data="8bit")
    with pytest.raises(TorchDiffusionError, match="learned variance"):
        vlb.discrete_vlb_bpd(lambda x, s, c=None: x, u8, variance="learned", process=p)
    with pytest.raises(TorchDiffusionError, match="timesteps"):
        vlb.discrete_vlb_bpd(model, u8, timesteps=0)

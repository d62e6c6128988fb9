"""Math checks of noise processes, preconditioners and objectives."""
import math

import pytest
import torch

from torchdiffusion.core.objectives import Objective
from torchdiffusion.core.precond import Preconditioned, Preconditioner
from torchdiffusion.core.processes import EDM, VE, VPContinuous, VPDiscrete

PROCESSES = [VPDiscrete(1000, "linear"), VPDiscrete(2000, "linear"), VPDiscrete(1000, "cosine"),
             VPContinuous(), VE(), EDM()]


def test_ddpm_linear_table_matches_ho_et_al():
    p = VPDiscrete(1000, "linear")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(p.alphas_cumprod(), abar, rtol=0, atol=0)
    assert p.sigma_max == pytest.approx(math.sqrt((1 - abar[-1]) / abar[-1]), rel=1e-12)
    # T=2000 keeps the end points of abar comparable (improved-diffusion scaling).
    p2 = VPDiscrete(2000, "linear")
    assert float(p2.alphas_cumprod()[-1]) == pytest.approx(float(abar[-1]), rel=0.05)


def test_cosine_schedule_matches_nichol_dhariwal():
    p = VPDiscrete(1000, "cosine")
    s = 0.008
    f = lambda t: math.cos((t / 1000 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert float(p.alphas_cumprod()[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-9)


@pytest.mark.parametrize("p", [VPDiscrete(1000, "linear"), VPDiscrete(1000, "cosine"), VPDiscrete(2000)])
def test_discrete_t_of_sigma_inverts_table(p):
    t = torch.arange(p.T)
    torch.testing.assert_close(p.t_of_sigma(p.sigmas()[t]), t.double(), atol=1e-6, rtol=0)
    # between two table entries, the fractional t lies between their indices
    mid = (p.sigmas()[10] * p.sigmas()[11]).sqrt()
    assert 10 < float(p.t_of_sigma(mid)) < 11


@pytest.mark.parametrize("p", [VPContinuous(), VE(), EDM()])
def test_continuous_t_of_sigma_inverts_sigma(p):
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    torch.testing.assert_close(p.t_of_sigma(p.sigma(t)), t, atol=1e-9, rtol=1e-9)


def test_vp_continuous_matches_song_marginal():
    # Song et al. 2021 eq. 33: abar(t) = exp(-t^2 (bmax - bmin)/2 - t bmin); sigma^2 = (1 - abar)/abar
    p = VPContinuous()
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    abar = torch.exp(-0.5 * t**2 * (p.beta_max - p.beta_min) - t * p.beta_min)
    torch.testing.assert_close(p.sigma(t) ** 2, (1 - abar) / abar, rtol=1e-10, atol=0)


class _Oracle(torch.nn.Module):
    """A backbone that returns each head's textbook target for a known (x0, n), computed from the
    papers' own formulas (not from the preconditioner), so D must return x0 exactly."""

    def __init__(self, head, x0, n, sigma, process, sd):
        super().__init__()
        self.head, self.x0, self.n, self.sigma, self.process, self.sd = head, x0, n, sigma, process, sd

    def forward(self, x_in, c_noise, cond=None):
        s = self.sigma.double().reshape(-1, 1)
        x0, n = self.x0.double(), self.n.double()
        if self.head == "eps":
            return n.float()
        if self.head == "x0":
            return x0.float()
        if self.head == "v":  # Salimans & Ho 2022: z = alpha x0 + sigma_t eps, v = alpha eps - sigma_t x0
            alpha, sigma_t = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
            return (alpha * n - sigma_t * x0).float()
        # EDM eq. 7/8: F target = (x0 - c_skip x) / c_out
        x = x0 + s * n
        c_skip = self.sd**2 / (s**2 + self.sd**2)
        c_out = s * self.sd / (s**2 + self.sd**2).sqrt()
        return ((x0 - c_skip * x) / c_out).float()


@pytest.mark.parametrize("head", ["eps", "x0", "v", "edm"])
@pytest.mark.parametrize("process", PROCESSES[:2] + PROCESSES[3:])
def test_every_head_recovers_x0_from_its_exact_target(head, process):
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 40.0])
    sd = 1.0 if head == "v" else 0.5
    model = Preconditioned(_Oracle(head, x0, n, sigma, process, sd), process, Preconditioner(head, sigma_data=sd))
    D = model(x0 + sigma[:, None] * n, sigma)
    torch.testing.assert_close(D, x0, atol=2e-4 * (1 + sigma.max().item() / 10), rtol=1e-4)


def test_eps_model_agrees_with_ddpm_x0_formula():
    """An eps-prediction network seen through the preconditioner gives DDPM's x0 estimate
    x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) (Ho et al. 2020, eq. 15)."""
    p = VPDiscrete()
    seen = {}

    class EpsNet(torch.nn.Module):
        def forward(self, x_t, t, cond=None):
            seen["x_t"], seen["t"] = x_t, t
            return torch.tanh(x_t) * 0.3 + 0.01 * t[:, None]

    model = Preconditioned(EpsNet(), p, Preconditioner("eps"))
    t = torch.tensor([0, 10, 500, 999])
    abar = p.alphas_cumprod()[t].float()[:, None]
    g = torch.Generator().manual_seed(1)
    x0, n = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * n
    sigma = p.sigmas()[t].float()
    D = model(x_t / abar.sqrt(), sigma)
    torch.testing.assert_close(seen["x_t"], x_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["t"], t.float(), atol=1e-3, rtol=0)
    eps = EpsNet()(x_t, t.float())
    torch.testing.assert_close(D, (x_t - (1 - abar).sqrt() * eps) / abar.sqrt(), atol=1e-3, rtol=1e-4)


def test_simple_loss_is_plain_eps_mse():
    p = VPDiscrete()

    class Net(torch.nn.Module):
        def forward(self, x, c, cond=None):
            return 0.5 * x

    model = Preconditioned(Net(), p, Preconditioner("eps"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, generator=g)
    sigma = p.sigmas()[torch.tensor([5, 50, 100, 200, 300, 400, 600, 900])].float()
    n = torch.randn(8, 4, generator=g)
    loss = Objective("discrete", "eps").loss(model, x0, sigma=sigma, noise=n)
    x_t = (x0 + sigma[:, None] * n) / (1 + sigma[:, None] ** 2).sqrt()
    torch.testing.assert_close(loss, (0.5 * x_t - n).pow(2).mean(1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weighting", ["eps", "x0", "v", "edm", "min_snr"])
@pytest.mark.parametrize("head", ["eps", "v", "edm"])
def test_expected_loss_of_exact_denoiser_has_closed_form(weighting, head):
    """Gaussian data x0 ~ N(0, v I): E||D*(x) - x0||^2 per dim = v sigma^2 / (v + sigma^2); the loss of a backbone
    that realises D* must be lambda(sigma) times that, for every head."""
    v, sd = 0.25, 0.5
    p = EDM()
    obj = Objective("lognormal", weighting, sigma_data=sd)

    class Exact(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = Preconditioner(head, sigma_data=sd)

        def forward(self, x_in, c_noise, cond=None):
            sigma = torch.exp(4 * c_noise).double()[:, None]
            c_skip, c_out, c_in, _ = self.pre.coefficients(sigma.squeeze(1), p)
            x = x_in.double() / c_in.double()[:, None]
            D = v / (v + sigma**2) * x
            return ((D - c_skip.double()[:, None] * x) / c_out.double()[:, None]).float()

    model = Preconditioned(Exact(), p, Preconditioner(head, sigma_data=sd))
    g = torch.Generator().manual_seed(0)
    n_per = 20000
    for s in (0.05, 0.5, 3.0):
        sigma = torch.full((n_per,), s)
        x0 = math.sqrt(v) * torch.randn(n_per, 4, generator=g)
        loss = obj.loss(model, x0, sigma=sigma, generator=g).double().mean()
        expect = float(obj.weight(torch.tensor([s]))[0]) * v * s**2 / (v + s**2)
        assert float(loss) == pytest.approx(expect, rel=0.03)


def test_training_densities():
    g = torch.Generator().manual_seed(0)
    s = Objective("lognormal").sample_sigma(100000, EDM(), g)
    assert float(s.log().mean()) == pytest.approx(-1.2, abs=0.02)
    assert float(s.log().std()) == pytest.approx(1.2, abs=0.02)
    p = VPDiscrete()
    s = Objective("discrete").sample_sigma(1000, p, g)
    assert torch.isin(s, p.sigmas().float()).all()
    with pytest.raises(ValueError, match="discrete VP"):
        Objective("discrete").sample_sigma(4, EDM(), g)
    s = Objective("uniform_t").sample_sigma(1000, VE(), g)
    assert float(s.min()) >= VE().sigma_min * 0.999 and float(s.max()) <= VE().sigma_max


def test_bad_names_are_one_line_errors():
    with pytest.raises(ValueError, match="valid: eps, x0, v, edm"):
        Preconditioner("epsilon")
    with pytest.raises(ValueError, match="valid"):
        Objective(weighting="snr")
    with pytest.raises(ValueError, match="linear"):
        VPDiscrete(schedule="quadratic")

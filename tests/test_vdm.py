"""VDM (Kingma et al. 2021): the monotone learned schedule, the continuous-time bound against the closed-form -log p
of Gaussian data, its training objective and gradient, sampling on the learned grid, and the CLI end to end."""
import math

import pytest
import torch

from analytic import GaussianData
from tiny_runs import invoke as _cli

from torchdiffusion.config.build import build_sigmas
from torchdiffusion.config.loaders import load_run
from torchdiffusion.config.schema import SampleConfig
from torchdiffusion.core import vdm, vlb
from torchdiffusion.core.objectives import Objective
from torchdiffusion.core.precond import Preconditioner
from torchdiffusion.nn.unet import UNet, UNetConfig
from torchdiffusion.sampling.ancestral import sample_ddpm
from torchdiffusion.sampling.ode import sample_heun


def _random_schedule(seed: int, g0=-13.3, g1=5.0, scale=3.0) -> vdm.MonotoneGamma:
    torch.manual_seed(seed)
    sch = vdm.MonotoneGamma(g0, g1, features=64)
    with torch.no_grad():
        for p in sch.parameters():
            p.copy_(scale * torch.randn_like(p))
    return sch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gamma_is_monotone_with_fixed_end_points(seed):
    sch = _random_schedule(seed)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    g, dg = sch.with_derivative(t)
    g, dg = g.detach(), dg.detach()
    assert float(g[0]) == pytest.approx(-13.3, abs=1e-9) and float(g[-1]) == pytest.approx(5.0, abs=1e-9)
    assert (g[1:] > g[:-1]).all() and (dg > 0).all()
    # the closed-form derivative is the derivative
    h = 1e-6
    tm = torch.tensor([0.1, 0.37, 0.5, 0.93], dtype=torch.float64)
    with torch.no_grad():
        fd = (sch(tm + h) - sch(tm - h)) / (2 * h)
        torch.testing.assert_close(sch.with_derivative(tm)[1], fd, rtol=1e-5, atol=1e-6)
    # gamma is not just the line: the random weights bend it
    assert float((g - (-13.3 + 18.3 * t)).abs().max()) > 0.05


def test_low_discrepancy_times():
    t = vdm.low_discrepancy_t(8, torch.Generator().manual_seed(0))
    assert sorted((t * 8).floor().long().tolist()) == list(range(8))  # one per stratum
    draws = torch.cat([vdm.low_discrepancy_t(5, torch.Generator().manual_seed(s)) for s in range(2000)])
    assert float(draws.mean()) == pytest.approx(0.5, abs=0.01) and float(draws.var()) == pytest.approx(1 / 12, abs=0.005)


# Narrow components: the estimator's spread comes mostly from gamma below log v, where ||eps - eps_hat||^2 ~ chi^2_D
# and gamma' multiplies it; narrow data keep that stretch short (and the test's 1% a tight margin in bits).
DATA = GaussianData(mu=torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64),
                    v=torch.tensor([1e-4, 4e-4, 1.6e-3, 6.4e-3], dtype=torch.float64))


@pytest.mark.parametrize("seed", [None, 5])
def test_continuous_vlb_with_exact_denoiser_equals_gaussian_nll(seed):
    """Continuous data (decoder density N(x; z_0, sigma_0^2)); exact denoiser; the bound equals -log p within 1%
    for the linear schedule and for a random monotone one (with fixed end points the bound does not depend on the
    schedule in between, VDM sec. 5.1)."""
    sch = vdm.MonotoneGamma(features=16) if seed is None else _random_schedule(seed)
    if seed is None:
        with torch.no_grad():
            sch.w3.fill_(-60.0)  # the linear schedule
    g = torch.Generator().manual_seed(0)
    x = DATA.sample(20000, g).float()
    logp = -0.5 * ((x.double() - DATA.mu) ** 2 / DATA.v + torch.log(2 * math.pi * DATA.v)).sum(1)
    nll = -logp / (4 * math.log(2))
    terms = vlb.vdm_vlb_terms(DATA, x, g, data="continuous", timesteps=32, schedule=sch)
    d = terms.total - nll
    se = float(d.std() / math.sqrt(d.numel()))
    assert abs(float(d.mean())) < 0.01 * abs(float(nll.mean())), (float(terms.total.mean()), float(nll.mean()), se)
    assert se < 0.004 * abs(float(nll.mean()))


def _tiny_vdm_model(seed=0, C=1):
    torch.manual_seed(seed)
    net = UNet(UNetConfig(image_size=8, in_channels=C, out_channels=C, model_channels=8, channel_mult=(1, 2),
                          num_res_blocks=1, attn_resolutions=(), norm_groups=4, mid_attention=False))
    return vdm.VDMModel(net, vdm.VDM(), Preconditioner("eps"), features=32)


def test_objective_and_bound_agree_on_the_identity_denoiser():
    """An untrained eps-head model has F = 0 (zero output conv), so D(x) = x and ||eps - eps_hat||^2 = ||n||^2: the
    diffusion term's expectation is 0.5 (gamma_1 - gamma_0) per dimension for any schedule. The training loss and
    the bound both estimate that (plus the same prior and reconstruction terms)."""
    model = _tiny_vdm_model()
    with torch.no_grad():
        model.schedule.w3.copy_(2 * torch.randn(32))  # a bent schedule
        model.schedule.w2.copy_(3 * torch.randn(32))
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (512, 1, 8, 8), generator=g, dtype=torch.uint8)
    x0 = u8.float() / 127.5 - 1
    obj = Objective("vdm", "vlb")
    with torch.no_grad():
        loss = obj.loss(model, x0, generator=g).double()
    terms = vlb.vdm_vlb_terms(model, u8, g, timesteps=2)
    diff_expect = 0.5 * 18.3 / math.log(2)
    assert float(terms.diffusion.mean()) == pytest.approx(diff_expect, rel=0.02)
    other = terms.prior + terms.decoder
    assert float(loss.mean()) == pytest.approx(float((other + diff_expect).mean()), rel=0.02)


def test_schedule_follows_the_variance_gradient(monkeypatch):
    """The network's parameters get the gradient of mean(L); the schedule's get that of mean(L^2) (VDM sec. 5.2)."""
    model = _tiny_vdm_model(1)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, 256, (6, 1, 8, 8), generator=g).float() / 127.5 - 1
    sigma = Objective("vdm", "vlb").sample_sigma(6, model.process, g)
    noise = torch.randn(x0.shape, generator=g)
    obj = Objective("vdm", "vlb")

    def grads(reduce):
        model.zero_grad()
        reduce(obj.loss(model, x0, sigma=sigma, noise=noise)).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    hooked = grads(lambda L: L.mean())
    monkeypatch.setattr(vdm, "variance_minimising_grad", lambda tensors, box: None)
    plain = grads(lambda L: L.mean())
    squared = grads(lambda L: (L.double() ** 2).mean())
    sched = [k for k in hooked if k.startswith("schedule.")]
    net = [k for k in hooked if not k.startswith("schedule.")]
    assert sched and net
    for k in sched:
        torch.testing.assert_close(hooked[k], squared[k], rtol=1e-4, atol=1e-7)
    for k in net:
        torch.testing.assert_close(hooked[k], plain[k], rtol=1e-5, atol=1e-8)


def test_sampling_on_the_learned_grid_recovers_the_data():
    """The VDM sampling grid is exp(gamma(t)/2) on uniform t; our samplers walk it: with the exact denoiser of
    Gaussian data, DDPM ancestral and Heun sampling on that grid reproduce the data's mean and variance."""
    sch = _random_schedule(3, g0=-12.0, g1=8.0, scale=1.0)
    process = vdm.VDM(-12.0, 8.0, schedule=sch)
    sigmas = build_sigmas(SampleConfig(grid="uniform_t", steps=200), process)
    t = torch.linspace(1, 0, 200, dtype=torch.float64)
    torch.testing.assert_close(sigmas[:-1], torch.exp(0.5 * sch(t)).detach())
    assert float(sigmas[-1]) == 0.0
    data = GaussianData(torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.1, 1.0], dtype=torch.float64))
    noise = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0))
    for fn in (sample_ddpm, sample_heun):
        x = fn(data, noise, sigmas, generator=torch.Generator().manual_seed(1)).double()
        torch.testing.assert_close(x.mean(0), data.mu, atol=0.03, rtol=0)
        torch.testing.assert_close(x.var(0) / data.v, torch.ones(2, dtype=torch.float64), atol=0.06, rtol=0)
    # without a learned schedule the grid is the reference (linear log-SNR) one
    ref = vdm.VDM(-12.0, 8.0).uniform_t_grid(5)
    torch.testing.assert_close(ref[:-1], torch.exp(0.5 * (-12.0 + 20.0 * torch.linspace(1, 0, 5, dtype=torch.float64))))


TINY = ["data.limit=32", "data.val_split=val", "model.backbone.model_channels=8", "model.backbone.channel_mult=[1,2]",
        "model.backbone.num_res_blocks=1", "model.backbone.attn_resolutions=[14]", "model.backbone.norm_groups=4",
        "model.backbone.num_heads=2", "train.batch_size=8", "train.warmup_steps=2", "train.log_every=2",
        "train.val_every=3", "train.val_images=16", "train.sample_every=1000", "train.ckpt_every=3",
        "sample.steps=3", "sample.grid_images=2", "train.max_minutes=0", "train.precision=fp32", "train.steps=3"]


def test_cli_trains_and_samples_a_vdm_model(tmp_path):
    run = tmp_path / "vdm"
    args = ["train", "--run", run, "--no-progress", "--threads", "1"]
    for s in TINY + ["model.process.kind=vdm", "model.head=eps", "objective.density=vdm", "objective.weighting=vlb",
                     "sample.grid=uniform_t", "sample.sampler=ddpm"]:
        args += ["--set", s]
    _cli(args)
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and all(math.isfinite(float(r.split(",")[2])) for r in rows[1:])
    loaded = load_run(run)
    assert isinstance(loaded.model, vdm.VDMModel) and loaded.model.process.schedule is loaded.model.schedule
    assert any(k.startswith("schedule.") for k in loaded.checkpoint.tensors["model"])
    # the optimiser trained the schedule (its last layer starts at -6 everywhere)
    assert float(loaded.checkpoint.tensors["model"]["schedule.w3"].sub(-6.0).abs().max()) > 0
    _cli(["sample", "--run", run, "--outdir", tmp_path / "s", "--seeds", "0-1", "--steps", "4"])
    assert (tmp_path / "s" / "000001.png").exists()
    bpd = vlb.vlb_bpd(loaded.model, torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert bpd.shape == (2,) and torch.isfinite(bpd).all()


@pytest.mark.parametrize("gamma_0", [-13.3, -8.0, -2.0, 1.0])
def test_reconstruction_window_equals_the_full_256_way_softmax(gamma_0):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 40), generator=g).double() / 127.5 - 1
    s = math.exp(0.5 * gamma_0)
    z = x + s * torch.randn(x.shape, generator=g, dtype=torch.float64)
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    logits = -0.5 * (z.unsqueeze(-1) - levels) ** 2 / s**2
    k = torch.round((x + 1) * 127.5).long()
    full = -(logits.gather(-1, k.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)).sum(1)
    torch.testing.assert_close(vdm.reconstruction_nll(x, z, gamma_0), full, rtol=1e-10, atol=1e-9)
    # a probability mass: summed over all 256 values of one pixel it is 1
    one = z[:1, :1].expand(256, 1)
    p = torch.exp(-vdm.reconstruction_nll(levels.reshape(256, 1), one, gamma_0))
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("settings, message", [
    (["model.process.kind=vdm", "model.variance=learned"], "needs model.process.kind 'vp_discrete'"),
    (["model.process.kind=edm", "objective.weighting=vlb", "objective.density=vdm"], "need model.process.kind 'vdm'"),
    (["model.process.kind=vdm", "objective.weighting=vlb", "objective.density=lognormal"], "needs objective.density"),
    (["model.process.kind=vp_discrete", "objective.weighting=hybrid", "objective.density=discrete"],
     "needs model.variance 'learned'"),
    (["model.process.kind=vdm", "model.process.gamma_min=3", "model.process.gamma_max=1"], "gamma_min < gamma_max"),
])
def test_bad_combinations_are_config_errors(settings, message):
    from torchdiffusion.config.build import build_objective, build_run_model
    from torchdiffusion.config.presets_io import load_preset, resolve
    from torchdiffusion.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        cfg = resolve(load_preset("mnist"), TINY + settings + ["model.data_shape=[1,28,28]"])
        build_run_model(cfg)
        build_objective(cfg.objective, cfg.model)

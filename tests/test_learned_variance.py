"""iDDPM's learned variance (Nichol & Dhariwal 2021): the 2C-channel head, sampling with the learned variance under
respacing, the hybrid loss's gradient split, and importance sampling of t from a loss history."""
import math

import pytest
import torch

from analytic import GaussianData
from torchdiffusion.core import grids
from torchdiffusion.core.objectives import LossHistory, Objective
from torchdiffusion.core.precond import LearnedVariance, Preconditioner, reverse_step_variances
from torchdiffusion.core.processes import VPDiscrete
from torchdiffusion.sampling.ancestral import sample_ddpm
from torchdiffusion.sampling.steps import SamplerError


class ExactStepVariance:
    """Exact denoiser of Gaussian data plus the v that makes each reverse step of `sigmas` exact:
    Var[x_{s'} | x_s] = small + (1 - s'^2/s^2)^2 Var[x0 | x_s], written as v between log small and log large."""

    def __init__(self, data: GaussianData, sigmas: torch.Tensor):
        self.data, self.sig = data, [float(s) for s in sigmas]

    learned_variance = True  # answers return_variance=True with (D, v) (core.precond.denoise_with_variance)

    def __call__(self, x, sigma, cond=None, return_variance=False):
        if return_variance:
            return self.with_variance(x, sigma, cond)
        return self.data.denoise(x.double(), sigma.double()).float()

    def with_variance(self, x, sigma, cond=None):
        s = float(sigma[0])
        i = min(range(len(self.sig) - 1), key=lambda k: abs(self.sig[k] - s))
        sn = self.sig[i + 1]
        if sn == 0:  # the step into the data draws no noise: v is not used
            return self(x, sigma), torch.full_like(x, 0.5)
        small, large = reverse_step_variances(s, sn)
        var0 = self.data.v * s**2 / (self.data.v + s**2)  # Var[x0 | x_s], (d,)
        true = small + (1 - sn**2 / s**2) ** 2 * var0
        v = (true.log() - math.log(small)) / (math.log(large) - math.log(small))
        return self(x, sigma), v.float().expand(x.shape)


def test_respaced_learned_variance_sampling_reproduces_data_variance():
    """With v set to the exact step variance, ancestral sampling on a 10-step respacing of T = 1000 is exact for
    Gaussian data, so the samples' variance is the data's; the fixed choices are visibly off on the same grid."""
    data = GaussianData(mu=torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64),
                        v=torch.tensor([0.05, 0.3, 2.0], dtype=torch.float64))
    p = VPDiscrete(1000, "linear")
    sigmas = grids.discrete(p.sigmas(), 10, "linspace")  # ends at sigma_0 = 0.01 before the step to 0
    model = ExactStepVariance(data, sigmas)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 3, generator=g)
    out = {}
    for variance in ("learned", "small", "large"):
        x = sample_ddpm(model, noise, sigmas, generator=torch.Generator().manual_seed(1), variance=variance)
        out[variance] = x.double().var(0) / data.v
        assert torch.isfinite(x).all()
    torch.testing.assert_close(out["learned"], torch.ones(3, dtype=torch.float64), atol=0.05, rtol=0)
    # the fixed variances on so coarse a grid: too little noise (small) for every component, too much (large) for
    # the component with v < 1
    assert float((out["small"] - 1).abs().max()) > 0.15
    assert float(out["large"][0] - 1) > 0.1


def test_learned_variance_head_contract():
    C = 2

    class Net(torch.nn.Module):
        def forward(self, x, c_noise, cond=None):
            return torch.cat([0.3 * x, torch.tanh(x) * 0 + 0.2 * torch.ones_like(x)], dim=1)

    p = VPDiscrete(100, "cosine")
    model = LearnedVariance(Net(), p, Preconditioner("eps"))
    x = torch.randn(3, C, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 1.0, 5.0])
    D = model(x, sigma)
    D2, v = model.denoise_with_variance(x, sigma)
    assert D.shape == x.shape and v.shape == x.shape
    torch.testing.assert_close(D, D2)
    torch.testing.assert_close(v, torch.full_like(x, 0.6))  # (0.2 + 1) / 2
    # eps head: D = x - sigma * F with F the first C channels
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(D, x - s * 0.3 * x / (1 + s**2).sqrt(), rtol=1e-5, atol=1e-6)

    class Wrong(torch.nn.Module):
        def forward(self, x, c_noise, cond=None):
            return x

    with pytest.raises(ValueError, match="2 x 2 channels"):
        LearnedVariance(Wrong(), p, Preconditioner("eps"))(x, sigma)


def test_learned_sampler_needs_a_variance_model():
    data = GaussianData(mu=torch.zeros(2, dtype=torch.float64), v=torch.ones(2, dtype=torch.float64))
    with pytest.raises(SamplerError, match="learned variance"):
        sample_ddpm(data, torch.randn(4, 2), grids.loglinear(3, 0.1, 10.0), variance="learned")


class _Capture(torch.nn.Module):
    """A tiny backbone with 2C outputs whose output tensor keeps its gradient."""

    def __init__(self, C):
        super().__init__()
        self.lin = torch.nn.Conv2d(C, 2 * C, 1)
        self.out = None

    def forward(self, x, c_noise, cond=None):
        self.out = self.lin(x) * (1 + 0.001 * c_noise.reshape(-1, 1, 1, 1))
        self.out.retain_grad()
        return self.out


@pytest.mark.parametrize("t_values", [[0, 3, 40, 99], [1, 2, 50, 98]])
def test_hybrid_loss_gradient_reaches_variance_only_through_vlb(t_values):
    """iDDPM sec. 3.1: L_simple drives the mean channels, L_vlb (mean's gradient stopped) drives the variance
    channels; so the mean channels' gradient equals the plain eps loss's and the variance channels' gradient
    vanishes when lambda = 0."""
    torch.manual_seed(0)
    C, p = 2, VPDiscrete(100, "cosine")
    net = _Capture(C)
    model = LearnedVariance(net, p, Preconditioner("eps"))
    g = torch.Generator().manual_seed(3)
    x0 = (torch.randint(0, 256, (4, C, 4, 4), generator=g).float() / 127.5 - 1)
    sigma = p.sigmas()[torch.tensor(t_values)].float()
    noise = torch.randn(x0.shape, generator=g)

    def out_grad(objective):
        objective.loss(model, x0, sigma=sigma, noise=noise).mean().backward()
        grad = net.out.grad.clone()
        net.zero_grad()
        return grad

    hybrid = out_grad(Objective("discrete", "hybrid"))
    simple = out_grad(Objective("discrete", "eps"))
    no_vlb = out_grad(Objective("discrete", "hybrid", vlb_lambda=0.0))
    torch.testing.assert_close(hybrid[:, :C], simple[:, :C], rtol=1e-5, atol=1e-8)
    assert float(simple[:, C:].abs().max()) == 0.0
    assert float(no_vlb[:, C:].abs().max()) == 0.0
    assert float(hybrid[:, C:].abs().min()) > 0  # every variance element learns from its own L_t term


def test_hybrid_loss_vlb_term_is_the_bound_term():
    """The hybrid loss minus L_simple is lambda T L_t with L_t the discrete bound's term in bits/dim; for the step
    into the data (t = 0) that is the discretised decoder's -log2 P(x0) / D."""
    from torchdiffusion.core import vlb

    C, p = 1, VPDiscrete(50, "cosine")

    class Net(torch.nn.Module):
        def forward(self, x, c_noise, cond=None):
            return torch.cat([0.5 * x, 0.1 * x], dim=1)

    model = LearnedVariance(Net(), p, Preconditioner("eps"))
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 256, (3, C, 4, 4), generator=g).float() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 0, 0])
    sigma = p.sigmas()[t].float()
    lam = 0.01
    diff = Objective("discrete", "hybrid", vlb_lambda=lam).loss(model, x0, sigma=sigma, noise=noise) \
        - Objective("discrete", "eps").loss(model, x0, sigma=sigma, noise=noise)
    x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    D, v = model.denoise_with_variance(x, sigma)
    small_clip = reverse_step_variances(p.sigmas()[1], p.sigmas()[0])[0]
    large = p.sigmas()[0] ** 2 / (1 + p.sigmas()[0] ** 2)
    log_var = v.double() * math.log(large) + (1 - v.double()) * math.log(small_clip)
    nll = -vlb.discretized_gaussian_log_likelihood(x0, D, log_var).flatten(1).sum(1)
    expect = lam * p.T * nll / (x0[0].numel() * math.log(2))
    torch.testing.assert_close(diff.double(), expect, rtol=1e-4, atol=1e-6)


def test_loss_history_importance_sampling():
    T = 8
    h = LossHistory(T, history=4)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(h.current(), torch.full((T,), 1 / T, dtype=torch.float64))
    L = torch.arange(1, T + 1, dtype=torch.float64)  # L_t = t + 1, constant per t
    for _ in range(4):
        h.update(torch.arange(T), L)
    p = h.current()
    expect = L / L.sum() * (1 - 0.001) + 0.001 / T  # sqrt(E[L^2]) = L for constant losses
    torch.testing.assert_close(p, expect)
    t = h.draw(200000, g)
    freq = torch.bincount(t, minlength=T).double() / t.numel()
    torch.testing.assert_close(freq, p, atol=0.004, rtol=0)
    # weighting by 1 / (T p_t) makes the importance-sampled mean the uniform-t mean
    est = float((L[t] * h.weights(t)).mean())
    assert est == pytest.approx(float(L.mean()), rel=0.01)
    # the state is in buffers: a fresh module restored from state_dict draws the same
    h2 = LossHistory(T, history=4)
    h2.load_state_dict(h.state_dict())
    torch.testing.assert_close(h2.current(), p)
    # a new loss pushes out the oldest
    h.update(torch.tensor([0]), torch.tensor([100.0]))
    assert float(h.losses[0, -1]) == 100.0 and float(h.losses[0, 0]) == 1.0 and int(h.counts[0]) == 5


def test_importance_density_needs_its_state():
    with pytest.raises(ValueError, match="LossHistory"):
        Objective("importance", "eps")


TINY = ["data.limit=32", "data.val_split=val", "model.backbone.model_channels=8", "model.backbone.channel_mult=[1,2]",
        "model.backbone.num_res_blocks=1", "model.backbone.attn_resolutions=[14]", "model.backbone.norm_groups=4",
        "model.backbone.num_heads=2", "train.batch_size=8", "train.warmup_steps=2", "train.log_every=2",
        "train.val_every=4", "train.val_images=8", "train.sample_every=1000", "train.ckpt_every=4",
        "sample.steps=3", "sample.grid_images=2", "train.max_minutes=0", "train.precision=fp32",
        "model.process.kind=vp_discrete", "model.process.T=4", "model.process.schedule=cosine", "model.head=eps",
        "model.variance=learned", "objective.density=importance", "objective.weighting=hybrid",
        "sample.grid=discrete", "sample.sampler=ddpm", "sample.variance=learned"]


def _train(run, steps, until=None):
    from tiny_runs import invoke

    args = ["train", "--run", run, "--no-progress", "--threads", "1"] + (["--until-step", until] if until else [])
    for s in TINY + [f"train.steps={steps}"]:
        args += ["--set", s]
    return invoke(args)


def test_cli_learned_variance_with_importance_sampling_resumes_exactly(tmp_path):
    """Hybrid loss + importance sampling end to end. T = 4 with 8 images a step fills the history (10 per t)
    within 8 steps, so the split run resumes in the importance-sampled regime; its loss history comes back from
    the checkpoint and the run matches the uninterrupted one."""
    from torchdiffusion.config.loaders import load_run
    from torchdiffusion.train.checkpoint import load_checkpoint, resolve_latest

    full, split = tmp_path / "full", tmp_path / "split"
    _train(full, 12)
    _train(split, 12, until=8)
    _train(split, 12)
    a = load_checkpoint(resolve_latest(full / "checkpoints"))
    b = load_checkpoint(resolve_latest(split / "checkpoints"))
    hist = a.tensors["objective"]
    assert int(hist["counts"].min()) >= 10  # importance sampling was active
    assert not torch.allclose(hist["probs"], torch.full_like(hist["probs"], 0.25))
    for group in ("model", "ema", "objective"):
        for k, v in a.tensors[group].items():
            torch.testing.assert_close(b.tensors[group][k], v, rtol=0, atol=0)
    run = load_run(full)
    assert isinstance(run.model, LearnedVariance) and run.sample_shape == (1, 28, 28)
    x = torch.randn(2, 1, 28, 28)
    D, v = run.model.denoise_with_variance(x, torch.tensor([0.5, 2.0]))
    assert D.shape == v.shape == x.shape
    from torchdiffusion.core import vlb
    bpd = vlb.vlb_bpd(run.model, torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert bpd.shape == (2,) and torch.isfinite(bpd).all() and (bpd > 0).all()
    from click.testing import CliRunner

    from torchdiffusion.cli.main import cli
    r = CliRunner().invoke(cli, ["sample", "--run", str(full), "--outdir", str(tmp_path / "s"), "--seeds", "0-1",
                                 "--steps", "4"], catch_exceptions=False)
    assert r.exit_code == 0, r.output


# --------------------------------------------------------------------------------------------- through guidance
def _iddpm_class_model():
    """A tiny class-conditional iDDPM model (learned variance) with non-trivial weights."""
    from torchdiffusion.config.build import build_model
    from torchdiffusion.config.schema import ModelConfig
    from torchdiffusion.config.strict import from_dict

    from torchdiffusion.protocols import CondSpec

    cfg = from_dict(ModelConfig, {"variance": "learned", "data_shape": [1, 8, 8], "backbone": {
        "kind": "unet", "model_channels": 16, "channel_mult": [1, 2], "attn_resolutions": [], "norm_groups": 8,
        "num_res_blocks": 1}})
    torch.manual_seed(0)
    model = build_model(cfg, conds=(CondSpec("label", "class", 10),)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def test_cfg_on_a_learned_variance_model_samples_and_is_the_model_at_scale_one():
    """CFG forwards the learned variance (v from the conditional branch, as guided-diffusion): DDPM with
    variance="learned" runs on the guided model; at scale 1 it is the conditional model exactly; at scale 3 the
    mean changes but v is still the conditional branch's."""
    from torchdiffusion.guidance.cfg import ClassifierFreeGuidance, null_label

    model = _iddpm_class_model()
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = {"label": torch.tensor([1, 2, 3])}
    sig = grids.karras(5, model.process.sigma_min, model.process.sigma_max)
    with torch.no_grad():
        plain = sample_ddpm(model, noise, sig, cond=cond, generator=torch.Generator().manual_seed(2),
                            variance="learned")
        at_one = sample_ddpm(ClassifierFreeGuidance(model, 1.0, null_label(10)), noise, sig, cond=cond,
                             generator=torch.Generator().manual_seed(2), variance="learned")
        guided = ClassifierFreeGuidance(model, 3.0, null_label(10))
        at_three = sample_ddpm(guided, noise, sig, cond=cond, generator=torch.Generator().manual_seed(2),
                               variance="learned")
        assert torch.equal(at_one, plain)
        assert torch.isfinite(at_three).all() and not torch.allclose(at_three, plain)
        x, s = noise * 2.0, torch.full((3,), 2.0)
        d_g, v_g = guided(x, s, cond, return_variance=True)
        d_c, v_c = model(x, s, cond, return_variance=True)
        d_u = model(x, s, {"label": torch.full((3,), 10)})
        torch.testing.assert_close(v_g, v_c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d_g, d_u + 3.0 * (d_c - d_u), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(guided(x, s, cond), d_g)


class _ClassBlind(ExactStepVariance):
    """ExactStepVariance that accepts (and ignores) a class label: D_c = D_u, so CFG at any scale is the model."""


def test_cfg_and_classifier_guidance_keep_the_exact_step_variance():
    """Through CFG (any scale) and classifier guidance (scale 0 here: no classifier term) around a model whose
    mean and v make every step exact, learned-variance DDPM still reproduces the data variance: the wrappers pass
    v through the contract untouched."""
    from torchdiffusion.guidance.cfg import ClassifierFreeGuidance, null_label
    from torchdiffusion.guidance.classifier import ClassifierGuidance

    data = GaussianData(mu=torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64),
                        v=torch.tensor([0.05, 0.3, 2.0], dtype=torch.float64))
    sigmas = grids.discrete(VPDiscrete(1000, "linear").sigmas(), 10, "linspace")
    model = _ClassBlind(data, sigmas)
    noise = torch.randn(20000, 3, generator=torch.Generator().manual_seed(0))
    cond = {"label": torch.zeros(20000, dtype=torch.long)}
    for wrapped in (ClassifierFreeGuidance(model, 3.0, null_label(10)),
                    ClassifierGuidance(model, lambda x, s: torch.zeros(x.shape[0], 10), 0.0)):
        x = sample_ddpm(wrapped, noise, sigmas, cond=cond, generator=torch.Generator().manual_seed(1),
                        variance="learned")
        torch.testing.assert_close(x.double().var(0) / data.v, torch.ones(3, dtype=torch.float64), atol=0.05, rtol=0)


def test_a_wrapper_without_a_variance_is_one_line():
    from torchdiffusion.errors import ConfigError
    from torchdiffusion.guidance.cfg import ClassifierFreeGuidance, null_label, with_cond

    data = GaussianData(mu=torch.zeros(2, dtype=torch.float64), v=torch.ones(2, dtype=torch.float64))
    sig = grids.loglinear(3, 0.1, 10.0)
    cond = {"label": torch.zeros(4, dtype=torch.long)}
    for den in (ClassifierFreeGuidance(data, 2.0, null_label(10)), with_cond(data, None)):
        with pytest.raises(ConfigError) as e:
            sample_ddpm(den, torch.randn(4, 2), sig, cond=cond, variance="learned")
        assert "learned variance" in str(e.value) and "small" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="has none"):
        ClassifierFreeGuidance(data, 2.0, null_label(10))(torch.randn(4, 2), torch.ones(4), cond,
                                                          return_variance=True)


def test_measurement_ccdf_and_fixed_cond_wrappers_pass_the_learned_variance_through():
    """DPS/MCG/reconstruction gradients, CCDF's shifted frame and with_cond change the mean estimate only: with
    return_variance=True they return the inner model's v unchanged (and their own D), so DDPM with the learned
    variance runs under every one of them."""
    from torchdiffusion.core.precond import denoise_with_variance
    from torchdiffusion.guidance.cfg import with_cond
    from torchdiffusion.inverse import Inpaint, Measurement, dps, half_mask, restore_ccdf, restore_dps, restore_mcg
    from torchdiffusion.sampling.ccdf import sample_ccdf

    model = _iddpm_class_model()
    label = {"label": torch.tensor([1, 2])}
    x, s = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2.0, torch.full((2,), 2.0)
    d_m, v_m = denoise_with_variance(model, x, s, label)
    meas = Measurement(Inpaint(half_mask(8)), Inpaint(half_mask(8))(x.clamp(-1, 1)), tuple(x.shape))
    fixed = with_cond(model, label)
    wrapped = {"dps": dps(model, meas), "with_cond": fixed}
    for name, w in wrapped.items():
        d_w, v_w = w(x, s, label, return_variance=True)
        torch.testing.assert_close(v_w, v_m, msg=name)
        torch.testing.assert_close(d_w, w(x, s, label), msg=name)
    assert not torch.allclose(wrapped["dps"](x, s, label), d_m)  # the gradient term is really there
    sig = grids.karras(4, model.process.sigma_min, model.process.sigma_max)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))

    def gens():
        return [torch.Generator().manual_seed(10 + i) for i in range(2)]

    with torch.no_grad():
        outs = [sample_ddpm(fixed, noise, sig, generator=gens(), variance="learned"),
                sample_ccdf(fixed, noise, sig, init=torch.zeros_like(noise), generator=gens(), sampler=sample_ddpm,
                            sampler_options={"variance": "learned"})]
    outs += [restore_dps(fixed, meas, noise, sig, generator=gens(), sampler_options={"variance": "learned"}),
             restore_mcg(fixed, meas, noise, sig, generator=gens(), sampler_options={"variance": "learned"})]
    assert all(o.shape == noise.shape and torch.isfinite(o).all() for o in outs)
    # the plain model under with_cond is the model: the learned-variance walk is the same bit for bit
    with torch.no_grad():
        torch.testing.assert_close(outs[0], sample_ddpm(model, noise, sig, cond=label, generator=gens(),
                                                        variance="learned"), rtol=0, atol=0)

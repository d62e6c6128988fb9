"""Guidance wrappers, condition dropout and rejection sampling, checked on exact Gaussian-mixture denoisers.

A class-conditional Gaussian mixture p(x0) = sum_k w_k N(m_k, diag(v_k)) with the class as the condition has
closed forms for everything: D_k(x, s) = m_k + v_k / (v_k + s^2) (x - m_k) (the class-conditional denoiser),
p(k | x, s) = softmax_k(log w_k + log N(x; m_k, v_k + s^2)) (the exact noisy classifier) and
D(x, s) = sum_k p(k | x, s) D_k (the unconditional denoiser).
"""
import math

import pytest
import torch

from torchdiffusion.errors import ConfigError
from torchdiffusion.guidance.cfg import ClassifierFreeGuidance, null_label, with_cond
from torchdiffusion.guidance.classifier import ClassifierGuidance, log_prob_grad
from torchdiffusion.guidance.dropout import LabelDropout, drop_labels, drop_mask
from torchdiffusion.pipelines.rejection import rejection_sample, retry_seed
from torchdiffusion.sampling.ode import sample_heun
from torchdiffusion.core import grids


class ClassMixture:
    """Exact denoisers and classifier of a class-conditional GMM; label K is the null (unconditional) label."""

    def __init__(self, means, variances, weights):
        self.m = torch.as_tensor(means, dtype=torch.float64)
        self.v = torch.as_tensor(variances, dtype=torch.float64)
        self.w = torch.as_tensor(weights, dtype=torch.float64)
        self.K = self.m.shape[0]

    def logits(self, x, sigma):
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1) ** 2
        var = self.v[None].to(x.dtype) + s2
        diff = x[:, None, :] - self.m[None].to(x.dtype)
        return torch.log(self.w.to(x.dtype)) - 0.5 * ((diff ** 2 / var) + torch.log(2 * math.pi * var)).sum(-1)

    def class_denoise(self, x, sigma):  # (B, K, d)
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1) ** 2
        v = self.v[None].to(x.dtype)
        return self.m[None] + v / (v + s2) * (x[:, None, :] - self.m[None])

    def __call__(self, x, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        dk = self.class_denoise(x, sigma)
        r = torch.softmax(self.logits(x, sigma), dim=1)
        d_uncond = (r[..., None] * dk).sum(1)
        if cond is None:
            return d_uncond
        y = cond["label"]
        d_cond = dk[torch.arange(x.shape[0]), y.clamp(max=self.K - 1)]
        return torch.where((y == self.K)[:, None], d_uncond, d_cond)

    def sample_class(self, k, n, g):
        return self.m[k] + self.v[k].sqrt() * torch.randn(n, self.m.shape[1], generator=g, dtype=torch.float64)


@pytest.fixture
def gmm():
    # three overlapping classes in 2-d, so class fidelity is not already perfect at scale 1
    return ClassMixture([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.5]], [[0.5, 0.4], [0.3, 0.6], [0.4, 0.4]], [0.5, 0.3, 0.2])


def _batch(g=0, b=6):
    gen = torch.Generator().manual_seed(g)
    return torch.randn(b, 2, generator=gen, dtype=torch.float64) * 2, torch.tensor([0, 1, 2, 0, 1, 2][:b])


# ----------------------------------------------------------------------------------------- CFG identities
def test_cfg_scale_one_is_the_conditional_model_and_zero_the_unconditional(gmm):
    x, y = _batch()
    sigma = torch.full((6,), 0.8, dtype=torch.float64)
    cond = {"label": y}
    assert torch.equal(ClassifierFreeGuidance(gmm, 1.0, null_label(3))(x, sigma, cond), gmm(x, sigma, cond))
    assert torch.equal(ClassifierFreeGuidance(gmm, 0.0, null_label(3))(x, sigma, cond), gmm(x, sigma, None))


@pytest.mark.parametrize("w", [0.5, 2.0, 4.0])
def test_cfg_formula_and_batching_equals_separate_calls(gmm, w):
    x, y = _batch(1)
    sigma = torch.full((6,), 1.3, dtype=torch.float64)
    cond = {"label": y}
    calls = []

    def counted(x_, s_, c_):
        calls.append(x_.shape[0])
        return gmm(x_, s_, c_)

    batched = ClassifierFreeGuidance(counted, w, null_label(3))(x, sigma, cond)
    assert calls == [12]  # one call of 2B rows
    separate = ClassifierFreeGuidance(counted, w, null_label(3), batched=False)(x, sigma, cond)
    assert calls[1:] == [6, 6]
    want = gmm(x, sigma, None) + w * (gmm(x, sigma, cond) - gmm(x, sigma, None))
    torch.testing.assert_close(batched, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(separate, want, rtol=0, atol=1e-12)


def test_cfg_batching_with_a_network_is_per_row():
    """With a real (tiny) class-conditional U-Net the 2B-row call equals two B-row calls to float tolerance."""
    from torchdiffusion.core.precond import Preconditioned, Preconditioner
    from torchdiffusion.core.processes import EDM
    from torchdiffusion.nn.unet import UNet, UNetConfig
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(4,), norm_groups=4, num_heads=2, num_classes=3))
    for p in net.parameters():  # make the zero-initialised output layer non-trivial
        p.data.add_(0.05 * torch.randn_like(p))
    model = Preconditioned(net, EDM(), Preconditioner("edm")).eval()
    x = torch.randn(4, 1, 8, 8)
    sigma = torch.full((4,), 2.0)
    cond = {"label": torch.tensor([0, 1, 2, 0])}
    with torch.no_grad():
        a = ClassifierFreeGuidance(model, 3.0, null_label(3))(x, sigma, cond)
        b = ClassifierFreeGuidance(model, 3.0, null_label(3), batched=False)(x, sigma, cond)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, model(x, sigma, cond))


def test_guidance_interval(gmm):
    x, y = _batch(2)
    cond = {"label": y}
    cfg = ClassifierFreeGuidance(gmm, 3.0, null_label(3), interval=(0.5, 2.0))
    outside = torch.tensor([0.3, 0.5, 2.5, 10.0, 0.1, 3.0], dtype=torch.float64)
    assert torch.equal(cfg(x, outside, cond), gmm(x, outside, cond))  # w = 1 outside (lo, hi]
    mixed = torch.tensor([0.3, 1.0, 2.0, 10.0, 0.7, 3.0], dtype=torch.float64)
    full = ClassifierFreeGuidance(gmm, 3.0, null_label(3))(x, mixed, cond)
    out = cfg(x, mixed, cond)
    inside = torch.tensor([False, True, True, False, True, False])
    torch.testing.assert_close(out[inside], full[inside])
    torch.testing.assert_close(out[~inside], gmm(x, mixed, cond)[~inside])
    with pytest.raises(ConfigError, match="sigma_lo < sigma_hi"):
        ClassifierFreeGuidance(gmm, 2.0, null_label(3), interval=(2.0, 1.0))


def test_null_label_needs_labels():
    with pytest.raises(ConfigError, match="cond\\['label'\\]"):
        null_label(3)(None)


# ----------------------------------------------------------------------------------------- classifier guidance
def test_exact_classifier_guidance_at_scale_one_is_the_class_conditional_denoiser(gmm):
    """D + sigma^2 grad log p(y | x, sigma) == E[x0 | x, y] for the exact D and classifier (the derivation)."""
    x, y = _batch(3)
    for s in (0.05, 0.4, 1.0, 3.0, 20.0):
        sigma = torch.full((6,), s, dtype=torch.float64)
        guided = ClassifierGuidance(gmm, gmm.logits, 1.0, denoiser_cond="none")(x, sigma, {"label": y})
        torch.testing.assert_close(guided, gmm(x, sigma, {"label": y}), rtol=1e-9, atol=1e-9)
        zero = ClassifierGuidance(gmm, gmm.logits, 0.0, denoiser_cond="none")(x, sigma, {"label": y})
        assert torch.equal(zero, gmm(x, sigma, None))


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_cfg_with_exact_denoisers_equals_exact_classifier_guidance(gmm, w):
    """D_u + w (D_c - D_u) = D_u + w sigma^2 grad log p(y | x): CFG and classifier guidance agree when exact."""
    x, y = _batch(4)
    sigma = torch.full((6,), 0.9, dtype=torch.float64)
    cond = {"label": y}
    a = ClassifierFreeGuidance(gmm, w, null_label(3))(x, sigma, cond)
    b = ClassifierGuidance(with_cond(gmm, None), gmm.logits, w)(x, sigma, cond)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_log_prob_grad_under_no_grad(gmm):
    x, y = _batch(5)
    sigma = torch.full((6,), 0.7, dtype=torch.float64)
    with torch.no_grad():
        g, lp = log_prob_grad(gmm.logits, x, sigma, y)
    eps = 1e-6
    e = torch.zeros_like(x)
    e[:, 0] = eps
    lp_plus = torch.log_softmax(gmm.logits(x + e, sigma), 1)[torch.arange(6), y]
    torch.testing.assert_close(g[:, 0], (lp_plus - lp) / eps, rtol=1e-4, atol=1e-5)


def _posterior_mass(gmm, x0, k):
    return torch.softmax(gmm.logits(x0, torch.full((x0.shape[0],), 1e-3, dtype=x0.dtype)), 1)[:, k].mean()


def test_guided_sampling_moves_mass_toward_the_class(gmm):
    """Sampling the PF-ODE with the guided exact denoisers: scale 0 gives class k's prior share of the
    posterior mass, scale 1 the class-conditional distribution's (Monte Carlo from the class itself), and larger
    scales more, for CFG and classifier guidance alike."""
    n, k = 600, 1
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    sigmas = grids.karras(40, 0.002, 40.0, 7.0)
    cond = {"label": torch.full((n,), k)}
    want_cond = float(_posterior_mass(gmm, gmm.sample_class(k, 20000, g), k))
    mixture_share = float(gmm.w[k])
    for make in (lambda w: ClassifierFreeGuidance(gmm, w, null_label(3)),
                 lambda w: ClassifierGuidance(with_cond(gmm, None), gmm.logits, w)):
        mass = [float(_posterior_mass(gmm, sample_heun(make(w), noise, sigmas, cond=cond), k)) for w in (0, 1, 3)]
        # prior share of E_x0[p(k | x0)] over the mixture is w_k
        assert abs(mass[0] - mixture_share) < 0.05, mass
        assert abs(mass[1] - want_cond) < 0.04, (mass, want_cond)
        assert mass[0] < mass[1] < mass[2], mass
        assert mass[2] > 0.9


# ----------------------------------------------------------------------------------------- condition dropout
def test_dropout_rate_and_determinism():
    masks = torch.stack([drop_mask(256, 0.1, seed=3, step=s) for s in range(200)])
    assert abs(float(masks.float().mean()) - 0.1) < 0.01  # 51200 draws: std 0.0013
    assert torch.equal(drop_mask(256, 0.1, 3, 17), masks[17])  # a function of (seed, step) only
    assert not torch.equal(masks[17], masks[18])
    assert not torch.equal(drop_mask(256, 0.1, 4, 17), masks[17])
    assert not drop_mask(64, 0.0, 0, 0).any() and drop_mask(64, 1.0, 0, 0).all()


def test_dropout_strides_like_the_data_order():
    """Process r of W holds global rows r, r + W, ...: together they drop exactly what one process drops."""
    full = drop_mask(12, 0.5, 1, 5)
    parts = [drop_mask(4, 0.5, 1, 5, rank=r, world_size=3) for r in range(3)]
    merged = torch.empty(12, dtype=torch.bool)
    for r in range(3):
        merged[r::3] = parts[r]
    assert torch.equal(merged, full)


def test_label_dropout_hook():
    hook = LabelDropout(10, 0.3, seed=0)
    batch = {"x": torch.zeros(64, 1, 2, 2, dtype=torch.uint8), "label": torch.arange(64) % 10}
    out = hook(batch, step=7)["label"]
    dropped = out == 10
    assert dropped.any() and torch.equal(out[~dropped], batch["label"][~dropped])
    assert torch.equal(dropped, drop_mask(64, 0.3, 0, 7))
    assert torch.equal(hook(batch, None)["label"], batch["label"])  # validation: no dropout
    assert torch.equal(drop_labels(batch["label"], 10, 0.3, 0, 7), out)
    with pytest.raises(ConfigError, match="labels must be in"):
        hook({"label": torch.full((4,), -1)}, 0)
    with pytest.raises(ConfigError, match="p_uncond"):
        LabelDropout(10, 1.5, 0)


# ----------------------------------------------------------------------------------------- rejection sampling
def _planted(k_classes=4, conf=0.9):
    """generate: the sample 'is' class seed % K (stored in the sample); classify: that class with `conf`."""
    seen = []

    def generate(seeds, labels):
        seen.append(list(seeds))
        return torch.tensor([[float(s % k_classes)] for s in seeds])

    def classify(x):
        cls = x[:, 0].long()
        p = torch.full((x.shape[0], k_classes), (1 - conf) / (k_classes - 1))
        p[torch.arange(x.shape[0]), cls] = conf
        return p

    return generate, classify, seen


def test_rejection_accepts_matching_samples_and_respects_the_budget():
    generate, classify, seen = _planted()
    seeds = list(range(16))
    labels = torch.zeros(16, dtype=torch.long)  # only samples of class 0 are accepted
    res = rejection_sample(generate, classify, seeds, labels, budget=1000)
    assert seen[0] == seeds
    assert res.accepted.all() and res.final_accuracy == 1.0
    for s, x in zip(res.seeds, res.samples):  # every returned sample is reproducible from its seed
        assert s % 4 == 0 and float(x[0]) == 0.0
    assert res.generated == sum(len(r) for r in seen) == 16 + sum(a - 1 for a in res.attempts)
    assert res.acceptance_rate == pytest.approx(16 / res.generated)
    assert res.history[0]["accepted"] == 4  # seeds 0, 4, 8, 12

    generate, classify, seen = _planted()
    res = rejection_sample(generate, classify, seeds, labels, budget=5)
    assert res.generated == 21 and sum(len(r) for r in seen) == 21  # the budget caps the extra generations
    assert res.summary()["extra"] == 5
    assert res.final_accuracy == float(res.accepted.float().mean()) < 1.0


def test_rejection_threshold_and_retry_seeds():
    generate, classify, _ = _planted(conf=0.6)
    labels = torch.tensor([s % 4 for s in range(8)])  # every first attempt has the right class ...
    res = rejection_sample(generate, classify, list(range(8)), labels, threshold=0.7, budget=4)
    assert not res.accepted.any() and res.generated == 12  # ... but too little confidence: all rejected
    assert res.acceptance_rate == 0.0
    res = rejection_sample(generate, classify, list(range(8)), labels, threshold=0.5, budget=4)
    assert res.accepted.all() and res.generated == 8 and res.acceptance_rate == 1.0
    assert retry_seed(5, 0) == 5 and retry_seed(5, 1) != retry_seed(5, 2) != 5
    with pytest.raises(ConfigError, match="one label per seed"):
        rejection_sample(generate, classify, [0, 1], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="threshold"):
        rejection_sample(generate, classify, [0], torch.zeros(1, dtype=torch.long), threshold=2.0)

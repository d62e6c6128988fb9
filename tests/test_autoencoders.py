"""First-stage autoencoders: shapes, round trips, the KL and VQ terms and their reductions, the quantiser's
straight-through gradient, dead-code restarts and usage counts, the discriminator's adaptive weight, metrics."""
import math

import pytest
import torch
from torch.nn import functional as F

from torchdiffusion.autoencoders.blocks import conv_flops
from torchdiffusion.autoencoders.discriminator import (DiscriminatorConfig, PatchDiscriminator, adaptive_weight,
                                                      hinge_d_loss, hinge_g_loss)
from torchdiffusion.autoencoders.kl import DiagonalGaussian, KLAutoencoder, KLConfig
from torchdiffusion.autoencoders.losses import AELossConfig, kl_reconstruction_loss, vq_reconstruction_loss
from torchdiffusion.autoencoders.metrics import code_usage, gaussian_window, psnr, ssim
from torchdiffusion.autoencoders.vq import VectorQuantizer, VQAutoencoder, VQConfig
from torchdiffusion.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(base_channels=8, num_res_blocks=1, z_channels=3, norm_groups=4)


def kl_model(ch_mult=(1, 2, 2), mid_attn=True, c=1):
    torch.manual_seed(0)
    return KLAutoencoder(KLConfig(ch_mult=ch_mult, mid_attn=mid_attn, **TINY), c)


def vq_model(ch_mult=(1, 2, 2), c=1, **kw):
    torch.manual_seed(0)
    return VQAutoencoder(VQConfig(ch_mult=ch_mult, n_codes=16, **TINY, **kw), c)


# ------------------------------------------------------------------------------ shapes and round trips
@pytest.mark.parametrize("ch_mult,f", [((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
@pytest.mark.parametrize("hw", [(32, 32), (16, 24)])
def test_latent_shapes_and_round_trips_for_f4_f8_and_non_square(ch_mult, f, hw):
    x = torch.rand(2, 3, *hw) * 2 - 1
    for m in (kl_model(ch_mult, c=3), vq_model(ch_mult, c=3)):
        assert m.f == f
        m.eval()
        latent = m.latent_shape((3,) + hw)
        assert latent == (3, hw[0] // f, hw[1] // f)
        z = m.encode(x).mode() if m.kind == "kl" else m.encode(x)
        assert tuple(z.shape[1:]) == latent
        assert m.decode(z).shape == x.shape
        assert m(x)[0].shape == x.shape


def test_sides_that_do_not_divide_by_f_are_one_line():
    m = kl_model()
    with pytest.raises(ConfigError, match="must be multiples of 4"):
        m.latent_shape((1, 30, 32))
    with pytest.raises(ConfigError, match="must be multiples of 4"):
        m.encode(torch.zeros(1, 1, 30, 28))


def test_vq_decode_of_encode_equals_forward_and_decode_indices():
    m = vq_model().eval()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    recon, _, idx = m(x)
    assert torch.equal(m.decode(m.encode(x)), recon)
    # the decoder quantises: decoding the codes themselves (not h) gives the same images up to rounding
    assert torch.allclose(m.decode_indices(idx), recon, atol=1e-5)
    # decoding never moves the codebook, even in training mode
    m.train()
    before = m.quantizer.codebook.clone()
    m.decode(m.encode(x))
    assert torch.equal(before, m.quantizer.codebook) and int(m.quantizer.calls) == 0


def test_kl_round_trip_with_the_mode_is_deterministic_and_sample_uses_the_generator():
    m = kl_model().eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    a, _ = m(x, sample=False)
    assert torch.equal(a, m.decode(m.encode(x).mode()))
    s1, _ = m(x, generator=torch.Generator().manual_seed(1))
    s2, _ = m(x, generator=torch.Generator().manual_seed(1))
    s3, _ = m(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)


# ------------------------------------------------------------------------------ KL posterior and reductions
def test_diagonal_gaussian_kl_is_summed_over_latent_dims_and_logvar_clamped():
    mean = torch.randn(2, 3, 4, 4)
    logvar = torch.randn(2, 3, 4, 4)
    logvar[0, 0, 0, 0] = 50.0
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    lv = logvar.clamp(-30, 20)
    assert post.logvar.max() == 20.0
    # closed form per element, summed over (3, 4, 4): one value per sample
    expect = 0.5 * (mean ** 2 + lv.exp() - 1 - lv).flatten(1).sum(1)
    assert post.kl().shape == (2,) and torch.allclose(post.kl(), expect)
    # the KL of N(0, I) to itself is 0
    assert torch.equal(DiagonalGaussian(torch.zeros(1, 6, 2, 2)).kl(), torch.zeros(1))


def test_reconstruction_reductions_are_pinned():
    x = torch.zeros(2, 1, 4, 4)
    x_hat = torch.zeros(2, 1, 4, 4)
    x_hat[0] = 0.5  # sample 0: |err| 0.5 on 16 pixels; sample 1: exact
    # KL-VAE (LDM): summed over pixels, mean over the batch -> (16 * 0.5 + 0) / 2 = 4
    assert float(kl_reconstruction_loss(x, x_hat)) == pytest.approx(4.0)
    # ... and the perceptual term enters as perceptual_weight * n * P_b
    p = torch.tensor([0.25, 0.0])
    assert float(kl_reconstruction_loss(x, x_hat, perceptual=p, perceptual_weight=2.0)) == \
        pytest.approx((8.0 + 2.0 * 16 * 0.25) / 2)
    # VQGAN: mean over every element -> 8 / 32 = 0.25 (+ weight * mean P)
    assert float(vq_reconstruction_loss(x, x_hat)) == pytest.approx(0.25)
    assert float(vq_reconstruction_loss(x, x_hat, perceptual=p, perceptual_weight=2.0)) == pytest.approx(0.5)
    assert float(vq_reconstruction_loss(x, x_hat, "l2")) == pytest.approx(0.125)
    assert AELossConfig().kl_weight == 1e-6


# ------------------------------------------------------------------------------ the quantiser
def test_vq_loss_terms_are_codebook_plus_beta_commitment_not_the_swapped_form():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, beta=0.25)
    h = torch.randn(1, 2, 3, 3, requires_grad=True)
    z_q_st, loss, idx = q(h)
    z_q = q.codebook[idx].movedim(-1, 1)
    assert float(loss.detach()) == pytest.approx(float(1.25 * F.mse_loss(z_q, h).detach()), rel=1e-6)
    # the gradients tell the two terms apart: d/dh = beta * 2 (h - z_q) / n (commitment only); the codebook gets
    # 2 (z_q - h) / n per assignment (the codebook term, weight 1)
    loss.backward()
    n = h.numel()
    assert torch.allclose(h.grad, 0.25 * 2 * (h - z_q).detach() / n, atol=1e-7)
    g_code = torch.zeros_like(q.codebook)
    g_code.index_add_(0, idx.flatten(), (2 * (z_q - h) / n).detach().movedim(1, -1).reshape(-1, 2))
    assert torch.allclose(q.codebook.grad, g_code, atol=1e-7)


def test_straight_through_gradients_reach_the_encoder():
    m = vq_model()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    recon, vq_loss, _ = m(x)
    recon.abs().mean().backward()  # no vq_loss: only the straight-through path can reach the encoder
    g = m.encoder.conv_in.weight.grad
    assert g is not None and float(g.abs().sum()) > 0
    # and the straight-through value equals the quantised one
    q = m.quantizer
    h = m.encode(x)
    z_st, _, idx = q(h, update=False)
    assert torch.allclose(z_st, q.lookup(idx), atol=1e-6)


def test_a_dead_code_is_restarted_onto_an_encoder_output_and_usage_is_counted():
    torch.manual_seed(0)
    q = VectorQuantizer(4, 2, restart_every=2)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [100.0, 100.0]]))  # code 3 is far away
    q.train()
    h = torch.randn(2, 2, 4, 4) * 0.1
    q(h.clone().requires_grad_())
    q(h.clone().requires_grad_())
    assert int(q.usage[3]) == 0 and int(q.usage.sum()) == 2 * 32 and int(q.calls) == 2
    h2 = torch.randn(2, 2, 4, 4) * 0.1
    q(h2.clone().requires_grad_())  # the third pass first restarts the codes unused in the window
    rows = h2.movedim(1, -1).reshape(-1, 2)
    assert int(q.restarts) >= 1
    assert (q.codebook[3] - rows).abs().sum(1).min() == 0  # code 3 now sits on one of the batch's h
    counts = q.reset_usage()
    assert int(counts.sum()) == 3 * 32 and int(q.usage.sum()) == 0
    u = code_usage(counts)
    assert 0 < u["code_usage"] <= 1 and 1 <= u["code_perplexity"] <= 4
    # no updates in eval mode or without gradients
    q.eval()
    q(h.clone().requires_grad_())
    with torch.no_grad():
        q.train()(h)
    assert int(q.calls) == 3


def test_ema_codebook_moves_to_the_mean_of_its_assignments_and_has_only_the_commitment_loss():
    torch.manual_seed(0)
    q = VectorQuantizer(2, 1, beta=0.25, codebook="ema", ema_decay=0.5)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0], [10.0]]))
        q.embed_sum.copy_(q.codebook)
    h = torch.full((1, 1, 2, 2), 1.0, requires_grad=True)
    _, loss, _ = q.train()(h)
    assert float(loss.detach()) == pytest.approx(0.25 * 1.0)  # beta * ||sg[z_q] - h||^2, z_q = 0
    assert not q.codebook.requires_grad
    # cluster 0 got 4 assignments of value 1: size 0.5 * 1 + 0.5 * 4 = 2.5, sum 0.5 * 0 + 0.5 * 4 = 2
    assert float(q.cluster_size[0]) == pytest.approx(2.5)
    total = 2.5 + 0.5
    expect = 2.0 / ((2.5 + 1e-5) / (total + 2e-5) * total)
    assert float(q.codebook[0, 0]) == pytest.approx(expect, rel=1e-5)


# ------------------------------------------------------------------------------ discriminator and adaptive weight
def test_patch_discriminator_and_hinge_losses():
    d = PatchDiscriminator(DiscriminatorConfig(base_channels=8, n_layers=2), 1)
    out = d(torch.zeros(2, 1, 32, 32))
    assert out.shape == (2, 1, 6, 6)
    assert not list(d.buffers())  # batch statistics only: the state is the parameters
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
    assert float(hinge_g_loss(fake)) == pytest.approx(1.0)


def test_adaptive_weight_equalises_the_gradient_norms_at_the_last_layer_and_is_clamped():
    m = kl_model()
    d = PatchDiscriminator(DiscriminatorConfig(base_channels=8, n_layers=2), 1)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    x_hat, _ = m(x, sample=False)
    rec = kl_reconstruction_loss(x, x_hat)
    g = hinge_g_loss(d(x_hat))
    w = adaptive_weight(rec, g, m.last_layer, disc_weight=1.0)
    assert not w.requires_grad and math.isfinite(float(w)) and float(w) > 0
    g_rec = torch.autograd.grad(rec, m.last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(w * g, m.last_layer, retain_graph=True)[0]
    # ||grad(w L_G)|| = ||grad L_rec|| * ||grad L_G|| / (||grad L_G|| + 1e-4)
    assert float(g_gan.norm()) == pytest.approx(float(g_rec.norm()), rel=1e-3)
    assert float(adaptive_weight(rec, g, m.last_layer, disc_weight=0.5)) == pytest.approx(0.5 * float(w), rel=1e-6)
    # a vanishing GAN gradient hits the clamp instead of blowing up
    tiny = 1e-12 * g
    assert float(adaptive_weight(rec, tiny, m.last_layer, max_weight=1e4)) == 1e4


# ------------------------------------------------------------------------------ metrics
def test_psnr_of_a_known_mse_and_ssim_identities():
    x = torch.rand(3, 1, 16, 16)
    y = (x + 0.1).clamp(max=10)  # MSE exactly 0.01 -> PSNR 20 dB
    assert torch.allclose(psnr(x, y), torch.full((3,), 20.0), atol=1e-4)
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(3))
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    s = ssim(x, noisy)
    assert (s < 0.95).all() and (s > -1).all()
    assert torch.allclose(ssim(x, noisy), ssim(noisy, x))  # symmetric
    # SSIM ignores a constant only through its luminance term: a brighter copy scores below 1
    assert (ssim(x * 0.5, x * 0.5 + 0.3) < 1).all()
    w = gaussian_window()
    assert w.shape == (11, 11) and float(w.sum()) == pytest.approx(1.0)


def test_flop_count_of_a_conv_is_exact():
    conv = torch.nn.Conv2d(2, 4, 3, padding=1)
    assert conv_flops(conv, (2, 8, 8)) == 2 * 4 * 8 * 8 * 2 * 9


# ------------------------------------------------------------------------------ perceptual distances
def lpips_file(tmp_path, fmt):
    from torchdiffusion.autoencoders.perceptual import LPIPS
    torch.manual_seed(0)
    m = LPIPS()
    for lin in m.lins:
        torch.nn.init.uniform_(lin.weight, 0, 1)  # LPIPS's heads are non-negative
    sd = m.state_dict()
    if fmt == "torchvision":  # torchvision's VGG16 names + lpips's head names, in a torch state dict
        state = {k: v for k, v in sd.items() if k.startswith("features.")}
        state.update({f"lin{i}.model.1.weight": sd[f"lins.{i}.weight"] for i in range(5)})
        path = tmp_path / "lpips_vgg.pth"
        torch.save(state, path)
    else:  # the lpips package's own module names, as safetensors
        from safetensors.torch import save_file
        slices = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
        state = {f"net.slice{slices[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v.contiguous()
                 for k, v in sd.items() if k.startswith("features.")}
        state.update({f"lin{i}.model.1.weight": sd[f"lins.{i}.weight"].contiguous() for i in range(5)})
        path = tmp_path / "lpips_vgg.safetensors"
        save_file(state, str(path))
    return m, path


def test_lpips_loads_both_weight_layouts_and_is_a_distance(tmp_path):
    from torchdiffusion.autoencoders.perceptual import LPIPS
    ref, p1 = lpips_file(tmp_path, "torchvision")
    _, p2 = lpips_file(tmp_path, "lpips")
    a, b = LPIPS.from_file(p1), LPIPS.from_file(p2)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    y = torch.rand(2, 1, 32, 32) * 2 - 1
    d = a(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.equal(d, b(x, y)) and torch.equal(d, ref(x, y))
    assert torch.allclose(a(x, x), torch.zeros(2)) and torch.allclose(d, a(y, x))
    assert not any(p.requires_grad for p in a.parameters())
    y.requires_grad_(True)
    a(x, y).sum().backward()
    assert y.grad is not None and float(y.grad.abs().sum()) > 0


def test_bad_lpips_files_are_one_line(tmp_path):
    from torchdiffusion.autoencoders.perceptual import LPIPS
    with pytest.raises(ConfigError, match="no such file"):
        LPIPS.from_file(tmp_path / "none.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="not a readable weights file"):
        LPIPS.from_file(tmp_path / "junk.pth")
    torch.save({"lin0.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "heads_only.pth")
    with pytest.raises(ConfigError, match="missing .* LPIPS-VGG16 tensors"):
        LPIPS.from_file(tmp_path / "heads_only.pth")


def test_classifier_perceptual_is_zero_on_equal_images_and_passes_gradients():
    from test_classifier import TINY
    from torchdiffusion.autoencoders.perceptual import ClassifierPerceptual
    from torchdiffusion.nn.classifier import Classifier, ClassifierConfig
    torch.manual_seed(0)
    clf = Classifier(ClassifierConfig(**TINY))
    p = ClassifierPerceptual(clf)
    s = TINY["image_size"]
    x = torch.rand(2, TINY.get("in_channels", 1), s, s) * 2 - 1
    y = (torch.rand_like(x) * 2 - 1).requires_grad_(True)
    d = p(x, y)
    assert d.shape == (2,) and (d > 0).all() and torch.allclose(p(x, x), torch.zeros(2))
    d.sum().backward()
    assert float(y.grad.abs().sum()) > 0 and all(q.grad is None for q in clf.parameters())


def test_channels_last_is_the_same_model():
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    for cls, cfg in ((KLAutoencoder, KLConfig), (VQAutoencoder, VQConfig)):
        torch.manual_seed(0)
        a = cls(cfg(**TINY), 1).eval()
        torch.manual_seed(0)
        b = cls(cfg(**TINY, channels_last=True), 1).eval()
        assert b.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        ya = a.decode(a.encode(x).mode()) if a.kind == "kl" else a(x)[0]
        yb = b.decode(b.encode(x).mode()) if b.kind == "kl" else b(x)[0]
        assert torch.allclose(ya, yb, atol=1e-5)
        b.load_state_dict(a.state_dict())  # checkpoints are layout-free

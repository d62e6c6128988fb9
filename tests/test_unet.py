"""U-Net backbone: shapes, conditioning paths, batch independence, gradients, config errors."""
from __future__ import annotations

import math

import pytest
import torch

from torchdiffusion.errors import ConfigError, TorchDiffusionError
from torchdiffusion.nn import UNet, UNetConfig
from torchdiffusion.nn.embedding import FourierEmbedding, PositionalEmbedding

# tiny but complete: 3 levels 12 -> 6 -> 3, attention at 6, all widths divisible by 4 groups
TINY = dict(image_size=12, in_channels=2, out_channels=3, model_channels=8, channel_mult=(1, 2, 2),
            num_res_blocks=1, attn_resolutions=(6,), num_heads=2, norm_groups=4)


def make(**kw) -> UNet:
    torch.manual_seed(0)
    net = UNet(UNetConfig(**{**TINY, **kw}))
    randomize_zero_inits(net)
    return net


def randomize_zero_inits(net: UNet) -> None:
    """The output conv and every residual branch start at zero (so the output is 0 and most
    gradients vanish at init); give them small random values so the paths can be tested."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def inputs(b=3, h=12, c=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, h, generator=g), torch.rand(b, generator=g) * 100


def full_cond(b=3, h=12, seed=0, num_classes=5):
    g = torch.Generator().manual_seed(seed + 100)
    return {"label": torch.randint(0, num_classes + 1, (b,), generator=g),
            "context": torch.randn(b, 4, 6, generator=g),
            "concat": torch.randn(b, 2, h, h, generator=g)}


FULL = dict(num_classes=5, context_dim=6, concat_channels=2)


def test_output_starts_at_zero_and_default_config_runs():
    net = UNet(UNetConfig())                      # 28 -> 14 -> 7, MNIST-sized defaults
    x = torch.randn(2, 1, 28, 28)
    out = net(x, torch.tensor([0.5, 900.0]))
    assert out.shape == x.shape and out.is_contiguous()
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output conv


@pytest.mark.parametrize("kw, cond_keys", [
    ({}, ()),
    (dict(num_classes=5), ("label",)),
    (dict(context_dim=6), ("context",)),
    (dict(concat_channels=2), ("concat",)),
    (FULL, ("label", "context", "concat")),
    (dict(noise_embedding="fourier", scale_shift_norm=False, resample_with_conv=False, channels_last=False), ()),
    (dict(head_channels=4, mid_attention=False, dropout=0.1), ()),
])
def test_shapes_for_every_conditioning_kind(kw, cond_keys):
    net = make(**kw)
    x, c = inputs()
    cond = {k: v for k, v in full_cond().items() if k in cond_keys}
    out = net(x, c, cond or None)
    assert out.shape == (3, 3, 12, 12) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_non_power_of_two_sizes_halve_to_integers():
    net = make(image_size=28, attn_resolutions=(7,))   # 28 -> 14 -> 7
    out = net(*inputs(b=2, h=28))
    assert out.shape == (2, 3, 28, 28)


@pytest.mark.parametrize("key", ["label", "context", "concat"])
def test_each_condition_changes_the_output(key):
    net = make(**FULL).eval()
    x, c = inputs()
    cond = full_cond()
    other = dict(cond)
    if key == "label":
        other[key] = (cond[key] + 1) % 6
    else:
        other[key] = cond[key] + torch.randn_like(cond[key])
    with torch.no_grad():
        d = (net(x, c, cond) - net(x, c, other)).abs().amax(dim=(1, 2, 3))
    assert (d > 1e-4).all(), d


def test_noise_level_changes_the_output():
    net = make().eval()
    x, c = inputs()
    with torch.no_grad():
        d = (net(x, c) - net(x, c + 1.0)).abs().amax(dim=(1, 2, 3))
    assert (d > 1e-4).all()


def test_no_coupling_between_batch_rows():
    """Changing row 0's inputs (x, c_noise, every cond) leaves rows 1.. bit-for-bit unchanged in
    eval mode and up to float reassociation in train mode (GroupNorm is per sample)."""
    net = make(**FULL)
    x, c = inputs(b=4)
    cond = full_cond(b=4)
    x2, c2 = x.clone(), c.clone()
    x2[0] += 1.0
    c2[0] += 3.0
    cond2 = {k: v.clone() for k, v in cond.items()}
    cond2["label"][0] = (cond["label"][0] + 1) % 6
    cond2["context"][0] += 1.0
    cond2["concat"][0] += 1.0
    for mode in (net.train, net.eval):
        mode()
        with torch.no_grad():
            a, b = net(x, c, cond), net(x2, c2, cond2)
        assert (a[0] - b[0]).abs().max() > 1e-4
        torch.testing.assert_close(a[1:], b[1:], rtol=1e-5, atol=1e-6)


def test_batch_of_one_equals_row_of_a_batch():
    net = make(**FULL).eval()
    x, c = inputs(b=3)
    cond = full_cond(b=3)
    with torch.no_grad():
        full = net(x, c, cond)
        row = net(x[2:], c[2:], {k: v[2:] for k, v in cond.items()})
    torch.testing.assert_close(row, full[2:], rtol=1e-5, atol=1e-6)


def test_gradient_reaches_every_parameter():
    net = make(**FULL)
    x, c = inputs()
    loss = net(x, c, full_cond()).square().mean()
    loss.backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


def test_at_init_only_the_output_conv_gets_gradient_through_the_zero_output():
    """With the zero-initialised output conv, d out / d h = 0, so only conv_out learns in step 1;
    this is the documented start, not a broken graph."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(**TINY))
    net(*inputs()).mul(torch.randn(3, 3, 12, 12)).sum().backward()
    live = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert live == {"conv_out.weight", "conv_out.bias"}


def test_channels_last_is_only_a_layout():
    a = make(channels_last=True).eval()
    b = make(channels_last=False).eval()
    b.load_state_dict(a.state_dict())
    x, c = inputs()
    with torch.no_grad():
        torch.testing.assert_close(a(x, c), b(x, c), rtol=1e-4, atol=1e-5)


def test_positional_embedding_closed_form():
    emb = PositionalEmbedding(8, max_period=10000.0)
    c = torch.tensor([0.0, 3.0])
    e = emb(c)
    f = torch.tensor([10000.0 ** (-i / 4) for i in range(4)])
    torch.testing.assert_close(e, torch.cat([torch.cos(c[:, None] * f), torch.sin(c[:, None] * f)], 1))
    # each (cos, sin) pair lies on the unit circle
    torch.testing.assert_close(e[:, :4] ** 2 + e[:, 4:] ** 2, torch.ones(2, 4))


def test_fourier_embedding_is_periodic_in_its_frequencies():
    emb = FourierEmbedding(16, scale=16.0)
    c = torch.tensor([0.25])
    e1 = emb(c)
    # shifting c by 1 / f_i advances feature i by exactly one period
    shift = 1.0 / emb.freqs.double()
    angle = 2 * math.pi * (c.double() + shift) * emb.freqs.double()
    torch.testing.assert_close(torch.cos(angle).float(), e1[0, :8], rtol=0, atol=1e-4)
    assert "freqs" in emb.state_dict()


@pytest.mark.parametrize("kw, words", [
    (dict(image_size=30, channel_mult=(1, 2, 2, 2), attn_resolutions=()), ["30", "15", "7.5", "multiple of 8"]),
    (dict(attn_resolutions=(5,)), ["attn_resolutions", "(12, 6, 3)"]),
    (dict(norm_groups=3), ["norm_groups=3"]),
    (dict(num_heads=3), ["num_heads=3"]),
    (dict(noise_embedding="gaussian"), ["positional", "fourier"]),
    (dict(dropout=1.0), ["dropout"]),
    (dict(channel_mult=()), ["channel_mult"]),
])
def test_config_that_cannot_work_is_a_clear_error(kw, words):
    with pytest.raises(ConfigError) as info:
        UNet(UNetConfig(**{**TINY, **kw}))
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_lists_from_yaml_become_tuples():
    cfg = UNetConfig(**{**TINY, "channel_mult": [1, 2, 2], "attn_resolutions": [6]})
    assert cfg.channel_mult == (1, 2, 2) and cfg.attn_resolutions == (6,)


@pytest.mark.parametrize("call, words", [
    (lambda net, x, c: net(x[:, :1], c, full_cond()), ["(B, 2, H, W)"]),
    (lambda net, x, c: net(x[..., :10, :10], c, full_cond(h=10)), ["10", "multiple of 4"]),
    (lambda net, x, c: net(x, c[:2], full_cond()), ["c_noise"]),
    (lambda net, x, c: net(x, c, {**full_cond(), "label": torch.full((3,), 6)}), ["[0, 5]"]),
    (lambda net, x, c: net(x, c, {k: v for k, v in full_cond().items() if k != "context"}), ["context"]),
    (lambda net, x, c: net(x, c, {**full_cond(), "concat": torch.zeros(3, 1, 12, 12)}), ["(3, 2, 12, 12)"]),
    (lambda net, x, c: net(x, c, {**full_cond(), "labels": torch.zeros(3)}), ["labels", "valid keys"]),
])
def test_bad_inputs_are_clear_errors(call, words):
    net = make(**FULL)
    x, c = inputs()
    with pytest.raises(TorchDiffusionError) as info:
        call(net, x, c)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_condition_given_to_a_net_without_it_is_an_error():
    net = make()
    x, c = inputs()
    with pytest.raises(TorchDiffusionError, match="num_classes=0"):
        net(x, c, {"label": torch.zeros(3, dtype=torch.long)})


def test_state_dict_round_trip_rebuilds_the_same_function():
    a = make(**FULL, noise_embedding="fourier").eval()
    b = UNet(a.cfg).eval()
    b.load_state_dict(a.state_dict())
    x, c = inputs()
    cond = full_cond()
    with torch.no_grad():
        assert torch.equal(a(x, c, cond), b(x, c, cond))


@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 6), (1, 4, 4, 1, 1), (3, 2, 7, 5, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sub_pixel_upsample_conv_is_the_resize_conv(shape, with_bias):
    """nearest x2 then 3x3 conv (padding 1) == four folded 2x2 convs at the input size, value and gradients, in
    float64 (so a wrong tap, phase or padding shows as O(1), rounding as 1e-14); odd and 1x1 sizes included."""
    from torch.nn import functional as F

    from torchdiffusion.nn.resblock import nearest_upsample_conv2d
    b_, c, o, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b_, c, h, w, dtype=torch.float64, generator=g, requires_grad=True)
    wt = torch.randn(o, c, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(o, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), wt, bias, padding=1)
    out = nearest_upsample_conv2d(x, wt, bias)
    assert out.shape == (b_, o, 2 * h, 2 * w)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    up = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    params = [p for p in (x, wt, bias) if p is not None]
    for a, r in zip(torch.autograd.grad((out * up).sum(), params), torch.autograd.grad((ref * up).sum(), params)):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-11)


def test_sub_pixel_upsample_keeps_channels_last_and_the_module_matches_its_conv():
    from torch.nn import functional as F

    from torchdiffusion.nn.resblock import Upsample
    torch.manual_seed(0)
    up = Upsample(8).double()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = up(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")), rtol=0, atol=1e-12)
    assert not up(x.contiguous()).is_contiguous(memory_format=torch.channels_last) or x.shape[-1] == 1

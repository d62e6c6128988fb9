"""Positional encodings (nn/posenc.py): exact identities of sin-cos, axial RoPE and T5 relative bias."""
import math

import pytest
import torch

from torchdiffusion.errors import ConfigError
from torchdiffusion.nn.attention import attend, merge_heads, split_heads
from torchdiffusion.nn.posenc import (AxialRoPE, RelativePositionBias, grid_positions, relative_position_bucket,
                                      sincos)


def _qk(n, d, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, heads, n, d, generator=g, dtype=torch.float32), torch.randn(3, heads, n, d, generator=g)


# --------------------------------------------------------------------------------------------- absolute
def test_sincos_is_the_formula_per_axis():
    pe = sincos((3, 5), 8)                                         # 2 pairs per axis
    pos = grid_positions((3, 5))
    assert pe.shape == (15, 8) and torch.equal(pos[6], torch.tensor([1, 1]))  # row-major, last axis fastest
    for l, (r, c) in enumerate(pos.tolist()):
        got = pe[l].tolist()
        # layout: [sin(r w), cos(r w), sin(c w), cos(c w)], each of 2 frequencies
        ref = ([math.sin(r * 10000.0 ** (-i / 2)) for i in range(2)] + [math.cos(r * 10000.0 ** (-i / 2)) for i in range(2)]
               + [math.sin(c * 10000.0 ** (-i / 2)) for i in range(2)] + [math.cos(c * 10000.0 ** (-i / 2)) for i in range(2)])
        assert got == pytest.approx(ref, abs=1e-6)
    torch.testing.assert_close(sincos((7,), 4)[:, :2], torch.sin(torch.arange(7.0)[:, None] * torch.tensor([1.0, 0.01])))
    with pytest.raises(ConfigError, match="divisible by 4"):
        sincos((3, 5), 6)


# --------------------------------------------------------------------------------------------- rope
def test_rope_rotates_pairs_by_position_times_frequency():
    rope = AxialRoPE((5,), 2, base=100.0)                          # 1-D, one pair, theta_0 = 1
    q = torch.tensor([1.0, 0.0]).expand(1, 1, 5, 2)
    p = torch.arange(5.0)
    torch.testing.assert_close(rope(q)[0, 0], torch.stack([p.cos(), p.sin()], dim=1))


def test_rope_logits_are_invariant_to_shifting_the_grid():
    grid, d = (4, 6), 16
    q, k = _qk(24, d)
    for dy, dx in ((0, 0), (3, -2), (-7, 11)):
        r0, r1 = AxialRoPE(grid, d), AxialRoPE(grid, d, origin=(dy, dx))
        torch.testing.assert_close(r1(q) @ r1(k).transpose(-1, -2), r0(q) @ r0(k).transpose(-1, -2),
                                   atol=1e-4, rtol=1e-5)
    # and through attention (SDPA with its 1/sqrt(d) scale): the outputs agree as well
    v = torch.randn(3, 2, 24, d)
    a0 = attend(merge_heads(q), merge_heads(k), merge_heads(v), 2, AxialRoPE(grid, d))
    a1 = attend(merge_heads(q), merge_heads(k), merge_heads(v), 2, AxialRoPE(grid, d, origin=(5, -3)))
    torch.testing.assert_close(a0, a1, atol=1e-5, rtol=1e-5)
    # a shift along one axis is seen by that axis only: rope is not shift-invariant per query unless k moves too
    r = AxialRoPE(grid, d, origin=(1, 0))
    assert (r(q) @ AxialRoPE(grid, d)(k).transpose(-1, -2) - q @ k.transpose(-1, -2)).abs().max() > 1e-2


def test_rope_logit_depends_on_offset_only_and_keeps_norms():
    grid, d = (4, 5), 8
    rope = AxialRoPE(grid, d)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(d, generator=g).expand(1, 1, 20, d)            # the same q and k at every position
    k = torch.randn(d, generator=g).expand(1, 1, 20, d)
    logits = (rope(q) @ rope(k).transpose(-1, -2))[0, 0]           # (L, L)
    pos = grid_positions(grid)
    by_offset = {}
    for i in range(20):
        for j in range(20):
            off = tuple((pos[j] - pos[i]).tolist())
            by_offset.setdefault(off, []).append(logits[i, j])
    for off, vals in by_offset.items():
        torch.testing.assert_close(torch.stack(vals), vals[0].expand(len(vals)), atol=1e-5, rtol=1e-5)
    # same pairing and angles for q and k: a token attending to itself sees the un-rotated logit q . k
    torch.testing.assert_close(logits.diagonal(), (q[0, 0] * k[0, 0]).sum(-1), atol=1e-5, rtol=1e-5)
    qq, _ = _qk(20, d)
    torch.testing.assert_close(rope(qq).norm(dim=-1), qq.norm(dim=-1))


def test_rope_leaves_extra_tokens_untouched_and_checks_head_dim():
    rope = AxialRoPE((3, 3), 8)
    q, _ = _qk(9 + 2, 8)
    out = rope(q)
    assert torch.equal(out[:, :, :2], q[:, :, :2])
    torch.testing.assert_close(out[:, :, 2:], rope(q[:, :, 2:]))
    assert not torch.equal(out[:, :, 2:], q[:, :, 2:])
    with pytest.raises(ConfigError, match="divisible by 4"):
        AxialRoPE((3, 3), 6)


# --------------------------------------------------------------------------------------------- relative bias
def _t5_bucket(relative_position, num_buckets=32, max_distance=128):
    """T5's _relative_position_bucket (bidirectional), transcribed in plain Python."""
    ret, n = 0, -relative_position
    num_buckets //= 2
    ret += (n < 0) * num_buckets
    n = abs(n)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    v = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return ret + min(v, num_buckets - 1)


@pytest.mark.parametrize("nb,md", [(32, 128), (8, 20)])
def test_bucket_matches_t5_and_has_its_properties(nb, md):
    rel = torch.arange(-3 * md, 3 * md + 1)
    b = relative_position_bucket(rel, nb, md)
    assert b.tolist() == [_t5_bucket(r, nb, md) for r in rel.tolist()]
    assert int(relative_position_bucket(torch.tensor(0), nb, md)) == 0
    zero = 3 * md
    pos, neg = b[zero:], b[:zero + 1].flip(0)                     # bucket(k), bucket(-k) for k = 0, 1, ...
    assert (pos[1:] != neg[1:]).all()                              # +k and -k never share a bucket
    assert set(pos[1:].tolist()).isdisjoint(neg.tolist())
    assert (pos.diff() >= 0).all() and (neg.diff() >= 0).all()     # monotone in |k|
    assert (pos[md:] == nb - 1).all() and (neg[md:] == nb // 2 - 1).all()  # clamped at max distance
    assert pos[md - 1] <= nb - 1 and b.min() >= 0 and b.max() < nb
    assert pos[:nb // 4].tolist() == [nb // 2 * (k > 0) + k for k in range(nb // 4)]  # exact near range


def test_relative_bias_is_the_sum_of_per_axis_tables():
    grid, heads = (3, 4), 2
    rb = RelativePositionBias(grid, heads, num_buckets=8, max_distance=20)
    with torch.no_grad():
        rb.tables.copy_(torch.randn(rb.tables.shape, generator=torch.Generator().manual_seed(0)))
    bias = rb()
    pos = grid_positions(grid).tolist()
    for i, (yi, xi) in enumerate(pos):
        for j, (yj, xj) in enumerate(pos):
            by = int(relative_position_bucket(torch.tensor(yj - yi), 8, 20))
            bx = int(relative_position_bucket(torch.tensor(xj - xi), 8, 20))
            torch.testing.assert_close(bias[:, i, j], rb.tables[0, by] + rb.tables[1, bx])
    padded = rb(extra=2)
    assert padded.shape == (heads, 14, 14) and torch.equal(padded[:, 2:, 2:], bias)
    assert (padded[:, :2, :] == 0).all() and (padded[:, :, :2] == 0).all()
    # the bias enters the logits additively: attention with it equals attention on hand-biased scores
    q, k = _qk(12, 4)
    v = torch.randn(3, heads, 12, 4)
    got = attend(merge_heads(q), merge_heads(k), merge_heads(v), heads, bias=bias)
    want = torch.softmax(q @ k.transpose(-1, -2) / 2.0 + bias, dim=-1) @ v
    torch.testing.assert_close(split_heads(got, heads), want, atol=1e-5, rtol=1e-5)


def test_relative_bias_is_one_dimensional_for_a_temporal_grid():
    rb = RelativePositionBias((6,), 1, num_buckets=8, max_distance=10)
    with torch.no_grad():
        rb.tables.copy_(torch.arange(8.0)[None, :, None])          # bias = the bucket number
    b = rb()[0]
    want = relative_position_bucket(torch.arange(6)[None, :] - torch.arange(6)[:, None], 8, 10).float()
    assert torch.equal(b, want)
    with pytest.raises(ConfigError, match="max_distance"):
        RelativePositionBias((6,), 1, num_buckets=8, max_distance=2)


# --------------------------------------------------------------------------------------------- U-Net attention
def _unet(attn_pos):
    from torchdiffusion.nn.unet import UNet, UNetConfig
    torch.manual_seed(0)
    return UNet(UNetConfig(image_size=(8, 12), model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(8, 4), norm_groups=4, num_heads=2, attn_pos=attn_pos))


def test_unet_attn_pos_is_off_by_default_and_changes_only_self_attention():
    from torchdiffusion.nn.unet import UNetConfig
    assert UNetConfig().attn_pos == "none"
    plain, rope, rel = _unet("none"), _unet("rope"), _unet("relbias")
    sp, sr, sb = plain.state_dict(), rope.state_dict(), rel.state_dict()
    assert list(sp) == list(sr) and all(torch.equal(sp[k], sr[k]) for k in sp)   # rope has no parameters
    extra = [k for k in sb if k not in sp]
    assert extra and all(k.endswith("attn.pos.tables") for k in extra)        # one table set per attention layer
    assert [m.pos.grid for m in rope.modules() if hasattr(m, "pos")] == [(8, 12), (4, 6), (4, 6),
                                                                          (4, 6), (4, 6), (8, 12), (8, 12)]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for model in (plain, rope, rel):
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        x, s = torch.randn(2, 1, 8, 12, generator=g), torch.randn(2, generator=g)
        a, b = plain(x, s), rope(x, s)
        assert (a - b).abs().max() > 1e-4
        # with all-zero tables the relative bias adds nothing: the output is the plain U-Net's up to float rounding
        # (an attention call with an additive mask takes a different kernel from one without: ~1e-6 apart)
        for name, t in rel.named_parameters():
            if name.endswith("pos.tables"):
                t.zero_()
        sd = {k: v for k, v in rel.state_dict().items() if k in sp}
        plain.load_state_dict(sd)
        torch.testing.assert_close(rel(x, s), plain(x, s), atol=5e-6, rtol=1e-5)
        for name, t in rel.named_parameters():                                  # and non-zero tables do act
            if name.endswith("pos.tables"):
                t.normal_(0.0, 1.0, generator=g)
        assert (rel(x, s) - plain(x, s)).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="valid: none, rope, relbias"):
        UNetConfig(attn_pos="absolute")

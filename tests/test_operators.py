"""Measurement operators: the adjoint identity, the pseudo-inverse, shapes beyond images, bad-input one-liners."""
import pytest
import torch

from torchdiffusion.errors import ConfigError
from torchdiffusion.inverse import (AvgPoolDown, BicubicDown, Colorize, GaussianBlur, GaussianNoise, Inpaint,
                                    OperatorError, box_mask, half_mask, measure, random_mask)

F64 = torch.float64


def _ops(c, h, w, g):
    ops = [Inpaint(random_mask((h, w), 0.4, g)), Inpaint(half_mask((h, w), "right")),
           Inpaint((torch.rand(c, h, w, generator=g) > 0.5).float()), GaussianBlur(0.8), GaussianBlur(1.5, 5)]
    for f in (2, 3, 4):
        if h % f == 0 and w % f == 0:
            ops += [AvgPoolDown(f), BicubicDown(f)]
    if c > 1:
        ops.append(Colorize(c))
    return ops


def _random_shapes(g, count=6):
    for _ in range(count):
        b, c = (int(v) for v in torch.randint(1, 4, (2,), generator=g))
        h, w = (int(v) * 12 for v in torch.randint(1, 4, (2,), generator=g))
        yield b, c, h, w


def test_adjoint_identity_over_random_shapes():
    g = torch.Generator().manual_seed(0)
    for b, c, h, w in _random_shapes(g):
        for op in _ops(c, h, w, g):
            x = torch.randn(b, c, h, w, generator=g, dtype=F64)
            y = torch.randn(op.output_shape(x.shape), generator=g, dtype=F64)
            lhs = (op(x) * y).flatten(1).sum(1)
            rhs = (x * op.adjoint(y)).flatten(1).sum(1)
            assert torch.allclose(lhs, rhs, rtol=1e-10, atol=1e-10), (op.name, (b, c, h, w))


def test_pseudo_inverse_reproduces_the_measurement():
    g = torch.Generator().manual_seed(1)
    for b, c, h, w in _random_shapes(g):
        for op in _ops(c, h, w, g):
            if not op.exact_pinv:
                continue
            y = op(torch.randn(b, c, h, w, generator=g, dtype=F64))  # in the range of A
            assert torch.allclose(op(op.pinv(y)), y, atol=1e-8), op.name
            if op.name != "inpaint":  # onto: every y is in the range
                y = torch.randn(y.shape, generator=g, dtype=F64)
                assert torch.allclose(op(op.pinv(y)), y, atol=1e-8), op.name


def test_pseudo_inverse_is_the_minimum_norm_solution():
    """A^+ y lies in the range of A^T (orthogonal to the null space): A^+ y = A^T u for the CG-solved u, and
    adding any null-space vector to it only increases the norm; check against a dense pinv."""
    g = torch.Generator().manual_seed(2)
    shape = (1, 2, 6, 6)
    d = 72
    basis = torch.eye(d, dtype=F64).reshape(d, *shape[1:])
    for op in (AvgPoolDown(2), BicubicDown(3), Colorize(2), Inpaint(box_mask(6))):
        a = op(basis).reshape(d, -1).T  # (m, d) dense matrix
        y = op(torch.randn(shape, generator=g, dtype=F64))
        want = (torch.linalg.pinv(a) @ y.reshape(-1)).reshape(shape)
        assert torch.allclose(op.pinv(y), want, atol=1e-8), op.name


def test_gram_matches_a_at():
    g = torch.Generator().manual_seed(3)
    for op in (AvgPoolDown(2), AvgPoolDown(4), Colorize(3)):
        y = op(torch.randn(2, 3, 8, 8, generator=g, dtype=F64))
        assert torch.allclose(op(op.adjoint(y)), op.gram * y, atol=1e-12)
    op = Inpaint(half_mask(8))
    y = op(torch.randn(2, 3, 8, 8, generator=g, dtype=F64))
    assert torch.allclose(op(op.adjoint(y)), y)


def test_blur_damped_inverse_converges_as_damping_vanishes():
    g = torch.Generator().manual_seed(4)
    x = torch.nn.functional.avg_pool2d(torch.randn(1, 1, 16, 16, generator=g, dtype=F64), 1)
    errors = []
    for eps in (1e-1, 1e-2, 1e-3):
        op = GaussianBlur(1.0, eps=eps, cg_iters=400)
        y = op(x)
        errors.append(float((op(op.pinv(y)) - y).norm() / y.norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, errors


def test_not_only_pixels_video_and_latent_shapes():
    g = torch.Generator().manual_seed(5)
    video = torch.randn(2, 4, 3, 8, 8, generator=g, dtype=F64)  # (B, C, T, H, W)
    for op in (AvgPoolDown(2), BicubicDown(2), GaussianBlur(1.0), Inpaint(half_mask(8)), Colorize(4)):
        y = op(video)
        assert tuple(y.shape) == op.output_shape(video.shape)
        v = torch.randn(y.shape, generator=g, dtype=F64)
        assert torch.allclose((y * v).sum(), (video * op.adjoint(v)).sum())
    # frame-wise down-sampling equals down-sampling each frame alone
    op = AvgPoolDown(2)
    assert torch.allclose(op(video)[:, :, 1], op(video[:, :, 1]))


def test_masks():
    assert box_mask(8).sum() == 64 - 16 and box_mask(8)[4, 4] == 0 and box_mask(8)[0, 0] == 1
    h = half_mask((6, 4), "bottom")
    assert h[:3].all() and not h[3:].any()
    assert half_mask(4, "left")[:, :2].sum() == 0 and half_mask(4, "right")[:, 2:].sum() == 0
    m = random_mask(64, 0.3, torch.Generator().manual_seed(0))
    assert 0.2 < 1 - m.mean() < 0.4 and set(m.unique().tolist()) <= {0.0, 1.0}


def test_measurement_noise_is_per_row():
    x = torch.zeros(3, 1, 4, 4)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    y3 = measure(AvgPoolDown(2), x, GaussianNoise(0.1), gens([7, 8, 9]))
    y1 = measure(AvgPoolDown(2), x[1:2], GaussianNoise(0.1), gens([8]))
    assert torch.equal(y3[1:2], y1)
    assert 0.05 < float(y3.std()) < 0.2
    assert torch.equal(measure(AvgPoolDown(2), x), AvgPoolDown(2)(x))


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and isinstance(excinfo.value, ConfigError)
    return msg


def test_bad_inputs_are_one_line_naming_both_shapes():
    x = torch.zeros(2, 1, 28, 28)
    with pytest.raises(OperatorError) as e:
        Inpaint(half_mask(32))(x)
    msg = _one_line(e)
    assert "(32, 32)" in msg and "(2, 1, 28, 28)" in msg
    with pytest.raises(OperatorError) as e:
        AvgPoolDown(3)(x)
    msg = _one_line(e)
    assert "3" in msg and "(2, 1, 28, 28)" in msg
    with pytest.raises(OperatorError) as e:
        BicubicDown(5)(x)
    assert "(2, 1, 28, 28)" in _one_line(e)
    mask = torch.ones(28, 28)
    mask[0, 0] = 0.5
    with pytest.raises(OperatorError) as e:
        Inpaint(mask)
    msg = _one_line(e)
    assert "binary" in msg and "(28, 28)" in msg and "0.5" in msg
    with pytest.raises(OperatorError) as e:
        Colorize(3)(x)
    assert "(2, 1, 28, 28)" in _one_line(e)
    with pytest.raises(OperatorError):
        AvgPoolDown(0)
    with pytest.raises(OperatorError):
        GaussianNoise(-1.0)
    with pytest.raises(OperatorError):
        GaussianBlur(0.0)
    with pytest.raises(OperatorError):
        half_mask(8, "middle")
    with pytest.raises(OperatorError):
        box_mask(8, (6, 6, 4, 4))

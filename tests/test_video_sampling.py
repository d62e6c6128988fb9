"""Video sampling and metrics: reconstruction guidance (Ho et al. 2022, eq. 7) against replacement on an exact
Gaussian video model, the video tasks' operators, clips written as GIFs, and the Moving MNIST motion metric."""
import pytest
import torch

from torchdiffusion.core.grids import karras
from torchdiffusion.data.moving_mnist import load_moving_mnist
from torchdiffusion.data.video_folder import load_video_folder
from torchdiffusion.errors import ConfigError, DataError
from torchdiffusion.eval.video_metrics import MOTION_METRIC, MotionFeatures, fd_motion, train_motion_net
from torchdiffusion.pipelines.clips import frame_grid, save_clips
from torchdiffusion.pipelines.video import restore_video, task_layout
from torchdiffusion.sampling.ancestral import sample_ddpm

T, RHO = 8, 0.9
_idx = torch.arange(T, dtype=torch.float64)
COV = RHO ** (_idx[:, None] - _idx[None, :]).abs()           # AR(1) along time: x_t = rho x_{t-1} + noise


class GaussianClips:
    """Exact denoiser of clips (B, 1, T, 1, 1) ~ N(0, COV): E[x0 | x] = COV (COV + sigma^2 I)^-1 x."""

    def __call__(self, x, sigma, cond=None):
        v = x.reshape(x.shape[0], T).double()
        s2 = sigma.double().reshape(-1, 1, 1) ** 2
        m = COV @ torch.linalg.inv(COV + s2 * torch.eye(T, dtype=torch.float64))  # (B, T, T)
        return (m @ v[:, :, None])[..., 0].to(x.dtype).reshape(x.shape)


SIGMAS = karras(30, 0.002, 80.0)
K, N = 2, 300


def _extend(method, w, n=N):
    given = torch.full((n, 1, K, 1, 1), 1.5)
    x, err, _ = restore_video(GaussianClips(), "extend", given, list(range(n)), SIGMAS, method=method, weight=w,
                              new_frames=T - K, batch=n)
    return x, err


def test_guidance_with_zero_weight_is_unconditional_sampling():
    x, _ = _extend("guidance", 0.0, n=16)
    gens = [torch.Generator().manual_seed(s) for s in range(16)]   # one per seed, as restore draws them
    noise = torch.stack([torch.randn((1, T, 1, 1), generator=g) for g in gens])
    ref = sample_ddpm(GaussianClips(), noise, SIGMAS, generator=gens)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)
    r, _ = _extend("reconstruction", 0.0, n=16)
    p, _ = _extend("replacement", 0.0, n=16)
    torch.testing.assert_close(r, p, atol=1e-6, rtol=1e-6)      # w_r = 0: reconstruction guidance = replacement


def test_reconstruction_guidance_moves_towards_the_exact_conditional():
    exact_mean = 1.5 * RHO ** (_idx[K:] - (K - 1))               # E[x_t | x_{K-1} = 1.5]
    errors = {}
    for method, w in (("replacement", 0.0), ("reconstruction", 3.0)):
        x, err = _extend(method, w)
        assert err.max() < 1e-5                                   # the given frames are kept exactly
        errors[method] = float((x[:, 0, K:, 0, 0].double().mean(0) - exact_mean).abs().mean())
    # replacement lags far behind the conditional (its unknown frames barely see the given ones); the guided
    # samples' mean is several times closer (sampling error of the mean at N=300: ~0.05)
    assert errors["replacement"] > 0.3
    assert errors["reconstruction"] < 0.5 * errors["replacement"]


def test_video_task_operators_measure_the_given_frames():
    given = torch.randn(2, 1, 3, 8, 8)
    op, full = task_layout("extend", given, new_frames=2)
    assert full.shape == (2, 1, 5, 8, 8) and torch.equal(op(full)[:, :, :3], given) and op(full)[:, :, 3:].eq(0).all()
    op, full = task_layout("interpolate", given, stride=3)
    assert full.shape == (2, 1, 7, 8, 8) and torch.equal(full[:, :, ::3], given)
    assert op.mask[:, 0, 0].tolist() == [1, 0, 0, 1, 0, 0, 1]
    op, full = task_layout("superres", given, scale=2)
    assert full.shape == (2, 1, 3, 16, 16)
    torch.testing.assert_close(op(full), given)
    for kw, match in (({"task": "extend"}, "new_frames"), ({"task": "interpolate", "stride": 1}, "stride"),
                      ({"task": "zoom"}, "unknown video task")):
        with pytest.raises(ConfigError, match=match):
            task_layout(kw.pop("task"), given, **kw)


def test_clips_round_trip_through_gifs(tmp_path):
    clips = torch.randint(0, 256, (3, 1, 4, 8, 8), dtype=torch.uint8)
    files = save_clips(clips, tmp_path / "out", seeds=[5, 6, 7])
    assert [f.name for f in files] == ["000005.gif", "000006.gif", "000007.gif", "grid.gif", "frames.png"]
    for f in files[2:]:
        f.rename(tmp_path / f.name)                               # keep only the per-seed clips in the folder
    back = load_video_folder(tmp_path / "out", frames=4)
    assert torch.equal(back.x, clips[:2])                         # gray GIFs are lossless
    g = frame_grid(clips)
    assert g.shape == (1, 3 * 10 + 2, 4 * 10 + 2) and torch.equal(g[:, 2 + 10:2 + 18, 2 + 20:2 + 28], clips[1, :, 2])


def test_motion_metric_is_zero_on_itself_and_sees_shuffled_frames():
    train = load_moving_mnist("train", resolution=32, frames=6, clips=256, digits=1, speed=3.0)
    test = load_moving_mnist("test", resolution=32, frames=6, clips=128, digits=1, speed=3.0)
    net, rec = train_motion_net(train, steps=40, batch=16, width=8, lr=3e-3)
    f = MotionFeatures(net)
    real = test.x
    r = fd_motion(real, real, f)
    assert abs(r[MOTION_METRIC]) < 1e-6 and r["protocol"]["clip_length"] == 6 and r["protocol"]["n_real"] == 128
    halves = fd_motion(real[:64], real[64:], f)[MOTION_METRIC]
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    shuffled = fd_motion(real[:64], real[64:][:, :, perm], f)[MOTION_METRIC]
    assert shuffled > 2 * halves                                  # same frames, other order: it sees motion
    with pytest.raises(DataError, match="differ in shape"):
        fd_motion(real, real[:, :, :4], f)

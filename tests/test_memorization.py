"""Memorisation audit: exact k-NN, the ratio and held-out tests on planted cases, the validation-loss flag, the CLI.

Planted cases: the optimal denoiser of an empirical distribution (a mixture of point masses at the training
images) is a "model" whose samples are training images; the same denoiser built on held-out images is a model
whose samples are new to the training set. The audit must flag the first ~100 % and the second ~0 %, in pixel
space and in a (random-conv) feature space.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from torchdiffusion.cli.main import cli
from torchdiffusion.core import grids
from torchdiffusion.errors import DataError
from torchdiffusion.eval import memorization as mem
from torchdiffusion.pipelines.generate import generate, save_png
from torchdiffusion.sampling.ode import sample_heun


class EmpiricalDenoiser:
    """D(x, sigma) = E[x0 | x] for x0 uniform on the given images: a softmax of -||x - x_i||^2 / (2 sigma^2)."""

    def __init__(self, images_u8: torch.Tensor):
        self.x = images_u8.to(torch.float64).flatten(1) / 127.5 - 1.0
        self.x2 = (self.x * self.x).sum(1)

    def __call__(self, x, sigma, cond=None):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        s = s.expand(x.shape[0]) if s.numel() == 1 else s
        flat = x.to(torch.float64).flatten(1)
        d2 = (flat * flat).sum(1, keepdim=True) + self.x2 - 2 * flat @ self.x.T
        w = torch.softmax(-d2 / (2 * s[:, None] ** 2), dim=1)
        return (w @ self.x).reshape(x.shape).to(x.dtype)


def _digits(n: int, seed: int, size: int = 12) -> torch.Tensor:
    """n distinct random 'digit-like' images (blurred blobs), uint8 (n, 1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 1, size, size), generator=g)
    x = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = (x - x.amin((2, 3), keepdim=True)) / (x.amax((2, 3), keepdim=True) - x.amin((2, 3), keepdim=True))
    return (x * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def data():
    pool = _digits(900, seed=0)
    return {"train": pool[:500], "heldout": pool[500:700], "other": pool[700:]}


def _samples(images, n=64):
    sigmas = grids.karras(12, 0.002, 80.0, 7.0)
    return generate(EmpiricalDenoiser(images), list(range(n)), tuple(images.shape[1:]), sample_heun, sigmas, batch=32)


# ----------------------------------------------------------------------------------------- k-NN and ratio
def test_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(0)
    q, r = rng.standard_normal((37, 9)), rng.standard_normal((101, 9))
    nb = mem.nearest_neighbours(q, r, k=3, chunk=10)
    full = np.sqrt(((q[:, None, :] - r[None]) ** 2).sum(-1))
    order = np.argsort(full, axis=1)[:, :3]
    np.testing.assert_array_equal(nb.indices, order)
    np.testing.assert_allclose(nb.distances, np.take_along_axis(full, order, 1), rtol=1e-10, atol=1e-12)


def test_ratio_of_an_exact_copy_is_zero_even_with_duplicates():
    assert mem.ratio(np.array([0.0, 0.0, 1.0]), np.array([0.0, 2.0, 4.0])).tolist() == [0.0, 0.0, 0.25]


def test_reference_with_one_item_is_a_one_line_error():
    with pytest.raises(DataError, match="at least 2"):
        mem.nearest_neighbours(np.zeros((3, 2)), np.zeros((1, 2)))


# ----------------------------------------------------------------------------------------- planted cases
def test_planted_copying_model_is_flagged_and_heldout_model_is_not(data):
    train, held = data["train"], data["heldout"]
    copies = _samples(train)
    novel = _samples(data["other"])
    # the empirical denoiser's samples land on its images (to rounding): a sanity check of the plant itself
    nb = mem.nearest_neighbours(mem.pixel_features(copies), mem.pixel_features(train), k=1)
    assert float(nb.distances.max()) < 0.05
    feats = {"random-conv": mem.RandomConvFeatures(1)}
    bad = mem.audit_images(copies, train, held, features=feats)
    good = mem.audit_images(novel, train, held, features=feats)
    for space in ("pixel", "random-conv"):
        assert bad[space].share_ratio >= 0.95, (space, bad[space].summary())
        assert bad[space].share_heldout >= 0.95, (space, bad[space].summary())
        assert bad[space].median_d1_over_heldout < 0.1
        assert good[space].share_ratio <= 0.05, (space, good[space].summary())
        assert good[space].share_heldout <= 0.1, (space, good[space].summary())
        assert 0.5 < good[space].median_d1_over_heldout < 2.0
        # the held-out images themselves calibrate the ratio test: few of them pass it
        assert good[space].heldout_share_ratio <= 0.05


def test_partial_copying_is_measured_in_proportion(data):
    train, held = data["train"], data["heldout"]
    mixed = torch.cat([train[:24], data["other"][:40]])
    r = mem.audit_images(mixed, train, held)["pixel"]
    assert r.share_ratio == pytest.approx(24 / 64, abs=2 / 64)
    assert (r.ratios[:24] == 0).all() and (r.d1[:24] == 0).all()  # exact copies: ratio 0
    assert (r.ratios[24:] > r.ratio_threshold).all()
    np.testing.assert_array_equal(r.nn1[:24], np.arange(24))  # each copy finds its original


def test_audit_rejects_mismatched_shapes(data):
    with pytest.raises(DataError, match="one shape"):
        mem.audit_images(data["train"][:4, :, :8, :8], data["train"], data["heldout"])


# ----------------------------------------------------------------------------------------- validation loss
def _metrics(path, vals):
    lines = ["step,images,loss,grad_norm,lr,val_loss,images_per_s,wall_s"]
    for i, v in enumerate(vals, start=1):
        for s in range(10 * i - 9, 10 * i + 1):
            lines.append(f"{s},{s * 8},{1.0 / s},,,{v if s == 10 * i else ''},,")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_validation_loss_rise_is_flagged(tmp_path):
    rising = mem.validation_loss_trend(_metrics(tmp_path / "a.csv", [1.0, 0.5, 0.4, 0.45, 0.5]))
    assert rising.rising and rising.min_step == 30 and rising.rise == pytest.approx(0.25)
    falling = mem.validation_loss_trend(_metrics(tmp_path / "b.csv", [1.0, 0.5, 0.4, 0.39]))
    assert not falling.rising and falling.min_step == 40
    none = mem.validation_loss_trend(tmp_path / "missing.csv")
    assert not none.rising and none.min_val_loss is None
    assert mem.save_val_loss_plot(rising, tmp_path / "v.png") and (tmp_path / "v.png").stat().st_size > 1000


def test_panel_has_one_row_per_pair(data):
    r = mem.audit_images(data["train"][:5], data["train"], data["heldout"])["pixel"]
    panel = mem.pairs_panel(data["train"][:5], data["train"], r, rows=3, cell=24)
    assert panel.size[1] > 3 * 24 and panel.size[0] > 3 * 24


# ----------------------------------------------------------------------------------------- CLI on image folders
def _write(folder, images):
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        save_png(img, folder / f"{i:06d}.png")
    return folder


def test_audit_command_on_image_folders(data, tmp_path):
    train_dir = _write(tmp_path / "train", data["train"][:200])
    held_dir = _write(tmp_path / "held", data["heldout"][:100])
    copies = _write(tmp_path / "copies", torch.cat([data["train"][:30], data["other"][:10]]))
    r = CliRunner().invoke(cli, ["audit", "--images", copies, "--train-dir", train_dir, "--heldout-dir", held_dir,
                                 "--features", "random-conv", "--heldout", "100", "--out", tmp_path / "out"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "out" / "audit.json").read_text())
    for space in ("pixel", "random-conv"):
        assert rec["spaces"][space]["share_ratio"] == pytest.approx(30 / 40, abs=1 / 40)
        assert rec["spaces"][space]["n_samples"] == 40
    assert rec["data"]["n_train"] == 200 and rec["data"]["n_heldout"] == 100
    assert math.isfinite(rec["spaces"]["pixel"]["median_d1_over_heldout"])
    for f in ("panel.png", "panel_pixel.png", "panel_random-conv.png", "samples.png", "samples.csv"):
        assert (tmp_path / "out" / f).stat().st_size > 0


def test_audit_command_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(cli, ["audit", "--images", tmp_path])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "--train-dir" in r.output
    r = CliRunner().invoke(cli, ["audit", "--images", tmp_path, "--train-dir", tmp_path])
    assert r.exit_code == 2 and "--heldout-dir" in r.output
    r = CliRunner().invoke(cli, ["audit", "--run", tmp_path / "nope"])
    assert r.exit_code == 2 and "no such run folder" in r.output


# ----------------------------------------------------------------------------------------- real training (slow)
@pytest.mark.slow
def test_small_data_training_is_flagged(tmp_path):
    """64 digits (8x8) trained on for 1500 steps: most samples are near-copies (bench/memorisation_small_data.py
    runs the same and records its numbers)."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("mnist")
    path = Path(__file__).resolve().parents[1] / "bench" / "memorisation_small_data.py"
    spec = importlib.util.spec_from_file_location("memorisation_small_data", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rec = bench.run(tmp_path, steps=1500, threads=2)
    pixel = rec["spaces"]["pixel"]
    assert pixel["share_ratio"] >= 0.5, pixel
    assert pixel["heldout_share_ratio"] <= 0.05, pixel
    assert pixel["median_d1_over_heldout"] < 0.5, pixel

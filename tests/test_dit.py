"""Transformer backbones (nn/dit.py, nn/uvit.py): exact init identities, patch round trips, conditioning, the
positional-encoding options, and DiT / U-ViT trained, resumed, sampled and restored through the CLI."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tiny_runs import invoke, train_short as train, write_noise_pngs
from torchdiffusion.config import registry
from torchdiffusion.config.loaders import load_run
from torchdiffusion.config.strict import from_dict
from torchdiffusion.core import grids
from torchdiffusion.errors import ConfigError, TorchDiffusionError
from torchdiffusion.guidance.cfg import ClassifierFreeGuidance
from torchdiffusion.nn.dit import DiT, DiTConfig, patchify, unpatchify
from torchdiffusion.nn.uvit import UViT, UViTConfig
from torchdiffusion.protocols import BackboneIO, CondSpec
from torchdiffusion.train.checkpoint import load_checkpoint, resolve_latest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = dict(width=32, depth=2, heads=2)
CONDS = (CondSpec("label", "class", 10), CondSpec("bright", "scalar"), CondSpec("style", "vector", 3))


def _cond(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"label": torch.tensor([0, 4, 10])[:b], "bright": torch.rand(b, generator=g),
            "style": torch.randn(b, 3, generator=g)}


def _randomize(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------------------------- patches
@pytest.mark.parametrize("p,shape", [(1, (2, 3, 5, 7)), (2, (2, 3, 8, 8)), (2, (2, 1, 28, 20)), (4, (2, 3, 8, 12)),
                                     (4, (2, 2, 12, 8)), (2, (1, 2, 4, 6, 8))])
def test_unpatchify_inverts_patchify(p, shape):
    x = torch.randn(shape)
    t = patchify(x, p)
    grid = tuple(s // p for s in shape[2:])
    assert t.shape == (shape[0], int(np.prod(grid)), shape[1] * p ** (len(shape) - 2))
    assert torch.equal(unpatchify(t, p, grid), x)


def test_patch_tokens_are_row_major_patches_and_the_embedding_is_a_strided_conv():
    x = torch.randn(2, 3, 8, 12)
    t = patchify(x, 4)                                              # grid (2, 3)
    assert torch.equal(t[:, 4], x[:, :, 4:8, 4:8].reshape(2, -1))   # token (1, 1) = patch rows 4:8, cols 4:8
    lin = nn.Linear(48, 5)
    conv = nn.Conv2d(3, 5, 4, stride=4)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.view(5, 3, 4, 4))
        conv.bias.copy_(lin.bias)
    torch.testing.assert_close(lin(t), conv(x).flatten(2).transpose(1, 2))
    with pytest.raises(TorchDiffusionError, match="patch size 4 must divide"):
        patchify(torch.randn(1, 1, 6, 8), 4)


# --------------------------------------------------------------------------------------------- adaLN-Zero
@pytest.mark.parametrize("pos", ["absolute", "rope", "relbias"])
def test_dit_blocks_are_the_identity_at_init_and_the_output_is_zero(pos):
    io = BackboneIO((1, 8, 12), 2, CONDS + (CondSpec("ctx", "context", 5),))
    model = DiT(DiTConfig(patch_size=2, pos=pos, **TINY), io)
    x, cond = torch.randn(3, 1, 8, 12), {**_cond(), "ctx": torch.randn(3, 4, 5)}
    out = model(x, torch.randn(3), cond)
    assert out.shape == (3, 2, 8, 12) and torch.equal(out, torch.zeros_like(out))
    t, c = torch.randn(3, 24, 32), torch.randn(3, 32)
    bias = model.relbias() if model.relbias is not None else None
    for blk in model.blocks:
        assert torch.equal(blk(t, c, cond["ctx"], model.rope, bias), t)


def test_adaln_zero_gradients_reach_the_gates_after_one_step_then_shift_and_scale():
    io = BackboneIO((1, 8, 8), 1, CONDS)
    model = DiT(DiTConfig(patch_size=2, **TINY), io)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, cond, target = torch.randn(3, 1, 8, 8), _cond(), torch.randn(3, 1, 8, 8)
    d = 32
    gate_rows = torch.zeros(6 * d, dtype=torch.bool)
    gate_rows[2 * d:3 * d] = gate_rows[5 * d:] = True

    def grads():
        opt.zero_grad()
        ((model(x, torch.randn(3, generator=torch.Generator().manual_seed(0)), cond) - target) ** 2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    g0 = grads()  # at init only the final linear map (its input is non-zero) has a gradient
    assert g0["final.linear.weight"].abs().sum() > 0
    assert all(g.abs().sum() == 0 for n, g in g0.items() if not n.startswith("final.linear"))
    opt.step()
    g1 = grads()  # after one step: the final modulation and every block's gates; shift and scale still exactly 0
    assert g1["final.modulation.weight"].abs().sum() > 0
    for i in range(len(model.blocks)):
        w = g1[f"blocks.{i}.modulation.weight"]
        assert (w[gate_rows].abs().sum(dim=1) > 0).all()
        assert torch.equal(w[~gate_rows], torch.zeros_like(w[~gate_rows]))
    opt.step()
    g2 = grads()
    for i in range(len(model.blocks)):
        assert (g2[f"blocks.{i}.modulation.weight"].abs().sum(dim=1) > 0).all()


def test_uvit_output_is_zero_at_init_and_trains():
    io = BackboneIO((1, 8, 12), 2, CONDS)
    model = UViT(UViTConfig(patch_size=2, width=32, depth=3, heads=2), io)
    x = torch.randn(3, 1, 8, 12)
    out = model(x, torch.randn(3), _cond())
    assert out.shape == (3, 2, 8, 12) and torch.equal(out, torch.zeros_like(out))
    loss = ((out - x.repeat(1, 2, 1, 1)) ** 2).mean()
    loss.backward()
    assert model.final_conv.weight.grad.abs().sum() > 0
    assert len(model.in_blocks) == len(model.out_blocks) == 1 and model.out_blocks[0].skip is not None


# --------------------------------------------------------------------------------------------- conditioning
@pytest.mark.parametrize("cls,cfg", [(DiT, DiTConfig(patch_size=4, **TINY)),
                                     (UViT, UViTConfig(patch_size=4, width=32, depth=3, heads=2))])
def test_every_declared_condition_changes_the_output(cls, cfg):
    io = BackboneIO((1, 8, 12), 1, CONDS + (CondSpec("ctx", "context", 5), CondSpec("low", "concat", 2)))
    model = cls(cfg, io)
    _randomize(model)
    x, s = torch.randn(3, 1, 8, 12), torch.randn(3)
    cond = {**_cond(), "ctx": torch.randn(3, 4, 5), "low": torch.randn(3, 2, 8, 12)}
    with torch.no_grad():
        base = model(x, s, cond)
        for key in cond:
            other = dict(cond)
            other[key] = torch.tensor([1, 2, 3]) if key == "label" else cond[key] + 1.0
            assert (model(x, s, other) - base).abs().max() > 1e-4, key
        assert (model(x, s + 1.0, cond) - base).abs().max() > 1e-4
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, s, cond)
    assert low.dtype == torch.bfloat16 and (low.float() - base).abs().max() < 0.1
    with pytest.raises(TorchDiffusionError, match=r"cond\['label'\] must be \(3,\) int64"):
        model(x, s, {**cond, "label": torch.zeros(3)})
    with pytest.raises(TorchDiffusionError, match="unknown cond keys"):
        model(x, s, {**cond, "y": torch.zeros(3)})


def test_relative_bias_is_not_applied_to_cross_attention():
    """With M = L context tokens a bias could silently enter the cross-attention logits; it must not. The
    self-attention gates are zeroed so only cross-attention and the MLPs remain: changing the bias tables then
    changes nothing, while with the gates back it does (the control)."""
    io = BackboneIO((1, 8, 8), 1, (CondSpec("ctx", "context", 5),))
    model = DiT(DiTConfig(patch_size=2, pos="relbias", **TINY), io)
    _randomize(model)
    x, s, cond = torch.randn(2, 1, 8, 8), torch.randn(2), {"ctx": torch.randn(2, 16, 5)}
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for blk in model.blocks:
            blk.modulation.weight[64:96] = 0
            blk.modulation.bias[64:96] = 0
        a = model(x, s, cond)
        model.relbias.tables.add_(torch.randn(model.relbias.tables.shape))
        assert torch.equal(model(x, s, cond), a)
        for n, p in model.named_parameters():
            p.copy_(saved[n])
        b = model(x, s, cond)
        model.relbias.tables.add_(torch.randn(model.relbias.tables.shape))
        assert (model(x, s, cond) - b).abs().max() > 1e-4


def test_rope_gives_the_model_positions():
    """Without positions a transformer on patches is exactly equivariant to a circular shift by whole patches (a
    permutation of the tokens); a DiT with RoPE (no absolute table) is not: it sees where each patch is."""
    io = BackboneIO((1, 8, 8), 1, ())
    model = DiT(DiTConfig(patch_size=2, pos="rope", **TINY), io)
    _randomize(model, std=0.2)
    x, s = torch.randn(1, 1, 8, 8), torch.zeros(1)
    with torch.no_grad():
        shifted_out = model(torch.roll(x, 2, dims=3), s)
        out_shifted = torch.roll(model(x, s), 2, dims=3)
    assert (shifted_out - out_shifted).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------- configs
def test_bad_configs_fail_in_one_line_naming_what_is_valid():
    with pytest.raises(ConfigError, match="valid: absolute, rope, relbias"):
        DiTConfig(pos="sinusoidal")
    with pytest.raises(ConfigError, match="valid: absolute, rope, relbias"):
        from_dict(UViTConfig, {"pos": "alibi"}, "model.backbone", run_config=True)
    with pytest.raises(ConfigError, match="patch_size 4 must divide"):
        DiT(DiTConfig(patch_size=4, **TINY), BackboneIO((1, 28, 30), 1))
    with pytest.raises(ConfigError, match="depth must be odd"):
        UViTConfig(depth=6)
    with pytest.raises(ConfigError, match="heads=3 must divide width=32"):
        DiTConfig(width=32, heads=3)
    with pytest.raises(ConfigError, match="at most 1 context"):
        DiT(DiTConfig(**TINY), BackboneIO((1, 8, 8), 1, (CondSpec("a", "context", 2), CondSpec("b", "context", 2))))
    assert registry.kind_entry("backbone", "dit").config is DiTConfig
    assert registry.kind_entry("backbone", "uvit").config is UViTConfig


# --------------------------------------------------------------------------------------------- end to end
KINDS = {"dit": "model.backbone={kind: dit, patch_size: 4, width: 32, depth: 2, heads: 2, pos: rope}",
         "uvit": "model.backbone={kind: uvit, patch_size: 4, width: 32, depth: 3, heads: 2, pos: relbias}"}


def test_bad_backbone_option_on_the_command_line_is_one_line(tmp_path):
    r = invoke(["train", "--run", tmp_path / "x", "--set", "model.backbone={kind: dit, pos: sincos}"], expect=2)
    assert "valid: absolute, rope, relbias" in r.output and r.output.count("\n") == 1
    r = invoke(["train", "--run", tmp_path / "x", "--set", "model.backbone={kind: dit, image_size: 28}"], expect=2)
    assert "unknown config key 'model.backbone.image_size'" in r.output and r.output.count("\n") == 1


@pytest.mark.parametrize("kind", ["dit", "uvit"])
def test_transformer_trains_resumes_bit_exactly_samples_and_restores(kind, tmp_path):
    pytest.importorskip("mnist")
    full, split = tmp_path / "full", tmp_path / "split"
    extra = [KINDS[kind], "cond.label.kind=class"]
    train(full, 4, extra)
    train(split, 4, extra, until=2)
    train(split, 4, extra)  # resumes at step 2
    a = load_checkpoint(resolve_latest(full / "checkpoints"))
    b = load_checkpoint(resolve_latest(split / "checkpoints"))
    assert a.meta["config"]["model"]["backbone"]["kind"] == kind
    for group in ("model", "ema"):
        assert set(a.tensors[group]) == set(b.tensors[group])
        for k in a.tensors[group]:
            assert torch.equal(a.tensors[group][k], b.tensors[group][k]), (group, k)

    run = load_run(full)
    assert isinstance(run.model.backbone, DiT if kind == "dit" else UViT) and run.num_classes == 10
    cond = run.conditioning.for_sampling([0, 1], {"label": [3, 4]})
    sigmas = grids.karras(3, run.model.process.sigma_min, run.model.process.sigma_max)
    guided = ClassifierFreeGuidance(run.model, 2.0, run.conditioning.null)
    s1 = torch.full((2,), 1.0)
    x0 = torch.randn(2, *run.sample_shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ClassifierFreeGuidance(run.model, 1.0, run.conditioning.null)(x0, s1, cond),
                               run.model(x0, s1, cond))
    for name in ("euler", "heun", "ddim", "euler_ancestral", "dpmpp_2m", "unipc"):
        sampler = registry.SAMPLERS[name][0]
        x = sampler(guided, x0.clone(), sigmas, cond=cond, generator=torch.Generator().manual_seed(1))
        assert x.shape == (2, 1, 28, 28) and torch.isfinite(x).all(), name

    out = tmp_path / "samples"
    invoke(["sample", "--run", full, "--outdir", out, "--seeds", "0-3", "--steps", "2", "--labels", "0-3",
            "--guidance-scale", "2", "--threads", "1"])
    assert len(list(out.glob("00000*.png"))) == 4
    uncond = tmp_path / "uncond"
    train(uncond, 2, [KINDS[kind]])
    images = write_noise_pngs(tmp_path / "images", 2)
    invoke(["restore", "--run", uncond, "--task", "inpaint", "--method", "replacement", "--input", images,
            "--outdir", tmp_path / "restored", "--steps", "2", "--threads", "1"])
    assert len(list((tmp_path / "restored" / "restored").iterdir())) == 2


@pytest.mark.parametrize("cfg", [DiTConfig(patch_size=2, **TINY), UViTConfig(patch_size=2, width=32, depth=1, heads=2)])
def test_learned_variance_doubles_the_output_channels_through_the_model_spec(cfg):
    from torchdiffusion.config.build import build_model
    from torchdiffusion.config.schema import ModelConfig
    from torchdiffusion.core.precond import LearnedVariance
    model = build_model(ModelConfig(backbone=cfg, variance="learned", data_shape=(3, 8, 12)))
    assert isinstance(model, LearnedVariance) and model.backbone.io.out_channels == 6
    x = torch.randn(2, 3, 8, 12)
    assert model(x, torch.full((2,), 1.0)).shape == (2, 3, 8, 12)

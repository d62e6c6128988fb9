"""Non-leaking augmentation (data.augment, conditioners.augment): exact operations, deterministic vectors, zero
at sampling, bit-exact resume, and no leak into the samples of a model trained with heavy rotations."""
import math

import pytest
import torch
from tiny_runs import invoke, train_short

from torchdiffusion.conditioners import AugmentConditioner, Conditioning
from torchdiffusion.core.objectives import Objective
from torchdiffusion.core.precond import Preconditioned, Preconditioner
from torchdiffusion.core.processes import EDM
from torchdiffusion.data import ImageArrayDataset
from torchdiffusion.data.augment import AUG_DIM, LAYOUT, AugmentConfig, AugmentPipe, apply_augment, augment_params
from torchdiffusion.errors import ConfigError
from torchdiffusion.train import checkpoint as ckpt
from torchdiffusion.train.logger import read_metrics
from torchdiffusion.train.trainer import TrainConfig, Trainer

ALL_ON = AugmentConfig(p=1.0, brightness=1, contrast=1, saturation=1, cutout=1)


def vec(**values):
    v = torch.zeros(1, AUG_DIM)
    for k, x in values.items():
        v[0, LAYOUT.index(k)] = x
    return v


def rot90_vec(k):
    return vec(rot90_cos=round(math.cos(k * math.pi / 2)) - 1, rot90_sin=round(math.sin(k * math.pi / 2)))


def test_exact_operations_and_zero_vector_identity():
    x = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(apply_augment(x, vec()), x)  # zero: untouched, bit for bit
    assert torch.allclose(apply_augment(x, vec(xflip=1)), x.flip(-1), atol=1e-5)
    rotated = [apply_augment(x, rot90_vec(k)) for k in (1, 2, 3)]
    for k, y in zip((3, 2, 1), rotated):  # the three quarter turns are torch.rot90's three, pixel-exact
        assert torch.allclose(y, torch.rot90(x, k, (2, 3)), atol=1e-5)
    shifted = apply_augment(x, vec(translate_x=2 / 6))  # two pixels right: columns move, reflection fills
    assert torch.allclose(shifted[..., 2:], x[..., :-2], atol=1e-5)
    assert torch.allclose(shifted[..., :2], x[..., :2].flip(-1), atol=1e-5)
    one = torch.ones(1, 1, 4, 4)
    assert torch.allclose(apply_augment(one, vec(brightness=0.5)), one + 0.5)
    assert torch.allclose(apply_augment(one, vec(contrast=1.0)), one * 2)
    grey = apply_augment(one, vec(cutout=1, cutout_x=0.0, cutout_y=0.0))  # side 0.5 centred: the middle 2x2
    assert grey[0, 0].sum() == 12 and torch.all(grey[0, 0, 1:3, 1:3] == 0)


def test_vector_deterministic_for_seed_step_position_and_differs_across_positions():
    a = augment_params(ALL_ON, 7, 11, range(16), (8, 8), 3)
    assert torch.equal(a, augment_params(ALL_ON, 7, 11, range(16), (8, 8), 3))
    assert torch.equal(a[5:9], augment_params(ALL_ON, 7, 11, range(5, 9), (8, 8), 3))  # a row is its position's
    assert len({tuple(r.tolist()) for r in a}) == 16
    assert not torch.equal(a, augment_params(ALL_ON, 7, 12, range(16), (8, 8), 3))
    assert not torch.equal(a, augment_params(ALL_ON, 8, 11, range(16), (8, 8), 3))
    gray = augment_params(ALL_ON, 7, 11, range(16), (8, 8), 1)
    assert torch.all(gray[:, LAYOUT.index("saturation")] == 0) and torch.any(a[:, LAYOUT.index("saturation")] != 0)
    assert torch.all(augment_params(AugmentConfig(p=0.0), 7, 11, range(16), (8, 8), 3) == 0)


def test_two_processes_see_the_augmentations_of_one():
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    one_x, one_v = AugmentPipe(ALL_ON, 3)(x, 5)
    for r in range(2):  # process r holds global rows r, r + 2, ... (data.order)
        part_x, part_v = AugmentPipe(ALL_ON, 3, rank=r, world_size=2)(x[r::2], 5)
        assert torch.equal(part_v, one_v[r::2]) and torch.equal(part_x, one_x[r::2])


def test_conditioner_vector_zero_at_sampling_null_and_validation():
    c = AugmentConditioner("aug", ALL_ON, seed=0)
    cond = Conditioning([c])
    assert cond.specs[0].kind == "vector" and cond.specs[0].size == AUG_DIM
    assert torch.equal(cond.for_sampling([0, 1, 2])["aug"], torch.zeros(3, AUG_DIM))
    x = torch.zeros(4, 1, 8, 8)
    x_aug, batch = cond.augment(x, {"x": torch.zeros(4, 1, 8, 8, dtype=torch.uint8)}, 3)
    trained = cond(batch, 3)["aug"]
    assert trained.shape == (4, AUG_DIM) and trained.abs().sum() > 0
    assert torch.equal(cond.null({"aug": trained})["aug"], torch.zeros(4, AUG_DIM))
    assert torch.equal(cond({"x": torch.zeros(4, 1, 8, 8, dtype=torch.uint8)}, None)["aug"], torch.zeros(4, AUG_DIM))
    with pytest.raises(ConfigError, match="does not apply the augmentation"):  # a training batch never augmented
        cond({"x": torch.zeros(4, 1, 8, 8, dtype=torch.uint8)}, 3)
    with pytest.raises(ConfigError, match="15 values"):
        cond.for_sampling([0, 1], {"aug": [0.0, 1.0]})


@pytest.mark.parametrize("kw, msg", [({"p": 1.5}, "augment.p must be in"), ({"rotate": -1}, "augment.rotate must"),
                                     ({"scale_std": -0.1}, "scale_std must be >= 0"),
                                     ({"cutout_size": 0}, "cutout_size must be in")])
def test_bad_augment_values_fail_in_one_line(kw, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        AugmentConfig(**kw)
    assert "\n" not in str(e.value)


def test_bad_values_on_the_command_line_are_one_line(tmp_path):
    for bad, msg in (("cond.aug.p=2", "augment.p must be in [0, 1]"), ("train.val_patience=-1", "val_patience"),
                     ("train.stop_near_copy_share=0.5", "needs the in-loop audit")):
        r = invoke(["train", "--run", tmp_path / "r", "--set", "cond.aug.kind=augment", "--set", bad], expect=2)
        assert msg in r.output and len(r.output.strip().splitlines()) == 1, r.output


UNET = ["model.backbone.model_channels=8", "model.backbone.channel_mult=[1,2]", "model.backbone.num_res_blocks=1",
        "model.backbone.attn_resolutions=[]", "model.backbone.norm_groups=4", "cond.aug.kind=augment", "cond.aug.p=0.8",
        "cond.aug.brightness=1", "cond.aug.cutout=1"]


def test_resume_is_bit_exact_with_augmentation(tmp_path):
    train_short(tmp_path / "a", 4, UNET)
    train_short(tmp_path / "b", 4, UNET, until=2)
    train_short(tmp_path / "b", 4, UNET)
    ra, rb = read_metrics(tmp_path / "a" / "metrics.csv"), read_metrics(tmp_path / "b" / "metrics.csv")
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb] and len(ra) == 4
    ta = ckpt.load_checkpoint(ckpt.resolve_latest(tmp_path / "a" / "checkpoints")).tensors
    tb = ckpt.load_checkpoint(ckpt.resolve_latest(tmp_path / "b" / "checkpoints")).tensors
    for group in ("model", "ema"):
        for k, v in ta[group].items():
            assert torch.equal(v, tb[group][k]), (group, k)


# ------------------------------------------------------------------------------------ non-leaking
class TinyMLP(torch.nn.Module):
    """forward(x, c_noise, cond): an MLP on the flattened 8x8 image, Fourier features of c_noise and the
    augmentation vector (zeros when `conditioned` is False: the control that cannot tell augmented images)."""

    def __init__(self, conditioned: bool, width: int = 256):
        super().__init__()
        self.conditioned = conditioned
        self.register_buffer("freqs", torch.randn(8) * 2)
        self.net = torch.nn.Sequential(torch.nn.Linear(64 + 16 + AUG_DIM, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, 64))

    def forward(self, x, c_noise, cond=None):
        b = x.shape[0]
        e = c_noise.reshape(b, 1).float() * self.freqs
        v = cond["aug"].float() if self.conditioned else torch.zeros(b, AUG_DIM)
        return self.net(torch.cat([x.reshape(b, -1), e.sin(), e.cos(), v], 1)).reshape(x.shape)


def quadrant(images):
    """Index of the brightest quadrant: 0 top-left (the data's), 1-3 the quarter turns of it."""
    m = images[:, 0].float()
    return torch.stack([m[:, :4, :4].sum((1, 2)), m[:, :4, 4:].sum((1, 2)), m[:, 4:, 4:].sum((1, 2)),
                        m[:, 4:, :4].sum((1, 2))], 1).argmax(1)


def rotated_share(tmp_path, conditioned: bool) -> float:
    from torchdiffusion.config.build import build_sampler, build_sigmas
    from torchdiffusion.config.schema import SampleConfig
    from torchdiffusion.pipelines.generate import generate
    x = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    x[:, :, :3, :3] = 255  # every training image: a square in the top-left quadrant
    cond = Conditioning([AugmentConditioner("aug", AugmentConfig(p=0.75, xflip=0, translate=0, scale=0, aniso=0,
                                                                 rotate=0, rotate90=1), seed=0)])
    torch.manual_seed(0)
    t = Trainer(TrainConfig(steps=400, batch_size=64, lr=2e-3, warmup_steps=20, log_every=1000, val_every=10 ** 6,
                            sample_every=10 ** 6, ckpt_every=10 ** 6, ema_halflife_images=500),
                model=Preconditioned(TinyMLP(conditioned), EDM(), Preconditioner("edm")),
                objective=Objective("lognormal", "edm"), train_set=ImageArrayDataset(x), val_set=None, run_dir=tmp_path,
                seed=0, resolved_config={}, data_fingerprint="f", progress=False,
                make_cond=cond if conditioned else None, augment=cond.augment)
    t.fit()
    sc = SampleConfig(sampler="dpmpp_2m", steps=12)
    samples = generate(t.ema, list(range(64)), (1, 8, 8), build_sampler(sc), build_sigmas(sc, t.ema.process), batch=64,
                       cond_for=cond.cond_for)  # augmentation vector 0
    return float((quadrant(samples) != 0).float().mean())


def test_heavy_rotation_augmentation_does_not_leak_into_samples(tmp_path):
    """75% of the training images are turned by 90, 180 or 270 degrees. Told the vector, the model samples the
    data's orientation at vector 0; the control (same augmented data, vector hidden) samples turned images, so
    the measurement can tell a leak."""
    assert rotated_share(tmp_path / "cond", True) < 0.1
    assert rotated_share(tmp_path / "control", False) > 0.4

"""Parity with diffusers itself: random UNet2DModels saved with save_pretrained load here (config/interop.py) and
give diffusers' network output and diffusers' DDIMScheduler samples; our U-Net runs exported to the diffusers
layout load in diffusers and give our outputs.

Runs only where diffusers is importable (the peers environment: `make test-peers`). The DDIM comparison uses the
mapping of docs/interop.md: the grid sigma_table[t_j] for diffusers' timesteps t_j, then 0, and the start noise
rescaled from x_T = z to the frame (diffusers_start_noise).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

diffusers = pytest.importorskip("diffusers")

from torchdiffusion.config.interop import (diffusers_start_noise, export_diffusers, load_diffusers,  # noqa: E402
                                           scheduler_sigmas)
from torchdiffusion.config.loaders import load_run  # noqa: E402
from torchdiffusion.core import grids  # noqa: E402
from torchdiffusion.sampling.ancestral import sample_ddim  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import make_diffusers_fixture as fixture  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _save(tmp_path, attention, prediction, schedule):
    model = fixture.tiny_unet(seed=3, attention=attention)
    sched = fixture.tiny_scheduler(prediction, schedule)
    model.save_pretrained(tmp_path, safe_serialization=True)
    sched.save_pretrained(tmp_path)
    return model, sched


CASES = [(True, "epsilon", "linear"), (False, "epsilon", "linear"), (True, "v_prediction", "squaredcos_cap_v2"),
         (False, "v_prediction", "scaled_linear")]
IDS = ["attn-eps-linear", "noattn-eps-linear", "attn-v-cosine", "noattn-v-scaledlinear"]


@pytest.mark.parametrize("attention,prediction,schedule", CASES, ids=IDS)
def test_same_network_output_as_diffusers(tmp_path, attention, prediction, schedule):
    model, sched = _save(tmp_path, attention, prediction, schedule)
    loaded = load_diffusers(tmp_path)
    torch.testing.assert_close(loaded.process.alphas_cumprod(), sched.alphas_cumprod.double(), rtol=2e-5, atol=0)
    x_t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 17, 500, 999])
    sig = loaded.process.sigmas()[t]
    with torch.no_grad():
        ref = model(x_t, t).sample
        F, _, _ = loaded.model.raw(x_t * (1 + sig**2).sqrt().float().reshape(-1, 1, 1, 1), sig.float())
        # the denoiser contract: D = x0 estimate; diffusers' own x0 from its output
        D = loaded.model(x_t * (1 + sig**2).sqrt().float().reshape(-1, 1, 1, 1), sig.float())
    torch.testing.assert_close(F, ref, atol=1e-5, rtol=1e-5)
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x0 = (x_t - (1 - a).sqrt() * ref) / a.sqrt() if prediction == "epsilon" else a.sqrt() * x_t - (1 - a).sqrt() * ref
    torch.testing.assert_close(D, x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention,prediction,schedule", CASES, ids=IDS)
@pytest.mark.parametrize("steps,spacing", [(10, "leading"), (8, "trailing")])
def test_same_ddim_samples_as_diffusers(tmp_path, attention, prediction, schedule, steps, spacing):
    model, _ = _save(tmp_path, attention, prediction, schedule)
    sched = diffusers.DDIMScheduler.from_pretrained(tmp_path, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    loaded = load_diffusers(tmp_path)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = z.clone()
        for tt in sched.timesteps:
            x = sched.step(model(x, tt).sample, tt, x).prev_sample
        sigmas = scheduler_sigmas(loaded.process, sched.timesteps)
        # the discrete grid kind picks diffusers' timesteps for each spacing
        assert torch.equal(grids.discrete(loaded.process.sigmas(), steps, spacing), sigmas)
        ours = sample_ddim(loaded.model, diffusers_start_noise(z, float(sigmas[0])), sigmas)
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_committed_fixture_still_matches_diffusers():
    """tests/fixtures/diffusers_unet_tiny/reference.safetensors (checked without diffusers in test_interop.py) is
    what this diffusers computes from the committed weights."""
    ref = safetensors.torch.load_file(str(fixture.FIXTURE / "reference.safetensors"))
    model = diffusers.UNet2DModel.from_pretrained(fixture.FIXTURE).eval()
    sched = diffusers.DDIMScheduler.from_pretrained(fixture.FIXTURE)
    again = fixture.reference(model, sched, steps=len(ref["timesteps"]))
    for key in ref:
        torch.testing.assert_close(again[key], ref[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backbone", [{"attn_resolutions": ()}, {}, {"scale_shift_norm": False}],
                         ids=["no-attention", "attention", "additive-emb"])
def test_exported_unet_loads_in_diffusers(tmp_path, backbone):
    from test_interop import _random_unet_run
    run = _random_unet_run(tmp_path, **backbone)
    out = export_diffusers(run, tmp_path / "exported")
    model = diffusers.UNet2DModel.from_pretrained(out).eval()
    sched = diffusers.DDPMScheduler.from_pretrained(out)
    ours = load_run(run).model
    torch.testing.assert_close(sched.alphas_cumprod.double(), ours.process.alphas_cumprod(), rtol=2e-5, atol=0)
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([5, 300, 999])
    sig = ours.process.sigmas()[t]
    with torch.no_grad():
        ref = model(x_t, t).sample
        F, _, _ = ours.raw(x_t * (1 + sig**2).sqrt().float().reshape(-1, 1, 1, 1), sig.float())
    assert F.abs().max() > 0.1
    torch.testing.assert_close(ref, F, atol=2e-5, rtol=2e-5)


def test_class_conditional_unet_same_output_as_diffusers(tmp_path):
    torch.manual_seed(5)
    model = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                                  layers_per_block=1, norm_num_groups=2, attention_head_dim=4, num_class_embeds=3,
                                  down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                                  resnet_time_scale_shift="scale_shift").eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    fixture.tiny_scheduler("epsilon", "linear").save_pretrained(tmp_path)
    loaded = load_diffusers(tmp_path)
    assert loaded.conditioning.specs[0].size == 3
    x_t, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 50, 900]), torch.tensor([0, 2, 1])
    sig = loaded.process.sigmas()[t]
    x = x_t * (1 + sig**2).sqrt().float().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        ref = model(x_t, t, class_labels=y).sample
        F = loaded.model.raw(x, sig.float(), {"label": y})[0]
        null = loaded.model.raw(x, sig.float(), {"label": torch.full_like(y, 3)})[0]
    torch.testing.assert_close(F, ref, atol=1e-5, rtol=1e-5)
    assert (null - ref).abs().max() > 1e-3  # the null label drops the class embedding

"""diffusers interop without diffusers (config/interop.py, nn/diffusers_unet.py; docs/interop.md).

The fixture tests/fixtures/diffusers_unet_tiny was written by diffusers (scripts/make_diffusers_fixture.py): a
random UNet2DModel with attention and its DDIMScheduler (v-prediction, squaredcos_cap_v2), plus diffusers' own
outputs in reference.safetensors. The loader must reproduce them here, where diffusers is not installed. The
comparisons against a live diffusers are in test_diffusers_parity.py (peers environment).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from tiny_runs import invoke

from torchdiffusion.config.interop import (convert_diffusers, diffusers_start_noise, export_config,
                                           export_diffusers, load_diffusers, map_scheduler, scheduler_sigmas)
from torchdiffusion.config.loaders import load_run
from torchdiffusion.errors import CheckpointError, ConfigError
from torchdiffusion.sampling.ancestral import sample_ddim

FIXTURE = Path(__file__).parent / "fixtures" / "diffusers_unet_tiny"
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def folder(tmp_path):
    """A copy of the fixture folder (the tests may edit it)."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "diffusers"))


def _ref():
    return safetensors.torch.load_file(str(FIXTURE / "reference.safetensors"))


def _network_output(loaded, x_t, t):
    """The backbone output F at diffusers' (x_t, t): frame x = x_t / s_t at sigma = sigma_table[t]."""
    sig = loaded.process.sigmas()[t]
    x = x_t * (1 + sig**2).sqrt().float().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        F, _, _ = loaded.model.raw(x, sig.float())
    return F


def test_fixture_network_output_matches_diffusers():
    ref = _ref()
    loaded = load_diffusers(FIXTURE)
    assert loaded.config.model.head == "v" and loaded.config.model.sigma_data == 1.0
    out = _network_output(loaded, ref["x_t"], ref["t"])
    assert ref["model_output"].abs().max() > 0.1  # a real output, not an untrained zero
    torch.testing.assert_close(out, ref["model_output"], atol=1e-5, rtol=1e-5)


def test_fixture_ddim_samples_match_diffusers():
    ref = _ref()
    loaded = load_diffusers(FIXTURE)
    sigmas = scheduler_sigmas(loaded.process, ref["timesteps"])
    with torch.no_grad():
        x = sample_ddim(loaded.model, diffusers_start_noise(ref["z"], float(sigmas[0])), sigmas)
    torch.testing.assert_close(x, ref["ddim_sample"], atol=1e-4, rtol=1e-4)
    # the start-noise rescaling matters at this precision only through sigma_max; without the model's own x0
    # estimate the samples would differ completely (a wrong head gives a different walk)
    wrong = load_diffusers(FIXTURE)
    wrong.model.precond = type(wrong.model.precond)("eps")
    with torch.no_grad():
        x_wrong = sample_ddim(wrong.model, diffusers_start_noise(ref["z"], float(sigmas[0])), sigmas)
    assert (x_wrong - ref["ddim_sample"]).abs().max() > 1e-2


def test_scheduler_sigmas_are_the_table_at_the_timesteps_then_zero():
    m = map_scheduler({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000})
    s = scheduler_sigmas(m.process, [900, 500, 0])
    table = m.process.sigmas()
    assert s.tolist() == [table[900].item(), table[500].item(), table[0].item(), 0.0]
    with pytest.raises(ConfigError, match="descending"):
        scheduler_sigmas(m.process, [0, 500])


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("T", [1000, 200])
def test_scheduler_betas_keep_the_end_points(schedule, T):
    """diffusers' linear betas are linspace(b0, b1, T), scaled_linear linspace(sqrt b0, sqrt b1, T)^2, for any T."""
    b0, b1 = 0.00085, 0.012
    p = map_scheduler({"num_train_timesteps": T, "beta_schedule": schedule, "beta_start": b0, "beta_end": b1}).process
    want = (torch.linspace(b0, b1, T, dtype=torch.float64) if schedule == "linear"
            else torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float64) ** 2)
    torch.testing.assert_close(p.betas(), want, rtol=1e-12, atol=0)


def test_scheduler_maps_to_samplers():
    ddpm = map_scheduler({"_class_name": "DDPMScheduler", "variance_type": "fixed_large", "clip_sample": True})
    assert (ddpm.sample.sampler, ddpm.sample.steps, ddpm.sample.variance) == ("ddpm", 1000, "large")
    assert any("clip_sample" in n for n in ddpm.notes)
    ddim = map_scheduler({"_class_name": "DDIMScheduler", "timestep_spacing": "trailing", "clip_sample": False})
    assert (ddim.sample.sampler, ddim.sample.grid, ddim.sample.spacing, ddim.notes) == ("ddim", "discrete",
                                                                                        "trailing", ())


@pytest.mark.parametrize("edit,match", [
    ({"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"]}, "CrossAttnDownBlock2D not supported; supported"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier' is not supported"),
    ({"resnet_time_scale_shift": "spatial"}, "resnet_time_scale_shift"),
    ({"sample_size": None}, "sample_size is null"),
    ({"some_new_option": 1}, "some_new_option not supported"),
])
def test_unsupported_unet_options_fail_in_one_line(folder, edit, match):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(edit)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match) as e:
        load_diffusers(folder)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit,match", [
    ({"_class_name": "EulerDiscreteScheduler"}, "supported: DDPMScheduler, DDIMScheduler"),
    ({"beta_schedule": "sigmoid"}, "supported: linear, scaled_linear, squaredcos_cap_v2"),
    ({"prediction_type": "flow"}, "supported: epsilon, v_prediction, sample"),
    ({"variance_type": "learned_range"}, "learned variance"),
    ({"rescale_betas_zero_snr": True}, "zero_snr"),
])
def test_unsupported_scheduler_options_fail_in_one_line(folder, edit, match):
    cfg = json.loads((folder / "scheduler_config.json").read_text())
    cfg.update(edit)
    (folder / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        load_diffusers(folder)


def test_missing_files_and_mismatched_weights(folder, tmp_path):
    (folder / "scheduler_config.json").unlink()
    with pytest.raises(ConfigError, match="no scheduler_config.json"):
        load_diffusers(folder)
    shutil.copy(FIXTURE / "scheduler_config.json", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["layers_per_block"] = 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not fit config.json"):
        load_diffusers(folder)
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled .bin weights are never loaded"):
        load_diffusers(folder)
    with pytest.raises(ConfigError, match="no such folder"):
        load_diffusers(tmp_path / "nothing")


def test_pipeline_layout_loads(tmp_path):
    """DDPMPipeline.save_pretrained's layout: unet/ and scheduler/ subfolders."""
    root = tmp_path / "pipe"
    shutil.copytree(FIXTURE, root / "unet")
    (root / "scheduler").mkdir()
    shutil.move(str(root / "unet" / "scheduler_config.json"), root / "scheduler")
    ref = _ref()
    out = _network_output(load_diffusers(root), ref["x_t"], ref["t"])
    torch.testing.assert_close(out, ref["model_output"], atol=1e-5, rtol=1e-5)


def test_converted_run_folder_works_with_every_command(tmp_path):
    run = tmp_path / "run"
    invoke(["convert-diffusers", FIXTURE, "--run", run])
    loaded, restored = load_diffusers(FIXTURE), load_run(run)
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 20.0])
    torch.testing.assert_close(restored.model(x, sigma), loaded.model(x, sigma), atol=0, rtol=0)
    assert restored.config.sample.sampler == "ddim"
    invoke(["sample", "--run", run, "--outdir", tmp_path / "out", "--seeds", "0-1", "--steps", "3"])
    assert len(list((tmp_path / "out").glob("0*.png"))) == 2
    r = invoke(["convert-diffusers", FIXTURE, "--run", run], expect=2)  # never overwritten silently
    assert "already holds checkpoints" in r.output


# ------------------------------------------------------------------------------------------------- export
def _random_unet_run(tmp_path, **backbone) -> Path:
    """A run folder of an untrained unet with random (non-zero) weights: config.yaml + one checkpoint."""
    from torchdiffusion.config.build import build_run_model
    from torchdiffusion.config.schema import ModelConfig, RunConfig
    from torchdiffusion.config.strict import to_dict
    from torchdiffusion.nn.unet import UNetConfig
    from torchdiffusion.train import checkpoint as ckpt

    net = UNetConfig(**{"model_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (4,),
                        "norm_groups": 4, "num_heads": 2, **backbone})
    cfg = RunConfig(model=ModelConfig(backbone=net, data_shape=(1, 8, 8)))
    torch.manual_seed(0)
    model = build_run_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    run = tmp_path / "ours"
    ckpt.save_checkpoint(run / "checkpoints", 0, tensors={"model": sd, "ema": sd},
                         meta={"config": to_dict(cfg), "trainer": {"step": 0}})
    return run


@pytest.mark.parametrize("backbone,atol", [({"attn_resolutions": ()}, 1e-5), ({}, 2e-5),
                                          ({"scale_shift_norm": False, "mid_attention": False}, 2e-5)])
def test_export_round_trip(tmp_path, backbone, atol):
    """Our U-Net exported to the diffusers layout and loaded back by the diffusers loader gives the same denoiser.
    Attention-free models agree to round-off (the sinusoid's frequencies are computed in float32 by diffusers, in
    float64 here); with attention, diffusers' attention GroupNorm uses norm_eps (1e-5) where ours uses 1e-6."""
    run = _random_unet_run(tmp_path, **backbone)
    out = export_diffusers(run, tmp_path / "exported")
    ours, back = load_run(run).model, load_diffusers(out).model
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 3
    sigma = ours.process.sigmas()[torch.tensor([5, 300, 999])].float()
    with torch.no_grad():
        a, b = ours.raw(x, sigma)[0], back.raw(x, sigma)[0]
    assert a.abs().max() > 0.1
    torch.testing.assert_close(b, a, atol=atol, rtol=atol)


@pytest.mark.parametrize("backbone,match", [({"channel_mult": (2, 2)}, "channel_mult"),
                                            ({"num_heads": 4, "channel_mult": (1, 2), "attn_resolutions": (8, 4)},
                                             "one attention_head_dim")])
def test_export_refuses_what_diffusers_cannot_hold(tmp_path, backbone, match):
    run = _random_unet_run(tmp_path, **backbone)
    with pytest.raises(ConfigError, match=match):
        export_config(load_run(run).config)
    r = invoke(["export-diffusers", "--run", run, "--out", tmp_path / "x"], expect=2)
    assert "cannot export" in r.output and not (tmp_path / "x").exists()


def test_training_does_not_resume_from_a_converted_run(tmp_path):
    """A converted run holds weights only: `train` on it is one line, not a traceback."""
    from tiny_runs import write_noise_pngs
    run = tmp_path / "run"
    convert_diffusers(FIXTURE, run)
    images = write_noise_pngs(tmp_path / "images", 4, shape=(8, 8))
    r = invoke(["train", "--run", run, "--no-progress", "--threads", "1", "--set", "data.kind=folder",
                "--set", f"data.path={images}", "--set", "data.val_split=null", "--set", "train.steps=1"], expect=1)
    assert "holds weights only" in r.output and "Traceback" not in r.output


def test_old_attention_names_load(folder):
    """Weights saved by diffusers' old attention blocks (query/key/value/proj_attn) load as today's names."""
    path = folder / "diffusion_pytorch_model.safetensors"
    sd = safetensors.torch.load_file(str(path))
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
           .replace(".to_out.0.", ".proj_attn."): v for k, v in sd.items()}
    assert old.keys() != sd.keys()
    safetensors.torch.save_file(old, str(path))
    ref = _ref()
    torch.testing.assert_close(_network_output(load_diffusers(folder), ref["x_t"], ref["t"]), ref["model_output"],
                               atol=1e-5, rtol=1e-5)

"""Write tests/fixtures/diffusers_unet_tiny: a randomly initialised diffusers UNet2DModel saved with
save_pretrained, its DDIMScheduler config, and reference outputs computed by diffusers itself (reference.safetensors):
the network's output at (x_t, t) and a 5-step DDIM loop from z. tests/test_interop.py checks that
torchdiffusion's loader reproduces them without diffusers; tests/test_diffusers_parity.py checks (where diffusers is
installed) that diffusers still computes them.

Run once in an environment with diffusers:  PYTHONPATH=src python scripts/make_diffusers_fixture.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "diffusers_unet_tiny"


def tiny_unet(seed: int = 0, attention: bool = True):
    from diffusers import UNet2DModel
    torch.manual_seed(seed)
    down = ("DownBlock2D", "AttnDownBlock2D") if attention else ("DownBlock2D", "DownBlock2D")
    up = ("AttnUpBlock2D", "UpBlock2D") if attention else ("UpBlock2D", "UpBlock2D")
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                       norm_num_groups=2, attention_head_dim=4, down_block_types=down, up_block_types=up,
                       add_attention=attention).eval()


def tiny_scheduler(prediction_type: str = "v_prediction", beta_schedule: str = "squaredcos_cap_v2"):
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type,
                         clip_sample=False)


def reference(model, scheduler, steps: int = 5) -> dict[str, torch.Tensor]:
    """diffusers' outputs: the network at (x_t, t), and a DDIM loop of `steps` steps from z."""
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 1, 8, 8, generator=g)
    t = torch.tensor([7, 640])
    z = torch.randn(2, 1, 8, 8, generator=g)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        out = model(x_t, t).sample
        x = z.clone()
        for tt in scheduler.timesteps:
            x = scheduler.step(model(x, tt).sample, tt, x).prev_sample
    return {"x_t": x_t, "t": t, "model_output": out, "z": z, "timesteps": scheduler.timesteps.clone(),
            "ddim_sample": x}


def main() -> int:
    import safetensors.torch
    model, scheduler = tiny_unet(), tiny_scheduler()
    FIXTURE.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(FIXTURE, safe_serialization=True)
    scheduler.save_pretrained(FIXTURE)
    safetensors.torch.save_file({k: v.contiguous() for k, v in reference(model, scheduler).items()},
                                str(FIXTURE / "reference.safetensors"))
    total = sum(p.stat().st_size for p in FIXTURE.iterdir())
    print(f"wrote {FIXTURE} ({total} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

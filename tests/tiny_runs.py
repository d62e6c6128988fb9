"""The command line in tests: `invoke` runs a command in-process, and TINY_RUN is the smallest unconditional
run folder worth sampling from (2 steps of an 8-channel U-Net on 64 MNIST images; conftest.py's `tiny_run`)."""
from __future__ import annotations

import torch
from click.testing import CliRunner

from torchdiffusion.cli.main import cli

TINY_RUN = [
    "data.limit=64", "data.val_split=null", "model.backbone.model_channels=8", "model.backbone.channel_mult=[1,2]",
    "model.backbone.num_res_blocks=1", "model.backbone.attn_resolutions=[]", "model.backbone.norm_groups=4",
    "model.backbone.num_heads=2", "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1",
    "train.sample_every=1000", "train.ckpt_every=2", "sample.steps=2", "sample.grid_images=2", "train.max_minutes=0",
    "train.precision=fp32", "train.steps=2",
]


def invoke(args, expect: int = 0):
    """`torchdiffusion ARGS` in this process (arguments str()-ed); asserts the exit code, keeps torch's thread
    count (--threads sets it for the whole process)."""
    threads = torch.get_num_threads()
    try:
        r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == expect, r.output
    return r


#: a short run for backbone/conditioner/codec tests: 32 images, validation every 2 steps, checkpoints every 2
SHORT_RUN = ["data.limit=32", "data.val_split=val", "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1",
             "train.val_every=2", "train.val_images=8", "train.sample_every=1000", "train.ckpt_every=2",
             "train.max_minutes=0", "train.precision=fp32", "sample.steps=2", "sample.grid_images=4"]


def train_short(run_dir, steps, extra=(), until=None):
    """`train` on SHORT_RUN for `steps` steps with extra --set overrides (optionally stopping at `until`)."""
    args = ["train", "--run", run_dir, "--no-progress", "--threads", "1"] + (["--until-step", until] if until else [])
    for s in SHORT_RUN + [f"train.steps={steps}"] + list(extra):
        args += ["--set", s]
    return invoke(args)


def write_noise_pngs(folder, n: int, shape=(28, 28), seed: int = 0):
    """n uint8 noise images NAME.png (0.png, 1.png, ...) in a new folder: inputs for restore."""
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True)
    g = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(g.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder

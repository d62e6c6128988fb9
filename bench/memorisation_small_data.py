"""Memorisation of a small training set, end to end through the command line: train, then audit.

64 MNIST digits (centre 16x16, averaged down to 8x8) are the whole training set; a small U-Net trained on them
for long reproduces them. `torchdiffusion audit` must flag most samples as near-copies by the ratio test and
find them far closer to the training images than 256 held-out digits (processed the same way) are.

    python bench/memorisation_small_data.py --workdir /tmp/mem64 [--steps 1500] [--threads 1]
    # -> /tmp/mem64/run/audit/audit.json and bench/results/memorisation_small_data.json

The same function backs the slow test tests/test_memorization.py::test_small_data_training_is_flagged.
Heavy for a shared 2-core machine (~1-3 min): run it as `flock /tmp/td-heavy.lock nice -n 5 python ...`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

N_TRAIN, N_HELDOUT, SIZE = 64, 256, 8


def digits_8x8(split: str, start: int, n: int) -> torch.Tensor:
    """MNIST digits [start, start + n) of `split`: centre 16x16 crop, 2x2 average -> uint8 (n, 1, 8, 8)."""
    from torchdiffusion.data import load_mnist
    x = load_mnist(split).x[start:start + n, :, 6:22, 6:22].float()
    return torch.nn.functional.avg_pool2d(x, 2).round().to(torch.uint8)


def write_folder(folder: Path, images: torch.Tensor) -> Path:
    from torchdiffusion.pipelines.generate import save_png
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        save_png(img, folder / f"{i:06d}.png")
    return folder


def settings(train_dir: Path, steps: int) -> list[str]:
    return [
        "data.kind=folder", f"data.path={train_dir}", "data.channels=L", "data.resolution=null", "data.val_split=null",
        "model.backbone.model_channels=16", "model.backbone.channel_mult=[1,2]", "model.backbone.num_res_blocks=1",
        "model.backbone.attn_resolutions=[]", "model.backbone.norm_groups=8", "model.backbone.mid_attention=false",
        f"train.steps={steps}", "train.batch_size=64", "train.lr=0.002", "train.warmup_steps=50",
        "train.lr_schedule=constant", "train.ema_halflife_images=2000", "train.precision=fp32",
        "train.log_every=50", f"train.sample_every={steps}", f"train.ckpt_every={steps}", "train.max_minutes=0",
        "sample.steps=18", "sample.grid_images=16",
    ]


def run(workdir: Path, steps: int = 1500, threads: int = 1, n_samples: int = 128) -> dict:
    """Train on 64 digits, audit 128 samples against them and 256 held-out digits; returns audit.json."""
    from click.testing import CliRunner

    from torchdiffusion.cli.main import cli

    workdir = Path(workdir)
    train_dir = write_folder(workdir / "train", digits_8x8("train", 0, N_TRAIN))
    held_dir = write_folder(workdir / "heldout", digits_8x8("val", 0, N_HELDOUT))
    run_dir = workdir / "run"
    t0 = time.perf_counter()
    args = ["train", "--preset", "folder", "--run", str(run_dir), "--no-progress", "--threads", str(threads)]
    for s in settings(train_dir, steps):
        args += ["--set", s]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    if r.exit_code != 0:
        raise RuntimeError(f"training failed: {r.output[-2000:]}")
    train_s = time.perf_counter() - t0
    r = CliRunner().invoke(cli, ["audit", "--run", str(run_dir), "--heldout-dir", str(held_dir), "--n", str(n_samples),
                                 "--heldout", str(N_HELDOUT), "--features", "random-conv", "--threads", str(threads)],
                           catch_exceptions=False)
    if r.exit_code != 0:
        raise RuntimeError(f"audit failed: {r.output[-2000:]}")
    rec = json.loads((run_dir / "audit" / "audit.json").read_text())
    rec["bench"] = {"train_steps": steps, "train_s": round(train_s, 1), "threads": threads, "n_train": N_TRAIN,
                    "image_size": SIZE, "torch": torch.__version__}
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memorisation_small_data.json")
    a = p.parse_args(argv)
    rec = run(a.workdir, a.steps, a.threads)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    keep = {k: rec[k] for k in ("bench", "spaces", "val_loss", "verdict", "criteria", "data", "timings")}
    keep["data"] = {k: v for k, v in keep["data"].items() if k not in ("train", "heldout")}
    a.out.write_text(json.dumps(keep, indent=1) + "\n")
    for name, s in rec["spaces"].items():
        print(f"{name:>12}: near-copies {s['share_ratio']:.1%} (held-out images {s['heldout_share_ratio']:.1%}), "
              f"closer than 1% of held-out {s['share_heldout']:.1%}, median d1 samples/held-out "
              f"{s['median_d1_over_heldout']:.3f}")
    print(f"train {rec['bench']['train_s']} s for {a.steps} steps -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

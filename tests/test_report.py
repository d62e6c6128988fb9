"""Run report: a static page with relative links only, every image present, and (when Debian's chromium is
installed) rendered by a real headless browser with no broken image.

Manual check with a screenshot (see docs/report.md):
    torchdiffusion report RUN && chromium --headless --no-sandbox --disable-gpu --window-size=1300,2400 \
        --screenshot=report.png RUN/report/index.html
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from torchdiffusion.cli.main import cli
from torchdiffusion.pipelines.generate import make_grid, save_png
from torchdiffusion.pipelines.report import pick_grids, read_metrics, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _images(n, seed, size=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((n, 1, size, size), generator=g) * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as `train` and `audit` leave it: config, metrics with val/FID/KID rows, 15 grids, an audit."""
    d = tmp_path_factory.mktemp("run")
    (d / "config.yaml").write_text("seed: 0\ndata:\n  kind: folder\nmodel:\n  head: edm  # <b>not html</b>\n")
    lines = ["step,images,loss,grad_norm,lr,val_loss,images_per_s,wall_s,fid,kid,kid_std"]
    for s in range(1, 301):
        val = f"{0.5 + 0.3 / s ** 0.5:.5f}" if s % 20 == 0 else ""
        fid = f"{100 / s ** 0.5:.4f}" if s % 50 == 0 else ""
        kid = f"{0.1 / s ** 0.5:.5f}" if s % 50 == 0 else ""
        std = "0.002" if kid else ""
        lines.append(f"{s},{s * 8},{1 / s ** 0.3:.5f},1.0,0.001,{val},100.0,{s * 0.1:.1f},{fid},{kid},{std}")
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")
    (d / "samples").mkdir()
    for s in range(20, 301, 20):
        save_png(make_grid(_images(16, s)), d / "samples" / f"grid_{s:08d}.png")
    # a real audit of a folder of images, written where the report looks for it
    pool = _images(160, 0)
    for name, imgs in (("train", pool[:100]), ("held", pool[100:140]), ("fake", torch.cat([pool[:5], pool[140:]]))):
        (d.parent / name).mkdir(exist_ok=True)
        for i, img in enumerate(imgs):
            save_png(img, d.parent / name / f"{i:06d}.png")
    r = CliRunner().invoke(cli, ["audit", "--images", d.parent / "fake", "--train-dir", d.parent / "train",
                                 "--heldout-dir", d.parent / "held", "--heldout", "40", "--features", "none",
                                 "--out", d / "audit"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return d


def test_report_is_static_with_relative_links_to_existing_files(run_dir, tmp_path):
    r = CliRunner().invoke(cli, ["report", str(run_dir), "--out", str(tmp_path / "rep")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "index.html").read_text()
    srcs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert srcs, "no images in the report"
    for s in srcs:
        assert "://" not in s and not s.startswith("/") and ".." not in s, s
        assert (tmp_path / "rep" / s).is_file(), s
    assert "http" not in page.lower().replace("http-equiv", "")
    # 15 grids -> 12 shown, first and last included; curves of all four columns; the audit panel; escaped config
    assert sum("grid_" in s for s in srcs) == 12 and "grid_00000300.png" in srcs and "grid_00000020.png" in srcs
    for key in ("loss", "val_loss", "fid", "kid"):
        assert f"curve_{key}.png" in srcs
    assert "audit_panel.png" in srcs and "near-copies" in page
    assert "&lt;b&gt;not html&lt;/b&gt;" in page and "<b>not html</b>" not in page
    # the folder stands alone: moved elsewhere, it still has every file it links
    moved = shutil.copytree(tmp_path / "rep", tmp_path / "moved")
    assert all((moved / s).is_file() for s in srcs)


def test_grid_selection_and_metrics_reading(run_dir):
    grids = pick_grids(run_dir / "samples", limit=4)
    assert [s for s, _ in grids] == [20, 120, 200, 300]  # indices round(i * 14 / 3)
    series = read_metrics(run_dir / "metrics.csv")
    assert len(series["loss"]) == 300 and len(series["val_loss"]) == 15 and len(series["fid"]) == 6
    assert series["kid_std"][0] == (50, 0.002)


def test_report_of_a_bare_run_notes_what_is_missing(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,loss\n1,0.5\n2,0.4\n")
    page = write_report(tmp_path).read_text()
    assert "No training grids" in page and "No memorisation audit yet" in page and "(no config.yaml)" in page
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "missing")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "no such run folder" in r.output


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    index = write_report(run_dir, tmp_path / "rep")
    n_img = index.read_text().count("<img ")
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run(base + ["--dump-dom", index.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f'data-images-ok="{n_img}"' in dom.stdout and 'data-images-broken="0"' in dom.stdout
    shot = tmp_path / "shot.png"
    r = subprocess.run(base + ["--window-size=1300,2400", f"--screenshot={shot}", index.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as im:
        gray = im.convert("L")
        lo, hi = gray.getextrema()
        assert im.size == (1300, 2400) and hi - lo > 100  # something was drawn, not a blank page

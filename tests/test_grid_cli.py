"""`torchdiffusion grid optimize` / `grid show` and `sample --grid optimized` on a tiny trained model
(`tiny_run`, tests/conftest.py)."""
from __future__ import annotations

import json

import pytest
from tiny_runs import invoke as run

from torchdiffusion.core import grids


def test_optimize_show_and_sample_with_the_grid(tiny_run, tmp_path):
    r = run(["grid", "optimize", "--run", tiny_run, "--sampler", "unipc", "--steps", "3", "--pilot-seeds", "4",
             "--candidates", "8", "--substeps", "1", "--sweeps", "1", "--threads", "1"])
    path = tiny_run / "grids" / "unipc_n3.json"
    assert str(path) in r.output and "pilot RMS error" in r.output
    sig, meta = grids.load_grid(path, 3)
    assert meta["sampler"] == "unipc" and meta["pilot_rms_error"] <= meta["dp_pilot_rms_error"]
    shown = json.loads(run(["grid", "show", path]).output)
    assert shown["sigmas"] == sig.tolist()
    out = tmp_path / "s"
    run(["sample", "--run", tiny_run, "--outdir", out, "--seeds", "0-1", "--sampler", "unipc", "--steps", "3",
         "--grid", "optimized", "--grid-file", path])
    rec = json.loads((out / "samples.json").read_text())
    assert rec["grid"] == "optimized" and rec["sigmas"] == pytest.approx(sig.tolist())


def test_errors_are_one_line(tiny_run, tmp_path):
    r = run(["sample", "--run", tiny_run, "--outdir", tmp_path / "s", "--seeds", "0", "--steps", "3",
             "--grid", "optimized"], expect=2)
    assert "grid_file" in r.output and r.output.count("\n") == 1
    r = run(["sample", "--run", tiny_run, "--outdir", tmp_path / "s", "--seeds", "0", "--steps", "4",
             "--grid", "optimized", "--grid-file", tmp_path / "missing.json"], expect=2)
    assert "does not exist" in r.output and r.output.count("\n") == 1
    r = run(["grid", "optimize", "--run", tiny_run, "--sampler", "unipc", "--sampler-opt", "colour=3"], expect=2)
    # the same parser as `sample --sampler-opt`: it names the sampler's valid options
    assert "no such option of sampler 'unipc'" in r.output and "order (default 2)" in r.output
    assert r.output.count("\n") == 1

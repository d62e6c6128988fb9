"""bench/gpu.sh's harness (bench/gpu_bench.py) runs end to end on the CPU at tiny sizes, for our U-Net and DiT, so
the one accelerator call it is written for does not fail on a detail."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_bench.py"


@pytest.mark.parametrize("model,preset", [("unet", "tiny"), ("dit", "tiny-dit")])
def test_gpu_bench_runs_on_cpu(tmp_path, model, preset):
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    mod.main(["--model", model, "--presets", preset, "--device", "cpu", "--batch", "2", "--sample-batch", "2",
              "--steps", "1", "--modes", "fp32,bf16", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["fp32", "bf16"]
    for r in rows:
        assert r["train_img_s"] > 0 and r["sample_img_s_nfe10"] > 0 and r["fwd_bwd_gflop_per_img"] > 0
        # MFU is against the device's best matmul rate at any precision (fp32 on a CPU with emulated bf16), so it is
        # a fraction: < 1.5 leaves room for a peak timed on a busy CPU; rounded to 3 decimals, tiny models may show 0
        assert 0 <= r["mfu_measured"] < 1.5

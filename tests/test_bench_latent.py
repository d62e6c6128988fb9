"""bench/latent_vs_pixel.py end to end at a tiny budget (every stage: two first stages, three diffusion models,
samples, FID/KID, JSON and plot). Marked slow (about a CPU-minute of subprocesses): `pytest -m slow`."""
import importlib.util
import json
import math
from pathlib import Path

import pytest


@pytest.mark.slow
def test_latent_vs_pixel_bench_runs_end_to_end_at_a_tiny_budget(tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "latent_vs_pixel.py"
    spec = importlib.util.spec_from_file_location("latent_vs_pixel", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    result = bench.main(["--tiny", "--minutes", "0.02", "--ae-minutes", "0.02", "--n", "16", "--real", "64",
                         "--probe-steps", "5", "--threads", "1", "--workdir", str(tmp_path / "w"), "--out", str(out),
                         "--plot", str(png)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result)) and png.stat().st_size > 1000
    models = result["models"]
    assert set(models) == {"pixel", "kl", "vq"} and set(result["first_stages"]) == {"kl", "vq"}
    for name, m in models.items():
        assert math.isfinite(m["fid"]) and m["kid"] is not None and m["images_per_s"] > 0
        assert m["total_cpu_minutes"] == pytest.approx(m["cpu_minutes"] + m["ae_cpu_minutes"], abs=1e-3)
        assert (m["latent_shape"] is None) == (name == "pixel")
    assert models["kl"]["latent_shape"] == [3, 8, 8] and models["pixel"]["ae_cpu_minutes"] == 0.0
    assert "val_psnr" in result["first_stages"]["vq"]["recon"]  # the first stage ended with its validation
    # a second call reuses every finished stage
    again = bench.main(["--tiny", "--minutes", "0.02", "--n", "16", "--real", "64", "--threads", "1",
                        "--workdir", str(tmp_path / "w"), "--out", str(out), "--plot", str(png)])
    assert again["models"]["kl"]["fid"] == models["kl"]["fid"]

"""bench/tokens_fashion.py end to end at a tiny budget (VQ first stage, token model, MaskGIT and ancestral samples,
FID/KID, JSON). Marked slow (subprocesses, about a CPU-minute): `pytest -m slow`."""
import importlib.util
import json
import math
from pathlib import Path

import pytest


@pytest.mark.slow
def test_tokens_bench_runs_end_to_end_at_a_tiny_budget(tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "tokens_fashion.py"
    spec = importlib.util.spec_from_file_location("tokens_fashion", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    args = ["--tiny", "--minutes", "0.05", "--ae-minutes", "0.05", "--steps", "4", "--n", "16", "--real", "64",
            "--probe-steps", "3", "--maskgit-steps", "2,4", "--ancestral-steps", "5", "--threads", "1",
            "--workdir", str(tmp_path / "w"), "--out", str(out)]
    result = bench.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [(r["sampler"], r["steps"]) for r in result["samples"]] == [("maskgit", 2), ("maskgit", 4),
                                                                       ("ancestral", 5)]
    for r in result["samples"]:
        assert math.isfinite(r["fid"]) and r["kid"] is not None and r["images_per_s"] > 0
    again = bench.main(args)  # every finished stage is reused
    assert again["samples"][0]["fid"] == result["samples"][0]["fid"]

#!/usr/bin/env bash
# Analytic sampler benchmark: torchdiffusion's samplers next to k-diffusion's and diffusers', all driven by
# the same exact Gaussian-mixture denoiser (see bench/README_analytic.md).
#
#   bash bench/analytic.sh                       # all problems, all NFE targets (peers + ours)
#   bash bench/analytic.sh --problems gmm64      # extra arguments go to analytic_bench.py
#
# Environment: BENCH_DIR (the referee bench folder, default ../shared/bench next to this repository),
# PEERS_VENV (default ../peers-venv; built with the bench's setup script if missing), THREADS (default 1:
# the quality metrics do not depend on it, and one thread keeps wall times sane on a shared machine).
# Writes bench/results/analytic_torchdiffusion.{csv,md}, bench/results/analytic_parity.txt and, for the
# held-out problems of bench/heldout_problems.py (HELDOUT=0 skips them),
# bench/results/analytic_torchdiffusion_heldout.{csv,md}. The optimised grids of the *_opt rows are computed
# first by bench/analytic_grids.py (cached in bench/results/grids/; delete a file to recompute it).
set -euo pipefail

THREADS="${THREADS:-1}"
# shellcheck source=bench/peers_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/peers_env.sh" analytic_bench.py

"$PY" "$REPO/bench/analytic_grids.py" --bench-dir "$BENCH_DIR" --threads "$THREADS" \
    --problems gmm2d,gmm64,digits64,fashion64,ring16

cd "$BENCH_DIR"
"$PY" analytic_bench.py --threads "$THREADS" \
    --adapter "$REPO/bench/adapters/torchdiffusion_analytic.py" \
    --out-dir "$OUT" --tag torchdiffusion "$@"

# Sample-by-sample parity with the same seed and grid: our euler/heun vs k-diffusion's, our DDIM/DDPM vs
# diffusers' schedulers (T=1000 linear betas). Differences should be float32 round-off.
"$PY" - "$BENCH_DIR" "$REPO" <<'PYEOF' | tee "$OUT/analytic_parity.txt"
import os, sys
import torch
bench, repo = sys.argv[1], sys.argv[2]
sys.path.insert(0, bench)
torch.set_num_threads(1)
from analytic_bench import Oracle
from analytic_problems import make_problem
from benchutil import load_adapter
ours = load_adapter(os.path.join(repo, "bench/adapters/torchdiffusion_analytic.py")).get_samplers()
peers = {"k-diffusion": load_adapter(os.path.join(bench, "adapters/kdiffusion_samplers.py")).get_samplers(),
         "diffusers": load_adapter(os.path.join(bench, "adapters/diffusers_samplers.py")).get_samplers()}
pairs = [("euler", "k-diffusion"), ("heun", "k-diffusion"), ("ddim", "diffusers"),
         ("ddim_trailing", "diffusers"), ("ddpm", "diffusers"), ("unipc_diffusers", "diffusers/unipc")]
print("problem gmm64, n=500, seed 0: |ours - peer| per coordinate, same generator")
print(f"{'ours':14s} {'peer':26s} {'nfe':>4s} {'max|diff|':>10s} {'mean|diff|':>10s} {'mean|x|':>8s}")
problem = make_problem("gmm64")
for name, fw in pairs:
    for nfe in (5, 20, 100):
        xa = ours[name](Oracle(problem), 500, nfe, torch.Generator().manual_seed(0))
        fw_name, _, peer_name = fw.partition("/")
        peer_name = peer_name or name
        xb = peers[fw_name][peer_name](Oracle(problem), 500, nfe, torch.Generator().manual_seed(0))
        d = (xa - xb).abs()
        print(f"{name:14s} {fw_name + '/' + peer_name:26s} {nfe:4d} {d.max().item():10.3g} {d.mean().item():10.3g} "
              f"{xb.abs().mean().item():8.3g}", flush=True)
PYEOF

if [ "${HELDOUT:-1}" != "0" ]; then
    "$PY" "$REPO/bench/analytic_heldout.py" --bench-dir "$BENCH_DIR" --threads "$THREADS"
fi

#!/usr/bin/env bash
# Training/sampling throughput of torchdiffusion's UNet beside diffusers' UNet2DModel, side by side
# in one run, with the shared referee script (throughput_bench.py) on the presets `s` and
# `ddpm-cifar10` (32x32, batch 16, fp32). Results land in bench/results/ (never in the shared folder).
#
# usage: bash bench/throughput.sh [PEERS_VENV] [SHARED_BENCH_DIR]   (or the same as environment variables)
#   PEERS_VENV        the venv built by the shared setup_peers_venv.sh, with this package installed
#                     into it (pip install --no-deps -e .); default ../peers-venv
#   SHARED_BENCH_DIR  the referee scripts; default ../shared/bench
# environment: THREADS (2), WAIT_IDLE seconds to wait for an idle machine (120), PRESETS ("s ddpm-cifar10"),
#              ROUNDS (1): ours and the peer alternate this many times per preset, so drifting load
#              hits both alike.
set -euo pipefail
PEERS_VENV="${1:-${PEERS_VENV:-}}"
BENCH_DIR="${2:-${BENCH_DIR:-}}"
[ -n "$PEERS_VENV" ] || unset PEERS_VENV
[ -n "$BENCH_DIR" ] || unset BENCH_DIR
THREADS="${THREADS:-2}"
WAIT_IDLE="${WAIT_IDLE:-120}"
PRESETS="${PRESETS:-s ddpm-cifar10}"
ROUNDS="${ROUNDS:-1}"
# shellcheck source=bench/peers_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/peers_env.sh" throughput_bench.py
for preset in $PRESETS; do
  for round in $(seq 1 "$ROUNDS"); do
    "$PY" "$BENCH_DIR/throughput_bench.py" --adapter "$REPO/bench/adapters/torchdiffusion_unet.py" --preset "$preset" \
      --threads "$THREADS" --wait-idle "$WAIT_IDLE" --tag "torchdiffusion_t${THREADS}_r$round" --out-dir "$OUT"
    "$PY" "$BENCH_DIR/throughput_bench.py" --adapter "$BENCH_DIR/adapters/diffusers_unet.py" --preset "$preset" \
      --threads "$THREADS" --wait-idle "$WAIT_IDLE" --tag "diffusers_t${THREADS}_r$round" --out-dir "$OUT"
  done
done
"$PY" "$REPO/bench/throughput_compare.py" "$OUT" | tee "$OUT/throughput_compare.md"

#!/usr/bin/env bash
# One call on an accelerator machine: our U-Net and DiT beside diffusers' UNet2DModel and DiTTransformer2DModel,
# measured by the same harness (bench/gpu_bench.py) in the same process environment, then the ratios.
#
# usage: bash bench/gpu.sh [--device cuda|cpu]
#   cuda (default): presets s and ddpm-cifar10 (U-Net) and dit-s, batch 512, modes fp32, bf16, bf16+cl,
#                   bf16+cl+compile, sampling at NFE 10 also with CUDA graphs; about 6-8 minutes on one H200.
#   cpu:            the smoke run of the same script (tiny presets, batch 4, 2 steps): checks it runs end to end.
# environment: PY (python3), OUT (results folder; default bench/results/gpu), and diffusers importable for the
# peer rows (missing: the peer rows are skipped with a line saying so).
set -uo pipefail
DEVICE=cuda
[ "${1:-}" = "--device" ] && DEVICE="${2:-cuda}"
PY="${PY:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/bench/results/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DEVICE" = "cpu" ]; then
  UNET="tiny"; DIT="tiny-dit"; ARGS=(--device cpu --batch 4 --sample-batch 4 --steps 2 --modes fp32,bf16)
else
  UNET="s,ddpm-cifar10"; DIT="dit-s"; ARGS=(--device cuda --batch 512 --sample-batch 512 --steps 20)
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
fi
have_diffusers=1
"$PY" -c "import diffusers" 2>/dev/null || { have_diffusers=0; echo "diffusers is not importable: peer rows skipped"; }
run() {  # name model presets extra-args...
  local name=$1 model=$2 presets=$3; shift 3
  "$PY" "$ROOT/bench/gpu_bench.py" --model "$model" --presets "$presets" "${ARGS[@]}" "$@" --out "$OUT/$name.json" \
    || echo "$name failed (exit $?)"
}
run unet_ours unet "$UNET"
[ $have_diffusers = 1 ] && run unet_diffusers unet-diffusers "$UNET"
run dit_ours dit "$DIT"
[ $have_diffusers = 1 ] && run dit_diffusers dit-diffusers "$DIT"
if [ "$DEVICE" = "cuda" ]; then  # sampling with CUDA graphs, bf16 + channels-last only
  run unet_ours_graphs unet "$UNET" --modes bf16+cl --graphs
  [ $have_diffusers = 1 ] && run unet_diffusers_graphs unet-diffusers "$UNET" --modes bf16+cl --graphs
fi
"$PY" "$ROOT/bench/gpu_compare.py" "$OUT" | tee "$OUT/summary.md"

# Sourced by the bench scripts: locate the repository, the referee bench folder and the peers venv.
#   BENCH_DIR   the referee scripts (default ../shared/bench next to this repository)
#   PEERS_VENV  the venv of setup_peers_venv.sh (default ../peers-venv); built if missing, and this package
#               is installed into it without dependencies
# Sets REPO, BENCH_DIR, PEERS_VENV, PY, OUT. $1: a referee script that must exist in BENCH_DIR.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="${BENCH_DIR:-$REPO/../shared/bench}"
PEERS_VENV="${PEERS_VENV:-$REPO/../peers-venv}"
OUT="$REPO/bench/results"
PY="$PEERS_VENV/bin/python"
if [ ! -f "$BENCH_DIR/$1" ]; then
    echo "error: no $1 in BENCH_DIR=$BENCH_DIR; set BENCH_DIR to the referee bench folder" >&2
    exit 2
fi
if [ ! -x "$PY" ] || ! "$PY" -c "import diffusers" 2>/dev/null; then
    echo "building the peers environment in $PEERS_VENV" >&2
    bash "$BENCH_DIR/setup_peers_venv.sh" "$PEERS_VENV"
fi
"$PY" -m pip install -q --no-deps -e "$REPO"
mkdir -p "$OUT"

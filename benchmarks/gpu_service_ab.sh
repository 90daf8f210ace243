#!/usr/bin/env bash
# A prepared service experiment for a lent GPU machine, after gpu_check.sh when device time
# is left (about 100 s per run, 5-6 minutes for the three; carry .whl, as for gpu_check.sh):
#
#   bash benchmarks/gpu_service_ab.sh
#
# The service on the GPU at 8 front ends (`serve --workers 8`), loaded as gpu_check.sh's
# service steps load it (bench_loadtest.py: 8 client processes, 8-image COCO-like SPARSE
# requests, closed loops then an open loop at 80% of the best unary rate), three ways:
#   block  the default: compute workers sleep while they wait for the GPU (--gpu-wait block)
#   spin   the waits of run5-run12 (--gpu-wait spin; CUDA's own choice spins there), where
#          the server spent 2.7-4.2 CPU ms per request against 0.55 in one process
#   mps    block, with the 8 front ends' CUDA contexts served by one MPS daemon
#          (nvidia-cuda-mps-control), so that their kernels share the GPU instead of taking
#          turns; skipped where the machine has no MPS or its daemon does not start
# The issue's figures to read: images/s, the open loop's p99 (goal <= 20 ms) and the
# server's CPU ms per request. (The tables' in-process baseline waits as CUDA chooses in
# every run: the flag is the server's.) Runs go one after another, so the machine's drift
# shows only when a run is repeated: AB_RUNS="block spin mps block" where time allows. Writes service_ab.txt (each run's table, one after another)
# and service_ab.tar.gz (the runs' JSON, CSV and plots) under $OUT (default
# benchmarks/results/gpu_service_ab). AB_RUNS picks and orders the runs (default
# "block spin mps"); AB_WORKERS the front ends (default 8); AB_BACKEND=cpu AB_WORKERS=2
# checks the script itself on a machine without a GPU (the flag changes nothing there).
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/benchmarks/results/gpu_service_ab}"
if [ -x "$REPO/.venv/bin/python" ]; then  # as gpu_check.sh: a development machine's venv, else the image's
    PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
else
    PYTHON="${PYTHON:-python3}"
fi
PYTHON="$(command -v "$PYTHON")" || { echo "gpu_service_ab: no Python interpreter" >&2; exit 1; }
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$REPO"
SCRATCH="$(mktemp -d)"
stop_mps() {  # a daemon this script started, if any
    [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] && echo quit | nvidia-cuda-mps-control >/dev/null 2>&1
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}
trap 'stop_mps; rm -rf "$SCRATCH"' EXIT

# shellcheck source=benchmarks/tritarget_shim.sh
source "$REPO/benchmarks/tritarget_shim.sh"
install_carried_wheels "$PYTHON" "$SCRATCH/site" || [ "${AB_BACKEND:-triton}" = cpu ] || exit 1
use_tritarget_uninstalled "$REPO" "$SCRATCH/shim"
python_on_path "$PYTHON" "$SCRATCH/bin"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

workers="${AB_WORKERS:-8}"
report="$OUT/service_ab.txt"
{
    date -u
    echo "$wheel_note"
    nvidia-smi --query-gpu=name,driver_version,compute_mode --format=csv,noheader || true
} | tee "$report"

status=0
unknown=0
port=50081
load() {  # load NAME [SERVER FLAGS...]: one bench_loadtest.py run against a fresh server
    local name="$1"
    shift
    echo "== $name: serve --workers $workers $* ==" | tee -a "$report"
    timeout -s INT -k 10 100 "$PYTHON" benchmarks/bench_loadtest.py --backend "${AB_BACKEND:-triton}" --processes 8 --scale 4 \
        --duration 3 --warmup 1 --server-args "--workers $workers --port $port $*" --out "$SCRATCH/runs/$name" 2>&1 |
        tail -n 12 | tee -a "$report"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    # Packed after every run: a call cut at its limit brings back what $OUT holds then,
    # at most 8 files (each run writes 3 and a plot folder).
    [ -d "$SCRATCH/runs" ] && tar -czf "$OUT/service_ab.tar.gz.part" -C "$SCRATCH/runs" . &&
        mv "$OUT/service_ab.tar.gz.part" "$OUT/service_ab.tar.gz"
    # A run its timeout killed leaves its server's front ends holding the GPU and cores.
    pkill -f -- "--workers $workers --port $port" && sleep 2
    port=$((port + 1))  # the last server's port may linger in TIME_WAIT
}

mps() {  # the run under an MPS daemon of its own, stopped after it
    if ! command -v nvidia-cuda-mps-control >/dev/null; then
        echo "== mps: skipped, no nvidia-cuda-mps-control on this machine ==" | tee -a "$report"
        return
    fi
    export CUDA_MPS_PIPE_DIRECTORY="$SCRATCH/mps-pipe" CUDA_MPS_LOG_DIRECTORY="$SCRATCH/mps-log"
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    # The control daemon returns at once; its server starts with the first client, so one
    # short CUDA program tells whether MPS can serve here at all.
    if nvidia-cuda-mps-control -d &&
        timeout 60 "$PYTHON" -c 'import torch; torch.zeros(1, device="cuda"); torch.cuda.synchronize()'; then
        load mps --gpu-wait block
    else
        echo "== mps: skipped, no MPS server answered a CUDA program ==" | tee -a "$report"
    fi
    tail -n 5 "$CUDA_MPS_LOG_DIRECTORY/control.log" 2>/dev/null | sed 's/^/mps log: /' | tee -a "$report"
    stop_mps
}

for run in ${AB_RUNS:-block spin mps}; do
    case "$run" in
        block | spin) load "$run" --gpu-wait "$run" ;;
        mps) mps ;;
        *) echo "gpu_service_ab: unknown run '$run' in AB_RUNS (block, spin, mps)" | tee -a "$report"; unknown=1 ;;
    esac
done

[ "$unknown" = 1 ] && status=2
exit "$status"

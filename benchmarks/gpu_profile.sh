#!/usr/bin/env bash
# A prepared Nsight Compute profile for a lent GPU machine, after gpu_check.sh when time is
# left (about 3 minutes):
#
#   bash benchmarks/gpu_profile.sh
#
# Profiles the matching (the gather, or the pair walk's kernels) and the finalize of
# gpu_profile.py's batches (B = 32 at G ~ 7 and G = 200, B = 8 at G = 1,000; the sparse
# passes at G ~ 7 alone: 9 kernels, each replayed once per pass of its sections) with the
# sections that say what bounds them: throughput against the hardware's peaks (SpeedOfLight), occupancy and its limiters, where warps stall (WarpStateStats,
# SchedulerStats), memory and atomics traffic with L1 and L2 requests per kind of access
# (MemoryWorkloadAnalysis and its _Tables), instructions executed (InstructionStats: per
# anchor or pair, against the SASS counts of kernel_resources.md, which count code, not
# its execution) and the source lines they come from (SourceCounters). The clocks are left
# alone (--clock-control none, the device README's advice). ncu reads no counters on some
# machines' runtimes (gVisor); the error is then the result. Writes profile.txt (ncu's
# log), profile_details.txt (the sections as text) and pairs.ncu-rep under $OUT (default
# benchmarks/results/gpu_profile). ncu writes its report only when it exits: GPU_PROFILE_S
# (default 180) bounds it, to be set from the device time left (the call's timeout less
# ~30 s), so that a short call still ends with a report.
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/benchmarks/results/gpu_profile}"
mkdir -p "$OUT"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
# shellcheck source=benchmarks/tritarget_shim.sh
source "$REPO/benchmarks/tritarget_shim.sh"
use_tritarget_uninstalled "$REPO" "$SCRATCH"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
NCU="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)"
if [ -z "$NCU" ]; then
    echo "gpu_profile: ncu not found" | tee "$OUT/profile.txt"
    exit 1
fi
cd "$REPO"
timeout -s INT -k 10 "${GPU_PROFILE_S:-180}" "$NCU" --clock-control none --nvtx --nvtx-include "coco/" --nvtx-include "g200/" \
    --nvtx-include "g1000/" --kernel-name regex:"pairs_kernel|gather_kernel|finalize_kernel" \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    --section InstructionStats --section SourceCounters \
    --export "$OUT/pairs" --force-overwrite python3 benchmarks/gpu_profile.py 2>&1 | tee "$OUT/profile.txt"
status="${PIPESTATUS[0]}"
# An exported report prints no sections: read them back as text (the report needs ncu to open).
"$NCU" --import "$OUT/pairs.ncu-rep" --page details >"$OUT/profile_details.txt" 2>&1
exit "$status"

#!/usr/bin/env bash
# The GPU check, one command for a lent GPU machine (see README, "Triton kernels"):
#
#   bash benchmarks/gpu_check.sh
#
# 0. Dependencies the machine's image lacks or has too old (its grpcio and protobuf
#    predate what our generated code checks for): if .whl/ holds wheels (fetched on a
#    networked machine, see below), they are installed with --target into a scratch
#    folder put first on PYTHONPATH; the image has no network, so nothing else is
#    fetched. tritarget itself is not installed: tritarget/ is a namespace package of
#    links to kernels/, service/, clients/ and protos/ in a scratch folder on PYTHONPATH.
#    A `python` wrapper for $PYTHON goes first on PATH (protos/generate.sh calls
#    `python`; an image may have only `python3`).
# 1. The whole test suite with compiled Triton (TRITON_INTERPRET unset), on 12
#    pytest-xdist workers where xdist is installed: the triton tests run on the GPU,
#    the `gpu` ones first (full-size 800x1344 parity for every preset and mode, B = 64
#    and G = 1000 without out-of-memory), then the other tests of the Triton path
#    (`-k triton`), then the rest, in the tests' time left. The tests that build a wheel
#    from the source tree run alongside in a process of their own, one build at a time.
# 2. benchmarks/bench_gpu.py: triton vs torchvision vs our reference on COCO-RetinaNet,
#    per-kernel device times, time against boxes per image (--time-limit: the points
#    left after it are skipped, and the tables and plots still written; so they are
#    when the step's timeout interrupts a point).
# 3. benchmarks/gpu_sweep.py (GPU_SWEEP=0 skips it), by default its sections host and
#    matching: host vs device time per call, and the pair walk against the gather and its
#    variants (run10's verdict made the gather the default, run12's set its launch; the
#    finalize matching inline, the grid's order, every record, every near box, one near
#    box at a time and lone visits are the variants to read next: heavy first, skipping
#    empty blocks' records and the threshold pruning became defaults untimed).
#    GPU_SWEEP_ARGS="--sections graphs,launches,boundary" the rest: calls launched against
#    replayed as CUDA graphs (``graph_batches``, off until a GPU run times the library's
#    path), the JIT's launches against direct ones, and the matchings over B x G (targets
#    checked equal in every cell; where a per-batch choice would switch).
# 4. benchmarks/bench_loadtest.py --backend triton: the service on the GPU, load from 8
#    client processes, one connection per caller (images/s and latency percentiles, 20
#    responses verified per run) against `serve --workers N` (GPU_SERVICE_WORKERS
#    front-end processes on one port, default 4, what `serve` picks on 16 cores;
#    service_workersN.txt). Since run13 the server's compute workers sleep while they wait
#    for the GPU (`serve --gpu-wait block`); run5-run12 spun (GPU_SERVICE_ARGS="--gpu-wait
#    spin" for theirs; benchmarks/gpu_service_ab.sh compares the two, and MPS, in one run).
# 5. The service against more front ends (GPU_SERVICE_WORKERS_MORE, default 8;
#    service_workers8.txt): at 4 (run8, run9) each front end's process spent ~1.5 cores
#    per second at the open-loop point (p99 29-32 ms against a 20 ms goal), so its event
#    loop, under one GIL, is where requests wait. One front end was measured in run4-run8.
# 6. benchmarks/bench_anchor_design.py: the anchor check scan on the GPU (20,000 images;
#    GPU_ANCHOR_IMAGES=100000 for the issue's figure, 9-14 s on the H200).
# Steps 4-6 in the order of what is still unmeasured: when time runs short, the last go.
#
# Results land under $OUT (default benchmarks/results/gpu_check): pytest.txt, bench.txt,
# bench_gpu.{json,png}, sweep.txt, service_workers4.txt, service_workers8.txt as plain
# files, everything else (env.txt, sweep_console.txt, the bench's CSV and other plot, the
# load tests' folders, anchor_scan.txt) in extras.tar.gz, packed after every step: the
# device tool brings back at most 8 files, and what is there when a call is cut.
#
# Steps: GPU_CHECK_STEPS (default "tests bench sweep service service_more anchors"; the
# numbers above are their order) picks some, so that a session's device time splits into
# calls that each fit: one call of ~8 minutes does not hold them all.
# Time: GPU_CHECK_BUDGET seconds (default 270: give the device call 300 s) bound the
# check. The tests get at most 65% of it, up to 375 s (370 s at 570: the suite's ~340 s
# left too little margin under the former 353), and the bench 20% (100 s); the sweep what
# is left, up to GPU_SWEEP_S (150 s), if that is at least 60 s; each later step (service
# 100 s twice, anchor scan 60 s) is skipped when it could end past the budget, and says so.
# On the H200 (run12, 2026-12-04) the whole suite (1,842 tests on 12 workers, the 5
# wheel-building ones beside them) took ~185 s and every step ran in 446 s at
# GPU_CHECK_BUDGET=540 in a 570 s device call (the machine started in ~30 s); the suite
# has ~3,300 tests since 2026-12-08 (84 `gpu`): ~350 s there, scaled by the count. For
# a session's 15 minutes, two calls (kind nvidia-h200: the issues' goals are stated for it;
# an H100's numbers are reported as the H100's):
#   GPU_CHECK_BUDGET=570 GPU_CHECK_STEPS="tests bench sweep" bash benchmarks/gpu_check.sh    (timeout 595)
# then at once (a warm machine is let go after 30 s idle), with LEFT = status's
# budget_left_s: the service (issue "The service at GPU scale": its p99 at 2,500 requests/s)
#   GPU_CHECK_BUDGET=$((LEFT - 60)) GPU_CHECK_STEPS="service service_more" bash benchmarks/gpu_check.sh
#                                                                                 (timeout LEFT - 30)
# or the kernels' Nsight profile (ncu writes its report only when it ends: bound it)
#   GPU_PROFILE_S=$((LEFT - 70)) OUT="$OUT/profile" bash benchmarks/gpu_profile.sh    (timeout LEFT - 30)
# Exit status: non-zero if the wheels did not install, the service stack does not import
# (then only the kernels' tests, the bench, the sweep and the anchor scan run: nothing
# is spent on failures), a test failed, a service step failed or the bench did not finish.
#
# The wheels, for the image's Python 3.12 on x86-64 (.whl/ is in .gitignore, so the
# device tool needs `carry: [".whl"]`):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl grpcio==1.85.3 grpcio-status==1.85.3 grpcio-health-checking==1.85.1 \
#       grpcio-reflection==1.85.1 grpcio-tools==1.85.1 protobuf==7.36.2 \
#       googleapis-common-protos==1.76.0 typing_extensions==4.16.0 hdrhistogram==0.10.8 pbr tqdm mmdet==3.3.0 \
#       "setuptools>=77"
#   (manylinux_2_28_x86_64 and manylinux1_x86_64 platforms too, for hdrhistogram; setuptools
#   for the tests that build a wheel without build isolation: pyproject.toml needs >= 77; mmdet for the parity tests against its own code)
#
# GPU_CHECK_DRY=1 checks the script itself on a machine without a GPU (about two
# minutes on 2 cores): a few test files, `bench_gpu.py --smoke`, the anchor scan (2,000
# images) and the service step (2 front ends) on the cpu backend. PYTHON defaults to the repo's
# .venv when there is one (a development machine), else python3 (the GPU image).
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/benchmarks/results/gpu_check}"
if [ -x "$REPO/.venv/bin/python" ]; then
    PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
else
    PYTHON="${PYTHON:-python3}"
fi
PYTHON="$(command -v "$PYTHON")" || { echo "gpu_check: no Python interpreter" >&2; exit 1; }
DRY="${GPU_CHECK_DRY:-0}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$REPO"

SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
EXTRAS="$SCRATCH/extras"
mkdir -p "$EXTRAS"
status=0

# GPU_CHECK_STEPS: which steps run (default all), in this order whatever the order given.
steps=" ${GPU_CHECK_STEPS:-tests bench sweep service service_more anchors} "
for step in $steps; do
    [[ " tests bench sweep service service_more anchors " == *" $step "* ]] || {
        echo "gpu_check: GPU_CHECK_STEPS: unknown step $step (tests bench sweep service service_more anchors)" >&2
        exit 2
    }
done
wanted() { [[ "$steps" == *" $1 "* ]]; }

# The device tool brings back at most 8 files from $OUT, and a call cut at its limit
# brings back what is there then: after every step, every file but these 7 goes into
# extras.tar.gz (staged outside $OUT), so $OUT never holds more than 8. The steps that
# write folders of results (the service, the anchor scan) write them into the staging
# folder itself ($EXTRAS): in $OUT they made 9-11 files until the step ended.
keep=" pytest.txt bench.txt bench_gpu.json bench_gpu.png sweep.txt "  # and the two service_workers*.txt
pack() {
    local f
    while IFS= read -r f; do
        [[ "$keep" == *" $f "* || "$f" == service_workers*.txt ]] && continue
        mkdir -p "$EXTRAS/$(dirname "$f")" && mv "$OUT/$f" "$EXTRAS/$f"
    done < <(cd "$OUT" && find . -type f ! -name extras.tar.gz | sed 's|^\./||' | sort)
    find "$OUT" -mindepth 1 -type d -empty -delete
    if [ -n "$(ls -A "$EXTRAS")" ]; then
        tar -czf "$OUT/extras.tar.gz.part" -C "$EXTRAS" . && mv "$OUT/extras.tar.gz.part" "$OUT/extras.tar.gz"
    fi
}

# shellcheck source=benchmarks/tritarget_shim.sh
source "$REPO/benchmarks/tritarget_shim.sh"
install_carried_wheels "$PYTHON" "$SCRATCH/site" || { [ "$DRY" = 1 ] || status=1; }
use_tritarget_uninstalled "$REPO" "$SCRATCH/shim"
python_on_path "$PYTHON" "$SCRATCH/bin"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

{
    date -u
    echo "$wheel_note"
    nvidia-smi || echo "nvidia-smi: not available"
    "$PYTHON" - <<'EOF'
import platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("torchvision", "grpc", "google.protobuf", "grpc_status", "grpc_tools", "xdist", "matplotlib"):
    try:
        module = __import__(name, fromlist=["_"])
        print(name, getattr(module, "__version__", "?"), "from", module.__file__)
    except ImportError as exc:
        print(name, "not importable:", exc)
import tritarget.kernels
print("tritarget.kernels from", tritarget.kernels.__file__)
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The image's grpcio predates what the generated code checks for and it has no
# hdrhistogram: without the wheels nothing of the service runs, and its tests and steps
# would only fail, for minutes of the lease.
service_stack=1
if ! "$PYTHON" -c "import tritarget.protos.target_assigner_pb2_grpc, grpc_status, grpc_health.v1.health, \
grpc_reflection.v1alpha.reflection, hdrh" >"$SCRATCH/stack.txt" 2>&1; then
    service_stack=0
    status=1
    echo "gpu_check: the service stack does not import ($(tail -n 1 "$SCRATCH/stack.txt")): fetch the wheels" \
        "into .whl (this script's header) and carry them; the service's tests and steps do not run" |
        tee -a "$OUT/env.txt"
fi

pytest_cmd=("$PYTHON" -m pytest -q -p no:cacheprovider --durations=15)
if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
    pytest_cmd+=(--timeout=150)  # one hung test fails alone instead of using up the step's time
fi
# Tests that build a wheel from the source tree, where setuptools writes build/ and
# *.egg-info: two such builds at once break each other, so they run in one process of
# their own, alongside the rest (which leaves them out).
wheel_tests=(tests/test_packaging.py tests/test_protos.py::test_generated_code_imports_from_a_wheel)
main_cmd=("${pytest_cmd[@]}" --ignore=tests/test_packaging.py --deselect "${wheel_tests[1]}")
if "$PYTHON" -c "import xdist" 2>/dev/null; then
    workers_default=12
    [ "$DRY" = 1 ] && workers_default=2  # 2 cores: 12 workers ran no test in the 120 s
    main_cmd+=(-n "${GPU_CHECK_WORKERS:-$workers_default}")
fi
# GPU_CHECK_TESTS (default: tests, the whole suite) and GPU_CHECK_BENCH_ARGS (extra
# bench_gpu.py arguments) narrow a re-run when device time is short.
budget="${GPU_CHECK_BUDGET:-270}"
if ! [[ "$budget" =~ ^[0-9]+$ ]] || ((budget < 120)); then
    echo "gpu_check: GPU_CHECK_BUDGET must be a whole number of seconds, at least 120; got $budget" >&2
    exit 2
fi
tests_timeout=$((budget * 65 / 100 < 375 ? budget * 65 / 100 : 375))
bench_timeout=$((budget * 20 / 100 < 100 ? budget * 20 / 100 : 100))
bench_limit=$((bench_timeout - 20))  # seconds, after which bench_gpu.py starts no new point
steps_backend=triton  # the anchor scan and the service
anchor_images="${GPU_ANCHOR_IMAGES:-20000}"
# And an open loop at 2,500 8-image requests/s: 80% of the issue's 25k images/s, where it
# asks for the p99 (the open loop at 80% of the best unary rate runs above that).
service_load=(--processes 8 --scale 4 --open-rate 2500)
service_s=100
if [ "$DRY" = 1 ]; then
    main_cmd+=(tests/test_assign_sparse.py tests/test_protos.py)
    bench_timeout=100
    bench_limit=60  # an interpreted point takes up to ~25 s on 2 cores
    steps_backend=cpu
    anchor_images=2000
    service_load=(--processes 1 --scale 1)  # several client processes overload 2 cores
    service_s=90
elif [ "$service_stack" = 1 ] || [ -n "${GPU_CHECK_TESTS:-}" ]; then
    read -ra selected <<<"${GPU_CHECK_TESTS:-tests}"
    main_cmd+=("${selected[@]}")
else  # the test files that need no gRPC
    mapfile -t selected < <(grep -L "grpc\|tritarget\.service\|tritarget\.clients\|test_service_harness\|serving" tests/test_*.py)
    main_cmd+=("${selected[@]}")
    wheel_tests=()
fi
# Not the reference backend's times (no goal rests on them; a quarter of the heavy points'
# time): GPU_CHECK_BENCH_ARGS="--methods ... reference" adds them back.
bench_cmd=("$PYTHON" benchmarks/bench_gpu.py --out "$OUT" --time-limit "$bench_limit"
    --methods triton triton_sparse triton_assign torchvision ${GPU_CHECK_BENCH_ARGS:-})
[ "$DRY" = 1 ] && bench_cmd+=(--smoke)

tests=skipped wheel=skipped
if wanted tests; then
echo "== tests (at most $tests_timeout s): ${main_cmd[*]:1} ==" | tee "$OUT/pytest.txt"
if [ "${#wheel_tests[@]}" -gt 0 ]; then
    timeout -k 10 "$((tests_timeout - 10))" "${pytest_cmd[@]}" "${wheel_tests[@]}" >"$SCRATCH/wheel_tests.txt" 2>&1 &
else
    echo "not run: they need the service stack" >"$SCRATCH/wheel_tests.txt"
    true &
fi
wheel_pid=$!
# SIGINT first, so pytest still prints what failed and the slowest tests. Two torch
# threads per worker: 12 workers of 16 threads each on 16 cores made CPU-heavy tests 5-10x
# slower (RetinaNet's backward in test_loader.py ran past its 150 s, run6/pytest.txt).
# The `gpu` tests first (full-size parity on the device, what only this machine checks),
# then the rest in the time left: a suite grown past its share cuts the others.
tests_started=$SECONDS
OMP_NUM_THREADS=2 timeout -s INT -k 15 "$tests_timeout" "${main_cmd[@]}" -m gpu 2>&1 | tee -a "$OUT/pytest.txt"
tests=${PIPESTATUS[0]}
[ "$tests" -eq 5 ] && tests=0 # no `gpu` test among the files selected (GPU_CHECK_TESTS, a dry run)
# Then the other tests of the Triton path (compiled here, interpreted everywhere else),
# then the rest, each in the time left.
for selection in triton "not triton"; do
    left=$((tests_timeout - (SECONDS - tests_started)))
    if ((left >= 20)); then
        echo "== the other tests, -k '$selection' (at most $left s) ==" | tee -a "$OUT/pytest.txt"
        OMP_NUM_THREADS=2 timeout -s INT -k 15 "$left" "${main_cmd[@]}" -m "not gpu" -k "$selection" 2>&1 |
            tee -a "$OUT/pytest.txt"
        rest=${PIPESTATUS[0]}
        [ "$rest" -eq 5 ] && rest=0 # none selected among the files (GPU_CHECK_TESTS, a dry run)
        [ "$rest" -eq 0 ] || tests=$rest
    else
        echo "== the other tests, -k '$selection': not run, $left s left of the tests' $tests_timeout s ==" |
            tee -a "$OUT/pytest.txt"
        tests=1
    fi
done
wait "$wheel_pid"
wheel=$?
{
    echo "== tests that build a wheel, alongside: ${pytest_cmd[*]:1} ${wheel_tests[*]} =="
    cat "$SCRATCH/wheel_tests.txt"
} | tee -a "$OUT/pytest.txt"
[ "$tests" -eq 0 ] && [ "$wheel" -eq 0 ] || status=1
fi
pack

bench=skipped
if wanted bench; then
    echo "== benchmark: ${bench_cmd[*]:1} =="
    timeout -s INT -k 10 "$bench_timeout" "${bench_cmd[@]}" 2>&1 | tee "$OUT/bench.txt"
    bench=${PIPESTATUS[0]}
    [ "$bench" -eq 0 ] || status=1
fi
pack

# The device call's limit stops the script wherever it is, before the files are packed
# below: from here on, a step that could run past the budget is skipped, and says so.
fits() {  # fits LIMIT NAME STEP: whether STEP is wanted and a step of at most LIMIT seconds ends within the budget
    if [[ "$2" == service* ]] && [ "$service_stack" = 0 ]; then
        echo "== $2: skipped, the service stack does not import =="
        return 1
    fi
    if ! wanted "$3"; then
        return 1
    fi
    if ((SECONDS + $1 > budget)); then
        echo "== $2: skipped, $((budget - SECONDS)) s left of the $budget s budget, the step may take $1 s =="
        return 1
    fi
}

# benchmarks/gpu_sweep.py (host vs device time, the matchings; ~60 s on the H200 in run10,
# before the walk-against-gather grid over B x G was added; its matching and grid sections
# took ~55 s in run12, before the inline variants, whose kernels compile on first use),
# unless GPU_SWEEP=0. Not in a dry run: it needs CUDA.
# It gets GPU_SWEEP_S (150) or what is left of the budget, if that is 60 s or more: it
# writes sweep.txt line by line, so a cut sweep keeps what it measured (GPU_SWEEP_ARGS,
# default "--sections host,matching": the host's time per call, which the B = 1 `assign`
# goal counts, and the untimed kernel variants; "--sections graphs,launches,boundary" the
# rest). Its console (warnings, a traceback) goes to sweep_console.txt.
sweep_s=$((budget - SECONDS - 10 < ${GPU_SWEEP_S:-150} ? budget - SECONDS - 10 : ${GPU_SWEEP_S:-150}))
if ((sweep_s < 60)) && wanted sweep && [ "${GPU_SWEEP:-1}" = 1 ] && [ "$DRY" != 1 ]; then
    echo "== sweep: skipped, $sweep_s s left for it (at least 60) =="
elif [ "${GPU_SWEEP:-1}" = 1 ] && [ "$DRY" != 1 ] && fits "$sweep_s" sweep sweep; then
    echo "== sweep (at most $sweep_s s) =="
    timeout -s INT -k 10 "$sweep_s" "$PYTHON" benchmarks/gpu_sweep.py --out "$OUT" ${GPU_SWEEP_ARGS:---sections host,matching} 2>&1 |
        tee "$OUT/sweep_console.txt" | tail -n 60
fi
pack

# The service on the GPU (issue "The service at GPU scale"): tritarget serve --backend triton
# under tritarget loadtest from 8 client processes, 8 COCO-like images per SPARSE request,
# against several front-end processes sharing the GPU (`serve --workers N`,
# GPU_SERVICE_WORKERS, default 4, what `serve` picks on 16 cores): one Python process's event
# loop decodes and answers every request (2 gave 19.9k images/s against 12.4k with 1,
# run6; 4 gave 29.5k, run7). GPU_SERVICE_ARGS adds server flags.
# service_under_load N PORT: that load against N front ends on PORT; its exit status.
# Its whole console goes to service_workersN.txt as it comes: a step cut by the call's
# limit keeps the runs that ended (through `tail`, the file was empty until the step ended).
service_under_load() {
    echo "== service, $1 front-end processes =="
    timeout -s INT -k 10 "$service_s" "$PYTHON" benchmarks/bench_loadtest.py --backend "$steps_backend" \
        "${service_load[@]}" --duration 3 --warmup 1 \
        --server-args "--workers $1 --port $2 ${GPU_SERVICE_ARGS:-}" --out "$EXTRAS/loadtest_workers$1" \
        2>&1 | tee "$OUT/service_workers$1.txt" | tail -n 14
    return "${PIPESTATUS[0]}"
}
workers="${GPU_SERVICE_WORKERS:-4}"
[ "$DRY" = 1 ] && workers=2  # 2 cores
service=skipped
if fits "$service_s" "service, $workers front ends" service; then
    service_under_load "$workers" 50061
    service=$?
    [ "$service" -eq 0 ] || status=1
fi
pack

# The same load against more front ends (not in a dry run: the same command as step 4,
# and a second server's open loop on 2 busy cores was refused RESOURCE_EXHAUSTED at times).
more="${GPU_SERVICE_WORKERS_MORE:-8}"
more_status=skipped
if [ "$DRY" != 1 ] && fits "$service_s" "service, $more front ends" service_more; then
    service_under_load "$more" 50062
    more_status=$?
    [ "$more_status" -eq 0 ] || status=1
fi
pack

# The anchor-design scan (issue "Anchor design tools": COCO-like images on one GPU; 100,000
# took 8.6-13.6 s in run4-run6, so 20,000 by default now).
if fits 60 "anchor scan" anchors; then
    echo "== anchor scan =="
    timeout -s INT -k 10 60 "$PYTHON" benchmarks/bench_anchor_design.py --images "$anchor_images" \
        --backend "$steps_backend" --out "$EXTRAS/anchor_scan" 2>&1 | tail -n 30 | tee "$EXTRAS/anchor_scan.txt"
fi
pack

# GPU_SERVICE_SWEEP=1: also benchmarks/service_sweep.py (compute workers, batch size, queue
# delay, front-end processes on the GPU) and bench_service_overhead.py (the server's time per
# request outside compute, from its metrics, on this machine's cores: the GPU backend and the
# cpu one); their tables go into extras.tar.gz.
if [ "${GPU_SERVICE_SWEEP:-0}" = 1 ] && fits 400 "service sweep" service; then
    echo "== service sweep =="
    timeout -s INT -k 10 200 "$PYTHON" benchmarks/service_sweep.py --backend "$steps_backend" \
        --out "$EXTRAS/service_sweep" 2>&1 | tail -n 12
    for backend in "$steps_backend" cpu; do
        echo "== server time outside compute, $backend backend =="
        timeout -s INT -k 10 90 "$PYTHON" benchmarks/bench_service_overhead.py --backend "$backend" --duration 2 --rounds 1 \
            --out "$EXTRAS/service_overhead_$backend" 2>&1 | tail -n 40
    done
fi

pack

echo "wheels: $wheel_note; tests exit $tests, wheel-building tests exit $wheel, bench exit $bench, service exit $service ($workers front ends) / $more_status ($more); results in $OUT"
exit $status

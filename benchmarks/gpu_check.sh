#!/usr/bin/env bash
# The GPU check, one command for a lent GPU machine (see README, "Triton kernels"):
#
#   bash benchmarks/gpu_check.sh
#
# 1. the triton backend's tests with compiled Triton (TRITON_INTERPRET unset): the
#    small-canvas parity tests on the GPU plus the `gpu` tests (full-size 800x1344
#    parity for every preset and mode, B = 64 and G = 1000 without out-of-memory);
# 2. benchmarks/bench_gpu.py: triton vs torchvision vs our reference on COCO-RetinaNet.
#
# Everything lands under $OUT (default benchmarks/results/gpu_check): env.txt,
# pytest.txt, bench.txt, bench_gpu.{csv,json,md,png} (7 files). Installs
# nothing: the package is put on PYTHONPATH through a temporary folder of links, and
# torch, triton, torchvision, pytest and matplotlib come from the machine's image.
# Finishes in under 5 minutes (each step has its own timeout: 100 + 80 + 110 s, plus
# a few seconds of setup). Exit status: non-zero if a test failed or the bench did not
# finish.
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/benchmarks/results/gpu_check}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
cd "$REPO"

# tritarget.kernels without installing: tritarget/ is a namespace package of links.
SHIM="$(mktemp -d)"
trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/tritarget"
for part in kernels service clients protos; do
    [ -d "$REPO/$part" ] && ln -s "$REPO/$part" "$SHIM/tritarget/$part"
done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

{
    date -u
    nvidia-smi || echo "nvidia-smi: not available"
    "$PYTHON" - <<'EOF'
import platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
try:
    import torchvision
    print("torchvision", torchvision.__version__)
except ImportError:
    print("torchvision: not installed")
import tritarget.kernels
print("tritarget.kernels from", tritarget.kernels.__file__)
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
# The gpu-marked tests first (full size, memory), then the small-canvas parity tests
# compiled: each has its own timeout, so a slow half still reports the other.
echo "== gpu tests (compiled Triton) ==" | tee "$OUT/pytest.txt"
timeout 100 "$PYTHON" -m pytest tests/test_triton_backend.py -m gpu -q -p no:cacheprovider -rs 2>&1 | tee -a "$OUT/pytest.txt"
gpu_tests=${PIPESTATUS[0]}
echo "== small-canvas tests (compiled Triton) ==" | tee -a "$OUT/pytest.txt"
timeout 80 "$PYTHON" -m pytest tests/test_triton_backend.py -m "not gpu" -q -p no:cacheprovider -rs 2>&1 \
    | tee -a "$OUT/pytest.txt"
small_tests=${PIPESTATUS[0]}
tests=$((gpu_tests || small_tests))
[ "$tests" -eq 0 ] || status=1

echo "== benchmark =="
timeout 110 "$PYTHON" benchmarks/bench_gpu.py --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
bench=${PIPESTATUS[0]}
[ "$bench" -eq 0 ] || status=1

echo "gpu tests exit $gpu_tests, small tests exit $small_tests, bench exit $bench; results in $OUT"
exit $status

#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one call: build kepler._C with the CUDA kernels
# against the machine's own torch, run every GPU test, run the GPU benchmark grid, and write the
# results as JSON (plus logs) under $OUT (default: bench_results/gpu).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# The GPU machine has its own torch/triton; install only kepler itself (--no-deps) on top of it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export TRITON_INTERPRET=0
export KEPLER_CUDA_ARCH=${KEPLER_CUDA_ARCH:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
status=0

{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
  > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

echo "== build"
if ! KEPLER_FORCE_CUDA_BUILD=1 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  exit 1
fi
$PY -c "import kepler; print('backends on cuda:', kepler.available_backends('cuda'))"

echo "== GPU tests"
$PY -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== GPU benchmarks"
$PY -m pytest benchmarks -m gpu -q -p no:cacheprovider --benchmark-json="$OUT/bench_gpu.json" \
  --benchmark-columns=median,iqr,ops --benchmark-sort=name 2>&1 | tee "$OUT/bench_gpu.log" | tail -80
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

exit $status

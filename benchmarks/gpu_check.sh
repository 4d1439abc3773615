#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one call, within 8 minutes on an H100-class GPU:
# build kepler._C with the CUDA kernels against the machine's own torch, then what a GPU user runs
# (kepler doctor, the quantizer in fp32 / bf16 autocast / torch.compile, a short training run), the
# GPU tests, compute-sanitizer over the CUDA kernels' tests, and the GPU benchmarks. Everything is
# written under $OUT (default: bench_results/gpu): one log per part, JSON results, and summary.tsv
# (part, PASS/FAIL, seconds, detail). The exit status is 1 when any part fails or is not run.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# The GPU machine has its own torch/triton; install only kepler itself (--no-deps) on top of it.
# Each part runs under `timeout`, capped by what is left of BUDGET_S for the whole script; a part
# that no longer fits is recorded as FAIL "not run". The expected times in the comments are
# estimates for an H100/H200 (this script has not yet run on one): about 7.5 minutes in all.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-bench_results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export TRITON_INTERPRET=0
export KEPLER_CUDA_ARCH=${KEPLER_CUDA_ARCH:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
BUDGET_S=${BUDGET_S:-470}  # 7 min 50 s: the 8 minutes less the slack of the last part's kill
status=0
: > "$OUT/summary.tsv"

record() {  # record PART PASS|FAIL SECONDS DETAIL
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUT/summary.tsv"
  echo "-- $1: $2 (${3} s) $4"
  [ "$2" = PASS ] || status=1
}

# run_part NAME LIMIT_S LOG COMMAND...: run COMMAND with its output in $OUT/LOG, under a timeout
# of LIMIT_S or what is left of the budget, whichever is less; record PASS/FAIL.
run_part() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt 20 ]; then
    record "$name" FAIL 0 "not run: the ${BUDGET_S}s budget is spent"
    return 1
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (limit ${limit} s)"
  local start=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$log"
  if [ "$rc" -eq 0 ]; then
    record "$name" PASS $((SECONDS - start)) "log: $log"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" FAIL $((SECONDS - start)) "timed out after ${limit} s; log: $log"
  else
    record "$name" FAIL $((SECONDS - start)) "exit status $rc; log: $log"
  fi
  return "$rc"
}

# ~5 s
{ nvidia-smi; nvcc --version; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
  > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# ~90 s (three .cu files for sm_90 plus the C++ CPU kernels, 16 jobs). Nothing else can run without it.
if ! KEPLER_FORCE_CUDA_BUILD=1 run_part build 210 build.log "$PY" -m pip install --no-build-isolation --no-deps -e .; then
  exit 1
fi

# ~30 s: every op on cpu and cuda:0, every backend there, fp32 + bf16, forward + backward against the
# float64 reference, and the speed figures; the table a user would see (doctor.txt, doctor.json).
run_part "kepler doctor" 90 doctor.txt "$PY" -m kepler doctor --json "$OUT/doctor.json"

# ~40 s: KeplerQuantizer fwd+bwd in fp32 and bf16 autocast on the cuda and triton backends against the
# reference backend, and torch.compile(fullgraph=True) (inductor) against eager.
run_part "quantizer fp32/bf16/compile" 120 quantizer.log \
  "$PY" benchmarks/gpu_quantizer_check.py --device cuda --json "$OUT/quantizer.json"

# ~120 s: every test marked gpu (Triton JIT compiles are most of it).
run_part "GPU tests" 180 gpu_tests.log \
  "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"

# ~30 s: the built-in config sample for 300 steps on the GPU (bf16 autocast by default there), then its
# validation; img/s from the run's metrics.json. time_limit_minutes guards against a slow machine.
if run_part "train sample 300 steps" 120 train.log "$PY" -m kepler train sample \
    train.max_steps=300 train.time_limit_minutes=1.5 train.progress=false device=cuda run_dir="$OUT/train_sample"; then
  train_figures=$("$PY" -c "import json, sys; m = json.load(open(sys.argv[1]))
print(f\"{m['step']} steps, {m['train_images_per_s']:.0f} img/s, PSNR {m['psnr']:.2f} dB\")" "$OUT/train_sample/metrics.json")
  printf 'train figures\tINFO\t-\t%s\n' "$train_figures" >> "$OUT/summary.tsv"
  echo "train: $train_figures"
fi

# compute-sanitizer over the CUDA kernels' tests (the cuda backend on CUDA tensors, a small subset):
# memcheck (out-of-bounds and misaligned accesses; torch's caching allocator off so that an access
# past a tensor's end is not inside another cached block) and racecheck (shared-memory hazards).
SANITIZER=$(command -v compute-sanitizer || true)
for candidate in "$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/nvcc)")" "${CUDA_HOME:-/usr/local/cuda}/bin" /usr/local/cuda/bin; do
  [ -n "$SANITIZER" ] && break
  [ -x "$candidate/compute-sanitizer" ] && SANITIZER="$candidate/compute-sanitizer"
done
# The ops' test files, from the op inventory (kepler/ops/__init__.py).
mapfile -t KERNEL_TESTS < <("$PY" -c "from kepler.ops import OPS; print(*(path for op in OPS for path in op.tests), sep='\n')")
if [ -z "$SANITIZER" ]; then
  echo "compute-sanitizer: not found on PATH, next to nvcc, in \$CUDA_HOME/bin or /usr/local/cuda/bin; skipped"
  printf 'compute-sanitizer\tSKIP\t0\tnot found\n' >> "$OUT/summary.tsv"
elif [ "${#KERNEL_TESTS[@]}" -eq 0 ]; then  # without files pytest would collect the whole folder
  record "compute-sanitizer" FAIL 0 "no kernel tests: reading kepler.ops.OPS failed"
else
  "$SANITIZER" --version >> "$OUT/environment.txt" 2>&1
  # ~60 s: 53 tests (36 before closest_lattice_point's 17).
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_part "compute-sanitizer memcheck" 90 memcheck.log \
    "$SANITIZER" --tool memcheck --error-exitcode 99 --print-limit 20 \
    "$PY" -m pytest "${KERNEL_TESTS[@]}" -m gpu -q -p no:cacheprovider \
    -k "cuda-cuda and (low_precision or gradients_match or empty or degenerate or non_contiguous)"
  # ~45 s: 22 tests.
  run_part "compute-sanitizer racecheck" 90 racecheck.log \
    "$SANITIZER" --tool racecheck --error-exitcode 99 --print-limit 20 \
    "$PY" -m pytest "${KERNEL_TESTS[@]}" -m gpu -q -p no:cacheprovider -k "cuda-cuda and (low_precision or gradients_match)"
fi

# ~45 s: the GPU benchmark targets (KEPLER_BENCH_QUICK=1: 60 points, 0.25 s each); the full grid is
# `pytest benchmarks -m gpu` by hand.
KEPLER_BENCH_QUICK=1 run_part "GPU benchmarks" 100 bench_gpu.log \
  "$PY" -m pytest benchmarks -m gpu -q -p no:cacheprovider --benchmark-json="$OUT/bench_gpu.json" \
  --benchmark-max-time=0.25 --benchmark-columns=median,iqr,ops --benchmark-sort=name

echo "== summary (${SECONDS} s)"
column -t -s $'\t' "$OUT/summary.tsv" 2>/dev/null || cat "$OUT/summary.tsv"
exit $status

#!/usr/bin/env bash
# One prepared run for a lent GPU machine (offline, its own torch): build the extension with that
# machine's python3, run the test suite (CUDA tests included), then the benchmarks; everything
# lands in $OUT. Usage (device tool): bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$OUT/device.txt" 2>&1

# Build in place for the visible GPU only (fast); ninja comes with torch's build deps or falls back.
export MAX_JOBS=${MAX_JOBS:-16} GRADWATCH_FORCE_CUDA=1
( time $PY setup.py build_ext --inplace ) > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }

# Tests: CUDA-specific ones first (they are what only this machine can run), then everything.
timeout 300 $PY -m pytest -q -x -k "cuda" tests/ > "$OUT/tests_cuda.log" 2>&1
echo "cuda tests rc=$?" | tee -a "$OUT/summary.txt"
timeout 240 $PY -m pytest -q tests/ > "$OUT/tests_all.log" 2>&1
echo "all tests rc=$?" | tee -a "$OUT/summary.txt"

# Benchmarks: the fused op, then monitoring overhead (if the suite exists in this tree).
timeout 120 $PY -m benchmarks.op_bench --device cuda --repeats 50 --out "$OUT" > "$OUT/op_bench.log" 2>&1
echo "op_bench rc=$?" | tee -a "$OUT/summary.txt"
if [ -f benchmarks/__main__.py ]; then
  timeout 200 $PY -m benchmarks --out "$OUT/overhead" > "$OUT/overhead.log" 2>&1
  echo "overhead bench rc=$?" | tee -a "$OUT/summary.txt"
fi
tail -5 "$OUT"/tests_*.log
cat "$OUT"/op_bench_cuda.md 2>/dev/null

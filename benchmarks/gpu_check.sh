#!/usr/bin/env bash
# One prepared run for a lent GPU machine (offline; its own python3 holds torch, torchvision,
# pytest, ninja): build the extension, run the CUDA-relevant tests, then both benchmarks.
# Everything lands in $OUT. Sized to finish in about 8 minutes, inside the device tool's 10-minute
# limit per command:   run(command="bash benchmarks/gpu_check.sh", timeout_s=590)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/device.txt"

# Build in place for the visible GPU only (fast); fail loudly if the CUDA kernels do not build.
export MAX_JOBS=${MAX_JOBS:-16} GRADWATCH_FORCE_CUDA=1
( time timeout 240 $PY setup.py build_ext --inplace ) > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build ok" | tee -a "$OUT/summary.txt"

# Tests that exercise the CUDA kernels and the sync-free monitor (the rest run in CI already).
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_build.py tests/test_monitor.py tests/test_in_backward.py \
  > "$OUT/tests_cuda.log" 2>&1
echo "tests rc=$? ($(tail -1 "$OUT/tests_cuda.log"))" | tee -a "$OUT/summary.txt"

# The fused op against torch on the GPU (absolute times are meaningful here: the device is named).
timeout 90 $PY -m benchmarks.op_bench --device cuda --repeats 50 --out "$OUT" > "$OUT/op_bench.log" 2>&1
echo "op_bench rc=$?" | tee -a "$OUT/summary.txt"
cat "$OUT/op_bench_cuda.md" 2>/dev/null

# Monitoring overhead per step: ResNet-50 (batch 64, 224^2, bf16 autocast) and the tiny-tensor model.
timeout 200 $PY -m benchmarks --device cuda --workloads resnet50 tiny_params --rounds 3 --no-progress \
  --out "$OUT/overhead" --results-md "$OUT/RESULTS_gpu.md" > "$OUT/overhead.log" 2>&1
echo "overhead bench rc=$?" | tee -a "$OUT/summary.txt"
tail -30 "$OUT/overhead.log"

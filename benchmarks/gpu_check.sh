#!/usr/bin/env bash
# One prepared run for a lent GPU machine (offline, no pip; its python3 holds torch, torchvision,
# pytest, ninja): build the extension for the visible GPU, run every CUDA test, then the op and
# overhead benchmarks. Everything lands in $OUT; summary.txt says what passed. Each stage has its own
# timeout; what finishes typically takes ~6 minutes, inside the device tool's 10-minute limit:
#     run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
# A stage that fails or times out is reported and the next one still runs.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$(date +%s)
stage() { echo "$1 rc=$2 after $(( $(date +%s) - START ))s${3:+ ($3)}" | tee -a "$OUT/summary.txt"; }
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/summary.txt"

# Build in place for the visible GPU only (TORCH_CUDA_ARCH_LIST unset: torch picks it); fail loudly
# if the CUDA kernels do not build. A stale build from another machine is ignored.
export MAX_JOBS=${MAX_JOBS:-16} GRADWATCH_FORCE_CUDA=1
unset TORCH_CUDA_ARCH_LIST
rm -rf build gradwatch/_C*.so
( time timeout 180 $PY setup.py build_ext --inplace ) > "$OUT/build.log" 2>&1
rc=$?
stage build $rc "$(grep real "$OUT/build.log")"
[ $rc -eq 0 ] || { tail -40 "$OUT/build.log"; exit 1; }
$PY -c "import gradwatch; assert gradwatch.native_backends()['cuda'], 'no CUDA kernels loaded'" 2>&1 | tee -a "$OUT/summary.txt"

# C++ errors must reach Python as exceptions. On the first H200 two of them segfaulted (built with
# /opt/gcc/bin/g++); the probe runs each kind in its own process. If any crashed, rebuild the CPU kernels
# alone with the system compiler in a copy and probe again, to tell the toolchain from the code.
{ for c in /opt/gcc/bin/g++ /usr/bin/g++; do echo "$c: $($c --version 2>/dev/null | head -1)"; done
  ldd gradwatch/_C*.so | grep -E "stdc\+\+|gcc_s"; } >> "$OUT/summary.txt" 2>&1
if ! timeout 60 $PY -m benchmarks.exception_probe >> "$OUT/summary.txt" 2>&1 && [ -x /usr/bin/g++ ]; then
  rm -rf /tmp/sysgcc && mkdir /tmp/sysgcc && cp -r setup.py pyproject.toml README.md csrc gradwatch benchmarks /tmp/sysgcc/
  ( cd /tmp/sysgcc && rm -f gradwatch/_C*.so && env -u GRADWATCH_FORCE_CUDA CXX=/usr/bin/g++ CC=/usr/bin/gcc GRADWATCH_FORCE_CPU=1 \
    timeout 120 $PY setup.py build_ext --inplace > /tmp/sysgcc/build.log 2>&1 && echo "system g++ build:" \
    && timeout 60 $PY -m benchmarks.exception_probe ) >> "$OUT/summary.txt" 2>&1
  stage "exception probe with the system g++" $?
fi

# The >2^31-element test needs ~8 GB (plus its oracle's temporaries); run it where memory allows.
FREE_GB=$($PY -c "import torch; print(torch.cuda.mem_get_info()[0] // 2**30)")
[ "$FREE_GB" -ge 24 ] && export GRADWATCH_BIG_TESTS=1

# Every CUDA-relevant test file in its own process, so a crash in one (a segfault kills pytest) cannot hide the
# others; all of them into one log (the device tool returns at most 8 files). The kernels' own file first.
tests() {  # tests <name> <timeout> <files...>
  local name=$1 limit=$2; shift 2
  for f in "$@"; do
    echo "== $f" >> "$OUT/tests.log"
    timeout "$limit" $PY -X faulthandler -m pytest -q -p no:cacheprovider -rs --tb=short "$f" >> "$OUT/tests.log" 2>&1
    stage "$name $f" $? "$(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -1)"
  done
}
tests kernels 150 tests/test_cuda_kernels.py
tests kernels 40 tests/test_ops.py tests/test_scale.py tests/test_build.py tests/test_log2_hist.py
# The fused check (issue 14): the CUDA kernel against the Python oracle, a captured training step.
tests fused 45 tests/test_fused_check_cuda.py tests/test_fused_monitor.py
tests monitor 40 tests/test_monitor.py tests/test_in_backward.py tests/test_policies.py

# Benchmarks: all output into bench.log (with the test log, summary, build log and the overhead table,
# 5 files come back: the device tool returns at most 8).
bench() {  # bench <name> <timeout> <command...>
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/bench.log"
  timeout "$limit" "$@" >> "$OUT/bench.log" 2>&1
  stage "$name" $?
}
# The fused op against torch on the GPU, incl. Llama-8B-shaped bf16 gradients and host time per call.
bench op_bench 60 $PY -m benchmarks.op_bench --device cuda --repeats 20 --out /tmp/op_bench
cat /tmp/op_bench/op_bench_cuda.md >> "$OUT/bench.log" 2>/dev/null
# One check: ops, CUDA kernels per check (issue 14's bound: 3) and time, Python pipeline against the fused op.
bench "check ops and launches" 90 $PY -m benchmarks.check_ops --device cuda --repeats 11 --out /tmp/check_ops
# The statistics pass with log2 histograms against without (and copy + histc per layer), on the GPU.
bench "histogram cost" 30 $PY -m benchmarks.histogram_cost --device cuda --repeats 10
# Monitoring overhead per step: ResNet-50 (batch 64, 224^2, bf16 autocast) and the tiny-tensor model.
# It ran past 55 s and 170 s on the first H200 (2026-11-28) with nothing printed: last, so it cannot cost the rest.
bench "overhead bench" 120 $PY -m benchmarks --device cuda --workloads resnet50 tiny_params --rounds 1 \
  --no-progress --out /tmp/overhead --results-md "$OUT/RESULTS_gpu.md"
tail -60 "$OUT/bench.log"

#!/bin/bash
# Builds benchmarks/kernel_bench.cpp against this checkout's compiled CPU kernels (the objects
# `setup.py build_ext` leaves under build/) and runs it: bash benchmarks/kernel_bench.sh [args].
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
torch_dir=$("$python" -c "import os, torch; print(os.path.dirname(torch.__file__))")
objects=()
for cap in default avx2 avx512; do
  objects+=("$(ls build/temp.*/cpu_$cap/csrc/cpu/kernels_impl.o | head -1)")
done
out=${TMPDIR:-/tmp}/gradwatch_kernel_bench
g++ -O2 -std=c++20 -I. -I"$torch_dir/include" benchmarks/kernel_bench.cpp "${objects[@]}" \
  -L"$torch_dir/lib" -lc10 -ltorch_cpu -fopenmp -Wl,-rpath,"$torch_dir/lib" -o "$out"
"$out" "$@"

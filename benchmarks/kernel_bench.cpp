// The CPU chunk kernels timed alone, without the op around them: statistics only against
// statistics with log2 histograms, per 64 elements, for one capability and dtype. On a shared VM
// the op-level benchmark (histogram_cost) moves by tens of percent from run to run; this one keeps
// the data in cache and the calls back to back, so instruction-level changes show. Build and run:
// `bash benchmarks/kernel_bench.sh [length] [tensors] [dtype: float32|float16|bfloat16] [capability]`.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "csrc/cpu/kernels.h"

using gradwatch::Dtype;
using gradwatch::cpu::KernelTable;

int main(int argc, char** argv) {
  const int64_t length = argc > 1 ? std::atoll(argv[1]) : 32768;  // elements per tensor
  const int64_t tensors = argc > 2 ? std::atoll(argv[2]) : 16;    // distinct tensors (working set)
  const std::string dtype_name = argc > 3 ? argv[3] : "bfloat16";
  const std::string capability = argc > 4 ? argv[4] : "AVX512";
  const Dtype dtype = dtype_name == "float32" ? Dtype::Float : dtype_name == "float16" ? Dtype::Half : Dtype::BFloat16;
  const KernelTable& table = capability == "DEFAULT" ? gradwatch::cpu::DEFAULT::kernel_table()
                             : capability == "AVX2"  ? gradwatch::cpu::AVX2::kernel_table()
                                                     : gradwatch::cpu::AVX512::kernel_table();
  constexpr int64_t kChunk = 32768;  // as grad_stats_cpu.cpp
  const size_t size = dtype == Dtype::Float ? 4 : 2;
  std::vector<char> data(length * tensors * size + 64);
  std::mt19937 rng(0);
  std::normal_distribution<float> gradient(0.f, 1e-3f);
  for (int64_t i = 0; i < length * tensors; ++i) {
    const float v = gradient(rng);
    const c10::Half half(v);
    const c10::BFloat16 bfloat(v);
    const void* bits = dtype == Dtype::Float  ? static_cast<const void*>(&v)
                       : dtype == Dtype::Half ? static_cast<const void*>(&half)
                                              : static_cast<const void*>(&bfloat);
    std::memcpy(data.data() + size * i, bits, size);
  }
  std::vector<int64_t> rows(gradwatch::kHistBins * tensors);
  std::vector<gradwatch::Partial> partials((length + kChunk - 1) / kChunk);
  volatile double sink = 0;
  const int64_t calls = std::max<int64_t>(1, 4'000'000 / (length * tensors));
  std::vector<double> samples[2];
  for (int round = 0; round < 41; ++round) {
    for (int hist = 0; hist < 2; ++hist) {
      const auto start = std::chrono::steady_clock::now();
      for (int64_t r = 0; r < calls; ++r) {
        for (int64_t k = 0; k < tensors; ++k) {
          const char* x = data.data() + k * length * size;
          if (hist) {
            table.stats_hist[static_cast<int>(dtype)](x, length, kChunk, partials.data(),
                                                      rows.data() + k * gradwatch::kHistBins, true);
            sink = sink + partials[0].sumsq;
          } else {
            for (int64_t o = 0; o < length; o += kChunk) {
              sink = sink + table.stats[static_cast<int>(dtype)](x + o * size, std::min(kChunk, length - o)).sumsq;
            }
          }
        }
      }
      const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
      samples[hist].push_back(ns / calls / (length * tensors) * 64);
    }
  }
  for (auto& s : samples) std::sort(s.begin(), s.end());
  const double plain = samples[0][20], with_hist = samples[1][20];
  std::printf("%s %s, %lld tensors of %lld: plain %.2f, with histograms %.2f ns per 64 elements (median of 41; "
              "+%.2f, %.2fx; minima %.2f, %.2f)\n",
              capability.c_str(), dtype_name.c_str(), static_cast<long long>(tensors), static_cast<long long>(length),
              plain, with_hist, with_hist - plain, with_hist / plain, samples[0][0], samples[1][0]);
}

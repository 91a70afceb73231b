// Interface between the CPU op (grad_stats_cpu.cpp) and the vectorized chunk kernels
// (kernels_impl.cpp), which is compiled once per CPU capability and picked at run time.
#pragma once

#include <cstdint>
#include <string>

#include "../dtype.h"

namespace gradwatch::cpu {

using gradwatch::Dtype;
using gradwatch::kNumDtypes;

// Statistics of one contiguous run of elements. Partials are combined in a fixed order.
struct ChunkStats {
  double sumsq = 0.0;     // sum of squares (float32 lanes folded into float64 every few hundred elements)
  double max_abs = 0.0;   // NaN when the chunk holds a NaN
  int64_t nonfinite = 0;  // NaN and +-Inf elements, counted one by one
};

using ChunkStatsFn = ChunkStats (*)(const void* data, int64_t n);
// data[i] *= factor for i < n, in float for reduced precision types. factor == 0 writes zeros.
using ScaleFn = void (*)(void* data, int64_t n, float factor);

struct KernelTable {
  ChunkStatsFn stats[kNumDtypes];
  ScaleFn scale[kNumDtypes];
};

// One definition per compiled capability (see setup.py); only those compiled exist.
namespace DEFAULT { const KernelTable& kernel_table(); }
namespace AVX2 { const KernelTable& kernel_table(); }
namespace AVX512 { const KernelTable& kernel_table(); }

// Name of the variant chosen for this processor (once, from at::get_cpu_capability(), which
// honours ATEN_CPU_CAPABILITY), limited to the variants this build contains.
std::string selected_capability();

}  // namespace gradwatch::cpu

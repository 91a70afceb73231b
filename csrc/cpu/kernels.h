// Interface between the CPU op (grad_stats_cpu.cpp) and the vectorized chunk kernels
// (kernels_impl.cpp), which is compiled once per CPU capability and picked at run time.
#pragma once

#include <cstdint>
#include <string>

#include "../dtype.h"
#include "../hist.h"
#include "../stats.h"

namespace gradwatch::cpu {

using gradwatch::Dtype;
using gradwatch::kNumDtypes;
using gradwatch::Partial;
using gradwatch::ScaleFactor;

// Statistics of one contiguous run of elements (a chunk), exact even where float32 (float64)
// squares overflow or underflow: see needs_scaled_pass in stats.h.
using ChunkStatsFn = Partial (*)(const void* data, int64_t n);
// The same statistics for each of a run of consecutive chunks of one tensor (n elements cut into
// chunks of `chunk`, the last one shorter: partials[k] is chunk k's, exactly what ChunkStatsFn gives
// it), and the run's log2 magnitude histogram (hist.h) added to hist_row, the tensor's int64
// [kHistBins] row: atomically, as a tensor's runs may be on several threads, unless `whole_tensor`
// (the run is the tensor: nothing else writes the row).
using RunStatsHistFn = void (*)(const void* data, int64_t n, int64_t chunk, Partial* partials, int64_t* hist_row,
                                bool whole_tensor);
// data[i] = scale_value(data[i], factor) for i < n (mode kSkip never reaches the kernel).
using ScaleFn = void (*)(void* data, int64_t n, const ScaleFactor& factor);

struct KernelTable {
  ChunkStatsFn stats[kNumDtypes];
  RunStatsHistFn stats_hist[kNumDtypes];
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

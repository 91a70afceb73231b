// CPU implementations of gradwatch::grad_stats and gradwatch::scale_: split every tensor into
// fixed-size chunks, run the vectorized chunk kernel over all chunks in one at::parallel_for,
// and combine the per-chunk partials in a fixed order, so results do not depend on threading.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "../hist.h"
#include "../stats.h"
#include "../tensor_list.h"
#include "kernels.h"
#include "ops.h"

namespace gradwatch::cpu {

namespace {

struct Selected {
  const KernelTable* table;
  const char* name;
};

const Selected& selected() {
  static const Selected choice = [] {
    const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
#ifdef GRADWATCH_HAVE_AVX512
    if (cap == "AVX512") return Selected{&AVX512::kernel_table(), "AVX512"};
#endif
#ifdef GRADWATCH_HAVE_AVX2
    if (cap == "AVX512" || cap == "AVX2") return Selected{&AVX2::kernel_table(), "AVX2"};
#endif
    return Selected{&DEFAULT::kernel_table(), "DEFAULT"};
  }();
  return choice;
}

// Elements per chunk: 128 KiB of float32, small enough to balance threads on mixed sizes.
constexpr int64_t kChunk = 32768;
// Below this many elements per task, threading costs more than it saves.
constexpr int64_t kMinElementsPerTask = 65536;

struct Chunk {
  int64_t tensor;
  int64_t offset;
  int64_t length;
};

std::vector<Chunk> split_into_chunks(const std::vector<FlatTensor>& inputs, int64_t* total_elements) {
  std::vector<Chunk> chunks;
  *total_elements = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const int64_t n = inputs[i].numel;
    *total_elements += n;
    for (int64_t offset = 0; offset < n; offset += kChunk) {
      chunks.push_back(Chunk{static_cast<int64_t>(i), offset, std::min(kChunk, n - offset)});
    }
  }
  return chunks;
}

// Runs fn(begin, end) for contiguous chunk ranges covering every chunk, in one at::parallel_for
// whose tasks hold about the same number of elements (not chunks: a bias is a chunk too).
template <typename F>
void parallel_over_chunk_ranges(const std::vector<Chunk>& chunks, int64_t total_elements, const F& fn) {
  const int64_t num_tasks =
      std::clamp<int64_t>(total_elements / kMinElementsPerTask, 1, std::max<int64_t>(1, at::get_num_threads()));
  std::vector<int64_t> bounds{0};
  int64_t seen = 0;
  for (size_t c = 0; c < chunks.size(); ++c) {
    seen += chunks[c].length;
    if (static_cast<int64_t>(bounds.size()) < num_tasks && seen * num_tasks >= total_elements * static_cast<int64_t>(bounds.size())) {
      bounds.push_back(static_cast<int64_t>(c) + 1);
    }
  }
  bounds.resize(num_tasks + 1, static_cast<int64_t>(chunks.size()));
  bounds.back() = static_cast<int64_t>(chunks.size());
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) fn(bounds[task], bounds[task + 1]);
  });
}

// Runs fn(chunk index) for every chunk, as above.
template <typename F>
void parallel_over_chunks(const std::vector<Chunk>& chunks, int64_t total_elements, const F& fn) {
  parallel_over_chunk_ranges(chunks, total_elements, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) fn(c);
  });
}

// The statistics of every tensor (float64 [N + 1, kNumStats]) and, when hist_rows is given, each
// tensor's log2 histogram added to hist_rows[i * kHistBins ...] (zeroed by the caller), in one pass.
at::Tensor stats_pass(at::TensorList tensors, int64_t* hist_rows) {
  const auto n = static_cast<int64_t>(tensors.size());
  std::vector<at::Tensor> copies;
  const std::vector<FlatTensor> inputs = flat_inputs(tensors, hist_rows ? "grad_stats_hist" : "grad_stats", copies);
  int64_t total_elements = 0;
  const std::vector<Chunk> chunks = split_into_chunks(inputs, &total_elements);
  std::vector<Partial> partials(chunks.size());
  const KernelTable& table = *selected().table;
  if (hist_rows == nullptr) {
    parallel_over_chunks(chunks, total_elements, [&](int64_t c) {
      const Chunk& chunk = chunks[c];
      const FlatTensor& in = inputs[chunk.tensor];
      partials[c] = table.stats[static_cast<int>(in.dtype)](in.data + chunk.offset * in.element_size, chunk.length);
    });
  } else {
    // A task's consecutive chunks of one tensor are one run: one histogram, counted and added to the
    // tensor's row once (a run that is the whole tensor is the row's only writer).
    parallel_over_chunk_ranges(chunks, total_elements, [&](int64_t begin, int64_t end) {
      for (int64_t first = begin, last = begin; first < end; first = last) {
        int64_t length = 0;
        for (; last < end && chunks[last].tensor == chunks[first].tensor; ++last) length += chunks[last].length;
        const Chunk& chunk = chunks[first];
        const FlatTensor& in = inputs[chunk.tensor];
        table.stats_hist[static_cast<int>(in.dtype)](in.data + chunk.offset * in.element_size, length, kChunk,
                                                     partials.data() + first, hist_rows + chunk.tensor * kHistBins,
                                                     length == in.numel);
      }
    });
  }

  // Chunks are ordered by tensor, so one sequential pass combines them deterministically.
  std::vector<Partial> per_tensor(tensors.size(), Partial{});
  for (size_t c = 0; c < chunks.size(); ++c) {
    per_tensor[chunks[c].tensor] = combine(per_tensor[chunks[c].tensor], partials[c]);
  }
  at::Tensor out = at::empty({n + 1, kNumStats}, at::TensorOptions().dtype(at::kDouble));
  double* rows = out.data_ptr<double>();
  Partial total{};
  for (int64_t i = 0; i < n; ++i) {
    write_row(rows + kNumStats * i, per_tensor[i]);
    total = combine(total, per_tensor[i]);
  }
  write_row(rows + kNumStats * n, total);
  return out;
}

std::tuple<at::Tensor, at::Tensor> grad_stats_hist_cpu(at::TensorList tensors) {
  TORCH_CHECK_VALUE(!tensors.empty(), "grad_stats_hist: tensors is empty; pass at least one tensor");
  at::Tensor hist = at::zeros({static_cast<int64_t>(tensors.size()), kHistBins}, at::TensorOptions().dtype(at::kLong));
  at::Tensor stats = stats_pass(tensors, hist.data_ptr<int64_t>());
  return {stats, hist};
}

// The distinct elements of a strided scale_ input, one by one (plan::offset_of, as the CUDA kernel).
template <typename T>
void scale_strided(const plan::Input& in, const plan::StridedLayout& layout, const ScaleFactor& factor) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  int64_t words[plan::kLayoutWords];
  words[0] = layout.ndim;
  std::copy(layout.sizes, layout.sizes + plan::kMaxDims, words + 1);
  std::copy(layout.strides, layout.strides + plan::kMaxDims, words + 1 + plan::kMaxDims);
  T* base = reinterpret_cast<T*>(in.address);
  at::parallel_for(0, in.numel, kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* p = base + plan::offset_of(words, i);
      *p = scale_value<T, A>(*p, factor);
    }
  });
}

void scale_cpu(at::TensorList tensors, const at::Tensor& factors) {
  const ScaleInputs all = scale_inputs(tensors);
  const at::Tensor f64 = checked_factors(factors, tensors.size(), tensors[0].device());
  const double* f = f64.const_data_ptr<double>();
  std::vector<FlatTensor> flat;
  std::vector<ScaleFactor> flat_factors;
  for (size_t i = 0; i < all.inputs.size(); ++i) {
    const plan::Input& in = all.inputs[i];
    const ScaleFactor factor = make_scale_factor(f[i]);
    if (factor.mode == ScaleMode::kSkip || in.numel == 0) continue;  // factor 1: not even read
    if (in.layout >= 0) {
      const plan::StridedLayout& layout = all.layouts[in.layout];
      switch (in.dtype) {
        case Dtype::Float: scale_strided<float>(in, layout, factor); break;
        case Dtype::Double: scale_strided<double>(in, layout, factor); break;
        case Dtype::Half: scale_strided<c10::Half>(in, layout, factor); break;
        case Dtype::BFloat16: scale_strided<c10::BFloat16>(in, layout, factor); break;
      }
      continue;
    }
    flat.push_back(FlatTensor{reinterpret_cast<char*>(in.address), in.numel, in.dtype, element_size(in.dtype)});
    flat_factors.push_back(factor);
  }
  int64_t total_elements = 0;
  const std::vector<Chunk> chunks = split_into_chunks(flat, &total_elements);
  const KernelTable& table = *selected().table;
  parallel_over_chunks(chunks, total_elements, [&](int64_t c) {
    const Chunk& chunk = chunks[c];
    const FlatTensor& in = flat[chunk.tensor];
    table.scale[static_cast<int>(in.dtype)](in.data + chunk.offset * in.element_size, chunk.length,
                                            flat_factors[chunk.tensor]);
  });
  bump_versions(tensors);
}

}  // namespace

at::Tensor grad_stats_cpu(at::TensorList tensors) { return stats_pass(tensors, nullptr); }

std::string selected_capability() { return selected().name; }

}  // namespace gradwatch::cpu

TORCH_LIBRARY_IMPL(gradwatch, CPU, m) {
  m.impl("grad_stats", &gradwatch::cpu::grad_stats_cpu);
  m.impl("grad_stats_hist", &gradwatch::cpu::grad_stats_hist_cpu);
  m.impl("scale_", &gradwatch::cpu::scale_cpu);
}

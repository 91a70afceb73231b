// CPU implementations of gradwatch::grad_stats and gradwatch::scale_: split every tensor into
// fixed-size chunks, run the vectorized chunk kernel over all chunks in one at::parallel_for,
// and combine the per-chunk partials in a fixed order, so results do not depend on threading.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../tensor_list.h"
#include "kernels.h"

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

// Runs fn(chunk index) for every chunk, in one at::parallel_for whose tasks hold about the same
// number of elements (not chunks: a bias is a chunk too), each task a contiguous chunk range.
template <typename F>
void parallel_over_chunks(const std::vector<Chunk>& chunks, int64_t total_elements, const F& fn) {
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
    for (int64_t task = begin; task < end; ++task) {
      for (int64_t c = bounds[task]; c < bounds[task + 1]; ++c) fn(c);
    }
  });
}

inline double nan_max(double a, double b) { return (std::isnan(a) || a >= b) ? a : b; }

at::Tensor grad_stats_cpu(at::TensorList tensors) {
  const auto n = static_cast<int64_t>(tensors.size());
  std::vector<at::Tensor> copies;
  const std::vector<FlatTensor> inputs = flat_inputs(tensors, "grad_stats", copies);
  int64_t total_elements = 0;
  const std::vector<Chunk> chunks = split_into_chunks(inputs, &total_elements);
  std::vector<ChunkStats> partials(chunks.size());
  const KernelTable& table = *selected().table;
  parallel_over_chunks(chunks, total_elements, [&](int64_t c) {
    const Chunk& chunk = chunks[c];
    const FlatTensor& in = inputs[chunk.tensor];
    partials[c] = table.stats[static_cast<int>(in.dtype)](in.data + chunk.offset * in.element_size, chunk.length);
  });

  // Chunks are ordered by tensor, so one sequential pass combines them deterministically.
  std::vector<ChunkStats> per_tensor(tensors.size());
  for (size_t c = 0; c < chunks.size(); ++c) {
    ChunkStats& acc = per_tensor[chunks[c].tensor];
    acc.sumsq += partials[c].sumsq;
    acc.max_abs = nan_max(acc.max_abs, partials[c].max_abs);
    acc.nonfinite += partials[c].nonfinite;
  }
  at::Tensor out = at::zeros({n + 1, 3}, at::TensorOptions().dtype(at::kDouble));
  double* row = out.data_ptr<double>();
  ChunkStats total;
  for (int64_t i = 0; i < n; ++i, row += 3) {
    const ChunkStats& s = per_tensor[i];
    row[0] = std::sqrt(s.sumsq);
    row[1] = s.max_abs;
    row[2] = static_cast<double>(s.nonfinite);
    total.sumsq += s.sumsq;
    total.max_abs = nan_max(total.max_abs, s.max_abs);
    total.nonfinite += s.nonfinite;
  }
  row[0] = std::sqrt(total.sumsq);
  row[1] = total.max_abs;
  row[2] = static_cast<double>(total.nonfinite);
  return out;
}

void scale_cpu(at::TensorList tensors, const at::Tensor& factors) {
  TORCH_CHECK_VALUE(!tensors.empty(), "scale_: tensors is empty; pass at least one tensor");
  check_factors(factors, tensors.size(), tensors[0].device());
  const at::Tensor f_contig = factors.contiguous();
  const float* f = f_contig.const_data_ptr<float>();
  std::vector<FlatTensor> inputs;
  std::vector<float> input_factors;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const Dtype dtype = dtype_code(t, i, "scale_");
    check_device(t, i, tensors[0].device(), "scale_");
    if (f[i] == 1.0f) continue;  // nothing to write
    if (!t.is_non_overlapping_and_dense()) {  // rare strided view: let ATen write it in place
      if (f[i] == 0.0f) {
        t.zero_();
      } else {  // same arithmetic as the kernels: float32 (float64) product, rounded once
        t.copy_(t.to(dtype == Dtype::Double ? at::kDouble : at::kFloat).mul_(f[i]));
      }
      continue;
    }
    inputs.push_back(FlatTensor{static_cast<char*>(t.data_ptr()), t.numel(), dtype, t.element_size()});
    input_factors.push_back(f[i]);
  }
  int64_t total_elements = 0;
  const std::vector<Chunk> chunks = split_into_chunks(inputs, &total_elements);
  const KernelTable& table = *selected().table;
  parallel_over_chunks(chunks, total_elements, [&](int64_t c) {
    const Chunk& chunk = chunks[c];
    const FlatTensor& in = inputs[chunk.tensor];
    table.scale[static_cast<int>(in.dtype)](in.data + chunk.offset * in.element_size, chunk.length,
                                            input_factors[chunk.tensor]);
  });
}

}  // namespace

std::string selected_capability() { return selected().name; }

}  // namespace gradwatch::cpu

TORCH_LIBRARY_IMPL(gradwatch, CPU, m) {
  m.impl("grad_stats", &gradwatch::cpu::grad_stats_cpu);
  m.impl("scale_", &gradwatch::cpu::scale_cpu);
}

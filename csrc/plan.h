// The launch plan of the CUDA multi-tensor kernels, and the index arithmetic they run: plain C++
// (no CUDA, no ATen) so that tests/cpp/ can check on any CPU that every element is visited exactly
// once, whatever the sizes, offsets and alignments. The device walks exactly these functions.
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "dtype.h"

namespace gradwatch::plan {

constexpr int kThreads = 256;           // threads per block of the task kernels
constexpr int kWarps = kThreads / 32;   // a pack gives each of its tasks one warp
constexpr int64_t kChunk = 65536;       // elements of a large tensor per task
constexpr int64_t kSmall = 4096;        // tasks up to this length are read by one warp, others by a block
constexpr int kMaxTasksPerPack = 64;    // a pack closes at this many tasks or kChunk elements
constexpr int kMaxDims = 8;             // strided (non-dense) tensors of scale_: dims after merging
constexpr int kTensorWords = 3;         // address, Dtype, layout index (-1: dense)
constexpr int kTaskWords = 3;           // tensor index, element offset, length
constexpr int kLayoutWords = 1 + 2 * kMaxDims;  // ndim, sizes, strides (elements; outermost first)

// The memory a non-dense tensor of scale_ covers, as at most kMaxDims (size, stride) pairs.
struct StridedLayout {
  int ndim = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
};

// Element offset of the i-th distinct element of `layout` (row-major over its dims).
C10_HOST_DEVICE inline int64_t offset_of(const int64_t* ndim_sizes_strides, int64_t i) {
  const int ndim = static_cast<int>(ndim_sizes_strides[0]);
  const int64_t* sizes = ndim_sizes_strides + 1;
  const int64_t* strides = sizes + kMaxDims;
  int64_t offset = 0;
  for (int d = ndim - 1; d >= 0; --d) {
    const int64_t size = sizes[d];
    offset += (i % size) * strides[d];
    i /= size;
  }
  return offset;
}

// The distinct memory of a tensor given by sizes and strides (in elements, all >= 0): expanded
// (stride 0) and size-1 dims are dropped, because each memory location is scaled once, whichever
// view of it is passed; the rest is sorted outermost first and merged where contiguous. Returns
// "" and fills `out` (and `*distinct`, the element count), or the reason it cannot be scaled.
inline std::string strided_layout(const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides,
                                  StridedLayout* out, int64_t* distinct) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  *distinct = 1;
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] == 0) {
      *distinct = 0;
      *out = StridedLayout{};
      return "";
    }
    if (sizes[d] != 1 && strides[d] != 0) dims.emplace_back(strides[d], sizes[d]);
  }
  std::sort(dims.begin(), dims.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<std::pair<int64_t, int64_t>> merged;
  for (size_t k = 0; k < dims.size(); ++k) {
    const auto [stride, size] = dims[k];
    // Non-overlapping: each stride must step past everything the dims after it (inner) cover.
    int64_t extent = 1;
    for (size_t j = k + 1; j < dims.size(); ++j) extent += (dims[j].second - 1) * dims[j].first;
    if (stride < extent) return "its elements overlap in memory (it is not an expanded view of distinct elements)";
    if (!merged.empty() && merged.back().first == stride * size) {
      merged.back() = {stride, merged.back().second * size};
    } else {
      merged.emplace_back(stride, size);
    }
  }
  if (static_cast<int>(merged.size()) > kMaxDims) {
    return "it has more than " + std::to_string(kMaxDims) + " dimensions that cannot be merged";
  }
  *out = StridedLayout{};
  out->ndim = static_cast<int>(merged.size());
  for (size_t d = 0; d < merged.size(); ++d) {
    out->strides[d] = merged[d].first;
    out->sizes[d] = merged[d].second;
    *distinct *= merged[d].second;
  }
  return "";
}

// A layout that is one run of elements (stride 1, or no dims at all) needs no strided walk.
inline bool is_flat(const StridedLayout& layout) {
  return layout.ndim == 0 || (layout.ndim == 1 && layout.strides[0] == 1);
}

// What the planner needs of one tensor.
struct Input {
  uintptr_t address;
  int64_t numel;  // elements the kernel visits (distinct elements for a strided scale_ input)
  Dtype dtype;
  int layout;     // index into the plan's layouts, -1 for a flat run
};

// The task table, one int64 array (offsets in words from its start):
//   tensors            [N][kTensorWords]
//   tasks              [T][kTaskWords]
//   tensor_task_begin  [N+1]   tasks of tensor i are [begin[i], begin[i+1]), in element order
//   block_task_begin   [B+1]   tasks of block b are [begin[b], begin[b+1])
//   layouts            [L][kLayoutWords]
struct Shape {
  int64_t n = 0, num_tasks = 0, num_blocks = 0, num_layouts = 0;
  C10_HOST_DEVICE int64_t words() const {
    return n * kTensorWords + num_tasks * kTaskWords + (n + 1) + (num_blocks + 1) + num_layouts * kLayoutWords;
  }
};

struct Table {
  const int64_t* tensors;
  const int64_t* tasks;
  const int64_t* tensor_task_begin;
  const int64_t* block_task_begin;
  const int64_t* layouts;
};

C10_HOST_DEVICE inline Table view(const int64_t* base, const Shape& s) {
  Table t{};
  t.tensors = base;
  t.tasks = t.tensors + s.n * kTensorWords;
  t.tensor_task_begin = t.tasks + s.num_tasks * kTaskWords;
  t.block_task_begin = t.tensor_task_begin + s.n + 1;
  t.layouts = t.block_task_begin + s.num_blocks + 1;
  return t;
}

// One task as the kernels see it.
struct Task {
  int64_t tensor;
  uintptr_t address;  // of the tensor's first element
  int64_t offset;     // first element index of the task
  int64_t length;
  Dtype dtype;
  const int64_t* layout;  // nullptr: a flat run
};

C10_HOST_DEVICE inline Task task_at(const Table& t, int64_t task) {
  const int64_t* w = t.tasks + kTaskWords * task;
  const int64_t* tensor = t.tensors + kTensorWords * w[0];
  return Task{w[0], static_cast<uintptr_t>(tensor[0]), w[1], w[2], static_cast<Dtype>(tensor[1]),
              tensor[2] < 0 ? nullptr : t.layouts + kLayoutWords * tensor[2]};
}

// A block reads its one task with all threads when the task is longer than kSmall, otherwise each
// task of the block gets a warp. Decided by the task alone, so a tensor's statistics do not depend
// on which other tensors share its pack (or its call).
C10_HOST_DEVICE inline bool block_reads_whole_task(int64_t length) { return length > kSmall; }

struct Plan {
  Shape shape;
  std::vector<int64_t> words;
};

// Tensors larger than kSmall are cut into kChunk-element tasks, one block each; runs of small
// tensors are packed, a warp per tensor. Empty tensors get no task.
inline Plan make_plan(const std::vector<Input>& inputs, const std::vector<StridedLayout>& layouts) {
  const auto n = static_cast<int64_t>(inputs.size());
  std::vector<int64_t> tasks, tensor_begin, block_begin;
  tensor_begin.reserve(n + 1);
  bool pack_open = false;
  int pack_tasks = 0;
  int64_t pack_elements = 0;
  for (int64_t i = 0; i < n; ++i) {
    tensor_begin.push_back(static_cast<int64_t>(tasks.size() / kTaskWords));
    const int64_t numel = inputs[i].numel;
    if (numel == 0) continue;
    if (numel <= kSmall) {
      if (!pack_open) {
        block_begin.push_back(static_cast<int64_t>(tasks.size() / kTaskWords));
        pack_tasks = 0;
        pack_elements = 0;
      }
      tasks.insert(tasks.end(), {i, 0, numel});
      pack_tasks += 1;
      pack_elements += numel;
      pack_open = pack_tasks < kMaxTasksPerPack && pack_elements < kChunk;
      continue;
    }
    pack_open = false;
    for (int64_t offset = 0; offset < numel; offset += kChunk) {
      block_begin.push_back(static_cast<int64_t>(tasks.size() / kTaskWords));
      tasks.insert(tasks.end(), {i, offset, std::min(kChunk, numel - offset)});
    }
  }
  Plan plan;
  plan.shape.n = n;
  plan.shape.num_tasks = static_cast<int64_t>(tasks.size() / kTaskWords);
  plan.shape.num_blocks = static_cast<int64_t>(block_begin.size());
  plan.shape.num_layouts = static_cast<int64_t>(layouts.size());
  tensor_begin.push_back(plan.shape.num_tasks);
  block_begin.push_back(plan.shape.num_tasks);
  plan.words.reserve(plan.shape.words());
  for (const Input& in : inputs) {
    plan.words.insert(plan.words.end(), {static_cast<int64_t>(in.address), static_cast<int64_t>(in.dtype),
                                         static_cast<int64_t>(in.layout)});
  }
  for (const auto* part : {&tasks, &tensor_begin, &block_begin}) plan.words.insert(plan.words.end(), part->begin(), part->end());
  for (const StridedLayout& l : layouts) {
    plan.words.push_back(l.ndim);
    plan.words.insert(plan.words.end(), l.sizes, l.sizes + kMaxDims);
    plan.words.insert(plan.words.end(), l.strides, l.strides + kMaxDims);
  }
  return plan;
}

// How one thread of `stride` visits a flat run of n elements at `address`: first `head` single
// elements up to a 16-byte boundary, then `nvec` 16-byte vectors, then the tail one by one.
// Addresses that are not a multiple of the element size (never from torch) are read one by one.
struct VecSplit {
  int64_t head;
  int64_t nvec;
  int per_vec;  // elements per 16-byte vector
};

C10_HOST_DEVICE inline VecSplit vec_split(uintptr_t address, int64_t n, int element_size) {
  const int per_vec = 16 / element_size;
  if (address % element_size != 0) return VecSplit{n, 0, per_vec};
  int64_t head = static_cast<int64_t>((16 - address % 16) % 16) / element_size;
  head = head < n ? head : n;
  return VecSplit{head, (n - head) / per_vec, per_vec};
}

// Calls scalar(i), vector4(i0, i1, i2, i3) and vector1(i) (i: first element of a vector) for the
// elements lane `lane` of `stride` threads owns in a flat run split by `s`; vectors come four at a
// time where they can, so that four 16-byte loads are in flight per thread.
template <typename Scalar, typename Vector4, typename Vector1>
C10_HOST_DEVICE inline void walk(const VecSplit& s, int64_t n, int lane, int stride, Scalar&& scalar, Vector4&& vector4,
                                 Vector1&& vector1) {
  for (int64_t i = lane; i < s.head; i += stride) scalar(i);
  const int64_t step = static_cast<int64_t>(stride) * s.per_vec;
  int64_t v = lane;
  for (; v + 3 * stride < s.nvec; v += 4 * stride) {
    const int64_t i = s.head + v * s.per_vec;
    vector4(i, i + step, i + 2 * step, i + 3 * step);
  }
  for (; v < s.nvec; v += stride) vector1(s.head + v * s.per_vec);
  for (int64_t i = s.head + s.nvec * s.per_vec + lane; i < n; i += stride) scalar(i);
}

// Byte ranges [begin, end) of the tensors of one scale_ call; returns the first pair (i, j) whose
// ranges intersect, or (-1, -1). Scaling such a pair would scale shared elements twice.
inline std::pair<int64_t, int64_t> first_overlap(const std::vector<std::pair<uintptr_t, uintptr_t>>& ranges) {
  std::vector<int64_t> order;
  for (size_t i = 0; i < ranges.size(); ++i) {
    if (ranges[i].second > ranges[i].first) order.push_back(static_cast<int64_t>(i));
  }
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return ranges[a].first != ranges[b].first ? ranges[a].first < ranges[b].first : a < b;
  });
  int64_t reach = -1;  // the range reaching furthest so far
  for (const int64_t i : order) {
    if (reach >= 0 && ranges[i].first < ranges[reach].second) return {std::min(reach, i), std::max(reach, i)};
    if (reach < 0 || ranges[i].second > ranges[reach].second) reach = i;
  }
  return {-1, -1};
}

}  // namespace gradwatch::plan

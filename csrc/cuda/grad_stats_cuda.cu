// CUDA implementations of gradwatch::grad_stats and gradwatch::scale_ as multi-tensor kernels:
// every tensor is cut into tasks (a 64K-element chunk of a large tensor, or a whole small tensor),
// blocks take either one large task or a pack of small ones (a warp each), and a task table on
// the device tells each block what to read. grad_stats is two launches for any number of tensors
// and dtypes: per-task partials, then one block that combines them in a fixed order (no atomics,
// so results are bit-reproducible). Nothing is read back to the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "../tensor_list.h"

namespace gradwatch::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kFinalThreads = 512;
constexpr int64_t kChunk = 65536;     // elements of a large tensor per task
constexpr int64_t kSmall = 4096;      // tensors up to this size are packed, one warp per tensor
constexpr int kMaxTasksPerPack = 64;  // and at most this many (or kChunk elements) per block

// The task table, one int64 buffer (word offsets from its start):
//   tensors            [N][2]  address, Dtype
//   tasks              [T][3]  tensor index, element offset, length
//   tensor_task_begin  [N+1]   tasks of tensor i are [begin[i], begin[i+1])
//   block_task_begin   [B+1]   tasks of block b are [begin[b], begin[b+1])
struct TaskTable {
  const int64_t* tensors;
  const int64_t* tasks;
  const int64_t* tensor_task_begin;
  const int64_t* block_task_begin;
};

__host__ __device__ inline TaskTable view_table(const int64_t* base, int64_t n, int64_t t) {
  return TaskTable{base, base + 2 * n, base + 2 * n + 3 * t, base + 2 * n + 3 * t + n + 1};
}

struct Plan {
  at::Tensor table;  // on the device
  int64_t num_tasks;
  int64_t num_blocks;
};

// Builds the task table on the host (pinned) and copies it to the device without a sync: the
// caching host allocator keeps the pinned buffer alive until the copy has run.
Plan make_plan(const std::vector<FlatTensor>& inputs, const at::Device& device) {
  const auto n = static_cast<int64_t>(inputs.size());
  std::vector<int64_t> tasks, tensor_begin, block_begin;
  bool pack_open = false;
  int pack_tasks = 0;
  int64_t pack_elements = 0;
  for (int64_t i = 0; i < n; ++i) {
    tensor_begin.push_back(static_cast<int64_t>(tasks.size() / 3));
    const int64_t numel = inputs[i].numel;
    if (numel == 0) continue;
    if (numel <= kSmall) {
      if (!pack_open) {
        block_begin.push_back(static_cast<int64_t>(tasks.size() / 3));
        pack_open = true;
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
      block_begin.push_back(static_cast<int64_t>(tasks.size() / 3));
      tasks.insert(tasks.end(), {i, offset, std::min(kChunk, numel - offset)});
    }
  }
  const auto num_tasks = static_cast<int64_t>(tasks.size() / 3);
  const auto num_blocks = static_cast<int64_t>(block_begin.size());
  tensor_begin.push_back(num_tasks);
  block_begin.push_back(num_tasks);

  const int64_t words = 2 * n + 3 * num_tasks + (n + 1) + (num_blocks + 1);
  at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* w = host.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    *w++ = static_cast<int64_t>(reinterpret_cast<intptr_t>(inputs[i].data));
    *w++ = static_cast<int64_t>(inputs[i].dtype);
  }
  for (const auto* part : {&tasks, &tensor_begin, &block_begin}) {
    std::memcpy(w, part->data(), part->size() * sizeof(int64_t));
    w += part->size();
  }
  return Plan{host.to(device, at::kLong, /*non_blocking=*/true), num_tasks, num_blocks};
}

// ---- statistics ---------------------------------------------------------------------------

struct Partial {
  double sumsq;
  double max_abs;
  long long nonfinite;
};

template <typename A>
__device__ inline A nan_max(A a, A b) {
  return (a != a || a >= b) ? a : b;  // a NaN on either side wins, unlike fmax
}

// Per-thread accumulator: float32 for reduced precision and float32 inputs, float64 for float64.
template <typename T>
struct ThreadStats {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  A sumsq = 0;
  A max_abs = 0;
  long long nonfinite = 0;

  __device__ inline void add(T raw) {
    const A v = static_cast<A>(raw);
    sumsq += v * v;  // NaN and Inf propagate into the norm, as torch.linalg.vector_norm does
    max_abs = nan_max(max_abs, static_cast<A>(fabs(v)));
    nonfinite += !isfinite(v);  // counted from the element, never inferred from the sum
  }

  __device__ inline void add16(const uint4& raw) {
    const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < int(16 / sizeof(T)); ++k) add(x[k]);
  }
};

// Accumulates elements [0, n) of p visited by `lane` among `stride` threads.
template <typename T>
__device__ Partial range_stats(const T* p, int64_t n, int lane, int stride) {
  ThreadStats<T> acc;
  constexpr int kVec = 16 / sizeof(T);
  int64_t scalar_from = 0;
  if (reinterpret_cast<uintptr_t>(p) % 16 == 0) {  // 16-byte loads, four in flight per thread
    const uint4* pv = reinterpret_cast<const uint4*>(p);
    const int64_t nvec = n / kVec;
    int64_t v = lane;
    for (; v + 3 * stride < nvec; v += 4 * stride) {
      const uint4 r0 = __ldg(pv + v), r1 = __ldg(pv + v + stride);
      const uint4 r2 = __ldg(pv + v + 2 * stride), r3 = __ldg(pv + v + 3 * stride);
      acc.add16(r0);
      acc.add16(r1);
      acc.add16(r2);
      acc.add16(r3);
    }
    for (; v < nvec; v += stride) acc.add16(__ldg(pv + v));
    scalar_from = nvec * kVec;
  }
  for (int64_t i = scalar_from + lane; i < n; i += stride) acc.add(p[i]);
  return Partial{static_cast<double>(acc.sumsq), static_cast<double>(acc.max_abs), acc.nonfinite};
}

__device__ inline void combine(Partial& into, const Partial& p) {
  into.sumsq += p.sumsq;
  into.max_abs = nan_max(into.max_abs, p.max_abs);
  into.nonfinite += p.nonfinite;
}

__device__ inline Partial warp_reduce(Partial p) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    Partial other;
    other.sumsq = __shfl_down_sync(0xffffffffu, p.sumsq, offset);
    other.max_abs = __shfl_down_sync(0xffffffffu, p.max_abs, offset);
    other.nonfinite = __shfl_down_sync(0xffffffffu, p.nonfinite, offset);
    combine(p, other);
  }
  return p;
}

// Fixed-shape reduction over the block; the result is valid in thread 0.
template <int kBlockThreads>
__device__ inline Partial block_reduce(Partial p) {
  __shared__ Partial warp_results[kBlockThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  p = warp_reduce(p);
  if (lane == 0) warp_results[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < kBlockThreads / 32 ? warp_results[lane] : Partial{0.0, 0.0, 0};
    p = warp_reduce(p);
  }
  return p;
}

__device__ Partial task_stats(const TaskTable& table, int64_t task, int lane, int stride) {
  const int64_t* t = table.tasks + 3 * task;
  const int64_t* tensor = table.tensors + 2 * t[0];
  const int64_t offset = t[1], length = t[2];
  switch (static_cast<Dtype>(tensor[1])) {
    case Dtype::Float: return range_stats(reinterpret_cast<const float*>(tensor[0]) + offset, length, lane, stride);
    case Dtype::Double: return range_stats(reinterpret_cast<const double*>(tensor[0]) + offset, length, lane, stride);
    case Dtype::Half:
      return range_stats(reinterpret_cast<const c10::Half*>(tensor[0]) + offset, length, lane, stride);
    case Dtype::BFloat16:
      return range_stats(reinterpret_cast<const c10::BFloat16*>(tensor[0]) + offset, length, lane, stride);
  }
  return Partial{0.0, 0.0, 0};
}

__global__ void __launch_bounds__(kThreads)
    task_stats_kernel(const int64_t* table_base, int64_t n, int64_t num_tasks, double* partials) {
  const TaskTable table = view_table(table_base, n, num_tasks);
  const int64_t first = table.block_task_begin[blockIdx.x], last = table.block_task_begin[blockIdx.x + 1];
  if (last - first == 1) {  // the whole block reads one chunk
    const Partial p = block_reduce<kThreads>(task_stats(table, first, threadIdx.x, kThreads));
    if (threadIdx.x == 0) {
      partials[3 * first] = p.sumsq;
      partials[3 * first + 1] = p.max_abs;
      partials[3 * first + 2] = static_cast<double>(p.nonfinite);
    }
    return;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t task = first + warp; task < last; task += kWarps) {  // a pack of small tensors
    const Partial p = warp_reduce(task_stats(table, task, lane, 32));
    if (lane == 0) {
      partials[3 * task] = p.sumsq;
      partials[3 * task + 1] = p.max_abs;
      partials[3 * task + 2] = static_cast<double>(p.nonfinite);
    }
  }
}

// One block: each thread combines the partials of its tensors in task order, then the block
// reduces the totals in a fixed tree. Writes out[N + 1][3] (see gradwatch.cpp).
__global__ void __launch_bounds__(kFinalThreads)
    finalize_kernel(const int64_t* table_base, int64_t n, int64_t num_tasks, const double* partials, double* out) {
  const TaskTable table = view_table(table_base, n, num_tasks);
  Partial total{0.0, 0.0, 0};
  for (int64_t i = threadIdx.x; i < n; i += kFinalThreads) {
    Partial s{0.0, 0.0, 0};
    for (int64_t task = table.tensor_task_begin[i]; task < table.tensor_task_begin[i + 1]; ++task) {
      combine(s, Partial{partials[3 * task], partials[3 * task + 1], static_cast<long long>(partials[3 * task + 2])});
    }
    out[3 * i] = sqrt(s.sumsq);
    out[3 * i + 1] = s.max_abs;
    out[3 * i + 2] = static_cast<double>(s.nonfinite);
    combine(total, s);
  }
  total = block_reduce<kFinalThreads>(total);
  if (threadIdx.x == 0) {
    out[3 * n] = sqrt(total.sumsq);
    out[3 * n + 1] = total.max_abs;
    out[3 * n + 2] = static_cast<double>(total.nonfinite);
  }
}

at::Tensor grad_stats_cuda(at::TensorList tensors) {
  std::vector<at::Tensor> copies;
  const std::vector<FlatTensor> inputs = flat_inputs(tensors, "grad_stats", copies);
  const at::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto n = static_cast<int64_t>(inputs.size());
  const Plan plan = make_plan(inputs, device);
  const auto doubles = at::TensorOptions().dtype(at::kDouble).device(device);
  at::Tensor partials = at::empty({std::max<int64_t>(plan.num_tasks, 1), 3}, doubles);
  at::Tensor out = at::empty({n + 1, 3}, doubles);
  const int64_t* table = plan.table.const_data_ptr<int64_t>();
  if (plan.num_blocks > 0) {
    task_stats_kernel<<<plan.num_blocks, kThreads, 0, stream>>>(table, n, plan.num_tasks,
                                                                 partials.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finalize_kernel<<<1, kFinalThreads, 0, stream>>>(table, n, plan.num_tasks, partials.const_data_ptr<double>(),
                                                   out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---- scaling ------------------------------------------------------------------------------

template <typename T>
__device__ void range_scale(T* p, int64_t n, float factor, int lane, int stride) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  for (int64_t i = lane; i < n; i += stride) {
    // zeros, not x * 0: clearing a NaN gradient must not leave NaN behind
    p[i] = factor == 0.0f ? T(0) : static_cast<T>(static_cast<A>(p[i]) * static_cast<A>(factor));
  }
}

__device__ void task_scale(const TaskTable& table, int64_t task, const float* factors, int lane, int stride) {
  const int64_t* t = table.tasks + 3 * task;
  const float factor = factors[t[0]];
  if (factor == 1.0f) return;
  const int64_t* tensor = table.tensors + 2 * t[0];
  const int64_t offset = t[1], length = t[2];
  switch (static_cast<Dtype>(tensor[1])) {
    case Dtype::Float: return range_scale(reinterpret_cast<float*>(tensor[0]) + offset, length, factor, lane, stride);
    case Dtype::Double:
      return range_scale(reinterpret_cast<double*>(tensor[0]) + offset, length, factor, lane, stride);
    case Dtype::Half:
      return range_scale(reinterpret_cast<c10::Half*>(tensor[0]) + offset, length, factor, lane, stride);
    case Dtype::BFloat16:
      return range_scale(reinterpret_cast<c10::BFloat16*>(tensor[0]) + offset, length, factor, lane, stride);
  }
}

__global__ void __launch_bounds__(kThreads)
    scale_kernel(const int64_t* table_base, int64_t n, int64_t num_tasks, const float* factors) {
  const TaskTable table = view_table(table_base, n, num_tasks);
  const int64_t first = table.block_task_begin[blockIdx.x], last = table.block_task_begin[blockIdx.x + 1];
  if (last - first == 1) {
    task_scale(table, first, factors, threadIdx.x, kThreads);
    return;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t task = first + warp; task < last; task += kWarps) task_scale(table, task, factors, lane, 32);
}

void scale_cuda(at::TensorList tensors, const at::Tensor& factors) {
  TORCH_CHECK_VALUE(!tensors.empty(), "scale_: tensors is empty; pass at least one tensor");
  const at::Device device = tensors[0].device();
  check_factors(factors, tensors.size(), device);
  // Strided views cannot be written through a flat pointer: write those with ATen ops instead
  // (factor 0 gives zeros there too, via where()).
  std::vector<at::Tensor> dense;
  std::vector<int64_t> dense_index;
  for (size_t i = 0; i < tensors.size(); ++i) {
    dtype_code(tensors[i], i, "scale_");
    check_device(tensors[i], i, device, "scale_");
    if (tensors[i].is_non_overlapping_and_dense()) {
      dense.push_back(tensors[i]);
      dense_index.push_back(static_cast<int64_t>(i));
    } else {
      const auto acc = tensors[i].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      const at::Tensor f = factors.select(0, static_cast<int64_t>(i)).to(acc);
      tensors[i].copy_(at::where(f == 0, at::zeros({}, f.options()), tensors[i].to(acc) * f));
    }
  }
  if (dense.empty()) return;
  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> no_copies;
  const std::vector<FlatTensor> inputs = flat_inputs(dense, "scale_", no_copies);
  const at::Tensor dense_factors =
      dense.size() == tensors.size()
          ? factors.contiguous()
          : factors.index_select(0, at::tensor(dense_index, at::TensorOptions().dtype(at::kLong)).to(device));
  const Plan plan = make_plan(inputs, device);
  if (plan.num_blocks == 0) return;
  scale_kernel<<<plan.num_blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      plan.table.const_data_ptr<int64_t>(), static_cast<int64_t>(inputs.size()), plan.num_tasks,
      dense_factors.const_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace gradwatch::cuda

TORCH_LIBRARY_IMPL(gradwatch, CUDA, m) {
  m.impl("grad_stats", &gradwatch::cuda::grad_stats_cuda);
  m.impl("scale_", &gradwatch::cuda::scale_cuda);
}

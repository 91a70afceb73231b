// CUDA implementations of gradwatch::grad_stats, grad_stats_hist and scale_ as multi-tensor kernels.
// The plan (../plan.h, unit-tested on the CPU) cuts every tensor into tasks; one task walk runs a
// functor per task, a whole block for a large chunk, a warp per task in a pack of small tensors.
// grad_stats: per-task partials (StatsOp), then per-tensor rows (a warp per tensor) and the total
// row (one block); grad_stats_check: the same task walk, then the rows, row N and the check
// (check_block.cuh) in one block, one launch. All combined in a fixed order (no atomics: bit-reproducible, and a tensor's row
// does not depend on the other tensors in the list). The per-element math and the combine are the
// CPU kernel's (../stats.h), overflow-safe scaled pass included. Nothing is read back to the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <list>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../hist.h"
#include "../plan.h"
#include "../stats.h"
#include "../tensor_list.h"
#include "../check_op.h"
#include "check_block.cuh"

namespace gradwatch::cuda {
namespace {

using plan::kThreads;
using plan::kWarps;

// ---- the device plan, cached per unchanged list ---------------------------------------------

struct DevicePlan {
  plan::Shape shape;
  at::Tensor table;  // int64 on the device, plan.h's layout
};

// Plans for the last few lists, keyed by what the plan is built from (addresses, sizes, dtypes,
// layouts): an unchanged gradient list costs no host work beyond building the key, and no copy.
// While a stream is being captured into a CUDA graph, a plan found here is used and kept for the
// life of the process, and a plan built here is uploaded from a pinned buffer kept for the life of
// the process too: the graph's replays read memory that nothing can free or recycle.
class PlanCache {
 public:
  DevicePlan get(const std::vector<plan::Input>& inputs, const std::vector<plan::StridedLayout>& layouts,
                 const at::Device& device, cudaStream_t stream) {
    std::vector<int64_t> key = make_key(inputs, layouts, device);
    const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->key != key) continue;
      entries_.splice(entries_.begin(), entries_, it);  // most recently used first
      Entry& e = entries_.front();
      if (stream != e.stream) {  // the caching allocator must not recycle it while this stream reads
        c10::cuda::CUDACachingAllocator::recordStream(e.plan.table.storage().data_ptr(),
                                                      c10::cuda::getCurrentCUDAStream(device.index()));
      }
      if (capturing) e.captured = true;
      return e.plan;
    }
    const plan::Plan host_plan = plan::make_plan(inputs, layouts);
    at::Tensor pinned = at::empty({static_cast<int64_t>(host_plan.words.size())},
                                  at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(pinned.data_ptr<int64_t>(), host_plan.words.data(), host_plan.words.size() * sizeof(int64_t));
    DevicePlan result{host_plan.shape, pinned.to(device, at::kLong, /*non_blocking=*/true)};
    if (capturing) kept_for_graphs_.push_back(pinned);
    entries_.push_front(Entry{std::move(key), result, stream, capturing});
    while (entries_.size() > kMaxEntries) {
      auto last = std::prev(entries_.end());
      if (last->captured) kept_for_graphs_.push_back(last->plan.table);  // a graph still reads it
      entries_.erase(last);
    }
    return result;
  }

 private:
  static constexpr size_t kMaxEntries = 8;
  struct Entry {
    std::vector<int64_t> key;
    DevicePlan plan;
    cudaStream_t stream;
    bool captured;
  };

  static std::vector<int64_t> make_key(const std::vector<plan::Input>& inputs,
                                       const std::vector<plan::StridedLayout>& layouts, const at::Device& device) {
    std::vector<int64_t> key;
    key.reserve(2 + 4 * inputs.size() + plan::kLayoutWords * layouts.size());
    key.push_back(device.index());
    key.push_back(static_cast<int64_t>(inputs.size()));
    for (const plan::Input& in : inputs) {
      key.insert(key.end(), {static_cast<int64_t>(in.address), in.numel, static_cast<int64_t>(in.dtype), in.layout});
    }
    for (const plan::StridedLayout& l : layouts) {
      key.push_back(l.ndim);
      key.insert(key.end(), l.sizes, l.sizes + plan::kMaxDims);
      key.insert(key.end(), l.strides, l.strides + plan::kMaxDims);
    }
    return key;
  }

  std::mutex mutex_;
  std::list<Entry> entries_;
  std::vector<at::Tensor> kept_for_graphs_;
};

PlanCache& plan_cache() {
  static auto* cache = new PlanCache();  // never destroyed: no CUDA calls at interpreter exit
  return *cache;
}

// ---- groups of threads that share a task --------------------------------------------------

__device__ inline Partial shfl_down(const Partial& p, int offset) {
  Partial o;
  o.sumsq = __shfl_down_sync(0xffffffffu, p.sumsq, offset);
  o.max_abs = __shfl_down_sync(0xffffffffu, p.max_abs, offset);
  o.nonfinite = __shfl_down_sync(0xffffffffu, p.nonfinite, offset);
  o.exponent = __shfl_down_sync(0xffffffffu, p.exponent, offset);
  return o;
}

__device__ inline Partial shfl_from_lane0(const Partial& p) {
  return Partial{__shfl_sync(0xffffffffu, p.sumsq, 0), __shfl_sync(0xffffffffu, p.max_abs, 0),
                 __shfl_sync(0xffffffffu, p.nonfinite, 0), __shfl_sync(0xffffffffu, p.exponent, 0)};
}

// Fixed tree over a warp; the result is valid in lane 0.
__device__ inline Partial warp_reduce(Partial p) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) p = combine(p, shfl_down(p, offset));
  return p;
}

// A warp reading one task: reduce() gives every lane the warp's combined partial.
struct WarpGroup {
  int lane;
  static constexpr int size = 32;
  __device__ Partial reduce(const Partial& p) const { return shfl_from_lane0(warp_reduce(p)); }
};

// Fixed tree over a block of kBlockThreads; the result is valid in thread 0.
template <int kBlockThreads>
__device__ inline Partial block_reduce(Partial p) {
  __shared__ Partial warp_results[kBlockThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // warp_results may still be read by a previous reduction
  p = warp_reduce(p);
  if (lane == 0) warp_results[warp] = p;
  __syncthreads();
  if (warp == 0) p = warp_reduce(lane < kBlockThreads / 32 ? warp_results[lane] : Partial{});
  return p;
}

// The whole block reading one task: reduce() gives every thread the block's combined partial.
struct BlockGroup {
  int lane;
  static constexpr int size = kThreads;
  __device__ Partial reduce(const Partial& p) const {
    __shared__ Partial result;
    const Partial r = block_reduce<kThreads>(p);
    if (threadIdx.x == 0) result = r;
    __syncthreads();
    return result;
  }
};

// The one task walk: a block with one large task reads it whole, otherwise a warp per task.
template <typename Op>
__global__ void __launch_bounds__(kThreads) tasks_kernel(const int64_t* table_base, plan::Shape shape, Op op) {
  const plan::Table table = plan::view(table_base, shape);
  const int64_t first = table.block_task_begin[blockIdx.x], last = table.block_task_begin[blockIdx.x + 1];
  if (last - first == 1) {
    const plan::Task task = plan::task_at(table, first);
    if (plan::block_reads_whole_task(task.length)) {
      op(task, first, BlockGroup{static_cast<int>(threadIdx.x)});
      return;
    }
  }
  const int warp = threadIdx.x / 32;
  for (int64_t t = first + warp; t < last; t += kWarps) {
    op(plan::task_at(table, t), t, WarpGroup{static_cast<int>(threadIdx.x % 32)});
  }
}

// The one dtype dispatch: f(T{}) with the element type of `dtype`.
template <typename F>
__device__ inline void dispatch(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::Float: return f(float{});
    case Dtype::Double: return f(double{});
    case Dtype::Half: return f(c10::Half{});
    case Dtype::BFloat16: return f(c10::BFloat16{});
  }
}

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ inline uint4 load16(const T* p, int64_t i) {
  return __ldg(reinterpret_cast<const uint4*>(p + i));
}

// ---- statistics ---------------------------------------------------------------------------

// Per-task partials: the fast pass (stats.h Accumulator: float32 lanes folded into float64 every
// 16 elements), then, where needs_scaled_pass says the squares overflowed or underflowed, the task
// again with scaled float64 squares, as the CPU kernel does for a chunk. With kHist, the same read
// also counts every element's log2 bin (hist.h) in a per-warp shared-memory histogram, added to the
// tensor's int64 row in global memory after the task (integer atomics: exact in any order, so the
// counts are as reproducible as the statistics). kHist is a template parameter: the
// statistics-only kernel is compiled without any of it.
template <bool kHist>
struct StatsOp {
  Partial* partials;
  unsigned long long* hist;  // [N, kHistBins] int64 rows, zeroed; unused unless kHist

  template <typename Group>
  __device__ void operator()(const plan::Task& task, int64_t index, const Group& g) const {
    [[maybe_unused]] unsigned int* counts = nullptr;
    if constexpr (kHist) {
      __shared__ unsigned int warp_counts[kWarps][kHistBins];
      counts = warp_counts[threadIdx.x / 32];
      for (int b = threadIdx.x % 32; b < kHistBins; b += 32) counts[b] = 0;
      __syncwarp();
    }
    dispatch(task.dtype, [&](auto zero) {
      using T = decltype(zero);
      const T* p = reinterpret_cast<const T*>(task.address) + task.offset;
      const plan::VecSplit split = plan::vec_split(reinterpret_cast<uintptr_t>(p), task.length, sizeof(T));
      Accumulator<acc_t<T>> acc;
      const auto add = [&](acc_t<T> v) {
        acc.add(v);
        if constexpr (kHist) atomicAdd(counts + log2_bin(v), 1u);  // float16/bfloat16 widen exactly
      };
      const auto add16 = [&](const uint4& raw) {
        const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < int(16 / sizeof(T)); ++k) add(static_cast<acc_t<T>>(x[k]));
      };
      plan::walk(
          split, task.length, g.lane, g.size, [&](int64_t i) { add(static_cast<acc_t<T>>(p[i])); },
          [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
            const uint4 r0 = load16(p, i0), r1 = load16(p, i1), r2 = load16(p, i2), r3 = load16(p, i3);
            add16(r0);
            add16(r1);
            add16(r2);
            add16(r3);
            acc.fold();  // 16 to 32 squares per float32 lane, as the CPU kernel's fold
          },
          [&](int64_t i) {
            add16(load16(p, i));
            acc.fold();
          });
      Partial part = g.reduce(acc.partial());
      if (needs_scaled_pass(part, task.dtype)) {  // the same on every lane: reduce() broadcasts
        const int e = scaled_pass_exponent(part.max_abs);
        const double inv = ::ldexp(1.0, -e);
        double sumsq = 0.0;
        for (int64_t i = g.lane; i < task.length; i += g.size) sumsq += scaled_square(static_cast<double>(p[i]), inv);
        const Partial scaled = g.reduce(Partial{sumsq, 0.0, 0, 0});
        part = with_scaled_sumsq(part, scaled.sumsq, e);
      }
      if (g.lane == 0) partials[index] = part;
    });
    if constexpr (kHist) {
      __syncwarp();  // every lane's shared-memory increments are visible to the warp
      unsigned long long* row = hist + task.tensor * kHistBins;
      for (int b = threadIdx.x % 32; b < kHistBins; b += 32) {
        if (counts[b] != 0) atomicAdd(row + b, static_cast<unsigned long long>(counts[b]));
      }
      __syncwarp();  // the next task of this warp clears the counts only after they were read
    }
  }
};

// Row i of the output from tensor i's task partials, by one warp: lanes striding over the tasks in
// order, then a fixed tree (parallel within a tensor: 8k chunks of an embedding are 256 per lane,
// not 8k on one thread).
__device__ inline void tensor_row(const plan::Table& table, int64_t i, const Partial* partials, Partial* per_tensor,
                                  double* out) {
  const int lane = threadIdx.x % 32;
  Partial s{};
  for (int64_t t = table.tensor_task_begin[i] + lane; t < table.tensor_task_begin[i + 1]; t += 32) {
    s = combine(s, partials[t]);
  }
  s = warp_reduce(s);
  if (lane == 0) {
    per_tensor[i] = s;
    write_row(out + kNumStats * i, s);
  }
}

__global__ void __launch_bounds__(kThreads) tensor_rows_kernel(const int64_t* table_base, plan::Shape shape,
                                                                const Partial* partials, Partial* per_tensor,
                                                                double* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= shape.n) return;  // whole warps leave together
  tensor_row(plan::view(table_base, shape), i, partials, per_tensor, out);
}

// The block size of the total row, and of grad_stats_check's combine kernel, which also runs the
// check block: one size, so that row N is the same bits from grad_stats and grad_stats_check.
constexpr int kTotalThreads = check::kCheckThreads;

// Row N: all tensors' partials, threads striding in order, then a fixed tree. Every thread of a
// kTotalThreads block calls it.
__device__ inline void total_row(const Partial* per_tensor, int64_t n, double* out) {
  Partial s{};
  for (int64_t i = threadIdx.x; i < n; i += kTotalThreads) s = combine(s, per_tensor[i]);
  s = block_reduce<kTotalThreads>(s);
  if (threadIdx.x == 0) write_row(out + kNumStats * n, s);
}

__global__ void __launch_bounds__(kTotalThreads) total_row_kernel(const Partial* per_tensor, int64_t n, double* out) {
  total_row(per_tensor, n, out);
}

// grad_stats_check after the task walk: every row, row N and the whole check in one block, one
// launch (instead of grad_stats' two and grad_check's one). The rows are the same code, so the same
// bits, as tensor_rows_kernel's; __syncthreads makes each phase's global writes visible to the next.
__global__ void __launch_bounds__(kTotalThreads)
    rows_and_check_kernel(const int64_t* table_base, plan::Shape shape, const Partial* partials, Partial* per_tensor,
                          double* out, const check::Config c, const check::Inputs in, check::State s, double* record,
                          double* factors, bool* skip) {
  const plan::Table table = plan::view(table_base, shape);
  for (int64_t i = threadIdx.x / 32; i < shape.n; i += kTotalThreads / 32) {  // warp-uniform
    tensor_row(table, i, partials, per_tensor, out);
  }
  __syncthreads();
  total_row(per_tensor, shape.n, out);
  __syncthreads();
  check::check_block(c, in, s, record, factors, skip);
}

// The task walk of the statistics into `out` (float64 [N + 1, kNumStats]): each task's partial, and,
// when `hist` is defined (int64 [N, kHistBins], zeroed), each tensor's log2 histogram added to it.
// The caller holds a CUDAGuard for the tensors' device and launches the combine.
struct TaskWalk {
  DevicePlan dp;
  at::Tensor scratch;  // keeps partials and per_tensor alive until the combine is enqueued
  Partial* partials;
  Partial* per_tensor;
  cudaStream_t stream;
};

TaskWalk walk_tasks(const std::vector<FlatTensor>& flat, const at::Tensor& hist, const at::Device& device) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  std::vector<plan::Input> inputs;
  inputs.reserve(flat.size());
  for (const FlatTensor& f : flat) inputs.push_back(plan::Input{reinterpret_cast<uintptr_t>(f.data), f.numel, f.dtype, -1});
  DevicePlan dp = plan_cache().get(inputs, {}, device, stream);
  static_assert(sizeof(Partial) == 4 * sizeof(double));
  at::Tensor scratch = at::empty({std::max<int64_t>(dp.shape.num_tasks + dp.shape.n, 1), 4},
                                 at::TensorOptions().dtype(at::kDouble).device(device));
  auto* partials = reinterpret_cast<Partial*>(scratch.data_ptr<double>());
  const int64_t* table = dp.table.const_data_ptr<int64_t>();
  if (dp.shape.num_blocks > 0) {
    if (hist.defined()) {
      static_assert(sizeof(unsigned long long) == sizeof(int64_t));
      auto* rows = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
      tasks_kernel<<<dp.shape.num_blocks, kThreads, 0, stream>>>(table, dp.shape, StatsOp<true>{partials, rows});
    } else {
      tasks_kernel<<<dp.shape.num_blocks, kThreads, 0, stream>>>(table, dp.shape, StatsOp<false>{partials, nullptr});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return TaskWalk{dp, scratch, partials, partials + dp.shape.num_tasks, stream};
}

at::Tensor empty_stats(int64_t n, const at::Device& device) {
  return at::empty({n + 1, kNumStats}, at::TensorOptions().dtype(at::kDouble).device(device));
}

// The statistics (float64 [N + 1, kNumStats]) and, when `hist` is defined, the log2 histograms.
at::Tensor stats_pass(at::TensorList tensors, const at::Tensor& hist) {
  std::vector<at::Tensor> copies;
  const std::vector<FlatTensor> flat = flat_inputs(tensors, hist.defined() ? "grad_stats_hist" : "grad_stats", copies);
  const at::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const TaskWalk w = walk_tasks(flat, hist, device);
  const int64_t n = w.dp.shape.n;
  at::Tensor out = empty_stats(n, device);
  tensor_rows_kernel<<<(n + kWarps - 1) / kWarps, kThreads, 0, w.stream>>>(
      w.dp.table.const_data_ptr<int64_t>(), w.dp.shape, w.partials, w.per_tensor, out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  total_row_kernel<<<1, kTotalThreads, 0, w.stream>>>(w.per_tensor, n, out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// grad_stats then grad_check in two launches: the task walk, then rows_and_check_kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grad_stats_check_cuda(
    at::TensorList tensors, at::Tensor& fstate, at::Tensor& istate, c10::ArrayRef<double> config,
    const c10::optional<at::Tensor>& index, const c10::optional<at::Tensor>& ignore,
    const c10::optional<at::Tensor>& loss, const c10::optional<at::Tensor>& loss_flags) {
  std::vector<at::Tensor> copies;
  const std::vector<FlatTensor> flat = flat_inputs(tensors, "grad_stats_check", copies);
  const at::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = empty_stats(static_cast<int64_t>(tensors.size()), device);
  // every argument checked before anything is launched (the values only on the device)
  const check::Config c = check::check_args(out, fstate, istate, config, index, ignore, loss, loss_flags);
  const check::Inputs in = check::input_views(out, index, ignore, loss, loss_flags);
  const check::State s = check::state_views(c, fstate, istate);
  auto [record, factors, skip] = check::make_outputs(c, out);
  const TaskWalk w = walk_tasks(flat, at::Tensor(), device);
  rows_and_check_kernel<<<1, kTotalThreads, 0, w.stream>>>(
      w.dp.table.const_data_ptr<int64_t>(), w.dp.shape, w.partials, w.per_tensor, out.data_ptr<double>(), c, in, s,
      record.data_ptr<double>(), factors.data_ptr<double>(), skip.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, record, factors, skip};
}

at::Tensor grad_stats_cuda(at::TensorList tensors) { return stats_pass(tensors, at::Tensor()); }

std::tuple<at::Tensor, at::Tensor> grad_stats_hist_cuda(at::TensorList tensors) {
  TORCH_CHECK_VALUE(!tensors.empty(), "grad_stats_hist: tensors is empty; pass at least one tensor");
  at::Tensor hist = at::zeros({static_cast<int64_t>(tensors.size()), kHistBins},
                              at::TensorOptions().dtype(at::kLong).device(tensors[0].device()));
  at::Tensor stats = stats_pass(tensors, hist);
  return {stats, hist};
}

// ---- scaling ------------------------------------------------------------------------------

// factors[i] applied to every distinct element of tensor i (stats.h scale_value, as on the CPU).
struct ScaleOp {
  const double* factors;

  template <typename Group>
  __device__ void operator()(const plan::Task& task, int64_t, const Group& g) const {
    const ScaleFactor f = make_scale_factor(factors[task.tensor]);
    if (f.mode == ScaleMode::kSkip) return;  // factor 1: not even read
    dispatch(task.dtype, [&](auto zero) {
      using T = decltype(zero);
      using A = acc_t<T>;
      T* base = reinterpret_cast<T*>(task.address);
      if (task.layout != nullptr) {  // a strided or expanded view: its distinct elements, one by one
        for (int64_t i = task.offset + g.lane; i < task.offset + task.length; i += g.size) {
          T* q = base + plan::offset_of(task.layout, i);
          *q = scale_value<T, A>(*q, f);
        }
        return;
      }
      T* p = base + task.offset;
      const auto scale16 = [&](int64_t i) {
        uint4 raw = *reinterpret_cast<const uint4*>(p + i);
        T* x = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int k = 0; k < int(16 / sizeof(T)); ++k) x[k] = scale_value<T, A>(x[k], f);
        *reinterpret_cast<uint4*>(p + i) = raw;
      };
      plan::walk(
          plan::vec_split(reinterpret_cast<uintptr_t>(p), task.length, sizeof(T)), task.length, g.lane, g.size,
          [&](int64_t i) { p[i] = scale_value<T, A>(p[i], f); },
          [&](int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
            scale16(i0);
            scale16(i1);
            scale16(i2);
            scale16(i3);
          },
          scale16);
    });
  }
};

void scale_cuda(at::TensorList tensors, const at::Tensor& factors) {
  const ScaleInputs all = scale_inputs(tensors);  // strided and expanded views included: no copies
  const at::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor f64 = checked_factors(factors, tensors.size(), device);  // on the device: no sync
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  const DevicePlan dp = plan_cache().get(all.inputs, all.layouts, device, stream);
  if (dp.shape.num_blocks > 0) {
    tasks_kernel<<<dp.shape.num_blocks, kThreads, 0, stream>>>(dp.table.const_data_ptr<int64_t>(), dp.shape,
                                                              ScaleOp{f64.const_data_ptr<double>()});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  bump_versions(tensors);
}

}  // namespace
}  // namespace gradwatch::cuda

TORCH_LIBRARY_IMPL(gradwatch, CUDA, m) {
  m.impl("grad_stats", &gradwatch::cuda::grad_stats_cuda);
  m.impl("grad_stats_hist", &gradwatch::cuda::grad_stats_hist_cuda);
  m.impl("grad_stats_check", &gradwatch::cuda::grad_stats_check_cuda);
  m.impl("scale_", &gradwatch::cuda::scale_cuda);
}

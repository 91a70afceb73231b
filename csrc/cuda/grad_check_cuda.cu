// CUDA implementation of gradwatch::grad_check: the three phases of ../check.h in one block.
// One launch per check, after grad_stats' three: thread 0 judges the step (total norm, residual,
// early reference, rolling window), every thread then judges its parameters (threads stride over
// the rows, and keep the same rows in every later loop, so a row's flags and factor are only ever
// touched by one thread), the flag bits are OR-ed in shared memory, and the policies run in
// decision order, a clip's sum of squares reduced in a fixed tree (bit-reproducible). The state is
// updated in place; nothing is read back to the host, so the launch can be captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <tuple>

#include "../check_op.h"

namespace gradwatch::check {
namespace {

constexpr int kCheckThreads = 256;

// Sum of one value per thread in a fixed order (warp shuffles, then the warps' sums by warp 0).
__device__ double block_sum(double v, double* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kCheckThreads / 32; ++w) total += scratch[w];
  }
  __syncthreads();
  return total;  // valid in thread 0
}

__global__ void __launch_bounds__(kCheckThreads) grad_check_kernel(const Config c, const Inputs in, State s,
                                                                   double* record, double* factors, bool* skip) {
  __shared__ StepInfo info;
  __shared__ int any;
  __shared__ double coef;
  __shared__ double scratch[kCheckThreads / 32];
  __shared__ Decision d;
  const int64_t tid = threadIdx.x;
  if (tid == 0) {
    info = judge_step(c, in, s, record);
    any = info.flags | loss_bits(in);
    d = Decision{false, false, 1.0};
  }
  __syncthreads();
  int mine = 0;
  for (int64_t i = tid; i < in.n; i += kCheckThreads) {
    CUDA_KERNEL_ASSERT(in.index == nullptr || (in.index[i] >= 0 && in.index[i] < c.num_params));
    mine |= judge_param(c, in, info, s, i, record);
    factors[i] = 1.0;
  }
  atomicOr(&any, mine);  // OR is order-free: the result does not depend on scheduling
  __syncthreads();
  double* extras = record + kHeadSize + 2 * kNumKinds;
  for (int k = 0; k < c.num_policies; ++k) {
    const PolicySpec& p = c.policies[k];
    if (p.type == kPolicyZero) {
      for (int64_t i = tid; i < in.n; i += kCheckThreads) {
        factors[i] = zero_factor(p, info, param_flags(c, in, record, i), factors[i]);
      }
    } else if (p.type == kPolicyClip || p.type == kPolicyAdaptiveClip) {
      double part = 0.0;
      for (int64_t i = tid; i < in.n; i += kCheckThreads) part += clip_term(in, i, factors[i]);
      const double sumsq = block_sum(part, scratch);
      if (tid == 0) {
        coef = clip_coef(p, info, sumsq, extras);
        d.clip_factor *= coef;
      }
      __syncthreads();
      for (int64_t i = tid; i < in.n; i += kCheckThreads) factors[i] *= coef;
      __syncthreads();  // coef is rewritten by the next clip
    } else if (tid == 0) {
      gate(p, info, any, s, d);
    }
  }
  if (tid == 0) {
    write_decision(d, record);
    *skip = d.skip;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grad_check_cuda(
    const at::Tensor& packed, at::Tensor& fstate, at::Tensor& istate, c10::ArrayRef<double> config,
    const c10::optional<at::Tensor>& index, const c10::optional<at::Tensor>& ignore,
    const c10::optional<at::Tensor>& loss, const c10::optional<at::Tensor>& loss_flags) {
  const Config c = check_args(packed, fstate, istate, config, index, ignore, loss, loss_flags);
  const c10::cuda::CUDAGuard guard(packed.device());
  const Inputs in = input_views(packed, index, ignore, loss, loss_flags);
  const State s = state_views(c, fstate, istate);
  auto [record, factors, skip] = make_outputs(c, packed);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(packed.device().index());
  grad_check_kernel<<<1, kCheckThreads, 0, stream>>>(c, in, s, record.data_ptr<double>(), factors.data_ptr<double>(),
                                                      skip.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {record, factors, skip};
}

}  // namespace
}  // namespace gradwatch::check

TORCH_LIBRARY_IMPL(gradwatch, CUDA, m) { m.impl("grad_check", &gradwatch::check::grad_check_cuda); }

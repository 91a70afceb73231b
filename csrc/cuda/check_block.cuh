// The whole check of ../check.h run by one block of kCheckThreads threads: used by grad_check's own
// kernel and by grad_stats_check's combine kernel, which runs it right after the statistics rows
// (one launch less). Thread 0 judges the step (total norm, residual, early reference, rolling
// window), every thread then judges its parameters (threads stride over the rows, and keep the
// same rows in every later loop, so a row's flags and factor are only ever touched by one thread),
// the flag bits are OR-ed in shared memory, and the policies run in decision order, a clip's sum of
// squares reduced in a fixed tree (bit-reproducible, the same in both kernels). The state is
// updated in place; nothing is read back to the host, so the launch can be captured in a CUDA graph.
#pragma once

#include <c10/macros/Macros.h>

#include "../check.h"

namespace gradwatch::check {

// One block size for both kernels: the clip's fixed-tree sum depends on it.
constexpr int kCheckThreads = 512;

// Sum of one value per thread in a fixed order (warp shuffles, then the warps' sums by thread 0).
__device__ inline double block_sum(double v, double* scratch) {
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

// Every thread of a kCheckThreads block calls it (it synchronizes the block); in.packed must be
// complete and visible to the block.
__device__ inline void check_block(const Config& c, const Inputs& in, State s, double* record, double* factors,
                                   bool* skip) {
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

}  // namespace gradwatch::check

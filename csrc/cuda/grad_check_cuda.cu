// CUDA implementation of gradwatch::grad_check: one launch of one block running check_block.cuh
// on statistics already computed (grad_stats_check runs the same block inside its combine kernel).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <tuple>

#include "../check_op.h"
#include "check_block.cuh"

namespace gradwatch::check {
namespace {

__global__ void __launch_bounds__(kCheckThreads) grad_check_kernel(const Config c, const Inputs in, State s,
                                                                   double* record, double* factors, bool* skip) {
  check_block(c, in, s, record, factors, skip);
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

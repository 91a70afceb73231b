// CUDA implementation of gradwatch::grad_check: one launch of one block running check_block.cuh
// on statistics already computed (grad_stats_check runs the same block inside its combine kernel).
#include <ATen/Dispatch.h>
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

template <typename T>
__global__ void loss_check_kernel(const LossConfig c, const T* loss, double* mean, double* var, int64_t* count,
                                  int64_t micro_batch, double* packet, bool* flags) {
  observe_loss(c, mean, var, count, static_cast<double>(*loss), micro_batch, packet, flags);
}

// One observed loss: one thread of one launch (loss_check.h), nothing read back.
void loss_check_cuda(const at::Tensor& loss, at::Tensor& mean, at::Tensor& var, at::Tensor& count, at::Tensor& packet,
                     at::Tensor& flags, int64_t micro_batch, c10::ArrayRef<double> config) {
  const LossConfig c = check_loss_args(loss, mean, var, count, packet, flags, micro_batch, config);
  const c10::cuda::CUDAGuard guard(loss.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(loss.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loss.scalar_type(), "loss_check", [&] {
    loss_check_kernel<scalar_t><<<1, 1, 0, stream>>>(c, loss.const_data_ptr<scalar_t>(), mean.data_ptr<double>(),
                                                     var.data_ptr<double>(), count.data_ptr<int64_t>(), micro_batch,
                                                     packet.data_ptr<double>(), flags.data_ptr<bool>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace gradwatch::check

TORCH_LIBRARY_IMPL(gradwatch, CUDA, m) {
  m.impl("grad_check", &gradwatch::check::grad_check_cuda);
  m.impl("loss_check", &gradwatch::check::loss_check_cuda);
}

// The CPU ops one CPU file calls from another (grad_stats_check is grad_stats, then grad_check).
#pragma once

#include <ATen/core/Tensor.h>

namespace gradwatch::cpu {

// torch.ops.gradwatch.grad_stats on the CPU (grad_stats_cpu.cpp).
at::Tensor grad_stats_cpu(at::TensorList tensors);

}  // namespace gradwatch::cpu

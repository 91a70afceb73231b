// CPU implementations of gradwatch::grad_check (the three phases of check.h, one after the other)
// and grad_stats_check (grad_stats, then grad_check), and loss_check.
// Compiled once, with the default flags (never per CPU capability): the check is a few hundred
// flops per parameter, nothing to vectorize.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../check_op.h"
#include "ops.h"

namespace gradwatch::check {

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> grad_check_cpu(
    const at::Tensor& packed, at::Tensor& fstate, at::Tensor& istate, c10::ArrayRef<double> config,
    const c10::optional<at::Tensor>& index, const c10::optional<at::Tensor>& ignore,
    const c10::optional<at::Tensor>& loss, const c10::optional<at::Tensor>& loss_flags) {
  const Config c = check_args(packed, fstate, istate, config, index, ignore, loss, loss_flags);
  const Inputs in = input_views(packed, index, ignore, loss, loss_flags);
  if (in.index != nullptr) {
    for (int64_t i = 0; i < in.n; ++i) {
      TORCH_CHECK_INDEX(in.index[i] >= 0 && in.index[i] < c.num_params, "grad_check: index[", i, "] is ",
                        in.index[i], "; expected a parameter in [0, ", c.num_params, ")");
    }
  }
  State s = state_views(c, fstate, istate);
  auto [record_t, factors_t, skip_t] = make_outputs(c, packed);
  double* record = record_t.data_ptr<double>();
  double* factors = factors_t.data_ptr<double>();

  const StepInfo info = judge_step(c, in, s, record);
  int any = info.flags | loss_bits(in);
  std::vector<int> flags(in.n);
  for (int64_t i = 0; i < in.n; ++i) {
    flags[i] = judge_param(c, in, info, s, i, record);
    any |= flags[i];
    factors[i] = 1.0;
  }
  Decision d{false, false, 1.0};
  double* extras = record + kHeadSize + 2 * kNumKinds;
  for (int k = 0; k < c.num_policies; ++k) {
    const PolicySpec& p = c.policies[k];
    if (p.type == kPolicyZero) {
      for (int64_t i = 0; i < in.n; ++i) factors[i] = zero_factor(p, info, flags[i], factors[i]);
    } else if (p.type == kPolicyClip || p.type == kPolicyAdaptiveClip) {
      double sumsq = 0.0;
      for (int64_t i = 0; i < in.n; ++i) sumsq += clip_term(in, i, factors[i]);
      const double coef = clip_coef(p, info, sumsq, extras);
      for (int64_t i = 0; i < in.n; ++i) factors[i] *= coef;
      d.clip_factor *= coef;
    } else {
      gate(p, info, any, s, d);
    }
  }
  write_decision(d, record);
  *skip_t.data_ptr<bool>() = d.skip;
  return {record_t, factors_t, skip_t};
}

// The statistics pass, then the check on its output, in one op: one dispatch less per check.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grad_stats_check_cpu(
    at::TensorList tensors, at::Tensor& fstate, at::Tensor& istate, c10::ArrayRef<double> config,
    const c10::optional<at::Tensor>& index, const c10::optional<at::Tensor>& ignore,
    const c10::optional<at::Tensor>& loss, const c10::optional<at::Tensor>& loss_flags) {
  TORCH_CHECK_VALUE(!tensors.empty(), "grad_stats_check: tensors is empty; pass at least one tensor");
  const at::Tensor packed = cpu::grad_stats_cpu(tensors);
  auto [record, factors, skip] = grad_check_cpu(packed, fstate, istate, config, index, ignore, loss, loss_flags);
  return {packed, record, factors, skip};
}

// One observed loss: Detector.detect_loss and StepLoss in one call (loss_check.h).
void loss_check_cpu(const at::Tensor& loss, at::Tensor& mean, at::Tensor& var, at::Tensor& count, at::Tensor& packet,
                    at::Tensor& flags, int64_t micro_batch, c10::ArrayRef<double> config) {
  const LossConfig c = check_loss_args(loss, mean, var, count, packet, flags, micro_batch, config);
  double value = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loss.scalar_type(), "loss_check",
                                  [&] { value = static_cast<double>(*loss.const_data_ptr<scalar_t>()); });
  observe_loss(c, mean.data_ptr<double>(), var.data_ptr<double>(), count.data_ptr<int64_t>(), value, micro_batch,
               packet.data_ptr<double>(), flags.data_ptr<bool>());
}

}  // namespace

}  // namespace gradwatch::check

TORCH_LIBRARY_IMPL(gradwatch, CPU, m) {
  m.impl("grad_check", &gradwatch::check::grad_check_cpu);
  m.impl("grad_stats_check", &gradwatch::check::grad_stats_check_cpu);
  m.impl("loss_check", &gradwatch::check::loss_check_cpu);
}

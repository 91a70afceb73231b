// Host side of gradwatch::grad_check shared by the CPU and CUDA implementations: argument checks,
// the config, the state views, the outputs.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <initializer_list>
#include <tuple>
#include <utility>

#include "check.h"
#include "loss_check.h"

namespace gradwatch::check {

inline Config checked_config(c10::ArrayRef<double> values) {
  Config c{};
  const char* error = parse_config(values.data(), static_cast<int64_t>(values.size()), c);
  TORCH_CHECK_VALUE(error == nullptr, "grad_check: ", error, "; build it with gradwatch.fused_check");
  return c;
}

inline int64_t num_streams(const Config& c) { return 2 * c.num_params + 2; }
inline int64_t fstate_size(const Config& c) { return 2 * num_streams(c) + 5 + c.rolling_window; }
inline int64_t istate_size(const Config& c) { return num_streams(c) + 1 + c.num_raise; }

// One tensor argument of `op`: its dtype, its device (that of `anchor`, the argument the others
// follow), its element count (numel < 0: any) and a contiguous layout.
inline void check_tensor(const char* op, const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel,
                         const at::Device& device, const char* anchor) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(), " but ", anchor, " is on ", device);
  TORCH_CHECK_VALUE(numel < 0 || t.numel() == numel, op, ": ", name, " has ", t.numel(), " elements; expected ",
                    numel);
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// The tensors an op writes in place must share no memory with each other nor with what it reads:
// the kernels read and write them element by element, so an alias (a view of one passed as another)
// gives statistics that are neither, silently. Pointers and strides only: no device read.
using Named = std::pair<const at::Tensor*, const char*>;
inline bool overlap(const at::Tensor& a, const at::Tensor& b) {
  const at::MemOverlapStatus status = at::get_overlap_status(a, b);  // TooHard: not dense (refused before)
  return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
}
inline void check_separate(const char* op, std::initializer_list<Named> written, std::initializer_list<Named> read) {
  for (auto w = written.begin(); w != written.end(); ++w) {
    for (auto o = w + 1; o != written.end(); ++o) {
      TORCH_CHECK_VALUE(!overlap(*w->first, *o->first), op, ": ",
                        w->second, " and ", o->second, " share memory; pass separate tensors");
    }
    for (const Named& r : read) {
      if (r.first == nullptr) continue;
      TORCH_CHECK_VALUE(!overlap(*w->first, *r.first), op, ": ",
                        w->second, " and ", r.second, " share memory; pass separate tensors");
    }
  }
}

// Checks every argument (shapes, dtypes, devices; not values, which may live on a GPU) and
// returns the config.
inline Config check_args(const at::Tensor& packed, const at::Tensor& fstate, const at::Tensor& istate,
                         c10::ArrayRef<double> config, const c10::optional<at::Tensor>& index,
                         const c10::optional<at::Tensor>& ignore, const c10::optional<at::Tensor>& loss,
                         const c10::optional<at::Tensor>& loss_flags) {
  const Config c = checked_config(config);
  const at::Device device = packed.device();
  TORCH_CHECK_VALUE(packed.dim() == 2 && packed.size(0) >= 2 && packed.size(1) >= 3,
                    "grad_check: packed must have shape [n + 1, >= 3] with n >= 1, got ", packed.sizes());
  const auto check = [&](const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel) {
    check_tensor("grad_check", t, name, dtype, numel, device, "packed");
  };
  check(packed, "packed", at::kDouble, -1);
  const int64_t n = packed.size(0) - 1;
  TORCH_CHECK_VALUE(index.has_value() || n == c.num_params, "grad_check: packed has ", n,
                    " parameter rows but the detector watches ", c.num_params, "; pass index");
  TORCH_CHECK_VALUE(n <= c.num_params, "grad_check: packed has ", n, " parameter rows, more than the ",
                    c.num_params, " watched");
  check(fstate, "fstate", at::kDouble, fstate_size(c));
  check(istate, "istate", at::kLong, istate_size(c));
  if (index.has_value()) check(*index, "index", at::kLong, n);
  if (ignore.has_value()) check(*ignore, "ignore", at::kBool, 1);
  if (loss.has_value()) check(*loss, "loss", at::kDouble, 1);
  if (loss_flags.has_value()) check(*loss_flags, "loss_flags", at::kBool, kNumKinds);
  const auto opt = [](const c10::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; };
  check_separate("grad_check", {{&fstate, "fstate"}, {&istate, "istate"}},
                 {{&packed, "packed"}, {opt(index), "index"}, {opt(ignore), "ignore"}, {opt(loss), "loss"},
                  {opt(loss_flags), "loss_flags"}});
  return c;
}

inline State state_views(const Config& c, const at::Tensor& fstate, const at::Tensor& istate) {
  const int64_t S = num_streams(c);
  double* f = fstate.data_ptr<double>();
  int64_t* i = istate.data_ptr<int64_t>();
  return State{f, f + S, i, f + 2 * S, f + 2 * S + 4, f + 2 * S + 5, i + S, i + S + 1};
}

inline Inputs input_views(const at::Tensor& packed, const c10::optional<at::Tensor>& index,
                          const c10::optional<at::Tensor>& ignore, const c10::optional<at::Tensor>& loss,
                          const c10::optional<at::Tensor>& loss_flags) {
  return Inputs{packed.const_data_ptr<double>(),
                packed.size(0) - 1,
                packed.size(1),
                index.has_value() ? index->const_data_ptr<int64_t>() : nullptr,
                ignore.has_value() ? ignore->const_data_ptr<bool>() : nullptr,
                loss.has_value() ? loss->const_data_ptr<double>() : nullptr,
                loss_flags.has_value() ? loss_flags->const_data_ptr<bool>() : nullptr};
}

// (record, factors, skip) on packed's device.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> make_outputs(const Config& c, const at::Tensor& packed) {
  const int64_t n = packed.size(0) - 1;
  const auto f64 = packed.options().dtype(at::kDouble);
  return {at::empty({record_size(c, n, packed.size(1))}, f64), at::empty({n}, f64),
          at::empty({}, packed.options().dtype(at::kBool))};
}

// loss_check's arguments: every tensor on the loss's device, the state and outputs of their exact
// dtype and size (values are not read: they may live on a GPU). Returns the config.
inline LossConfig check_loss_args(const at::Tensor& loss, const at::Tensor& mean, const at::Tensor& var,
                                  const at::Tensor& count, const at::Tensor& packet, const at::Tensor& flags,
                                  int64_t micro_batch, c10::ArrayRef<double> config) {
  LossConfig c{};
  const char* error = parse_loss_config(config.data(), static_cast<int64_t>(config.size()), c);
  TORCH_CHECK_VALUE(error == nullptr, "loss_check: ", error, "; build it with gradwatch.fused_check.loss_config");
  TORCH_CHECK_VALUE(loss.numel() == 1, "loss_check: loss must hold one element, got shape ", loss.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(loss.scalar_type()) && loss.scalar_type() != at::kFloat8_e4m3fn &&
                       loss.scalar_type() != at::kFloat8_e5m2,
                   "loss_check: loss must be float16, bfloat16, float32 or float64, got ", loss.scalar_type());
  TORCH_CHECK_VALUE(micro_batch >= 1, "loss_check: micro_batch is ", micro_batch, "; count from 1");
  const at::Device device = loss.device();
  const auto check = [&](const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel) {
    check_tensor("loss_check", t, name, dtype, numel, device, "loss");
  };
  check(mean, "mean", at::kDouble, 1);
  check(var, "var", at::kDouble, 1);
  check(count, "count", at::kLong, 1);
  check(packet, "packet", at::kDouble, kLossPacketWords);
  check(flags, "flags", at::kBool, kNumKinds);
  check_separate("loss_check",
                 {{&mean, "mean"}, {&var, "var"}, {&count, "count"}, {&packet, "packet"}, {&flags, "flags"}},
                 {{&loss, "loss"}});
  return c;
}

}  // namespace gradwatch::check

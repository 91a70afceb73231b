// Argument checks and layout handling shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "dtype.h"
#include "plan.h"

namespace gradwatch {

inline Dtype dtype_code(const at::Tensor& t, size_t index, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::Float;
    case at::kDouble: return Dtype::Double;
    case at::kHalf: return Dtype::Half;
    case at::kBFloat16: return Dtype::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": tensors[", index, "] has dtype ", t.scalar_type(),
                       "; expected float16, bfloat16, float32 or float64");
  }
}

// One tensor's elements as a flat run in memory. Statistics and scaling do not depend on element
// order, so any dense layout (contiguous, channels-last, permuted) is read in place.
struct FlatTensor {
  char* data;
  int64_t numel;
  Dtype dtype;
  int64_t element_size;
};

inline void check_device(const at::Tensor& t, size_t index, const at::Device& device, const char* op) {
  TORCH_CHECK(t.device() == device, op, ": tensors[", index, "] is on ", t.device(), " but tensors[0] is on ",
              device, "; call gradwatch.", op, ", which groups tensors by device");
}

// Flat views of `tensors` for reading. Tensors that are not dense are copied to `copies`,
// which must outlive the views.
inline std::vector<FlatTensor> flat_inputs(at::TensorList tensors, const char* op, std::vector<at::Tensor>& copies) {
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": tensors is empty; pass at least one tensor");
  const at::Device device = tensors[0].device();
  std::vector<FlatTensor> flat;
  flat.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Dtype dtype = dtype_code(tensors[i], i, op);
    check_device(tensors[i], i, device, op);
    const at::Tensor& t =
        tensors[i].is_non_overlapping_and_dense() ? tensors[i] : copies.emplace_back(tensors[i].contiguous());
    flat.push_back(FlatTensor{static_cast<char*>(t.data_ptr()), t.numel(), dtype, t.element_size()});
  }
  return flat;
}

// factors: one float32 or float64 entry per tensor on the tensors' device. Returned as float64
// (a device-side conversion, no sync): factors are kept in float64 so that the float64 clip factor of
// a float64 gradient is not rounded, nor underflows to 0 (which would mean "write zeros").
inline at::Tensor checked_factors(const at::Tensor& factors, size_t n, const at::Device& device) {
  TORCH_CHECK_VALUE(factors.device() == device &&
                        (factors.scalar_type() == at::kFloat || factors.scalar_type() == at::kDouble) &&
                        factors.dim() == 1 && factors.numel() == static_cast<int64_t>(n),
                    "scale_: factors must be a 1-D float32 or float64 tensor with one entry per tensor on ", device,
                    "; got shape ", factors.sizes(), ", dtype ", factors.scalar_type(), " on ", factors.device(),
                    " for ", n, " tensors");
  return factors.to(at::kDouble).contiguous();
}

// What scale_ writes, per tensor: each memory location once. Dense tensors are flat runs; other
// views (strided, expanded) are walked through their distinct memory (plan::strided_layout), by the
// same code on both backends. Tensors whose memory intersects another's are refused: their shared
// elements would be scaled twice, or raced on.
struct ScaleInputs {
  std::vector<plan::Input> inputs;
  std::vector<plan::StridedLayout> layouts;
};

inline ScaleInputs scale_inputs(at::TensorList tensors) {
  TORCH_CHECK_VALUE(!tensors.empty(), "scale_: tensors is empty; pass at least one tensor");
  const at::Device device = tensors[0].device();
  ScaleInputs out;
  out.inputs.reserve(tensors.size());
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  ranges.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const Dtype dtype = dtype_code(t, i, "scale_");
    check_device(t, i, device, "scale_");
    const auto address = reinterpret_cast<uintptr_t>(t.data_ptr());
    const auto esize = static_cast<uintptr_t>(t.element_size());
    if (t.is_non_overlapping_and_dense()) {
      out.inputs.push_back(plan::Input{address, t.numel(), dtype, -1});
      ranges.emplace_back(address, address + esize * static_cast<uintptr_t>(t.numel()));
      continue;
    }
    plan::StridedLayout layout;
    int64_t distinct = 0;
    const std::string why = plan::strided_layout(t.sizes().vec(), t.strides().vec(), &layout, &distinct);
    TORCH_CHECK_VALUE(why.empty(), "scale_: tensors[", i, "] (shape ", t.sizes(), ", strides ", t.strides(),
                      ") cannot be scaled in place: ", why, "; scale a copy with distinct elements instead");
    int64_t extent = distinct == 0 ? 0 : 1;
    for (int d = 0; d < layout.ndim; ++d) extent += (layout.sizes[d] - 1) * layout.strides[d];
    ranges.emplace_back(address, address + esize * static_cast<uintptr_t>(extent));
    if (plan::is_flat(layout)) {
      out.inputs.push_back(plan::Input{address, distinct, dtype, -1});
    } else {
      out.inputs.push_back(plan::Input{address, distinct, dtype, static_cast<int>(out.layouts.size())});
      out.layouts.push_back(layout);
    }
  }
  const auto [a, b] = plan::first_overlap(ranges);
  TORCH_CHECK_VALUE(a < 0, "scale_: tensors[", a, "] and tensors[", b,
                    "] share memory (the same tensor twice, or views of one buffer), so shared elements would be "
                    "scaled twice; pass each tensor once (views of one buffer that interleave are refused too)");
  return out;
}

// scale_ writes its tensors in place: bump their autograd version counters as in-place ATen ops
// do, so that autograd refuses a backward that saved them, and version checks see the write.
inline void bump_versions(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace gradwatch

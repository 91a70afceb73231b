// Argument checks and layout handling shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "dtype.h"

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

inline void check_factors(const at::Tensor& factors, size_t n, const at::Device& device) {
  TORCH_CHECK(factors.device() == device && factors.scalar_type() == at::kFloat && factors.dim() == 1 &&
                  factors.numel() == static_cast<int64_t>(n),
              "scale_: factors must be a 1-D float32 tensor with one entry per tensor on ", device, "; got shape ",
              factors.sizes(), ", dtype ", factors.scalar_type(), " on ", factors.device(), " for ", n, " tensors");
}

}  // namespace gradwatch

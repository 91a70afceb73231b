// Element types the kernels read; the order is the index into each backend's kernel tables.
// Kept free of ATen headers: the per-capability CPU kernel file includes it.
#pragma once

namespace gradwatch {

enum class Dtype : int { Float = 0, Double = 1, Half = 2, BFloat16 = 3 };
constexpr int kNumDtypes = 4;

constexpr int element_size(Dtype dtype) {
  return dtype == Dtype::Double ? 8 : dtype == Dtype::Float ? 4 : 2;
}

}  // namespace gradwatch

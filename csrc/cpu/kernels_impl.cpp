// Vectorized chunk kernels for the CPU op. setup.py compiles this file once per CPU capability
// (DEFAULT, AVX2, AVX512) with that capability's macros and -m flags, as ATen does for its own
// kernels, so at::vec::Vectorized is the real SIMD type. Keep it to raw pointers and at::vec:
// anything shared with other translation units could be emitted with instructions the CPU lacks.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <type_traits>

#include "kernels.h"

namespace gradwatch::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Reduced precision inputs accumulate in float32, float64 inputs in float64.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
template <typename T>
using AccVec = Vectorized<acc_t<T>>;

// Elements consumed by one load_pair: two accumulator vectors' worth.
template <typename T>
constexpr int64_t kPair = 2 * AccVec<T>::size();

template <typename T>
inline void load_pair(const T* p, AccVec<T>& a, AccVec<T>& b) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    a = AccVec<T>::loadu(p);
    b = AccVec<T>::loadu(p + AccVec<T>::size());
  } else {
    static_assert(Vectorized<T>::size() == kPair<T>);
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
  }
}

// Same for the last count < kPair elements; missing lanes read as zero.
template <typename T>
inline void load_pair_partial(const T* p, int64_t count, AccVec<T>& a, AccVec<T>& b) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    constexpr int64_t w = AccVec<T>::size();
    a = AccVec<T>::loadu(p, count < w ? count : w);
    b = count > w ? AccVec<T>::loadu(p + w, count - w) : AccVec<T>(0);
  } else {
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, count));
  }
}

template <typename V>
inline double sum_lanes(const V& v) {
  typename V::value_type lanes[V::size()];
  v.store(lanes);
  double s = 0.0;
  for (int64_t k = 0; k < V::size(); ++k) s += lanes[k];
  return s;
}

template <typename V>
inline double max_lanes(const V& v) {
  typename V::value_type lanes[V::size()];
  v.store(lanes);
  double m = 0.0;
  for (int64_t k = 0; k < V::size(); ++k) m = lanes[k] > m ? lanes[k] : m;
  return m;
}

template <typename T>
constexpr Dtype dtype_of() {
  if constexpr (std::is_same_v<T, float>) return Dtype::Float;
  else if constexpr (std::is_same_v<T, double>) return Dtype::Double;
  else if constexpr (std::is_same_v<T, c10::Half>) return Dtype::Half;
  else return Dtype::BFloat16;
}

// Element by element in float64: for chunks whose fast sum is not finite, which is the only way
// a NaN or Inf (or an overflow of the squares) shows in the fast path.
template <typename T>
Partial exact_stats(const T* x, int64_t n) {
  Partial s{};
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    s.sumsq += v * v;  // NaN and Inf propagate into the norm, as torch.linalg.vector_norm does
    if (!std::isfinite(v)) ++s.nonfinite;
    s.max_abs = gradwatch::nan_max(s.max_abs, std::fabs(v));  // NaN sticks
  }
  return s;
}

// The chunk again with squares scaled by a power of two (stats.h: needs_scaled_pass).
template <typename T>
Partial scaled_stats(const T* x, int64_t n, const Partial& fast) {
  const int e = gradwatch::scaled_pass_exponent(fast.max_abs);
  const double inv = std::ldexp(1.0, -e);
  double sumsq = 0.0;
  for (int64_t i = 0; i < n; ++i) sumsq += gradwatch::scaled_square(static_cast<double>(x[i]), inv);
  return gradwatch::with_scaled_sumsq(fast, sumsq, e);
}

template <typename T>
Partial chunk_stats(const void* data, int64_t n) {
  using V = AccVec<T>;
  // Each float32 lane sums 16 squares before the partial is folded into float64: this keeps
  // the result within ~1e-7 of a float64 reference where one float32 accumulator drifts.
  constexpr int64_t kStep = 2 * kPair<T>;
  constexpr int64_t kFold = 16 * kStep;
  const T* x = static_cast<const T*>(data);

  double sumsq = 0.0;
  V m0(0), m1(0), m2(0), m3(0);
  V a, b, c, d;
  int64_t i = 0;
  while (i < n) {
    V s0(0), s1(0), s2(0), s3(0);
    const int64_t fold_end = n - i < kFold ? n : i + kFold;
    for (; i + kStep <= fold_end; i += kStep) {
      load_pair<T>(x + i, a, b);
      load_pair<T>(x + i + kPair<T>, c, d);
      s0 = at::vec::fmadd(a, a, s0);
      s1 = at::vec::fmadd(b, b, s1);
      s2 = at::vec::fmadd(c, c, s2);
      s3 = at::vec::fmadd(d, d, s3);
      // max without NaN handling: a NaN makes the sum NaN and sends the chunk to exact_stats.
      m0 = at::vec::clamp_min(m0, a.abs());
      m1 = at::vec::clamp_min(m1, b.abs());
      m2 = at::vec::clamp_min(m2, c.abs());
      m3 = at::vec::clamp_min(m3, d.abs());
    }
    for (; i < fold_end; i += kPair<T>) {
      const int64_t count = fold_end - i < kPair<T> ? fold_end - i : kPair<T>;
      load_pair_partial<T>(x + i, count, a, b);
      s0 = at::vec::fmadd(a, a, s0);
      s1 = at::vec::fmadd(b, b, s1);
      m0 = at::vec::clamp_min(m0, a.abs());
      m1 = at::vec::clamp_min(m1, b.abs());
    }
    sumsq += sum_lanes((s0 + s1) + (s2 + s3));
  }
  Partial s{};
  if (std::isfinite(sumsq)) {  // no NaN or Inf (they would make it so): the fast max is exact
    s.sumsq = sumsq;
    s.max_abs = max_lanes(at::vec::clamp_min(at::vec::clamp_min(m0, m1), at::vec::clamp_min(m2, m3)));
  } else {
    s = exact_stats(x, n);
  }
  return gradwatch::needs_scaled_pass(s, dtype_of<T>()) ? scaled_stats(x, n, s) : s;
}

template <typename T>
void scale(void* data, int64_t n, const ScaleFactor& factor) {
  T* x = static_cast<T*>(data);
  if (factor.mode != gradwatch::ScaleMode::kNarrow) {  // zeros, or a factor float32 cannot hold
    for (int64_t i = 0; i < n; ++i) x[i] = gradwatch::scale_value<T, acc_t<T>>(x[i], factor);
    return;
  }
  using V = AccVec<T>;
  const acc_t<T> f_scalar = std::is_same_v<T, double> ? static_cast<acc_t<T>>(factor.f64) : factor.f32;
  const V f(f_scalar);
  int64_t i = 0;
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    for (; i + V::size() <= n; i += V::size()) (V::loadu(x + i) * f).store(x + i);
  } else {
    using R = Vectorized<T>;
    for (; i + R::size() <= n; i += R::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(R::loadu(x + i));
      at::vec::convert_from_float<T>(lo * f, hi * f).store(x + i);
    }
  }
  for (; i < n; ++i) x[i] = gradwatch::scale_value<T, acc_t<T>>(x[i], factor);
}

}  // namespace

// Order follows Dtype: Float, Double, Half, BFloat16.
const KernelTable& kernel_table() {
  static const KernelTable table{
      {&chunk_stats<float>, &chunk_stats<double>, &chunk_stats<c10::Half>, &chunk_stats<c10::BFloat16>},
      {&scale<float>, &scale<double>, &scale<c10::Half>, &scale<c10::BFloat16>}};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace gradwatch::cpu

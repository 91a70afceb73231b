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

// Element by element in float64: used for chunks whose fast sum is not finite, which is
// the only way a NaN or Inf (or a float32 overflow of the squares) shows in the fast path.
template <typename T>
ChunkStats exact_stats(const T* x, int64_t n) {
  ChunkStats s;
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    const double a = std::fabs(v);
    s.sumsq += v * v;  // NaN and Inf propagate into the norm, as torch.linalg.vector_norm does
    if (!std::isfinite(v)) ++s.nonfinite;
    if (!std::isnan(s.max_abs) && (std::isnan(a) || a > s.max_abs)) s.max_abs = a;  // NaN sticks
  }
  return s;
}

template <typename T>
ChunkStats chunk_stats(const void* data, int64_t n) {
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
  if (!std::isfinite(sumsq)) return exact_stats(x, n);
  ChunkStats s;
  s.sumsq = sumsq;
  s.max_abs = max_lanes(at::vec::clamp_min(at::vec::clamp_min(m0, m1), at::vec::clamp_min(m2, m3)));
  return s;
}

template <typename T>
void scale(void* data, int64_t n, float factor) {
  T* x = static_cast<T*>(data);
  if (factor == 0.0f) {  // zeros, not x * 0: clearing a NaN gradient must not leave NaN behind
    for (int64_t i = 0; i < n; ++i) x[i] = T(0);
    return;
  }
  using V = AccVec<T>;
  const V f(static_cast<acc_t<T>>(factor));
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
  for (; i < n; ++i) x[i] = static_cast<T>(static_cast<acc_t<T>>(x[i]) * static_cast<acc_t<T>>(factor));
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

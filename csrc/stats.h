// The statistics layout and its math, named once for both backends: output columns, the partial
// statistics of a run of elements, how two partials combine, how a row is written, when a chunk's
// fast float32 sum of squares must be redone with scaled float64 squares, and how a factor scales
// an element. Plain C++ that nvcc also compiles for the device (C10_HOST_DEVICE); the unit tests
// in tests/cpp/ build it with g++ alone.
//
// cpu/kernels_impl.cpp includes this header and is compiled once per CPU capability with -m flags.
// Inline functions with external linkage would be merged by the linker across those objects, so
// the default path could end up calling an AVX-512 copy. Every function here therefore lives in an
// inline namespace named after the capability being compiled (as ATen's vec headers do): each object
// gets its own copy. Types (no code) stay outside it so that objects can pass them to each other.
#pragma once

#include <c10/macros/Macros.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <math.h>

#include "dtype.h"
#include "isa.h"

namespace gradwatch {

// Columns of grad_stats' float64 [N + 1, kNumStats] output; gradwatch/_ops.py mirrors them (Stat).
constexpr int kNorm = 0;       // L2 norm
constexpr int kMaxAbs = 1;     // max |x|, NaN when a NaN is present
constexpr int kNonfinite = 2;  // count of NaN and +-Inf elements
constexpr int kNumStats = 3;

// Statistics of a run of elements (a chunk, a tensor, all tensors). The sum of squares is
// sumsq * 2^(2 * exponent): exponent stays 0 unless a scaled pass ran or a combine had to move a
// power of four out of range, so float64 inputs neither overflow nor underflow (LAPACK nrm2's idea).
// A plain aggregate (32 bytes, no padding): value-initialize with Partial{}; CUDA shared memory
// cannot hold types with default member initializers.
struct Partial {
  double sumsq;
  double max_abs;
  int64_t nonfinite;
  int64_t exponent;
};

// How scale_ treats one tensor's factor.
enum class ScaleMode : int32_t {
  kSkip = 0,    // factor 1: the tensor is neither read nor written
  kZero = 1,    // factor +-0: write zeros (clears NaN and Inf)
  kNarrow = 2,  // multiply in float32 (float64 for float64 tensors) by the factor rounded to float32
  kWide = 3,    // a nonzero finite factor float32 cannot hold: multiply in float64, round once
};

struct ScaleFactor {
  double f64;
  float f32;
  ScaleMode mode;
};

inline namespace GRADWATCH_ISA {

template <typename A>
C10_HOST_DEVICE inline A nan_max(A a, A b) {
  return (a != a || a >= b) ? a : b;  // a NaN on either side wins, unlike fmax
}

C10_HOST_DEVICE inline bool is_finite(double x) { return x - x == 0.0; }  // false for NaN and +-Inf

// Keeps a finite nonzero sumsq within [2^-512, 2^512) by moving powers of four into the exponent
// (exact: only the binary exponent changes), so adding two normalized partials cannot overflow.
C10_HOST_DEVICE inline Partial normalized(Partial p) {
  const double s = p.sumsq;
  if (s > 0.0 && is_finite(s) && !(s >= 0x1p-512 && s < 0x1p+512)) {
    const int k = ::ilogb(s) / 2;
    p.sumsq = ::ldexp(s, -2 * k);
    p.exponent += k;
  }
  return p;
}

// sumsq * 2^(2 * shift) for shift <= 0, saturating to 0 far below (negligible in any sum it joins).
C10_HOST_DEVICE inline double shifted(double sumsq, int64_t shift) {
  return shift < -1100 ? sumsq * 0.0 : ::ldexp(sumsq, static_cast<int>(2 * shift));  // NaN, Inf stay
}

// The one combine rule: norms add in quadrature, maxima take the max (NaN wins), counts add.
// Partials with equal exponents (the common case, both 0) just add, bit for bit as plain doubles.
C10_HOST_DEVICE inline Partial combine(Partial a, Partial b) {
  a = normalized(a);
  b = normalized(b);
  Partial r{};
  r.max_abs = nan_max(a.max_abs, b.max_abs);
  r.nonfinite = a.nonfinite + b.nonfinite;
  if (a.exponent == b.exponent || b.sumsq == 0.0) {
    r.sumsq = a.sumsq + b.sumsq;
    r.exponent = a.exponent;
  } else if (a.sumsq == 0.0) {
    r.sumsq = b.sumsq;
    r.exponent = b.exponent;
  } else {
    const int64_t e = a.exponent > b.exponent ? a.exponent : b.exponent;
    r.sumsq = shifted(a.sumsq, a.exponent - e) + shifted(b.sumsq, b.exponent - e);
    r.exponent = e;
  }
  return normalized(r);
}

// The one row writer: row[kNorm], row[kMaxAbs], row[kNonfinite] of the packed output.
C10_HOST_DEVICE inline void write_row(double* row, const Partial& p) {
  row[kNorm] = ::ldexp(::sqrt(p.sumsq), static_cast<int>(p.exponent));
  row[kMaxAbs] = p.max_abs;
  row[kNonfinite] = static_cast<double>(p.nonfinite);
}

// Whether a partial from the fast path (squares summed in the input's accumulator type) must be
// redone with scaled float64 squares: finite elements whose squares overflowed (sum not finite with
// no NaN or Inf counted), or whose largest square is so small that squares underflowed and lost
// bits (float32 lanes below 2^-80, float64 below 2^-900). Needs exact nonfinite and max_abs.
C10_HOST_DEVICE inline bool needs_scaled_pass(const Partial& p, Dtype dtype) {
  if (p.nonfinite != 0) return false;  // the norm is NaN or Inf whatever the scale
  const double small = dtype == Dtype::Double ? 0x1p-450 : 0x1p-40;
  return !is_finite(p.sumsq) || (p.max_abs > 0.0 && p.max_abs < small);
}

// Exponent e of the scaled pass: elements times 2^-e have max |x| in [1, 2) (subnormal maxima are
// scaled by 2^1022 only, which keeps 2^-e a normal double).
C10_HOST_DEVICE inline int scaled_pass_exponent(double max_abs) {
  const int e = ::ilogb(max_abs);
  return e < -1022 ? -1022 : e;
}

// One element's contribution in the scaled pass; `inv` is 2^-e (exact powers of two).
C10_HOST_DEVICE inline double scaled_square(double v, double inv) {
  const double s = v * inv;
  return s * s;
}

// The partial after a scaled pass: its own sum of squares, everything else from the fast pass.
C10_HOST_DEVICE inline Partial with_scaled_sumsq(Partial fast, double scaled_sumsq, int e) {
  fast.sumsq = scaled_sumsq;
  fast.exponent = e;
  return normalized(fast);
}

// Per-thread accumulator of the fast path: squares summed in float32 lanes (float64 for float64
// inputs) and folded into float64 every few elements (the caller decides when: kFoldEvery), so the
// result stays within ~1e-7 of float64; max and nonfinite exact, element by element.
template <typename A>
struct Accumulator {
  static constexpr int kFoldEvery = 16;
  A lane = 0;
  double sumsq = 0.0;
  A max_abs = 0;
  int64_t nonfinite = 0;

  C10_HOST_DEVICE inline void add(A v) {
    lane += v * v;  // NaN and Inf propagate into the norm, as torch.linalg.vector_norm does
    const A a = v < 0 ? -v : v;
    max_abs = nan_max(max_abs, a);
    nonfinite += (v - v == v - v) ? 0 : 1;  // counted from the element, never inferred from the sum
  }
  C10_HOST_DEVICE inline void fold() {
    sumsq += static_cast<double>(lane);
    lane = 0;
  }
  C10_HOST_DEVICE inline Partial partial() {
    fold();
    return Partial{sumsq, static_cast<double>(max_abs), nonfinite, 0};
  }
};

// Factor decoding shared by both scale_ implementations.
C10_HOST_DEVICE inline ScaleFactor make_scale_factor(double f) {
  ScaleFactor s{f, static_cast<float>(f), ScaleMode::kNarrow};
  const double a = f < 0 ? -f : f;
  if (f == 1.0) {
    s.mode = ScaleMode::kSkip;
  } else if (f == 0.0) {
    s.mode = ScaleMode::kZero;
  } else if (is_finite(f) && (a < static_cast<double>(FLT_MIN) || a > static_cast<double>(FLT_MAX))) {
    s.mode = ScaleMode::kWide;  // float32 would round it to 0, a subnormal or Inf
  }
  return s;
}

// x scaled as the op specifies (mode kSkip is the caller's business: nothing is touched).
template <typename T, typename A>
C10_HOST_DEVICE inline T scale_value(T x, const ScaleFactor& s) {
  if (s.mode == ScaleMode::kZero) return T(0);  // zeros, not x * 0: clearing a NaN must leave 0
  if (sizeof(A) == sizeof(double) || s.mode == ScaleMode::kWide) {
    return static_cast<T>(static_cast<double>(x) * s.f64);
  }
  return static_cast<T>(static_cast<A>(x) * static_cast<A>(s.f32));
}

}  // namespace GRADWATCH_ISA
}  // namespace gradwatch

// The log2 magnitude histogram's bin layout and per-element bin math, named once for both backends
// (C10_HOST_DEVICE; tests/cpp/ builds it with g++ alone). grad_stats_hist counts, per tensor, how
// many elements fall in each bin, in the same read pass as the statistics.
//
// Bins (kHistBins = 281) of an int64 row:
//   0                 exact zeros (+0 and -0)
//   1 + e + 150       nonzero finite x with e = floor(log2|x|) clamped to [kHistMinExp, kHistMaxExp]
//                     = [-150, 128]: bin 1 holds every |x| < 2^-149 (float64 only: float32's smallest
//                     subnormal is 2^-149), bin 279 every |x| >= 2^128 (float64 only: beyond float32's
//                     max); bins 2..278 are single binades [2^e, 2^(e+1)) for e = -149..127
//   280               NaN and +-Inf
// Every float16, bfloat16 and float32 value lands in its exact binade (no clamping), so thresholds of
// any of these formats and of fp8 (E4M3: 2^-9 .. 448, E5M2: 2^-16 .. 57344) fall on bin edges; a row
// sums to the tensor's numel. The exponent comes from the bits (frexp-like), never from log2: exact
// at powers of two and for subnormals.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>

#include "isa.h"

namespace gradwatch {

constexpr int kHistMinExp = -150;  // lowest exponent bin: every |x| < 2^-149
constexpr int kHistMaxExp = 128;   // highest exponent bin: every finite |x| >= 2^128
constexpr int kHistZero = 0;
constexpr int kHistNonfinite = kHistMaxExp - kHistMinExp + 2;  // 280
constexpr int kHistBins = kHistNonfinite + 1;                  // 281
// The bin of a normal float32 is its biased exponent field r (1..254, e = r - 127) plus this.
constexpr int kFloatFieldToBin = 1 - 127 - kHistMinExp;  // 24

inline namespace GRADWATCH_ISA {

// The bin of exponent e = floor(log2|x|) of a nonzero finite x.
C10_HOST_DEVICE inline int hist_bin_of_exponent(int e) {
  e = e < kHistMinExp ? kHistMinExp : e;
  e = e > kHistMaxExp ? kHistMaxExp : e;
  return 1 + e - kHistMinExp;
}

// The bin of a float32 value (float16 and bfloat16 widen to float32 exactly, so they use this too).
C10_HOST_DEVICE inline int log2_bin(float v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof bits);
  const int field = static_cast<int>((bits >> 23) & 0xffu);
  if (field == 0xff) return kHistNonfinite;
  if (field != 0) return field + kFloatFieldToBin;
  if ((bits & 0x7fffffu) == 0) return kHistZero;
  // A subnormal: times 2^64 it is a normal float32 (exact: only the exponent changes).
  const float scaled = v * 18446744073709551616.0f;
  memcpy(&bits, &scaled, sizeof bits);
  return hist_bin_of_exponent(static_cast<int>((bits >> 23) & 0xffu) - 127 - 64);
}

// The bin of a float64 value; its subnormals (below 2^-1022) all clamp to the lowest bin.
C10_HOST_DEVICE inline int log2_bin(double v) {
  uint64_t bits;
  memcpy(&bits, &v, sizeof bits);
  const int field = static_cast<int>((bits >> 52) & 0x7ffu);
  if (field == 0x7ff) return kHistNonfinite;
  if (field == 0) return (bits & 0xfffffffffffffull) == 0 ? kHistZero : hist_bin_of_exponent(kHistMinExp);
  return hist_bin_of_exponent(field - 1023);
}

}  // namespace GRADWATCH_ISA
}  // namespace gradwatch

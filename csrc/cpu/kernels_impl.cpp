// Vectorized chunk kernels for the CPU op. setup.py compiles this file once per CPU capability
// (DEFAULT, AVX2, AVX512) with that capability's macros and -m flags, as ATen does for its own
// kernels, so at::vec::Vectorized is the real SIMD type. Keep it to raw pointers and at::vec:
// anything shared with other translation units could be emitted with instructions the CPU lacks.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
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

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#define GRADWATCH_BF16_EVEN_ODD 1
// A bfloat16 is the upper half of a float32, so a vector of them widens as its elements' 32-bit
// pairs shifted up (the even elements) and masked (the odd ones): 2 instructions where ATen's
// convert takes 5 (the statistics and the histogram do not depend on the elements' order). The
// sign bits are cleared first (load_raw: |x|, one instruction for 32 elements), so the widened
// values are the magnitudes the max needs (magnitude() below) and squares are unchanged.
#if defined(CPU_CAPABILITY_AVX512)
using RawBFloat16 = __m512i;
inline RawBFloat16 load_raw(const c10::BFloat16* p) {
  return _mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi16(0x7fff));
}
inline void widen_bf16(RawBFloat16 r, Vectorized<float>& even, Vectorized<float>& odd) {
  even = Vectorized<float>(_mm512_castsi512_ps(_mm512_slli_epi32(r, 16)));
  odd = Vectorized<float>(_mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u)))));
}
#else
using RawBFloat16 = __m256i;
inline RawBFloat16 load_raw(const c10::BFloat16* p) {
  return _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), _mm256_set1_epi16(0x7fff));
}
inline void widen_bf16(RawBFloat16 r, Vectorized<float>& even, Vectorized<float>& odd) {
  even = Vectorized<float>(_mm256_castsi256_ps(_mm256_slli_epi32(r, 16)));
  odd = Vectorized<float>(_mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u)))));
}
#endif
static_assert(sizeof(RawBFloat16) == sizeof(Vectorized<float>));
#endif

// |v| of a vector from load_pair: bfloat16 ones are magnitudes already (load_raw).
template <typename T>
inline AccVec<T> magnitude(const AccVec<T>& v) {
#ifdef GRADWATCH_BF16_EVEN_ODD
  if constexpr (std::is_same_v<T, c10::BFloat16>) return v;
#endif
  return v.abs();
}

template <typename T>
inline void load_pair(const T* p, AccVec<T>& a, AccVec<T>& b) {
#ifdef GRADWATCH_BF16_EVEN_ODD
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    widen_bf16(load_raw(p), a, b);
    return;
  }
#endif
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

// Asks for the cache lines kPrefetchBytes ahead of the `count` elements at p. The hardware prefetcher
// alone keeps too few lines in flight on some machines: a loop with more work per line (the
// histogram) then waits on memory instead of overlapping with it.
constexpr int64_t kPrefetchBytes = 4096;
template <typename T>
inline void prefetch_ahead(const T* p, int64_t count) {
  const char* c = reinterpret_cast<const char*>(p) + kPrefetchBytes;
  for (int64_t b = 0; b < count * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(c + b, 0, 3);
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

#if defined(CPU_CAPABILITY_AVX512)
#define GRADWATCH_HIST_BITS 1  // the window counted as bits (BitCounts)
#elif defined(CPU_CAPABILITY_AVX2)
#define GRADWATCH_HIST_WINDOW 1  // the window counted in 4-bit lane counters (FloatFieldCounts)
#endif
#ifdef GRADWATCH_HIST_WINDOW
// The few integer vector operations of the AVX2 window histogram (FloatFieldCounts).
namespace isa {
using IVec = __m256i;
constexpr int kLanes = 8;
inline IVec bits_of(const Vectorized<float>& v) { return _mm256_castps_si256(static_cast<__m256>(v)); }
inline IVec set1(int x) { return _mm256_set1_epi32(x); }
inline IVec add(IVec a, IVec b) { return _mm256_add_epi32(a, b); }
inline IVec sub(IVec a, IVec b) { return _mm256_sub_epi32(a, b); }
inline IVec sllv(IVec a, IVec count) { return _mm256_sllv_epi32(a, count); }  // 0 where count >= 32 (unsigned)
inline IVec field_times_4(IVec bits) { return _mm256_and_si256(_mm256_srli_epi32(bits, 21), set1(~3)); }
inline IVec byte_at(IVec v, int j) { return _mm256_and_si256(_mm256_srl_epi32(v, _mm_cvtsi32_si128(8 * j)), set1(0xff)); }
inline IVec low_nibbles(IVec v) { return _mm256_and_si256(v, set1(0x0f0f0f0f)); }
inline IVec high_nibbles(IVec v) { return _mm256_and_si256(_mm256_srli_epi32(v, 4), set1(0x0f0f0f0f)); }
inline IVec add_bytes(IVec a, IVec b) { return _mm256_add_epi8(a, b); }
inline uint32_t lane_mask(IVec v) { return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(v))); }
inline uint32_t nonzero_lanes(IVec bits) { return ~lane_mask(_mm256_cmpeq_epi32(bits, set1(0))) & 0xffu; }
inline uint32_t lanes_above(IVec x, int limit, uint32_t among) {  // unsigned x > limit
  return ~lane_mask(_mm256_cmpeq_epi32(_mm256_min_epu32(x, set1(limit)), x)) & among;
}
inline IVec max_u(IVec a, IVec b) { return _mm256_max_epu32(a, b); }
inline uint32_t max_lane(IVec v) {
  uint32_t lanes[kLanes];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), v);
  uint32_t m = 0;
  for (int k = 0; k < kLanes; ++k) m = lanes[k] > m ? lanes[k] : m;
  return m;
}
inline int64_t sum(IVec v) {
  int32_t lanes[kLanes];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), v);
  int64_t s = 0;
  for (int k = 0; k < kLanes; ++k) s += lanes[k];
  return s;
}
}  // namespace isa
#endif

// row[bin] += count: atomically unless the caller's run is the whole tensor (the row's only writer).
inline void add_to_row(int64_t* row, int bin, int64_t count, bool whole_tensor) {
  if (whole_tensor) row[bin] += count;
  else std::atomic_ref<int64_t>(row[bin]).fetch_add(count, std::memory_order_relaxed);
}

// The scalar part: counts per exponent field in four interleaved tables, and the flush into a row.
struct FieldTables {
  uint32_t t[4][257];  // counts modulo 2^32: the lookup window's take-backs may wrap one table

  void clear_tables() { std::memset(t, 0, sizeof t); }
  static inline uint32_t key_of_bits(uint32_t bits) {
    const uint32_t field = (bits >> 23) & 0xffu;
    const uint32_t subnormal = static_cast<uint32_t>(field == 0) & static_cast<uint32_t>((bits & 0x7fffffu) != 0);
    return field | (subnormal << 8);
  }
  static inline uint32_t key(float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    return key_of_bits(bits);
  }
  inline void add_run(const float* v, int64_t count) {
    for (int64_t k = 0; k < count; ++k) ++t[k & 3][key(v[k])];
  }
  static bool normal_field(int field) { return field >= 1 && field <= 254; }
  // The window's base for a block whose largest exponent field is `top`: the top 3 below the window's
  // top (the highest window [239, 255) ends at the largest finite binade, field 254); 0 to keep `base`
  // (it would not change, or top is not a normal finite field: zeros, subnormals, NaN, Inf).
  static int new_base(int top, int base) {
    const int moved = std::clamp(top - (16 - 3), 1, 255 - 16);
    return normal_field(top) && moved != base ? moved : 0;
  }
  // The largest exponent field of a normal finite element among n |x| bits (float32's layout), or 0.
  template <typename BitsAt>
  static int largest_finite_field(int n, const BitsAt& bits_at) {
    int top = 0;
    for (int k = 0; k < n; ++k) {
      const int field = static_cast<int>(bits_at(k) >> 23);
      if (field < 255 && field > top) top = field;
    }
    return top;
  }
  // The tables into the tensor's row; float32 subnormals (slot 256) binned by a rescan of the chunk.
  template <typename T>
  void flush_tables(const T* x, int64_t n, int64_t* row, bool whole_tensor) {
    // Summed modulo 2^32: exact, as a run holds fewer elements (kMaxCountedRun; a take-back may wrap one table).
    // Vectorized sums and a test per 16 fields: a chunk's counts sit in a few dozen fields.
    alignas(64) uint32_t counts[256];
    for (int field = 0; field < 256; ++field) counts[field] = t[0][field] + t[1][field] + t[2][field] + t[3][field];
    for (int group = 0; group < 256; group += 16) {
      uint32_t any = 0;
      for (int field = group; field < group + 16; ++field) any |= counts[field];
      if (any == 0) continue;
      for (int field = group; field < group + 16; ++field) {
        if (counts[field] == 0) continue;
        const int bin = field == 0 ? gradwatch::kHistZero : field == 255 ? gradwatch::kHistNonfinite
                                                                          : field + gradwatch::kFloatFieldToBin;
        add_to_row(row, bin, counts[field], whole_tensor);
      }
    }
    if (static_cast<uint32_t>(t[0][256] + t[1][256] + t[2][256] + t[3][256]) == 0) return;
    int64_t sub[gradwatch::kHistBins] = {};
    for (int64_t i = 0; i < n; ++i) {
      const float v = static_cast<float>(x[i]);
      if (key(v) == 256) ++sub[gradwatch::log2_bin(v)];
    }
    for (int bin = 0; bin < gradwatch::kHistBins; ++bin) {
      if (sub[bin] != 0) add_to_row(row, bin, sub[bin], whole_tensor);
    }
  }
};

// Log2 histogram of a chunk whose elements are read as float32 (float32, and float16/bfloat16 widened
// exactly): counts of the float32 exponent field, the bin up to a constant (hist.h). Slot 256 counts
// float32 subnormals, binned exactly at flush time by a rescan (rare: gradients below 2^-126).
//
// One element at a time (the DEFAULT build, tails, and the rare elements below) costs a load, a few
// integer ops and a read-modify-write of a counter: several times the statistics' own work per
// element. So with AVX2 the bulk goes through a window instead (AVX-512: BitCounts): 16 consecutive exponent
// fields [base, base + 16), each lane holding a 4-bit counter per field (8 fields in `lo`, 8 in
// `hi`), spilled into 32-bit sums every 12 vectors, before a nibble can overflow. Elements outside
// the window (far below the chunk's largest, subnormal, NaN, Inf) go one by one; when a block has
// many, the window moves to that block's largest binade (gradients of one chunk sit mostly within a
// dozen binades of their largest: the ones more than 13 below are ~1e-4 of a Gaussian). Four
// interleaved scalar tables, so that a run of elements in one binade does not wait on one counter.
// A lane's increment `1 << 4 * slot` is a variable shift of the field offset (0 outside the window),
// with a per-vector out-of-window lane mask; zeros = seen - window - outside.
struct FloatFieldCounts : FieldTables {
#ifdef GRADWATCH_HIST_WINDOW
  static constexpr int kSlots = 16;
  static constexpr int kSpillEvery = 12;        // vectors; a nibble holds 15
  static constexpr int kWidenEvery = 16;        // spills; a byte holds 255 >= 16 * 12
  static constexpr int kMoveAbove = 8;          // elements outside the window in one block that move it
  static constexpr int kMaxMoves = 8;           // per chunk: a chunk spread over many binades stays scalar
  isa::IVec bytes[4];                           // nibbles spilled into bytes: slots {0,2,4,6}, {1,3,5,7}, ...
  isa::IVec sums[kSlots];                       // bytes widened into per-slot 32-bit lane sums
  int moves = 0;
  int64_t outside_total = 0;                    // AVX2: nonzero elements counted one by one (zeros: the rest)
  // The hot state, a separate local of the caller that never reaches a non-inlined call, so that
  // the compiler keeps it in registers (a member of an escaping object would round-trip memory).
  struct Window {
    isa::IVec lo, hi;
    isa::IVec base4;
    bool placed;  // by the chunk's first block with a normal element
    int base, pending, spills;
    int64_t seen;  // elements through the window since its last drain
  };
#else
  struct Window {};
#endif
  static constexpr bool kBlockMax = false;
  static constexpr bool kRaw = false;

  void clear(Window& w) {
    clear_tables();
#ifdef GRADWATCH_HIST_WINDOW
    reset_window(w, 127 - 20);  // [2^-20, 2^-4) until place() sees a normal element
    moves = 0;
    w.placed = false;
#else
    (void)w;
#endif
  }

  // The four float32 vectors of one block of the statistics loop.
  inline void add_vectors(Window& w, const Vectorized<float>& a, const Vectorized<float>& b,
                          const Vectorized<float>& c, const Vectorized<float>& d) {
    [[maybe_unused]] constexpr int kW = Vectorized<float>::size();
#if defined(GRADWATCH_HIST_WINDOW)
    static_assert(kW == isa::kLanes);
    const Vectorized<float> v[4] = {a.abs(), b.abs(), c.abs(), d.abs()};
    if (!w.placed) [[unlikely]] {
      place(w, isa::max_u(isa::max_u(isa::bits_of(v[0]), isa::bits_of(v[1])),
                          isa::max_u(isa::bits_of(v[2]), isa::bits_of(v[3]))));
    }
    uint32_t outside[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const isa::IVec bits = isa::bits_of(v[k]);
      const isa::IVec slot4 = isa::sub(isa::field_times_4(bits), w.base4);
      w.lo = isa::add(w.lo, isa::sllv(isa::set1(1), slot4));
      w.hi = isa::add(w.hi, isa::sllv(isa::set1(1), isa::sub(slot4, isa::set1(32))));
      outside[k] = isa::lanes_above(slot4, 4 * (kSlots - 1), isa::nonzero_lanes(bits));
    }
    w.seen += 4 * kW;
    w.pending += 4;
    if (w.pending >= kSpillEvery) spill(w);
    if ((outside[0] | outside[1] | outside[2] | outside[3]) != 0) [[unlikely]] {
      float values[4 * kW];  // stored only here: the common path keeps everything in registers
      for (int k = 0; k < 4; ++k) v[k].store(values + k * kW);
      const int new_base = add_outside(values, outside[0], outside[1], outside[2], outside[3], w.base);
      if (new_base != 0) {
        drain(w);
        reset_window(w, new_base);
        ++moves;
      }
    }
#else
    (void)w;
    float values[4 * kW];
    a.store(values);
    b.store(values + kW);
    c.store(values + 2 * kW);
    d.store(values + 3 * kW);
    for (int k = 0; k < 4 * kW; k += 4) {  // four interleaved streams
      ++t[0][key(values[k])];
      ++t[1][key(values[k + 1])];
      ++t[2][key(values[k + 2])];
      ++t[3][key(values[k + 3])];
    }
#endif
  }

#ifdef GRADWATCH_HIST_WINDOW
  void reset_window(Window& w, int base) {
    w.base = base;
    w.base4 = isa::set1(4 * base);
    w.lo = w.hi = isa::set1(0);
    w.pending = w.spills = 0;
    w.seen = 0;
    outside_total = 0;
    for (auto& b : bytes) b = isa::set1(0);
    for (auto& sum : sums) sum = isa::set1(0);
  }
  // Nibbles into bytes (4 byte-adds), and every kWidenEvery spills bytes into 32-bit sums.
  inline void spill(Window& w) {
    bytes[0] = isa::add_bytes(bytes[0], isa::low_nibbles(w.lo));   // slots 0, 2, 4, 6
    bytes[1] = isa::add_bytes(bytes[1], isa::high_nibbles(w.lo));  // slots 1, 3, 5, 7
    bytes[2] = isa::add_bytes(bytes[2], isa::low_nibbles(w.hi));   // slots 8, 10, 12, 14
    bytes[3] = isa::add_bytes(bytes[3], isa::high_nibbles(w.hi));  // slots 9, 11, 13, 15
    w.lo = w.hi = isa::set1(0);
    w.pending = 0;
    if (++w.spills >= kWidenEvery) widen(w);
  }
  void widen(Window& w) {
    for (int k = 0; k < 4; ++k) {
      for (int j = 0; j < 4; ++j) {  // byte j of group k holds slot 8 * (k / 2) + 2 * j + k % 2
        isa::IVec& sum = sums[8 * (k / 2) + 2 * j + k % 2];
        sum = isa::add(sum, isa::byte_at(bytes[k], j));
      }
      bytes[k] = isa::set1(0);
    }
    w.spills = 0;
  }
  // The window's counts into the tables (before it moves, and at the end of the chunk). Zeros are
  // what went through the window without being counted in it (or, AVX2, one by one).
  void drain(Window& w) {
    spill(w);
    widen(w);
    int64_t in_window = 0;
    for (int s = 0; s < kSlots; ++s) {
      const int64_t c = isa::sum(sums[s]);
      t[0][w.base + s] += static_cast<uint32_t>(c);
      in_window += c;
    }
    t[0][0] += static_cast<uint32_t>(w.seen - in_window - outside_total);
  }
  // Puts the window at the run's first block whose largest element is normal: that binade 3 below
  // the window's top (the chunk's largest sits a binade or two above its first block's, and a
  // Gaussian's elements more than 13 binades below its largest are ~1e-4 of them).
  void place(Window& w, isa::IVec high) {
    const int field = static_cast<int>(isa::max_lane(high) >> 23);
    if (const int base = new_base(field, w.base); base != 0) {
      if (w.seen != 0) drain(w);  // blocks of zeros and subnormals before this one
      reset_window(w, base);
    }
    w.placed = normal_field(field);  // a block of zeros and subnormals, or whose largest is NaN or Inf,
                                     // places nothing: the next block does
  }
  // Counts one block's elements outside the window one by one; returns the window's new base when
  // the block had many of them (0 to keep it).
  __attribute__((noinline)) int add_outside(const float* values, uint32_t o0, uint32_t o1, uint32_t o2, uint32_t o3,
                                            int base) {
    constexpr int kW = isa::kLanes;
    const uint32_t outside[4] = {o0, o1, o2, o3};
    int count = 0;
    for (int k = 0; k < 4; ++k) {
      for (uint32_t m = outside[k]; m != 0; m &= m - 1) {
        ++t[count & 3][key(values[k * kW + __builtin_ctz(m)])];
        ++count;
      }
    }
    outside_total += count;
    if (count <= kMoveAbove || moves >= kMaxMoves) return 0;
    uint32_t bits[4 * kW];
    std::memcpy(bits, values, sizeof bits);
    return new_base(largest_finite_field(4 * kW, [&](int k) { return bits[k]; }), base);
  }
#endif

  void start_chunk(Window&) {
#ifdef GRADWATCH_HIST_WINDOW
    moves = 0;
#endif
  }
  template <typename T>
  void flush(Window& w, const T* x, int64_t n, int64_t* row, bool whole_tensor) {
#ifdef GRADWATCH_HIST_WINDOW
    drain(w);
#else
    (void)w;
#endif
    flush_tables(x, n, row, whole_tensor);
  }
};

#ifdef GRADWATCH_HIST_BITS
// The lanes a window of bit counts reads: bfloat16 |x| bits as loaded (16-bit lanes, exponent field
// at bit 7: 32 elements per vector, 2 vectors per block) or float32 |x| bits (32-bit lanes, field
// at bit 23: float32, and float16 widened exactly by the statistics, 4 vectors per block). Both
// exponent fields are float32's (bfloat16 is float32's upper half).
struct BFloat16Lanes {
  using Mask = __mmask32;
  static constexpr int kShift = 7, kVectors = 2, kLanes = 32;
  static __m512i set1(int x) { return _mm512_set1_epi16(static_cast<int16_t>(x)); }
  static __m512i max(__m512i a, __m512i b) { return _mm512_max_epu16(a, b); }
  static __m512i min(__m512i a, __m512i b) { return _mm512_min_epu16(a, b); }
  static Mask below(__m512i a, __m512i b) { return _mm512_cmplt_epu16_mask(a, b); }
  static Mask at_or_above(__m512i a, __m512i b) { return _mm512_cmpge_epu16_mask(a, b); }
  static Mask nonzero(__m512i a) { return _mm512_test_epi16_mask(a, a); }
  static Mask below_where(Mask m, __m512i a, __m512i b) { return _mm512_mask_cmplt_epu16_mask(m, a, b); }
  static bool any(Mask a, Mask b) { return !_kortestz_mask32_u8(a, b); }
  // 1 << (field - base) in each lane, 0 where field - base is outside [0, 16) (code: window_code).
  static __m512i window_code(int base) { return set1(base); }
  static __m512i slot_bits(__m512i v, __m512i code) {
    return _mm512_sllv_epi16(_mm512_set1_epi16(1), _mm512_sub_epi16(_mm512_srli_epi16(v, kShift), code));
  }
  static uint32_t bits_of(const uint16_t* values, int k) { return static_cast<uint32_t>(values[k]) << 16; }
  static uint32_t max_lane(__m512i v) {
    const __m512i wide = _mm512_max_epu32(_mm512_srli_epi32(v, 16), _mm512_and_si512(v, _mm512_set1_epi32(0xffff)));
    return static_cast<uint32_t>(_mm512_reduce_max_epu32(wide)) << 16;
  }
};
struct FloatLanes {
  using Mask = __mmask16;
  static constexpr int kShift = 23, kVectors = 4, kLanes = 16;
  static __m512i set1(int x) { return _mm512_set1_epi32(x); }
  static __m512i max(__m512i a, __m512i b) { return _mm512_max_epu32(a, b); }
  static __m512i min(__m512i a, __m512i b) { return _mm512_min_epu32(a, b); }
  static Mask below(__m512i a, __m512i b) { return _mm512_cmplt_epu32_mask(a, b); }
  static Mask at_or_above(__m512i a, __m512i b) { return _mm512_cmpge_epu32_mask(a, b); }
  static Mask nonzero(__m512i a) { return _mm512_test_epi32_mask(a, a); }
  static Mask below_where(Mask m, __m512i a, __m512i b) { return _mm512_mask_cmplt_epu32_mask(m, a, b); }
  static bool any(Mask a, Mask b) { return !_kortestz_mask16_u8(a, b); }
  // As BFloat16Lanes, as 0x8000 >> (base + 15 - field): a shift by 16 to 31 (fields below the
  // window) leaves no bit either, where 1 << 16..31 would leave one above the 16 bits packed.
  static __m512i window_code(int base) { return set1(base + 15); }
  static __m512i slot_bits(__m512i v, __m512i code) {
    return _mm512_srlv_epi32(_mm512_set1_epi32(0x8000), _mm512_sub_epi32(code, _mm512_srli_epi32(v, kShift)));
  }
  static uint32_t bits_of(const uint32_t* values, int k) { return values[k]; }
  static uint32_t max_lane(__m512i v) { return static_cast<uint32_t>(_mm512_reduce_max_epu32(v)); }
};

// With AVX-512, the window's 16 exponent fields [base, base + 16) are counted as bits: an element
// becomes 1 << (field - base) in its lane (a variable shift, which shifts the bit out for fields
// outside the window, zeros included, so those count nothing); float32 lanes are packed into 16-bit
// ones. Every 8 blocks of 64 elements, the 16 vectors of bits are summed by position with carry-save
// adders (Harley-Seal) into bit-sliced running counts of weight 1, 2, 4 and 8 per slot, and the carry
// out (weight 16) into 4-bit counters, 4 slots apart in each lane: about 10 vector ops per bfloat16
// block, where a 4-bit counter per slot in every lane (16 per element) took ~27. Outsiders (nonzero
// elements outside the window: far below the run's largest, subnormal, NaN, Inf) are found per block
// from its min and max |x| bits (the max is the statistics' max too) and counted one by one in the
// tables; a block with zeros takes that path as well and finds nothing to count. Zeros are the
// elements that went through the window uncounted. A bfloat16 chunk's last < 64 elements go through
// the window too, as a block padded with zeros; a float chunk's go one by one (add_run).
template <typename L>
struct BitCounts : FieldTables {
  static constexpr int kSlots = 16;
  static constexpr int kGroup = 8;         // blocks (2 vectors of 16-bit bits each) per carry-save sum
  static constexpr int kNibbleSpill = 15;  // groups; a 4-bit counter holds 15
  static constexpr int kMoveAbove = 8;     // elements outside the window in one block that move it
  static constexpr int kMaxMoves = 8;      // per chunk
  static constexpr bool kRaw = std::is_same_v<L, BFloat16Lanes>;  // add_raw: the loaded bfloat16 vectors
  static constexpr bool kBlockMax = !kRaw;                         // add_block: the block's max |x|
  using Value = std::conditional_t<kRaw, uint16_t, uint32_t>;
  int moves = 0;
  int groups = 0;                          // into `nibbles` since their last spill
  bool tables_used = false;                // cleared on first use: most runs never need them
  int64_t outside_total = 0;               // elements counted one by one since the window's reset
  int64_t padding = 0;                     // padded zeros among the window's elements since its reset
  __m512i bits[2 * kGroup];                // the current group's vectors of slot bits
  __m512i nibbles[4];                      // 4-bit counters: nibble k of vector j counts slot 4k + j
  uint32_t slot_counts[kSlots];            // spilled counters: per slot, since the window's reset
  // Named members, not arrays: the compiler then keeps them in registers.
  struct Window {
    __m512i ones, twos, fours, eights;  // bit s of a lane: slot s's count, bit-sliced by weight 1, 2, 4, 8
    __m512i code;                       // L::window_code(base)
    __m512i bottom, top;                // |x| bits of 2^(base - 127) and of 2^(base + 16 - 127)
    __m512i high;                       // bfloat16: running max of |x| bits, the statistics' max (max_abs)
    int base;
    int buffered;    // blocks in `bits`
    int64_t blocks;  // through the window since its reset
    bool placed;     // by the run's first block with a normal element
  };

  void clear(Window& w) {
    tables_used = false;
    reset_window(w, 127 - 20);
    moves = 0;
    w.placed = false;
  }
  void start_chunk(Window& w) {
    moves = 0;
    w.high = _mm512_setzero_si512();  // max_abs is the chunk's
  }
  void reset_window(Window& w, int base) {
    w.base = base;
    w.code = L::window_code(base);
    w.bottom = L::set1(base << L::kShift);
    w.top = L::set1((base + kSlots) << L::kShift);
    w.ones = w.twos = w.fours = w.eights = _mm512_setzero_si512();
    w.buffered = 0;
    w.blocks = 0;
    outside_total = 0;
    padding = 0;
    groups = 0;
    for (auto& n : nibbles) n = _mm512_setzero_si512();
    std::memset(slot_counts, 0, sizeof slot_counts);
  }
  void use_tables() {
    if (!tables_used) clear_tables();
    tables_used = true;
  }
  // sum + a + b = new sum + 2 * carry, bit by bit (a full adder per bit: parity and majority).
  static inline void add_carry_save(__m512i& sum, __m512i& carry, __m512i a, __m512i b) {
    carry = _mm512_ternarylogic_epi32(sum, a, b, 0xe8);
    sum = _mm512_ternarylogic_epi32(sum, a, b, 0x96);
  }
  static inline typename L::Mask outside(__m512i v, const Window& w) {  // nonzero and not in [bottom, top)
    return L::below_where(L::nonzero(v), v, w.bottom) | L::at_or_above(v, w.top);
  }

  // One block of 64 elements as |x| bits (L::kVectors vectors), of which `padding` are padded zeros
  // (kPadded: a tail); returns the block's max |x| bits.
  template <bool kPadded = false>
  inline __m512i add_lanes(Window& w, const __m512i* v, [[maybe_unused]] int64_t pad = 0) {
    __m512i high = L::max(v[0], v[1]), low = L::min(v[0], v[1]);
    if constexpr (L::kVectors == 4) {
      high = L::max(high, L::max(v[2], v[3]));
      low = L::min(low, L::min(v[2], v[3]));
    }
    if (!w.placed) [[unlikely]] place(w, high);
    if constexpr (L::kVectors == 4) {  // 32-bit lanes of bits <= 0xffff pack into 16-bit ones exactly
      bits[2 * w.buffered] = _mm512_packus_epi32(L::slot_bits(v[0], w.code), L::slot_bits(v[1], w.code));
      bits[2 * w.buffered + 1] = _mm512_packus_epi32(L::slot_bits(v[2], w.code), L::slot_bits(v[3], w.code));
    } else {
      bits[2 * w.buffered] = L::slot_bits(v[0], w.code);
      bits[2 * w.buffered + 1] = L::slot_bits(v[1], w.code);
    }
    ++w.blocks;
    if constexpr (kPadded) padding += pad;  // in the window the block is counted in, also if it moves below
    if (++w.buffered == kGroup) add_group(w);
    if (L::any(L::below(low, w.bottom), L::at_or_above(high, w.top))) [[unlikely]] {
      typename L::Mask o[L::kVectors];
      typename L::Mask any = 0;
      for (int k = 0; k < L::kVectors; ++k) any |= o[k] = outside(v[k], w);
      if (any != 0) {  // else zeros only
        alignas(64) Value values[64];
        for (int k = 0; k < L::kVectors; ++k) _mm512_store_si512(values + k * L::kLanes, v[k]);
        const int new_base = add_outside(values, o, w.base);
        if (new_base != 0) {
          drain(w);
          reset_window(w, new_base);
          ++moves;
        }
      }
    }
    return high;
  }
  // bfloat16: one block of the statistics loop, two vectors of 32 magnitudes (load_raw; their max
  // is kept for max_abs).
  inline void add_raw(Window& w, __m512i r0, __m512i r1) {
    const __m512i v[2] = {r0, r1};
    w.high = L::max(w.high, add_lanes(w, v));
  }
  // bfloat16: the chunk's last count < 64 elements, as a block whose missing elements read as zeros.
  void add_tail(Window& w, const c10::BFloat16* p, int64_t count) {
    const auto mask = [](int64_t k) { return static_cast<__mmask32>(k >= 32 ? ~0u : (1u << k) - 1); };
    const __m512i abs = _mm512_set1_epi16(0x7fff);
    const __m512i r0 = _mm512_and_si512(_mm512_maskz_loadu_epi16(mask(count), p), abs);
    const __m512i r1 = _mm512_and_si512(_mm512_maskz_loadu_epi16(mask(count - 32 < 0 ? 0 : count - 32), p + 32), abs);
    const __m512i v[2] = {r0, r1};
    w.high = L::max(w.high, add_lanes<true>(w, v, 64 - count));
  }
  // The max |x| of the chunk's bfloat16 blocks so far, as float32 lanes.
  Vectorized<float> max_abs(const Window& w) const {
    Vectorized<float> even, odd;
    widen_bf16(w.high, even, odd);
    return at::vec::clamp_min(even, odd);
  }
  // float32 lanes: the four vectors of one block of the statistics loop; returns the block's max |x|
  // (the max of the |x| bits, which order like the values; a NaN's bits sort above +Inf, and a NaN
  // sends the chunk to exact_stats anyway).
  inline Vectorized<float> add_block(Window& w, const Vectorized<float>& a, const Vectorized<float>& b,
                                     const Vectorized<float>& c, const Vectorized<float>& d) {
    const __m512i abs = _mm512_set1_epi32(0x7fffffff);
    const __m512i v[4] = {_mm512_and_si512(_mm512_castps_si512(a), abs), _mm512_and_si512(_mm512_castps_si512(b), abs),
                          _mm512_and_si512(_mm512_castps_si512(c), abs), _mm512_and_si512(_mm512_castps_si512(d), abs)};
    return Vectorized<float>(_mm512_castsi512_ps(add_lanes(w, v)));
  }
  // float32 lanes: a chunk's last elements, one by one.
  inline void add_run(const float* v, int64_t count) {
    use_tables();
    FieldTables::add_run(v, count);
  }
  // The group's 16 vectors of bits into the running counts (15 carry-save adders).
  inline void add_group(Window& w) {
    __m512i twos_a, twos_b, fours_a, fours_b, eights_a, eights_b, carry16;
    add_carry_save(w.ones, twos_a, bits[0], bits[1]);
    add_carry_save(w.ones, twos_b, bits[2], bits[3]);
    add_carry_save(w.twos, fours_a, twos_a, twos_b);
    add_carry_save(w.ones, twos_a, bits[4], bits[5]);
    add_carry_save(w.ones, twos_b, bits[6], bits[7]);
    add_carry_save(w.twos, fours_b, twos_a, twos_b);
    add_carry_save(w.fours, eights_a, fours_a, fours_b);
    add_carry_save(w.ones, twos_a, bits[8], bits[9]);
    add_carry_save(w.ones, twos_b, bits[10], bits[11]);
    add_carry_save(w.twos, fours_a, twos_a, twos_b);
    add_carry_save(w.ones, twos_a, bits[12], bits[13]);
    add_carry_save(w.ones, twos_b, bits[14], bits[15]);
    add_carry_save(w.twos, fours_b, twos_a, twos_b);
    add_carry_save(w.fours, eights_b, fours_a, fours_b);
    add_carry_save(w.eights, carry16, eights_a, eights_b);
    const __m512i every4 = _mm512_set1_epi16(0x1111);
    for (int j = 0; j < 4; ++j) {
      nibbles[j] = _mm512_add_epi16(nibbles[j], _mm512_and_si512(_mm512_srli_epi16(carry16, j), every4));
    }
    w.buffered = 0;
    if (++groups == kNibbleSpill) spill_nibbles(4);
  }
  // slot_counts += the 4-bit counters (each <= 15) summed over the lanes, << weight_log2. The sums
  // fold the 4 counter vectors together without overflowing a byte: nibbles into bytes (8 vectors,
  // even and odd bytes two slots each), then 512 -> 128 bits pairing vectors (each 128-bit block one
  // vector), 128 -> 64, and the bytes of each qword by parity (sad).
  void spill_nibbles(int weight_log2) {
    __m512i v[8];  // v[2j + h]: nibbles 0, 2 (h = 0) or 1, 3 (h = 1) of nibbles[j] as bytes
    const __m512i low4 = _mm512_set1_epi16(0x0f0f);
    for (int j = 0; j < 4; ++j) {
      v[2 * j] = _mm512_and_si512(nibbles[j], low4);
      v[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(nibbles[j], 4), low4);
      nibbles[j] = _mm512_setzero_si512();
    }
    __m512i c[4];  // c[k]: 128-bit blocks [v0 + v2, v1 + v3] of v[2k], then of v[2k + 1]
    for (int k = 0; k < 4; ++k) {
      c[k] = _mm512_add_epi8(_mm512_shuffle_i64x2(v[2 * k], v[2 * k + 1], 0x44),
                             _mm512_shuffle_i64x2(v[2 * k], v[2 * k + 1], 0xee));
    }
    __m512i e[2];  // e[m]: block b is v[4m + b] summed over its 4 blocks
    for (int m = 0; m < 2; ++m) {
      e[m] = _mm512_add_epi8(_mm512_shuffle_i64x2(c[2 * m], c[2 * m + 1], 0x88),
                             _mm512_shuffle_i64x2(c[2 * m], c[2 * m + 1], 0xdd));
    }
    // qword 2b: v[b] summed to 8 bytes, qword 2b + 1: v[4 + b] (bytes <= 8 * 15)
    const __m512i f = _mm512_add_epi8(_mm512_unpacklo_epi64(e[0], e[1]), _mm512_unpackhi_epi64(e[0], e[1]));
    alignas(64) uint64_t even[8], odd[8];
    _mm512_store_si512(even, _mm512_sad_epu8(_mm512_and_si512(f, _mm512_set1_epi16(0x00ff)), _mm512_setzero_si512()));
    _mm512_store_si512(odd, _mm512_sad_epu8(_mm512_srli_epi16(f, 8), _mm512_setzero_si512()));
    for (int q = 0; q < 8; ++q) {
      const int vec = (q & 1) ? 4 + q / 2 : q / 2;  // v[vec]: nibbles[vec / 2], half vec % 2
      const int slot = 4 * (vec % 2) + vec / 2;      // its even bytes' slot; the odd bytes' is slot + 8
      slot_counts[slot] += static_cast<uint32_t>(even[q]) << weight_log2;
      slot_counts[slot + 8] += static_cast<uint32_t>(odd[q]) << weight_log2;
    }
    groups = 0;
  }
  // The window's counts per slot (into slot_counts) and its zeros.
  int64_t count_window(Window& w) {
    if (w.buffered != 0) {
      for (int k = 2 * w.buffered; k < 2 * kGroup; ++k) bits[k] = _mm512_setzero_si512();
      add_group(w);  // the group's blocks so far (the rest are zeros, which count nothing)
    }
    if (groups != 0) spill_nibbles(4);
    // The bit-sliced counts as 4-bit counters: ones + 2 twos + 4 fours + 8 eights <= 15.
    const __m512i every4 = _mm512_set1_epi16(0x1111);
    for (int j = 0; j < 4; ++j) {
      const auto level = [&](__m512i v, int weight_log2) {
        return _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(v, j), every4), weight_log2);
      };
      nibbles[j] = _mm512_or_si512(_mm512_or_si512(level(w.ones, 0), level(w.twos, 1)),
                                   _mm512_or_si512(level(w.fours, 2), level(w.eights, 3)));
    }
    spill_nibbles(0);
    int64_t in_window = 0;
    for (int s = 0; s < kSlots; ++s) in_window += slot_counts[s];
    return 64 * w.blocks - padding - in_window - outside_total;
  }
  // The window's counts into the tables (before it moves).
  void drain(Window& w) {
    const int64_t zeros = count_window(w);
    use_tables();
    for (int s = 0; s < kSlots; ++s) t[0][w.base + s] += slot_counts[s];
    t[0][0] += static_cast<uint32_t>(zeros);
  }
  // Counts one block's elements outside the window one by one (|x| bits, masks o per vector);
  // returns the window's new base when the block had many of them (0 to keep it).
  __attribute__((noinline)) int add_outside(const Value* values, const typename L::Mask* o, int base) {
    use_tables();
    int count = 0;
    for (int k = 0; k < L::kVectors; ++k) {
      for (uint32_t m = o[k]; m != 0; m &= m - 1) {
        ++t[count & 3][key_of_bits(L::bits_of(values, k * L::kLanes + __builtin_ctz(m)))];
        ++count;
      }
    }
    outside_total += count;
    if (count <= kMoveAbove || moves >= kMaxMoves) return 0;
    return new_base(largest_finite_field(64, [&](int k) { return L::bits_of(values, k); }), base);
  }
  // As FloatFieldCounts::place.
  void place(Window& w, __m512i high) {
    const int field = static_cast<int>(L::max_lane(high) >> 23);
    if (const int base = new_base(field, w.base); base != 0) {
      if (w.blocks != 0) drain(w);  // blocks of zeros and subnormals before this one
      reset_window(w, base);
    }
    w.placed = normal_field(field);
  }
  // The window's counts straight into the row (the tables only when something went through them).
  template <typename T>
  void flush(Window& w, const T* x, int64_t n, int64_t* row, bool whole_tensor) {
    const int64_t zeros = count_window(w);
    for (int s = 0; s < kSlots; ++s) {
      if (slot_counts[s] != 0) add_to_row(row, w.base + s + gradwatch::kFloatFieldToBin, slot_counts[s], whole_tensor);
    }
    if (zeros != 0) add_to_row(row, gradwatch::kHistZero, zeros, whole_tensor);
    if (tables_used) flush_tables(x, n, row, whole_tensor);
  }
};
using BFloat16BitCounts = BitCounts<BFloat16Lanes>;
using FloatBitCounts = BitCounts<FloatLanes>;
#endif

// The same for float64 chunks, binned element by element (hist.h log2_bin).
struct DoubleBinCounts {
  uint32_t t[gradwatch::kHistBins];
  struct Window {};
  static constexpr bool kBlockMax = false;
  static constexpr bool kRaw = false;

  void clear(Window&) { std::memset(t, 0, sizeof t); }
  void start_chunk(Window&) {}
  inline void add_vectors(Window&, const Vectorized<double>& a, const Vectorized<double>& b,
                          const Vectorized<double>& c, const Vectorized<double>& d) {
    constexpr int64_t kW = Vectorized<double>::size();
    double w[4 * kW];
    a.store(w);
    b.store(w + kW);
    c.store(w + 2 * kW);
    d.store(w + 3 * kW);
    add_run(w, 4 * kW);
  }
  inline void add_run(const double* v, int64_t count) {
    for (int64_t k = 0; k < count; ++k) ++t[gradwatch::log2_bin(v[k])];
  }
  template <typename T>
  void flush(Window&, const T*, int64_t, int64_t* row, bool whole_tensor) {
    for (int bin = 0; bin < gradwatch::kHistBins; ++bin) {
      if (t[bin] != 0) add_to_row(row, bin, t[bin], whole_tensor);
    }
  }
};

#ifdef GRADWATCH_HIST_BITS
using BFloat16Counts = BFloat16BitCounts;
using FloatCounts = FloatBitCounts;
#else
using BFloat16Counts = FloatFieldCounts;
using FloatCounts = FloatFieldCounts;
#endif
template <typename T>
using ChunkHist = std::conditional_t<std::is_same_v<T, double>, DoubleBinCounts,
                                     std::conditional_t<std::is_same_v<T, c10::BFloat16>, BFloat16Counts, FloatCounts>>;

// Statistics of a chunk and, when kHist, its elements counted into `hist`, in the same read: the
// histogram reads each block of elements right after the vector loads (from L1), so memory is
// streamed once. kHist is a template parameter: the statistics-only path is the code it always was.
template <typename T, bool kHist>
Partial chunk_stats_impl(const T* x, int64_t n, [[maybe_unused]] ChunkHist<T>* hist,
                         [[maybe_unused]] typename ChunkHist<T>::Window* window) {
  using V = AccVec<T>;
  // Each float32 lane sums 16 squares before the partial is folded into float64: this keeps
  // the result within ~1e-7 of a float64 reference where one float32 accumulator drifts.
  constexpr int64_t kStep = 2 * kPair<T>;
  constexpr int64_t kFold = 16 * kStep;
  [[maybe_unused]] acc_t<T> widened[kPair<T>];  // the tail's elements as float32, for the histogram
  if constexpr (kHist) hist->start_chunk(*window);

  double sumsq = 0.0;
  V m0(0), m1(0), m2(0), m3(0);
  V a, b, c, d;
  int64_t i = 0;
  while (i < n) {
    V s0(0), s1(0), s2(0), s3(0);
    const int64_t fold_end = n - i < kFold ? n : i + kFold;
    for (; i + kStep <= fold_end; i += kStep) {
      prefetch_ahead(x + i, kStep);
      load_pair<T>(x + i, a, b);
      load_pair<T>(x + i + kPair<T>, c, d);
      s0 = at::vec::fmadd(a, a, s0);
      s1 = at::vec::fmadd(b, b, s1);
      s2 = at::vec::fmadd(c, c, s2);
      s3 = at::vec::fmadd(d, d, s3);
      // max without NaN handling: a NaN makes the sum NaN and sends the chunk to exact_stats.
      if constexpr (kHist && ChunkHist<T>::kRaw) {
        hist->add_raw(*window, load_raw(x + i), load_raw(x + i + kPair<T>));  // the max too: max_abs below
      } else if constexpr (kHist && ChunkHist<T>::kBlockMax) {
        m0 = at::vec::clamp_min(m0, hist->add_block(*window, a, b, c, d));  // the block's max |x|
      } else {
        m0 = at::vec::clamp_min(m0, magnitude<T>(a));
        m1 = at::vec::clamp_min(m1, magnitude<T>(b));
        m2 = at::vec::clamp_min(m2, magnitude<T>(c));
        m3 = at::vec::clamp_min(m3, magnitude<T>(d));
        if constexpr (kHist) hist->add_vectors(*window, a, b, c, d);
      }
    }
    for (; i < fold_end; i += kPair<T>) {
      const int64_t count = fold_end - i < kPair<T> ? fold_end - i : kPair<T>;
      load_pair_partial<T>(x + i, count, a, b);
      s0 = at::vec::fmadd(a, a, s0);
      s1 = at::vec::fmadd(b, b, s1);
      m0 = at::vec::clamp_min(m0, a.abs());
      m1 = at::vec::clamp_min(m1, b.abs());
      if constexpr (kHist && ChunkHist<T>::kRaw) {
        hist->add_tail(*window, x + i, count);
      } else if constexpr (kHist) {  // only the `count` real elements: missing lanes read as zero
        a.store(widened);
        b.store(widened + V::size());
        hist->add_run(widened, count);
      }
    }
    sumsq += sum_lanes((s0 + s1) + (s2 + s3));
  }
  if constexpr (kHist && ChunkHist<T>::kRaw) m1 = at::vec::clamp_min(m1, hist->max_abs(*window));
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
Partial chunk_stats(const void* data, int64_t n) {
  return chunk_stats_impl<T, false>(static_cast<const T*>(data), n, nullptr, nullptr);
}

// A run's counters hold up to 2^32 - 1 per field (FieldTables): longer runs are flushed in parts.
constexpr int64_t kMaxCountedRun = int64_t{1} << 30;

// The statistics of each chunk of a run, and the run's histogram counted in one set of counters,
// flushed into the tensor's row once: the per-chunk costs of a histogram (clearing its counters,
// draining the window, adding to the row) are paid per run, not per chunk.
template <typename T>
void run_stats_hist(const void* data, int64_t n, int64_t chunk, Partial* partials, int64_t* hist_row,
                    bool whole_tensor) {
  const T* x = static_cast<const T*>(data);
  ChunkHist<T> hist;                      // counters in memory
  typename ChunkHist<T>::Window window;   // its hot part, in registers
  const int64_t part = std::max(chunk, kMaxCountedRun / chunk * chunk);
  for (int64_t begin = 0; begin < n; begin += part) {
    const int64_t end = std::min(n, begin + part);
    hist.clear(window);
    for (int64_t offset = begin; offset < end; offset += chunk) {
      *partials++ = chunk_stats_impl<T, true>(x + offset, std::min(chunk, end - offset), &hist, &window);
    }
    hist.flush(window, x + begin, end - begin, hist_row, whole_tensor && end - begin == n);
  }
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
      {&run_stats_hist<float>, &run_stats_hist<double>, &run_stats_hist<c10::Half>,
       &run_stats_hist<c10::BFloat16>},
      {&scale<float>, &scale<double>, &scale<c10::Half>, &scale<c10::BFloat16>}};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace gradwatch::cpu
